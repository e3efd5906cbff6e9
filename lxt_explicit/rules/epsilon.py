"""The epsilon rule (AttnLRP Eq. 8) and the uniform-epsilon rule of bilinear maps (Proposition 3.3).

Calls of the torch functions that the library has an operation for (``F.linear``,
``torch.addmm``, sums, differences, means, matrix products) run that operation of
:mod:`lxt_explicit.functional`; every other callable gets the rule through a vector-Jacobian
product (:class:`~lxt_explicit.rules.graph.NodeRule`).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from .. import functional as lf
from ..ops import OP_GROUPS, argument
from ..stabilizer import DEFAULT_EPSILON, check_epsilon
from .base import RuleDeclined, carries_relevance, describe
from .graph import NodeRule, input_times_vjp, input_values, normalized_relevance, output_values

__all__ = ["EpsilonRule", "UniformEpsilonRule"]

Tensor = torch.Tensor


def _linear(rule, fn, args, kwargs):
    if not set(kwargs) <= {"input", "weight", "bias"} or len(args) > 3:
        raise RuleDeclined("F.linear is covered with input, weight and bias only")
    x, weight, bias = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "weight"), argument(
        args, kwargs, 2, "bias"
    )
    if carries_relevance(weight) or carries_relevance(bias):
        return rule.node(fn, args, kwargs)
    return lf.linear_epsilon(x, weight, bias, epsilon=rule.epsilon)


def _addmm(rule, fn, args, kwargs):
    if not set(kwargs) <= {"input", "mat1", "mat2", "beta", "alpha"} or len(args) > 3:
        raise RuleDeclined("torch.addmm is covered with input, mat1, mat2, beta and alpha only")
    bias, x, weight = (argument(args, kwargs, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
    if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or carries_relevance(bias) or carries_relevance(
        weight
    ):
        return rule.node(fn, args, kwargs)
    return lf.linear_epsilon(x, weight.t(), bias, epsilon=rule.epsilon)


_REFLECTED = frozenset({Tensor.__rsub__, Tensor.__radd__, Tensor.__rmatmul__})
_SUBTRACTIONS = frozenset(OP_GROUPS["sub"])


def _binary(fn, args, kwargs, allowed=()):
    if len(args) != 2 or any(key not in allowed for key in kwargs):
        raise RuleDeclined(f"{describe(fn)} is covered with two positional operands only")
    a, b = args
    return (b, a) if fn in _REFLECTED else (a, b)


def _add(rule, fn, args, kwargs):
    a, b = _binary(fn, args, kwargs, allowed=("alpha",))
    if kwargs.get("alpha", 1) != 1:
        return rule.node(fn, args, kwargs)
    if fn in _SUBTRACTIONS:
        b = lf.identity(torch.neg, b) if carries_relevance(b) else -b
    return lf.add2(a, b, epsilon=rule.epsilon)


_MEANS = frozenset(OP_GROUPS["mean"])


_REDUCTION_KEYWORDS = frozenset({"input", "dim", "axis", "keepdim", "dtype"})


def _reduction(rule, fn, args, kwargs):
    if not set(kwargs) <= _REDUCTION_KEYWORDS or len(args) > 3:
        raise RuleDeclined(f"{describe(fn)} is covered with input, dim (or axis), keepdim and dtype only")
    x = argument(args, kwargs, 0, "input")
    dim = argument(args, kwargs, 1, "dim", kwargs.get("axis"))
    keepdim = argument(args, kwargs, 2, "keepdim", False)
    if kwargs.get("dtype") is not None:
        x = x.to(kwargs["dtype"])
    if isinstance(dim, list):
        dim = tuple(dim)
    reduce = lf.mean if fn in _MEANS else lf.sum_epsilon
    return reduce(x, dim, keepdim, epsilon=rule.epsilon)


def _grouped_mm(rule, fn, args, kwargs):
    x, weight = argument(args, kwargs, 0, "mat_a" if fn is not torch._grouped_mm else "self"), argument(
        args, kwargs, 1, "mat_b" if fn is not torch._grouped_mm else "mat2"
    )
    offs = kwargs.get("offs")
    if carries_relevance(weight) or offs is None or kwargs.get("bias") is not None or kwargs.get("out_dtype"):
        return rule.node(fn, args, kwargs)
    return lf.grouped_linear_epsilon(x, weight, offs, epsilon=rule.epsilon)


_BATCH_SUMS = frozenset({torch.addbmm, Tensor.addbmm})
_MATRIX_PRODUCTS = frozenset({torch.addmm, Tensor.addmm})


def _matmul_add(rule, fn, args, kwargs):
    """``torch.baddbmm``, ``torch.addbmm`` and ``torch.addmm``: ``beta * input + alpha * (mat1 @ mat2)``."""
    names = ("input", "mat1", "mat2") if fn in _MATRIX_PRODUCTS else ("input", "batch1", "batch2")
    c, a, b = (argument(args, kwargs, i, name) for i, name in enumerate(names))
    if kwargs.get("out") is not None or not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise RuleDeclined(f"{describe(fn)} is covered for two tensor factors and no out= only")
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    return lf.matmul_add(c, a, b, beta=beta, alpha=alpha, batch_sum=fn in _BATCH_SUMS, epsilon=rule.epsilon)


def _addmm_uniform(rule, fn, args, kwargs):
    """``torch.addmm`` as a linear layer (the fast path) or, in general, as :func:`_matmul_add`."""
    bias, weight = argument(args, kwargs, 0, "input"), argument(args, kwargs, 2, "mat2")
    if kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and not carries_relevance(bias) and not (
        carries_relevance(weight)
    ):
        return _addmm(rule, fn, args, kwargs)
    return _matmul_add(rule, fn, args, kwargs)


def _matmul(rule, fn, args, kwargs):
    a, b = _binary(fn, args, kwargs)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise RuleDeclined(f"{describe(fn)} is covered for two tensors only")
    return lf.matmul(a, b, epsilon=rule.epsilon)


def _call_table(*pairs) -> dict:
    """Torch function -> how this rule runs a call of it, for every function of the named op groups."""
    return {func: call for group, call in pairs for func in OP_GROUPS[group]}


_LINEAR_CALLS = {func: (_addmm if func is torch.addmm else _linear) for func in OP_GROUPS["linear"]}


class EpsilonRule(NodeRule):
    r"""Epsilon rule, ``R_x = x \odot J^T (R_y / (y + eps sign y))`` (AttnLRP Eq. 8).

    For a linear map this is the epsilon-LRP rule of Bach et al. (2015); for
    any differentiable function it is Gradient x Input of the normalized
    relevance (a first-order Taylor expansion at the input with its bias
    absorbed).  Every relevance-carrying input receives its full share, as the
    summands of a sum should (:func:`~lxt_explicit.functional.add2`).

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    needs_graph = True
    calls = MappingProxyType(
        {**_LINEAR_CALLS, **_call_table(("add", _add), ("sub", _add), ("sum", _reduction), ("mean", _reduction))}
    )

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON):
        self.epsilon = check_epsilon(epsilon)

    def options(self):
        return {"epsilon": self.epsilon}

    def explain_call(self, fn, args, kwargs):
        try:
            call = self.calls.get(fn)
        except TypeError:  # an unhashable callable
            call = None
        if call is not None:
            return call(self, fn, args, kwargs)
        return self.node(fn, args, kwargs)

    def share(self, ctx) -> float:
        """The fraction of its epsilon-rule relevance that every input receives."""
        return 1.0

    def relevance(self, ctx, out_relevance):
        outputs, normalized = normalized_relevance(ctx, out_relevance, output_values(ctx), self.epsilon)
        return input_times_vjp(ctx, outputs, normalized, input_values(ctx), self.share(ctx))


class UniformEpsilonRule(EpsilonRule):
    r"""Epsilon rule followed by the uniform rule: each of the ``N`` relevance-carrying inputs gets ``1/N``.

    The rule of bilinear operations such as matrix products of two
    relevance-carrying operands (AttnLRP Proposition 3.3).  With one
    relevance-carrying input it is the epsilon rule: linear layers, convolutions
    and matrix products with a constant operand.  A product added to a scaled summand
    (``torch.baddbmm``, ``torch.addbmm``, ``torch.addmm``; BLOOM's attention scores with their
    ALiBi bias) runs :func:`~lxt_explicit.functional.matmul_add`: the epsilon rule of the sum, in
    which a constant summand absorbs its share, then this rule on the product.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    calls = MappingProxyType({
        **_LINEAR_CALLS, **_call_table(("matmul", _matmul), ("grouped_mm", _grouped_mm), ("matmul_add", _matmul_add)),
        torch.addmm: _addmm_uniform,
    })

    def apply(self, fn, args, kwargs):
        if fn is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
            args = (args[0], *args[1])  # operands given as one list: the same call with separate operands
        return super().apply(fn, args, kwargs)

    def share(self, ctx) -> float:
        return 1.0 / sum(ctx.needs)
