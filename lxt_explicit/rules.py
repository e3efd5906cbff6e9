"""Rules: LRP super-functions that wrap any module or callable.

A rule is a small configured object.  ``rule(fn, *inputs, **kwargs)`` returns
``fn(*inputs, **kwargs)`` unchanged, and its backward pass turns the relevance
of the outputs into relevance of the positional tensor inputs that require a
gradient.  Keyword arguments are passed through and receive no relevance.

The rules that need the local Jacobian (:class:`EpsilonRule`,
:class:`UniformEpsilonRule`, :class:`TaylorDecompositionRule`) compute it as a
vector-Jacobian product of ``fn`` at its inputs, so they apply to any
differentiable function.

Example
-------
>>> rule = EpsilonRule(epsilon=1e-6)
>>> y = rule(linear_module, x)          # same value as linear_module(x)
>>> y.backward(y)                       # x.grad now holds the relevance of x
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .functional import _sum_to_shape
from .stabilizer import DEFAULT_EPSILON, stabilized_quotient

__all__ = [
    "Rule",
    "EpsilonRule",
    "UniformEpsilonRule",
    "IdentityRule",
    "UniformRule",
    "StopRelevanceRule",
    "TaylorDecompositionRule",
]


def _carries_relevance(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _name_of(fn: Callable) -> str:
    return type(fn).__name__ if isinstance(fn, torch.nn.Module) else getattr(fn, "__qualname__", repr(fn))


def _output_tensors(output: Any, fn: Callable) -> tuple[tuple, bool]:
    """Return the outputs as a tuple and whether ``fn`` returned a tuple."""
    if isinstance(output, torch.Tensor):
        return (output,), False
    if isinstance(output, tuple) and any(isinstance(o, torch.Tensor) for o in output):
        return output, True
    raise TypeError(
        f"a rule can wrap only callables that return a tensor or a tuple of tensors; {_name_of(fn)} returned "
        f"{type(output).__name__}. Wrap the submodules that compute tensors instead, or give this module no rule."
    )


class _RuleFunction(Function):
    """Autograd node of a rule: plain forward, the rule's relevance in the backward pass."""

    @staticmethod
    def forward(ctx, rule, fn, kwargs, *args):
        needs = ctx.needs_input_grad[3:]
        if rule.needs_graph:
            inputs = tuple(
                a.detach().requires_grad_() if isinstance(a, torch.Tensor) and need else a
                for a, need in zip(args, needs)
            )
            with torch.enable_grad():
                output = fn(*inputs, **kwargs)
        else:
            inputs = args
            output = fn(*args, **kwargs)
        outputs, is_tuple = _output_tensors(output, fn)
        ctx.rule, ctx.needs = rule, needs
        ctx.input_meta = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else None for a in args)
        ctx.output_meta = tuple((o.shape, o.dtype) if isinstance(o, torch.Tensor) else None for o in outputs)
        rule._forward(ctx, fn, inputs, kwargs, outputs)
        detached = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        return detached if is_tuple else detached[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *out_relevance):
        relevance = ctx.rule._relevance(ctx, out_relevance)
        ctx.inputs = ctx.outputs = None
        return (None, None, None) + tuple(relevance)


class Rule:
    """Base class of the rules: a configured, stateless LRP rule for any callable.

    Subclasses set ``needs_graph`` when the backward pass needs the local
    Jacobian, and implement ``_relevance``.
    """

    needs_graph: bool = False

    def __call__(self, fn: Callable, *inputs, **kwargs):
        """Return ``fn(*inputs, **kwargs)``; the backward pass applies this rule.

        Parameters
        ----------
        fn : callable
            Module or function to explain.
        *inputs
            Positional arguments; the tensors among them that require a gradient receive relevance.
        **kwargs
            Passed to ``fn``; they receive no relevance.
        """
        if not torch.is_grad_enabled() or not any(_carries_relevance(a) for a in inputs):
            return fn(*inputs, **kwargs)
        return _RuleFunction.apply(self, fn, kwargs, *inputs)

    def copy(self) -> "Rule":
        """Return an independent copy of this rule (each module of a Composite gets one)."""
        return copy.copy(self)

    def _forward(self, ctx, fn, inputs, kwargs, outputs) -> None:
        if self.needs_graph:
            ctx.inputs, ctx.outputs = inputs, outputs

    def _relevance(self, ctx, out_relevance) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._options() == other._options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self._options().items(), key=lambda kv: kv[0]))))


def _single_relevance_input(ctx, rule_name: str) -> int:
    indices = [i for i, need in enumerate(ctx.needs) if need]
    if len(indices) != 1 or sum(m is not None for m in ctx.output_meta) != 1:
        raise ValueError(
            f"{rule_name} needs exactly one relevance-carrying input and one tensor output; got "
            f"{len(indices)} inputs and {sum(m is not None for m in ctx.output_meta)} outputs. "
            "Use UniformRule or UniformEpsilonRule for several inputs."
        )
    return indices[0]


class IdentityRule(Rule):
    r"""Identity rule, ``R_x = R_y``, for element-wise functions of one input (AttnLRP Eq. 9).

    Also the rule of normalization layers (division by a norm, multiplication
    by a constant), AttnLRP Proposition 3.4.  If the output is a broadcast of
    the input, relevance is summed back over the broadcast dimensions.
    """

    def _forward(self, ctx, fn, inputs, kwargs, outputs):
        index = _single_relevance_input(ctx, "IdentityRule")
        in_shape, out_shape = ctx.input_meta[index][0], outputs[0].shape
        try:
            element_wise = torch.broadcast_shapes(in_shape, out_shape) == out_shape
        except RuntimeError:
            element_wise = False
        if not element_wise:
            raise ValueError(
                f"IdentityRule needs an element-wise function, but {_name_of(fn)} maps shape {tuple(in_shape)} "
                f"to {tuple(out_shape)}. Use EpsilonRule or TaylorDecompositionRule for functions that mix elements."
            )
        ctx.index = index

    def _relevance(self, ctx, out_relevance):
        shape, dtype = ctx.input_meta[ctx.index]
        result = [None] * len(ctx.needs)
        result[ctx.index] = _sum_to_shape(out_relevance[0], shape).to(dtype)
        return result


class UniformRule(Rule):
    r"""Uniform rule, ``R_{x_i} = R_y / N`` for the ``N`` relevance-carrying inputs (AttnLRP Eq. 7).

    For element-wise functions of several inputs, such as products
    (Proposition 3.2).  Relevance of a broadcast input is summed over the
    broadcast dimensions.
    """

    def _forward(self, ctx, fn, inputs, kwargs, outputs):
        if sum(m is not None for m in ctx.output_meta) != 1:
            raise ValueError(f"UniformRule needs a function with one tensor output; {_name_of(fn)} has several")
        out_shape = outputs[0].shape
        for need, meta in zip(ctx.needs, ctx.input_meta):
            if need and torch.broadcast_shapes(meta[0], out_shape) != out_shape:
                raise ValueError(
                    f"UniformRule needs inputs that broadcast to the output; {_name_of(fn)} maps an input of shape "
                    f"{tuple(meta[0])} to {tuple(out_shape)}"
                )

    def _relevance(self, ctx, out_relevance):
        count = sum(ctx.needs)
        share = out_relevance[0] / count
        return [
            _sum_to_shape(share, meta[0]).to(meta[1]) if need else None for need, meta in zip(ctx.needs, ctx.input_meta)
        ]


class StopRelevanceRule(Rule):
    """Stop relevance: the output is returned detached, as a constant.

    Downstream rules see a constant (a product with it passes all relevance to
    the other factor) and no relevance reaches the inputs.  This is how CP-LRP
    treats attention weights.
    """

    def __call__(self, fn: Callable, *inputs, **kwargs):
        output = fn(*inputs, **kwargs)
        if isinstance(output, torch.Tensor):
            return output.detach()
        outputs, _ = _output_tensors(output, fn)
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)


def _normalized_relevance(ctx, out_relevance, denominators, epsilon):
    outputs, normalized = [], []
    for output, relevance, denominator in zip(ctx.outputs, out_relevance, denominators):
        if isinstance(output, torch.Tensor) and relevance is not None and output.requires_grad:
            outputs.append(output)
            normalized.append(stabilized_quotient(relevance, denominator, epsilon))
    return outputs, normalized


def _input_times_vjp(ctx, outputs, normalized, factors, scale=1.0):
    """``factor_i * (J^T normalized)_i`` for every relevance-carrying input."""
    indices = [i for i, need in enumerate(ctx.needs) if need]
    result = [None] * len(ctx.needs)
    if not outputs:
        return result
    grads = torch.autograd.grad(outputs, [ctx.inputs[i] for i in indices], normalized, allow_unused=True)
    for i, grad in zip(indices, grads):
        if grad is not None:
            result[i] = (factors[i] * grad * scale).to(ctx.input_meta[i][1])
    return result


class EpsilonRule(Rule):
    r"""Epsilon rule for any function: ``R_x = x \odot J^T (R_y / (y + eps sign y))`` (AttnLRP Eq. 8).

    For a linear map this is the epsilon-LRP rule of Bach et al. (2015); for
    any differentiable function it is Gradient x Input of the normalized
    relevance (a first-order Taylor expansion at the input with its bias
    absorbed).  All relevance-carrying inputs receive their full share.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    needs_graph = True

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON):
        if epsilon < 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon}")
        self.epsilon = float(epsilon)

    def _options(self):
        return {"epsilon": self.epsilon}

    def _share(self, ctx) -> float:
        return 1.0

    def _relevance(self, ctx, out_relevance):
        outputs, normalized = _normalized_relevance(ctx, out_relevance, ctx.outputs, self.epsilon)
        return _input_times_vjp(ctx, outputs, normalized, ctx.inputs, self._share(ctx))


class UniformEpsilonRule(EpsilonRule):
    r"""Epsilon rule followed by the uniform rule: each of the ``N`` inputs gets ``1/N`` of its epsilon relevance.

    The rule of bilinear operations such as matrix products of two
    relevance-carrying operands (AttnLRP Proposition 3.3).

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    def _share(self, ctx) -> float:
        return 1.0 / sum(ctx.needs)


class TaylorDecompositionRule(Rule):
    r"""First-order Taylor decomposition of any function (AttnLRP Eq. 4-5).

    With a reference point :math:`\tilde x` the function is expanded as
    :math:`f(x) \approx f(\tilde x) + J(\tilde x)(x - \tilde x)` and input
    :math:`i` receives :math:`\sum_j (x_i - \tilde x_i) J_{ji}(\tilde x) R_j / d_j`.
    With ``reference=None`` the function is linearized at the input itself,
    :math:`f(x) = J(x)\,x + \beta`, and input :math:`i` receives
    :math:`\sum_j x_i J_{ji}(x) R_j / d_j` (the decomposition behind the
    softmax rule, Proposition 3.1).

    Parameters
    ----------
    reference : None, float, tensor, callable or tuple, optional
        Reference point :math:`\tilde x`: a number or tensor for every input, a
        callable ``input -> reference``, or a tuple with one of these per
        positional input.  ``None`` (default) linearizes at the input.
    bias : bool, optional
        If ``True`` (default) the denominators are the outputs
        :math:`d_j = f_j(x)`, so the zero-order (bias) term absorbs its share.
        If ``False`` they are the first-order terms, so relevance is conserved
        exactly: :math:`\sum_i R_{x_i} = \sum_j R_j`.
    epsilon : float, optional
        Stabilizer of the denominators.
    """

    needs_graph = True

    def __init__(self, *, reference=None, bias: bool = True, epsilon: float = DEFAULT_EPSILON):
        self.reference = reference
        self.bias = bool(bias)
        self.epsilon = float(epsilon)

    def _options(self):
        reference = self.reference if isinstance(self.reference, (type(None), int, float)) else id(self.reference)
        return {"reference": reference, "bias": self.bias, "epsilon": self.epsilon}

    def _reference_for(self, index, value):
        reference = self.reference[index] if isinstance(self.reference, tuple) else self.reference
        if callable(reference):
            reference = reference(value)
        if isinstance(reference, torch.Tensor):
            return reference.to(value).expand_as(value)
        return torch.full_like(value, float(reference))

    def _forward(self, ctx, fn, inputs, kwargs, outputs):
        ctx.outputs = outputs
        if self.reference is None:
            ctx.inputs = inputs
            ctx.factors = tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inputs)
        else:
            points = tuple(
                self._reference_for(i, a.detach()).requires_grad_() if need else a
                for i, (a, need) in enumerate(zip(inputs, ctx.needs))
            )
            with torch.enable_grad():
                at_reference = fn(*points, **kwargs)
            ctx.inputs = points
            ctx.outputs, _ = _output_tensors(at_reference, fn)
            ctx.factors = tuple(
                (a.detach() - p.detach()) if need else None for a, p, need in zip(inputs, points, ctx.needs)
            )
        if self.bias:
            ctx.denominators = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        else:
            ctx.denominators = self._first_order_terms(ctx, fn, kwargs)

    def _first_order_terms(self, ctx, fn, kwargs):
        """``J(x~) (x - x~)`` (or ``J(x) x``) per output, by forward-mode differentiation."""
        primals = tuple(p.detach() if isinstance(p, torch.Tensor) else p for p in ctx.inputs)
        indices = [i for i, need in enumerate(ctx.needs) if need]

        def partial_fn(*relevant):
            args = list(primals)
            for i, value in zip(indices, relevant):
                args[i] = value
            return fn(*args, **kwargs)

        tangents = tuple(ctx.factors[i] for i in indices)
        _, terms = torch.func.jvp(partial_fn, tuple(primals[i] for i in indices), tangents)
        return terms if isinstance(terms, tuple) else (terms,)

    def _relevance(self, ctx, out_relevance):
        outputs, normalized = _normalized_relevance(ctx, out_relevance, ctx.denominators, self.epsilon)
        return _input_times_vjp(ctx, outputs, normalized, ctx.factors)
