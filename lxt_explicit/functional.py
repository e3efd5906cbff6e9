"""Explicit LRP operations: one :class:`torch.autograd.Function` per operation.

Every operation's forward pass returns exactly what the corresponding torch
operation returns.  Its backward pass receives the relevance of the output in
the gradient slot and returns the relevance of the inputs, so that after
``y.backward(y)`` the ``.grad`` of an input *is* its relevance.

Relevance flows into every input that requires a gradient; inputs that do not
(constants, frozen parameters, Python numbers) receive none.  Equation numbers
refer to Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance
Propagation for Transformers", ICML 2024.

Half-precision inputs are handled in float32 inside every backward pass (the
divisions and the sums over rows), and the relevance is returned in the
input's dtype, as autograd requires.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .stabilizer import DEFAULT_EPSILON, sign_shift, stabilize, stabilized_quotient

__all__ = [
    "linear_epsilon",
    "softmax",
    "matmul",
    "add2",
    "mul2",
    "mean",
    "sum_epsilon",
    "layer_norm",
    "rms_norm_identity",
    "normalize",
    "identity",
    "scaled_dot_product_attention",
]

_HALF = (torch.float16, torch.bfloat16)

#: Attention backward passes process this many score elements at a time at most: on the CPU a block
#: that stays in cache (about 4 MB in float32) runs the element-wise steps twice as fast as one
#: large block; on accelerators large blocks keep the kernels busy.
_ATTENTION_BLOCK_ELEMENTS = {"cpu": 1 << 20}
_ATTENTION_BLOCK_ELEMENTS_DEFAULT = 1 << 26


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Dtype in which relevance is computed: float32 for half precision, else the tensor's own."""
    return torch.float32 if tensor.dtype in _HALF else tensor.dtype


def _sum_to_shape(relevance: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum relevance over the dimensions along which an operand of ``shape`` was broadcast."""
    if relevance.shape == shape:
        return relevance
    extra = relevance.dim() - len(shape)
    if extra > 0:
        relevance = relevance.sum(dim=tuple(range(extra)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and relevance.shape[i] != 1)
    if dims:
        relevance = relevance.sum(dim=dims, keepdim=True)
    return relevance


def _check_epsilon(epsilon: float) -> float:
    if not isinstance(epsilon, (int, float)) or epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite non-negative number, got {epsilon!r}")
    return float(epsilon)


# ---------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------


#: Output layers at least this many times wider than their input (vocabulary projections) do not
#: store their output for the backward pass; it recomputes the rows that carry relevance.
_RECOMPUTE_WIDENING = 8


class _LinearEpsilon(Function):
    """Epsilon rule for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        out = F.linear(x, weight, bias)
        if ctx.needs_input_grad[0]:
            ctx.keeps_output = out.shape[-1] < _RECOMPUTE_WIDENING * x.shape[-1]
            ctx.save_for_backward(x, weight, bias, out if ctx.keeps_output else None)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, weight, bias, out = ctx.saved_tensors
        rows = _rows_with_relevance(relevance)
        if rows is None:
            out = out if out is not None else F.linear(x, weight, bias)
            return _linear_relevance(x, weight, out, relevance, ctx.epsilon), None, None, None
        # Only some positions carry relevance (e.g. the explained token of an output layer):
        # the others receive exactly zero, so skip them.
        x_rows = x.reshape(-1, x.shape[-1])[rows]
        out_rows = F.linear(x_rows, weight, bias) if out is None else out.reshape(-1, out.shape[-1])[rows]
        result = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        result.view(-1, x.shape[-1])[rows] = _linear_relevance(
            x_rows, weight, out_rows, relevance.reshape(-1, relevance.shape[-1])[rows], ctx.epsilon
        )
        return result, None, None, None


def _rows_with_relevance(relevance: torch.Tensor):
    """Indices of the rows (positions) with non-zero relevance, or ``None`` if (almost) all rows have some."""
    if relevance.dim() < 2 or relevance.numel() < (1 << 16):
        return None
    flat = relevance.reshape(-1, relevance.shape[-1])
    if flat[0].any():  # inside a network the first position nearly always carries relevance: dense
        return None
    rows = flat.any(-1).nonzero().squeeze(-1)
    return rows if rows.numel() < 0.5 * flat.shape[0] else None


def _linear_relevance(x, weight, out, relevance, epsilon):
    dtype = _compute_dtype(out)
    normed = stabilized_quotient(relevance.to(dtype), out.to(dtype), epsilon)
    relevance_x = (normed.to(weight.dtype) @ weight).to(dtype).mul_(x.to(dtype))
    return relevance_x.to(x.dtype)


def linear_epsilon(x, weight, bias=None, *, epsilon: float = DEFAULT_EPSILON):
    r"""Linear layer ``x @ weight.T + bias`` with the epsilon rule in the backward pass.

    .. math:: R_{x_i} = \sum_j \frac{x_i W_{ji}}{z_j + \epsilon\,\mathrm{sign}(z_j)} R_j

    (AttnLRP Eq. 8).  The bias and the stabilizer absorb their share of the
    relevance; without a bias and with ``epsilon -> 0`` relevance is conserved.

    Parameters
    ----------
    x : torch.Tensor
        Input of shape ``(..., in_features)``; the only operand that receives relevance.
    weight : torch.Tensor
        Weight of shape ``(out_features, in_features)``.
    bias : torch.Tensor, optional
        Bias of shape ``(out_features,)``.
    epsilon : float, optional
        Stabilizer of the denominator.

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.linear(x, weight, bias)``.
    """
    return _LinearEpsilon.apply(x, weight, bias, _check_epsilon(epsilon))


# ---------------------------------------------------------------------------
# Softmax
# ---------------------------------------------------------------------------


class _Softmax(Function):
    """Deep-Taylor rule with bias for the softmax."""

    @staticmethod
    def forward(ctx, x, dim, dtype, temperature):
        logits = x if temperature == 1.0 else x / temperature
        out = torch.softmax(logits, dim, dtype=dtype)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, out)
        ctx.dim, ctx.input_dtype = dim, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits, out = ctx.saved_tensors
        dtype = _compute_dtype(out)
        relevance = relevance.to(dtype)
        out = out.to(dtype)
        logits = logits.to(dtype)
        total = relevance.sum(ctx.dim, keepdim=True)
        relevance_x = (relevance - out * total) * logits
        # Masked logits (-inf) have zero probability and receive no relevance: -inf * 0 would be NaN.
        relevance_x = torch.where(torch.isinf(logits), 0.0, relevance_x)
        return relevance_x.to(ctx.input_dtype), None, None, None


def softmax(x, dim: int, *, dtype: torch.dtype | None = None, temperature: float = 1.0):
    r"""Softmax with the deep-Taylor rule (with bias) in the backward pass.

    .. math:: R_{x_i} = x_i \Big(R_i - s_i \sum_j R_j\Big)

    (AttnLRP Proposition 3.1), with ``x`` the logits after the temperature.
    Logits that are masked with ``-inf`` or a very negative number receive zero
    relevance.

    Parameters
    ----------
    x : torch.Tensor
        Logits.
    dim : int
        Dimension along which the softmax is taken.
    dtype : torch.dtype, optional
        Cast the logits to this dtype first, as ``torch.softmax(..., dtype=dtype)`` does.
    temperature : float, optional
        The softmax is taken of ``x / temperature``.

    Returns
    -------
    torch.Tensor
        ``torch.softmax(x / temperature, dim, dtype=dtype)``.
    """
    if temperature == 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite non-zero number, got {temperature!r}")
    return _Softmax.apply(x, dim, dtype, float(temperature))


# ---------------------------------------------------------------------------
# Matrix multiplication
# ---------------------------------------------------------------------------


def _as_matrices(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor):
    """Bring 1-D operands of ``torch.matmul`` and the output relevance to matrix form."""
    if a.dim() == 1:
        a = a.unsqueeze(0)
        g = g.unsqueeze(-2)
    if b.dim() == 1:
        b = b.unsqueeze(-1)
        g = g.unsqueeze(-1)
    return a, b, g


class _Matmul(Function):
    """Epsilon rule followed by the uniform rule for ``torch.matmul``."""

    @staticmethod
    def forward(ctx, a, b, epsilon):
        out = torch.matmul(a, b)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(a, b, out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs_a, needs_b = ctx.needs_input_grad[:2]
        if not (needs_a or needs_b):
            return None, None, None
        a, b, out = ctx.saved_tensors
        dtype = _compute_dtype(out)
        share = 0.5 if (needs_a and needs_b) else 1.0
        normed = stabilized_quotient(relevance.to(dtype) * share, out.to(dtype), ctx.epsilon)
        a_m, b_m, g = _as_matrices(a.to(dtype), b.to(dtype), normed)
        relevance_a = relevance_b = None
        if needs_a:
            relevance_a = _sum_to_shape((g @ b_m.transpose(-1, -2)) * a_m, a_m.shape)
            relevance_a = relevance_a.reshape(a.shape).to(a.dtype)
        if needs_b:
            relevance_b = _sum_to_shape((a_m.transpose(-1, -2) @ g) * b_m, b_m.shape)
            relevance_b = relevance_b.reshape(b.shape).to(b.dtype)
        return relevance_a, relevance_b, None


def matmul(a, b, *, epsilon: float = DEFAULT_EPSILON):
    r"""Matrix product ``a @ b`` with the epsilon rule followed by the uniform rule.

    .. math:: R_{a_{ik}} = \frac{1}{2}\sum_j \frac{a_{ik} b_{kj}}{z_{ij} + \epsilon\,\mathrm{sign}(z_{ij})} R_{ij}

    and symmetrically for ``b`` (AttnLRP Proposition 3.3).  When only one
    operand requires a gradient it is the only input of a linear map and
    receives the whole epsilon-rule relevance (no halving).  Batch dimensions
    broadcast as in :func:`torch.matmul`.

    Parameters
    ----------
    a, b : torch.Tensor
        Operands of :func:`torch.matmul`.
    epsilon : float, optional
        Stabilizer of the denominator.

    Returns
    -------
    torch.Tensor
        ``torch.matmul(a, b)``.
    """
    return _Matmul.apply(a, b, _check_epsilon(epsilon))


# ---------------------------------------------------------------------------
# Element-wise addition and multiplication
# ---------------------------------------------------------------------------


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
            # Keep the sum (later operations store it anyway) and the smaller summand; the larger one is
            # the difference, exact to a rounding of the sum relative to itself.
            ctx.kept = 0 if a.abs().mean() <= b.abs().mean() else 1
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
            small, out = ctx.saved_tensors
            large = out - small
            a, b = (small, large) if ctx.kept == 0 else (large, small)
        else:
            a, b = (s if s is not None else c for s, c in zip(ctx.saved_tensors, ctx.constants))
            out = torch.add(a, b)
        dtype = _compute_dtype(out)
        out = out.to(dtype)
        relevance = relevance.to(dtype)
        operands = (a, b)
        if all(needs):
            normed = stabilized_quotient(relevance, out, ctx.epsilon)
            return (
                _sum_to_shape(normed * a.to(dtype), a.shape).to(a.dtype),
                _sum_to_shape(normed * b.to(dtype), b.shape).to(b.dtype),
                None,
            )
        # One operand is a constant (a bias or a mask): it absorbs exactly its share
        # c / (z + eps sign z); the other operand keeps its own share and the stabilizer's.
        index = 0 if needs[0] else 1
        own = operands[index]
        shift = sign_shift(out, ctx.epsilon)
        own_relevance = relevance * ((own.to(dtype) + shift) / (out + shift))
        own_relevance = _sum_to_shape(own_relevance, own.shape).to(own.dtype)
        return (own_relevance, None, None) if index == 0 else (None, own_relevance, None)


def add2(a, b, *, epsilon: float = DEFAULT_EPSILON):
    r"""Element-wise ``a + b`` (with broadcasting) and the epsilon rule in the backward pass.

    .. math:: R_a = \frac{a}{z + \epsilon\,\mathrm{sign}(z)} R, \qquad R_b = \frac{b}{z + \epsilon\,\mathrm{sign}(z)} R

    (AttnLRP Eq. 8 applied to a sum).  If only one operand requires a gradient,
    the other is a constant (a bias, an attention mask): it absorbs exactly its
    share ``c / (z + eps sign z)`` and the relevance-carrying operand receives
    the rest, so adding a zero passes relevance unchanged.  Relevance of a
    broadcast operand is summed over the broadcast dimensions.

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
    return _Add2.apply(a, b, _check_epsilon(epsilon))


class _Mul2(Function):
    """Uniform rule for the product of two operands."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = tuple(t.shape if isinstance(t, torch.Tensor) else None for t in (a, b))
        ctx.dtypes = tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in (a, b))
        return torch.mul(a, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[:2]
        if not any(needs):
            return None, None
        share = relevance * 0.5 if all(needs) else relevance
        return tuple(
            _sum_to_shape(share, shape).to(dtype) if need else None
            for need, shape, dtype in zip(needs, ctx.shapes, ctx.dtypes)
        )


def mul2(a, b):
    r"""Element-wise ``a * b`` (with broadcasting) and the uniform rule in the backward pass.

    .. math:: R_a = R_b = \tfrac{1}{2} R

    (AttnLRP Proposition 3.2).  A constant operand, or one that does not
    require a gradient, receives nothing and the other operand receives all of
    the relevance: multiplication by a constant passes relevance unchanged.

    Parameters
    ----------
    a, b : torch.Tensor or number
        Factors.

    Returns
    -------
    torch.Tensor
        ``torch.mul(a, b)``.
    """
    return _Mul2.apply(a, b)


# ---------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------


class _SumEpsilon(Function):
    """Epsilon rule for sums and means over dimensions."""

    @staticmethod
    def forward(ctx, x, dim, keepdim, epsilon, average):
        out = x.mean(dim=dim, keepdim=keepdim) if average else x.sum(dim=dim, keepdim=keepdim)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, out)
        ctx.dim, ctx.keepdim, ctx.epsilon, ctx.average = dim, keepdim, epsilon, average
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x, out = ctx.saved_tensors
        dtype = _compute_dtype(out)
        normed = stabilized_quotient(relevance.to(dtype), out.to(dtype), ctx.epsilon)
        if not ctx.keepdim and ctx.dim is not None:
            dims = (ctx.dim,) if isinstance(ctx.dim, int) else tuple(ctx.dim)
            for d in sorted(d % x.dim() for d in dims):
                normed = normed.unsqueeze(d)
        elif ctx.dim is None and not ctx.keepdim:
            normed = normed.reshape((1,) * x.dim())
        contribution = x.to(dtype)
        if ctx.average:
            contribution = contribution * (out.numel() / x.numel())
        return (contribution * normed).to(x.dtype), None, None, None, None


def mean(x, dim=None, keepdim: bool = False, *, epsilon: float = DEFAULT_EPSILON):
    r"""Mean over ``dim`` with the epsilon rule in the backward pass.

    .. math:: R_{x_i} = \frac{x_i / N}{z + \epsilon\,\mathrm{sign}(z)} R, \qquad z = \frac{1}{N}\sum_i x_i

    (AttnLRP Eq. 8 for the linear map ``x -> mean(x)``).

    Parameters
    ----------
    x : torch.Tensor
        Input.
    dim : int or tuple of int, optional
        Dimensions to reduce; all if ``None``.
    keepdim : bool, optional
        Keep the reduced dimensions with size one.
    epsilon : float, optional
        Stabilizer of the denominator.

    Returns
    -------
    torch.Tensor
        ``x.mean(dim, keepdim)``.
    """
    return _SumEpsilon.apply(x, dim, keepdim, _check_epsilon(epsilon), True)


def sum_epsilon(x, dim=None, keepdim: bool = False, *, epsilon: float = DEFAULT_EPSILON):
    r"""Sum over ``dim`` with the epsilon rule, ``R_{x_i} = x_i / (z + eps sign z) R`` (AttnLRP Eq. 8).

    Parameters and return value as in :func:`mean`, for ``x.sum(dim, keepdim)``.
    """
    return _SumEpsilon.apply(x, dim, keepdim, _check_epsilon(epsilon), False)


# ---------------------------------------------------------------------------
# Normalization layers
# ---------------------------------------------------------------------------


class _LayerNorm(Function):
    """Identity rule on the division by the standard deviation, epsilon rule on the centering."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, epsilon):
        out = F.layer_norm(x, normalized_shape, weight, bias, eps)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, out, bias)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        ctx.epsilon, ctx.input_dtype = epsilon, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        x, out, bias = ctx.saved_tensors
        dtype = _compute_dtype(out)
        relevance = relevance.to(dtype)
        out = out.to(dtype)
        if bias is not None:
            # The bias is a constant summand: it absorbs exactly its share.
            shift = sign_shift(out, ctx.epsilon)
            relevance = relevance * ((out - bias.to(dtype) + shift) / (out + shift))
        # Multiplication by the weight and division by the standard deviation: identity.
        x = x.to(dtype)
        centered = x - x.mean(dim=ctx.dims, keepdim=True)
        normed = stabilized_quotient(relevance, centered, ctx.epsilon)
        relevance_x = x * (normed - normed.mean(dim=ctx.dims, keepdim=True))
        return relevance_x.to(ctx.input_dtype), None, None, None, None, None


def layer_norm(x, weight, bias, eps: float, *, normalized_shape=None, epsilon: float = DEFAULT_EPSILON):
    r"""Layer normalization with the AttnLRP rules in the backward pass.

    ``y = (x - mean(x)) / std(x) * weight + bias`` is decomposed into the
    centering ``c = x - mean(x)``, a linear map that gets the epsilon rule

    .. math:: R_{x_j} = x_j \Big(\frac{R_j}{c_j + \epsilon\,\mathrm{sign}(c_j)} - \frac{1}{N}\sum_i \frac{R_i}{c_i + \epsilon\,\mathrm{sign}(c_i)}\Big),

    the division by the standard deviation and the multiplication by the
    weight, which get the identity rule (AttnLRP Proposition 3.4), and the
    constant bias, which absorbs its share as in :func:`add2`.

    Parameters
    ----------
    x : torch.Tensor
        Input.
    weight, bias : torch.Tensor or None
        Element-wise affine parameters.
    eps : float
        The layer's variance epsilon (forward pass).
    normalized_shape : sequence of int, optional
        Normalized trailing dimensions; the weight's shape, or the last dimension of ``x``, by default.
    epsilon : float, optional
        Stabilizer of the relevance denominators (backward pass).

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)``.
    """
    if normalized_shape is None:
        normalized_shape = tuple(weight.shape) if weight is not None else (x.shape[-1],)
    return _LayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps, _check_epsilon(epsilon))


class _Identity(Function):
    """Identity rule: the relevance of the output is the relevance of the input."""

    @staticmethod
    def forward(ctx, fn, x):
        out = fn(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the identity rule needs a function that returns a tensor, got {type(out).__name__}")
        try:
            element_wise = torch.broadcast_shapes(out.shape, x.shape) == out.shape
        except RuntimeError:
            element_wise = False
        if not element_wise:
            raise ValueError(
                "the identity rule needs an element-wise function (the output keeps the input's shape, "
                f"or broadcasts it); got input {tuple(x.shape)} and output {tuple(out.shape)}. "
                "Use an epsilon or Taylor rule for functions that mix elements."
            )
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        return None, _sum_to_shape(relevance, ctx.input_shape).to(ctx.input_dtype)


def identity(fn: Callable[[torch.Tensor], torch.Tensor], x):
    r"""Apply an element-wise function ``fn`` and pass relevance through unchanged, ``R_x = R_y``.

    The identity rule (AttnLRP Eq. 9) for element-wise non-linearities such as
    SiLU, GELU or tanh, and for multiplication by constants.

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


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def _score_mask(attn_mask, is_causal, query_len, key_len, dtype, device):
    """Additive mask for the attention scores with finite values, or ``None``.

    Boolean masks (``True`` = attend) and the causal flag become ``0`` and the
    dtype's most negative number, so that masked scores get probability zero
    and relevance zero without ``inf * 0``.
    """
    lowest = torch.finfo(dtype).min
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            mask = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill_(~attn_mask, lowest)
        else:
            mask = attn_mask.to(dtype).clamp(min=lowest)
    if is_causal:
        keep = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(query_len, key_len, dtype=dtype, device=device).masked_fill_(~keep, lowest)
        mask = causal if mask is None else (mask + causal).clamp(min=lowest)
    return mask


def _mask_is_pure(attn_mask) -> bool:
    """Whether a mask only attends or blocks: boolean, or additive with values 0 and (nearly) -inf only."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return True
    lowest = torch.finfo(attn_mask.dtype).min
    return bool(((attn_mask == 0) | (attn_mask <= lowest / 2)).all())


class _Attention(Function):
    """AttnLRP / CP-LRP rules for scaled dot-product attention."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, epsilon, cp):
        ctx.is_causal, ctx.scale, ctx.epsilon, ctx.cp = is_causal, scale, epsilon, cp
        needs = ctx.needs_input_grad[:3]
        ctx.fused = any(needs) and _mask_is_pure(attn_mask)
        if ctx.fused:
            # Keep the graph of torch's own attention: its fused backward pass computes the rules (see backward).
            # CP-LRP needs only the values' side.
            tracked = (False, False, needs[2]) if cp else needs
            inputs = tuple(t.detach().requires_grad_(track) for t, track in zip((q, k, v), tracked))
            with torch.enable_grad():
                out = F.scaled_dot_product_attention(
                    *inputs, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa,
                )
            ctx.inputs, ctx.output = inputs, out
            return out.detach()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        if any(needs):
            ctx.save_for_backward(q, k, v, out, attn_mask)
        return out

    @staticmethod
    def _fused_backward(ctx, relevance):
        r"""The rules through torch's attention backward pass.

        With ``G = R_o / stab(o)`` as the output gradient, the attention VJP returns
        ``dV = S^T G``, ``dQ = scale (S * (D - rowsum(S * D))) K`` and the analogue ``dK``, with
        ``D = G V^T``.  ``S * (D - rowsum(S * D))`` is twice the relevance ``R_x / x`` of the scores
        after the softmax rule, and the q k^T rule divides ``R_x`` by the scores it is proportional
        to, so ``R_q = q dQ / 4``, ``R_k = k dK / 4`` and ``R_v = v dV / 2`` (``v dV`` for CP-LRP).
        """
        q, k, v = ctx.inputs
        out = ctx.output
        ctx.inputs = ctx.output = None
        dtype = _compute_dtype(out)
        normed = stabilized_quotient(relevance.to(dtype), out.detach().to(dtype), ctx.epsilon).to(out.dtype)
        shares = (0.25, 0.25, 0.5)
        if ctx.cp:  # all relevance to the values; queries and keys get exactly zero
            shares = (0.0, 0.0, 1.0)
        wanted = [t for t, share in zip((q, k, v), shares) if t.requires_grad and share]
        grads = iter(torch.autograd.grad(out, wanted, normed) if wanted else ())
        result = []
        for tensor, share, need in zip((q, k, v), shares, ctx.needs_input_grad[:3]):
            if not need:
                result.append(None)
            elif not share:
                # zeros rather than None: hooks on the projections that produced q and k (Zennit's) need a tensor
                result.append(torch.zeros_like(tensor))
            else:
                result.append((next(grads).to(dtype) * tensor.detach().to(dtype)).mul_(share).to(tensor.dtype))
        return tuple(result) + (None,) * 6

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
        nothing = (None,) * 6
        if not (needs_q or needs_k or needs_v):
            return (None, None, None) + nothing
        if ctx.fused:
            return _Attention._fused_backward(ctx, relevance)
        q, k, v, out, attn_mask = ctx.saved_tensors
        dtype = _compute_dtype(out)
        eps = ctx.epsilon
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.size(-1))
        groups = q.size(-3) // k.size(-3)
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        if groups > 1:
            kc = kc.repeat_interleave(groups, dim=-3)
            vc = vc.repeat_interleave(groups, dim=-3)
        query_len, key_len = qc.size(-2), kc.size(-2)
        mask = _score_mask(attn_mask, ctx.is_causal, query_len, key_len, dtype, q.device)
        normed_out = stabilized_quotient(relevance.to(dtype), out.to(dtype), eps)

        batch_shape = torch.broadcast_shapes(qc.shape[:-2], kc.shape[:-2])
        block = _ATTENTION_BLOCK_ELEMENTS.get(q.device.type, _ATTENTION_BLOCK_ELEMENTS_DEFAULT)
        rows_per_block = max(1, block // max(1, math.prod(batch_shape) * key_len))
        relevance_q = torch.zeros_like(qc) if (needs_q and not ctx.cp) else None
        relevance_k = torch.zeros(batch_shape + kc.shape[-2:], dtype=dtype, device=q.device) if not ctx.cp else None
        value_sum = torch.zeros(batch_shape + vc.shape[-2:], dtype=dtype, device=q.device)
        # Only reached for float masks with values other than 0 and -inf (a bias on the scores).
        for start in range(0, query_len, rows_per_block):
            rows = slice(start, min(start + rows_per_block, query_len))
            q_b, g_b = qc[..., rows, :], normed_out[..., rows, :]
            raw = q_b @ kc.transpose(-1, -2)
            scores = raw * scale
            scores += mask[..., rows, :] if mask.size(-2) != 1 else mask
            probs = torch.softmax(scores, dim=-1)
            # Value side: epsilon rule on o = s v, half of it (all of it for CP-LRP) to v.
            value_sum += probs.transpose(-1, -2) @ g_b
            if ctx.cp:
                continue
            # Weight side: the other half, R_s = s * (G v^T) / 2, then the softmax rule
            # R_x = x * (R_s - s * sum(R_s)) (Proposition 3.1).  The factors 1/2 are applied at the end.
            rel = (g_b @ vc.transpose(-1, -2)).mul_(probs)
            rel.addcmul_(probs, rel.sum(-1, keepdim=True), value=-1.0)
            del probs
            # The mask is a constant summand and absorbs its share (see add2): R_a = R_x (a + e) / (x + e);
            # the scale passes relevance; the epsilon/uniform rule on q k^T divides by stab(q k^T).
            shift = sign_shift(scores, eps)
            ratio = (raw * scale).add_(shift).div_(shift.add_(scores))
            rel.mul_(scores).mul_(ratio).div_(stabilize(raw, eps))
            del shift, ratio, raw, scores
            if relevance_q is not None:
                relevance_q[..., rows, :] = rel @ kc
            relevance_k += rel.transpose(-1, -2) @ q_b
        # 1/2 of the softmax side, 1/2 of the q k^T rule.
        if relevance_q is not None:
            relevance_q.mul_(qc).mul_(0.25)
        share = 1.0 if ctx.cp else 0.5
        relevance_v = value_sum.mul_(vc).mul_(share) if needs_v else None
        if relevance_k is not None:
            relevance_k = relevance_k.mul_(kc).mul_(0.25) if needs_k else None

        def to_input(rel, like):
            if rel is None:
                return None
            if groups > 1 and like is not q:
                rel = rel.unflatten(-3, (like.size(-3), groups)).sum(-3)
            return _sum_to_shape(rel, like.shape).to(like.dtype)

        if ctx.cp:  # all relevance to the values; zeros (not None) for hooks on the q and k projections
            relevance_q = torch.zeros_like(q) if needs_q else None
            relevance_k = torch.zeros_like(k) if needs_k else None
            return (relevance_q, relevance_k, to_input(relevance_v, v)) + nothing
        return (
            to_input(relevance_q, q) if needs_q else None,
            to_input(relevance_k, k),
            to_input(relevance_v, v),
        ) + nothing


def scaled_dot_product_attention(
    q,
    k,
    v,
    *,
    attn_mask=None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    epsilon: float = DEFAULT_EPSILON,
    cp: bool = False,
):
    r"""Scaled dot-product attention with the AttnLRP (or CP-LRP) rules in the backward pass.

    The forward pass is :func:`torch.nn.functional.scaled_dot_product_attention`.
    The backward pass decomposes it into the operations of eager attention and
    applies each one's rule: epsilon/uniform rule on ``softmax(.) v`` and on
    ``q k^T`` (Proposition 3.3), pass-through of the scaling, the mask as a
    constant summand (see :func:`add2`), and the softmax rule (Proposition 3.1).
    With ``cp=True`` (CP-LRP, Ali et al. 2022) the attention weights are treated
    as constants and all relevance flows to the values (queries and keys
    receive zeros).

    The relevance that reaches a score from the softmax rule is proportional to
    that score, so the ``q k^T`` rule's division by the score cancels exactly and
    needs no stabilizer.  Without a bias in the mask (boolean masks, causal,
    or additive masks of 0 and -inf), the rules then equal torch's own fused
    attention backward pass evaluated at ``R_o / stab(o)``, which is what runs
    (no score matrix is stored or rebuilt).  A float mask with other values is
    a bias: it absorbs its share, the ``q k^T`` rule is stabilized, and the
    scores are recomputed block by block.

    Parameters
    ----------
    q, k, v : torch.Tensor
        Queries ``(..., heads, L, d)``, keys and values ``(..., kv_heads, S, d)``.
    attn_mask : torch.Tensor, optional
        Boolean (``True`` = attend) or additive mask broadcastable to ``(..., L, S)``.
    is_causal : bool, optional
        Apply a causal mask aligned to the top-left corner, as torch does.
    scale : float, optional
        Score scale; ``1 / sqrt(d)`` by default.
    enable_gqa : bool, optional
        Keys and values have fewer heads than queries (grouped-query attention).
    epsilon : float, optional
        Stabilizer of the denominators.
    cp : bool, optional
        Use CP-LRP: no relevance through the attention weights.

    Returns
    -------
    torch.Tensor
        The attention output, ``(..., heads, L, d)``.
    """
    if q.size(-3) != k.size(-3) and not enable_gqa:
        raise ValueError(
            f"queries have {q.size(-3)} heads and keys {k.size(-3)}; pass enable_gqa=True for grouped-query attention"
        )
    if q.size(-3) % k.size(-3) != 0:
        raise ValueError(f"query heads ({q.size(-3)}) must be a multiple of key/value heads ({k.size(-3)})")
    return _Attention.apply(q, k, v, attn_mask, bool(is_causal), scale, bool(enable_gqa), _check_epsilon(epsilon), bool(cp))
