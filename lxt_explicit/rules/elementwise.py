"""Rules of element-wise functions: identity (AttnLRP Eq. 9) and uniform (Eq. 7, Proposition 3.2)."""

from __future__ import annotations

import torch

from .. import functional as lf
from ..functional.shapes import sum_to_shape
from ..ops import OP_GROUPS, argument
from ..stabilizer import DEFAULT_EPSILON, check_epsilon
from .base import RuleDeclined, carries_relevance, describe
from .graph import NodeRule

__all__ = ["IdentityRule", "ActivationRule", "DivisionRule", "DropoutRule", "UniformRule"]

_PRODUCTS = frozenset(OP_GROUPS["mul"])


class IdentityRule(NodeRule):
    r"""Identity rule, ``R_x = R_y``, for element-wise functions of one input (AttnLRP Eq. 9).

    Also the rule of normalization layers (division by a norm, multiplication
    by a constant), AttnLRP Proposition 3.4, of negation, of division by a
    constant and of dropout.  If the output is a broadcast of the input,
    relevance is summed back over the broadcast dimensions.  Declines calls
    with more than one relevance-carrying input.
    """

    function = staticmethod(lf.identity)

    def explain_call(self, fn, args, kwargs):
        relevant = [i for i, a in enumerate(args) if carries_relevance(a)]
        if len(relevant) != 1 or any(carries_relevance(v) for v in kwargs.values()):
            count = len(relevant) + sum(carries_relevance(v) for v in kwargs.values())
            raise RuleDeclined(
                f"{type(self).__name__} needs exactly one relevance-carrying input; {describe(fn)} got {count}. "
                "Use UniformRule or UniformEpsilonRule for several inputs."
            )
        index = relevant[0]

        def of_one_input(tensor):
            values = list(args)
            values[index] = tensor
            return fn(*values, **kwargs)

        try:
            return self.function(of_one_input, args[index])
        except lf.NotElementWise as error:  # e.g. a module named like a norm that returns a per-row scale
            raise RuleDeclined(f"{type(self).__name__} on {describe(fn)}: {error}") from error


class ActivationRule(IdentityRule):
    """The identity rule for element-wise non-linearities (SiLU, GELU, tanh, ...), AttnLRP Eq. 9.

    Equal to :class:`IdentityRule`; in addition, the outputs are recognised as *gates*
    (:func:`~lxt_explicit.functional.is_gate`), which ``UniformRule(gates="constant")`` treats as
    constants in a product (CP-LRP for gated MLPs).
    """

    function = staticmethod(lf.activation)


class DivisionRule(IdentityRule):
    r"""Division ``a / d``: the identity rule on the dividend; the divisor is a normalizer (AttnLRP Proposition 3.4).

    Division by a constant passes relevance unchanged (identity rule).  A divisor that carries
    relevance itself, such as the sum of a mixture-of-experts router's selected weights
    (``w / w.sum(-1, keepdim=True)``) or a norm written out by hand, is treated as a constant,
    as the normalization rules treat the norm: the dividend receives all relevance.  A constant
    divided by a relevance-carrying tensor (``c / x``) is an element-wise function of ``x``.
    """

    _REFLECTED = frozenset({torch.Tensor.__rtruediv__, torch.Tensor.__rdiv__})

    def explain_call(self, fn, args, kwargs):
        if len(args) == 2 and carries_relevance(args[0]) and carries_relevance(args[1]):
            # the divisor: the second operand of a / d, the first of the reflected d.__rtruediv__(a)
            args = (args[0].detach(), args[1]) if fn in self._REFLECTED else (args[0], args[1].detach())
        return super().explain_call(fn, args, kwargs)


class DropoutRule(IdentityRule):
    """Dropout: the identity rule while it drops units (training); in eval mode it is not there at all.

    In eval mode (or with ``p == 0``) dropout returns its input unchanged, so the call runs as it is
    (no operation is added, and the input stays the tensor the model changes in place, if it does).
    """

    def explain_call(self, fn, args, kwargs):
        if not argument(args, kwargs, 2, "training", True) or argument(args, kwargs, 1, "p", 0.5) == 0:
            return fn(*args, **kwargs)
        return super().explain_call(fn, args, kwargs)


def _without_gates(args: tuple) -> tuple:
    """Detach the gates among the relevance-carrying arguments, if another relevance-carrying argument remains."""
    gates = [carries_relevance(a) and lf.is_gate(a) for a in args]
    others = [carries_relevance(a) and not gate for a, gate in zip(args, gates)]
    if not any(gates) or not any(others):
        return args
    return tuple(a.detach() if gate else a for a, gate in zip(args, gates))


class UniformRule(NodeRule):
    r"""Uniform rule, ``R_{x_i} = R_y / N`` for the ``N`` relevance-carrying inputs (AttnLRP Eq. 7).

    For element-wise functions of several inputs, such as products
    (Proposition 3.2): a product with a constant factor passes all relevance to
    the other factor.  Relevance of a broadcast input is summed over the
    broadcast dimensions.

    Parameters
    ----------
    gates : {'relevant', 'constant'}, optional
        ``'relevant'`` (AttnLRP): every relevance-carrying factor gets its share, including the
        gate of a gated MLP, ``act(gate_proj(x)) * up_proj(x)``.  ``'constant'`` (CP-LRP as the
        reference implementation defines it): a factor that is the output of an element-wise
        non-linearity (:class:`ActivationRule`) is a gate and treated as a constant when another
        factor carries relevance, so the whole relevance goes to the other factor.
    epsilon : float, optional
        Stabilizer of products with a complex constant (see :func:`~lxt_explicit.functional.mul2`).
    """

    def __init__(self, *, gates: str = "relevant", epsilon: float = DEFAULT_EPSILON):
        if gates not in ("relevant", "constant"):
            raise ValueError(f"gates must be 'relevant' or 'constant', got {gates!r}")
        self.gates = gates
        self.epsilon = check_epsilon(epsilon)

    def options(self):
        return {"gates": self.gates, "epsilon": self.epsilon}

    def explain_call(self, fn, args, kwargs):
        if self.gates == "constant":
            args = _without_gates(args)
        if fn in _PRODUCTS and len(args) == 2 and not kwargs:
            return lf.mul2(*args, epsilon=self.epsilon)
        return self.node(fn, args, kwargs)

    def record(self, ctx, fn, inputs, kwargs, outputs):
        if sum(m is not None for m in ctx.output_meta) != 1:
            raise ValueError(f"UniformRule needs a function with one tensor output; {describe(fn)} has several")
        out_shape = outputs[0].shape
        for need, meta in zip(ctx.needs, ctx.input_meta):
            if need and torch.broadcast_shapes(meta[0], out_shape) != out_shape:
                raise ValueError(
                    f"UniformRule needs inputs that broadcast to the output; {describe(fn)} maps an input of shape "
                    f"{tuple(meta[0])} to {tuple(out_shape)}"
                )

    def relevance(self, ctx, out_relevance):
        share = out_relevance[0] / sum(ctx.needs)
        return [
            sum_to_shape(share, meta[0]).to(meta[1]) if need else None
            for need, meta in zip(ctx.needs, ctx.input_meta)
        ]
