"""Element-wise operations: sums (epsilon rule), products (uniform rule), element-wise functions (identity rule)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, sign_shift, stabilized_quotient
from .shapes import compute_dtype, not_a_view, sum_to_shape

__all__ = [
    "add2",
    "add_relevance",
    "mul2",
    "identity",
    "activation",
    "is_gate",
    "rms_norm_identity",
    "normalize",
    "NotElementWise",
]

# ----------------------------------------------------------------------------------------- sums


def add_relevance(a, b, out, relevance, epsilon: float, needs=(True, True)):
    r"""The epsilon rule of ``z = a + b`` written out (Eq. 8): ``R_a = a R / stab(z)``, ``R_b = b R / stab(z)``.

    If only one operand carries relevance, the other is a constant (a bias, a mask): it absorbs
    exactly its share and the stabilizer's share stays with the relevance-carrying operand,
    ``R_a = (a + e) R / (z + e)`` with ``e = eps sign(z)``, so that adding zero passes relevance
    unchanged.  Returns the relevance of both operands (``None`` where not needed), summed over
    broadcast dimensions, in the compute dtype.
    """
    dtype = compute_dtype(out)
    out, relevance = out.to(dtype), relevance.to(dtype)
    if all(needs):
        normed = stabilized_quotient(relevance, out, epsilon)
        return sum_to_shape(normed * a.to(dtype), a.shape), sum_to_shape(normed * b.to(dtype), b.shape)
    own = a if needs[0] else b
    shift = sign_shift(out, epsilon)
    own_relevance = sum_to_shape(relevance * ((own.to(dtype) + shift) / (out + shift)), own.shape)
    return (own_relevance, None) if needs[0] else (None, own_relevance)


def _looks_like_residual(tensor: torch.Tensor) -> bool:
    """A residual stream: an input of the explanation (a leaf) or the result of an earlier sum."""
    node = tensor.grad_fn
    return node is None or getattr(type(node), "_forward_cls", None) is _Add2


class _Add2(Function):
    """Epsilon rule for the addition of two operands."""

    @staticmethod
    def forward(ctx, a, b, epsilon):
        out = torch.add(a, b)
        ctx.epsilon = epsilon
        ctx.constants = tuple(None if isinstance(t, torch.Tensor) else t for t in (a, b))
        ctx.kept = None
        needs = ctx.needs_input_grad[:2]
        if all(needs) and a.shape == b.shape == out.shape:
            # Keep the sum (later operations store it anyway) and the branch added to a residual
            # stream; the residual is the difference, exact to a rounding of the sum relative to
            # itself.  Decided from the graph, without reading values (no device synchronization).
            ctx.kept = 0 if (_looks_like_residual(b) and not _looks_like_residual(a)) else 1
            ctx.save_for_backward((a, b)[ctx.kept], out)
        elif any(needs):
            ctx.save_for_backward(*(t if isinstance(t, torch.Tensor) else None for t in (a, b)))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[:2]
        if not any(needs):
            return None, None, None
        if ctx.kept is not None:
            kept, out = ctx.saved_tensors
            other = out - kept
            a, b = (kept, other) if ctx.kept == 0 else (other, kept)
        else:
            a, b = (s if s is not None else c for s, c in zip(ctx.saved_tensors, ctx.constants))
            out = torch.add(a, b)
        relevance_a, relevance_b = add_relevance(a, b, out, relevance, ctx.epsilon, needs)
        return (
            relevance_a.to(a.dtype) if needs[0] else None,
            relevance_b.to(b.dtype) if needs[1] else None,
            None,
        )


def add2(a, b, *, epsilon: float = DEFAULT_EPSILON):
    r"""Element-wise ``a + b`` (with broadcasting) and the epsilon rule in the backward pass.

    .. math:: R_a = \frac{a}{z + \epsilon\,\mathrm{sign}(z)} R, \qquad R_b = \frac{b}{z + \epsilon\,\mathrm{sign}(z)} R

    (AttnLRP Eq. 8 applied to a sum).  If only one operand requires a gradient,
    the other is a constant (a bias, an attention mask): it absorbs exactly its
    share ``c / (z + eps sign z)`` and the relevance-carrying operand receives
    the rest, so adding a zero passes relevance unchanged (see :func:`add_relevance`).
    Relevance of a broadcast operand is summed over the broadcast dimensions.

    Parameters
    ----------
    a, b : torch.Tensor or number
        Summands.
    epsilon : float, optional
        Stabilizer of the denominator.

    Returns
    -------
    torch.Tensor
        ``torch.add(a, b)``.
    """
    return _Add2.apply(a, b, check_epsilon(epsilon))


# ------------------------------------------------------------------------------------- products


class _Mul2(Function):
    """Uniform rule for the product of two operands."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = tuple(t.shape if isinstance(t, torch.Tensor) else None for t in (a, b))
        ctx.dtypes = tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in (a, b))
        return not_a_view(torch.mul(a, b))

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[:2]
        if not any(needs):
            return None, None
        share = relevance * 0.5 if all(needs) else relevance
        return tuple(
            sum_to_shape(share, shape).to(dtype) if need else None
            for need, shape, dtype in zip(needs, ctx.shapes, ctx.dtypes)
        )


class _ComplexScale(Function):
    """Epsilon rule for a complex tensor times a complex constant (a rotation and scaling of each (re, im) pair)."""

    @staticmethod
    def forward(ctx, x, c, epsilon):
        out = torch.mul(x, c)
        ctx.save_for_backward(x, c, out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        x, c, out = ctx.saved_tensors
        c = c.expand_as(out)
        normed_re = stabilized_quotient(relevance.real, out.real.clone(), ctx.epsilon)
        normed_im = stabilized_quotient(relevance.imag, out.imag.clone(), ctx.epsilon)
        a, b, p, q = x.real, x.imag, c.real, c.imag
        relevance_a = a * (p * normed_re + q * normed_im)  # re(z) = a p - b q, im(z) = a q + b p
        relevance_b = b * (p * normed_im - q * normed_re)
        return sum_to_shape(torch.complex(relevance_a, relevance_b), x.shape).to(x.dtype), None, None


def _is_complex_constant(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_complex() and not value.requires_grad


def mul2(a, b, *, epsilon: float = DEFAULT_EPSILON):
    r"""Element-wise ``a * b`` (with broadcasting) and the uniform rule in the backward pass.

    .. math:: R_a = R_b = \tfrac{1}{2} R

    (AttnLRP Proposition 3.2).  A constant operand, or one that does not
    require a gradient, receives nothing and the other operand receives all of
    the relevance: multiplication by a constant passes relevance unchanged.

    A complex tensor times a complex constant (rotary embeddings in complex form) mixes the real
    and imaginary parts of each element: a linear map of the pair ``(re, im)``, which gets the
    epsilon rule (Eq. 8) with stabilizer ``epsilon``, as the real form of the same rotation does.

    Parameters
    ----------
    a, b : torch.Tensor or number
        Factors.
    epsilon : float, optional
        Stabilizer of the epsilon rule for complex constants.

    Returns
    -------
    torch.Tensor
        ``torch.mul(a, b)``.
    """
    if isinstance(a, torch.Tensor) and a.is_complex() and a.requires_grad and _is_complex_constant(b):
        return _ComplexScale.apply(a, b, check_epsilon(epsilon))
    if isinstance(b, torch.Tensor) and b.is_complex() and b.requires_grad and _is_complex_constant(a):
        return _ComplexScale.apply(b, a, check_epsilon(epsilon))
    return _Mul2.apply(a, b)


# ---------------------------------------------------------------------------- element-wise maps


class NotElementWise(ValueError):
    """The identity rule was given a function whose output mixes the elements of its input."""


def _check_element_wise(x: torch.Tensor, out) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the identity rule needs a function that returns a tensor, got {type(out).__name__}")
    try:
        element_wise = torch.broadcast_shapes(out.shape, x.shape) == out.shape
    except RuntimeError:
        element_wise = False
    if not element_wise:
        raise NotElementWise(
            "the identity rule needs an element-wise function (the output keeps the input's shape, "
            f"or broadcasts it); got input {tuple(x.shape)} and output {tuple(out.shape)}. "
            "Use an epsilon or Taylor rule for functions that mix elements."
        )


class _Identity(Function):
    """Identity rule: the relevance of the output is the relevance of the input."""

    @staticmethod
    def forward(ctx, fn, x):
        out = fn(x)
        _check_element_wise(x, out)
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return not_a_view(out, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        return None, sum_to_shape(relevance, ctx.input_shape).to(ctx.input_dtype)


class _Activation(_Identity):
    """Identity rule for an element-wise non-linearity; its outputs are recognised as gates (:func:`is_gate`)."""


def identity(fn: Callable[[torch.Tensor], torch.Tensor], x):
    r"""Apply an element-wise function ``fn`` and pass relevance through unchanged, ``R_x = R_y``.

    The identity rule (AttnLRP Eq. 9) for element-wise functions such as
    negation, division by a constant or dropout, and for normalizations.

    Parameters
    ----------
    fn : callable
        Element-wise function of one tensor.
    x : torch.Tensor
        Input.

    Returns
    -------
    torch.Tensor
        ``fn(x)``.
    """
    return _Identity.apply(fn, x)


def activation(fn: Callable[[torch.Tensor], torch.Tensor], x):
    r"""The identity rule ``R_x = R_y`` (AttnLRP Eq. 9) for an element-wise non-linearity (SiLU, GELU, tanh, ...).

    Equal to :func:`identity`, and in addition the output is recognised by :func:`is_gate`:
    in a product ``act(g) * u`` the activation's output is the gate.
    """
    return _Activation.apply(fn, x)


#: Autograd nodes that only move, view or cast their input (walked through by :func:`is_gate`).
_SHAPE_NODES = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ToCopyBackward0", "ExpandBackward0",
        "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "TransposeBackward0", "PermuteBackward0",
        "CloneBackward0", "SliceBackward0", "SelectBackward0", "SplitBackward0", "SplitWithSizesBackward0",
        "UnbindBackward0", "AliasBackward0",
    }
)


def is_gate(tensor: torch.Tensor, *, depth: int = 4) -> bool:
    """Whether ``tensor`` is the output of an element-wise non-linearity (:func:`activation`), up to views and casts.

    Gated MLPs compute ``act(gate_proj(x)) * up_proj(x)``; CP-LRP treats the activation's output
    as a constant gate.  Decided from the autograd graph, without reading values.
    """
    node = tensor.grad_fn if isinstance(tensor, torch.Tensor) else None
    for _ in range(depth + 1):
        if node is None:
            return False
        if getattr(type(node), "_forward_cls", None) is _Activation:
            return True
        if type(node).__name__ not in _SHAPE_NODES or not node.next_functions:
            return False
        node = node.next_functions[0][0]
    return False


def rms_norm_identity(x, weight, eps: float | None = None):
    r"""RMS normalization ``x / rms(x) * weight`` with the identity rule, ``R_x = R_y``.

    The division by the root mean square and the multiplication by the weight
    both get the identity rule (AttnLRP Proposition 3.4).

    Parameters
    ----------
    x : torch.Tensor
        Input; normalized over its last dimension.
    weight : torch.Tensor or None
        Element-wise scale.
    eps : float, optional
        The layer's epsilon (forward pass), as in :func:`torch.nn.functional.rms_norm`.

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)``.
    """
    shape = tuple(weight.shape) if weight is not None else (x.shape[-1],)
    return _Identity.apply(lambda t: F.rms_norm(t, shape, weight, eps), x)


def normalize(x, p: float = 2.0, dim: int = 1, eps: float = 1e-12):
    r"""``torch.nn.functional.normalize`` with the identity rule, ``R_x = R_y`` (AttnLRP Proposition 3.4).

    Parameters
    ----------
    x : torch.Tensor
        Input.
    p, dim, eps
        As in :func:`torch.nn.functional.normalize`.

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.normalize(x, p, dim, eps)``.
    """
    return _Identity.apply(lambda t: F.normalize(t, p=p, dim=dim, eps=eps), x)
