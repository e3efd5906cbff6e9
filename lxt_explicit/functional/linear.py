"""Linear and bilinear maps: the epsilon rule (AttnLRP Eq. 8) and Proposition 3.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, is_batched, stabilized_quotient
from .shapes import compute_dtype, not_a_view, sum_to_shape

__all__ = ["linear_epsilon", "linear_relevance", "matmul"]

#: Output layers at least this many times wider than their input (vocabulary projections) do not
#: store their output for the backward pass; it recomputes the rows that carry relevance.
RECOMPUTE_WIDENING = 8


def linear_relevance(x, weight, bias, relevance, epsilon: float) -> torch.Tensor:
    r"""The epsilon rule of ``F.linear`` written out: ``x * ((R / stab(x W^T + b)) @ W)`` (Eq. 8).

    The reference that :func:`linear_epsilon`'s backward pass (which skips rows without relevance
    and recomputes the outputs of wide layers) is tested against.
    """
    out = F.linear(x, weight, bias)
    return _relevance(x, weight, out, relevance, epsilon)


def _relevance(x, weight, out, relevance, epsilon):
    dtype = compute_dtype(out)
    normed = stabilized_quotient(relevance.to(dtype), out.to(dtype), epsilon)
    relevance_x = (normed.to(weight.dtype) @ weight).to(dtype).mul_(x.to(dtype))
    return relevance_x.to(x.dtype)


def _rows_with_relevance(relevance: torch.Tensor):
    """Indices of the positions with relevance, or ``None`` if (almost) all have some.

    Reads the relevance on the host, so it is only asked for vocabulary-wide layers (one per
    backward pass), never for every linear layer.
    """
    if relevance.dim() < 2:
        return None
    flat = relevance.reshape(-1, relevance.shape[-1])
    rows = flat.any(-1).nonzero().squeeze(-1)
    return rows if rows.numel() < 0.5 * flat.shape[0] else None


class _LinearEpsilon(Function):
    """Epsilon rule for ``F.linear``."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        out = not_a_view(F.linear(x, weight, bias))
        if ctx.needs_input_grad[0]:
            ctx.wide = out.shape[-1] >= RECOMPUTE_WIDENING * x.shape[-1]
            ctx.save_for_backward(x, weight, bias, None if ctx.wide else out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, weight, bias, out = ctx.saved_tensors
        rows = _rows_with_relevance(relevance) if ctx.wide and not is_batched(relevance) else None
        if rows is None:
            out = out if out is not None else F.linear(x, weight, bias)
            return _relevance(x, weight, out, relevance, ctx.epsilon), None, None, None
        # Only some positions carry relevance (the explained tokens of a vocabulary head):
        # the others receive exactly zero, so skip them.
        x_rows = x.reshape(-1, x.shape[-1])[rows]
        result = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        result.view(-1, x.shape[-1])[rows] = linear_relevance(
            x_rows, weight, bias, relevance.reshape(-1, relevance.shape[-1])[rows], ctx.epsilon
        )
        return result, None, None, None


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
    return _LinearEpsilon.apply(x, weight, bias, check_epsilon(epsilon))


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
        out = not_a_view(torch.matmul(a, b))
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
        dtype = compute_dtype(out)
        share = 0.5 if (needs_a and needs_b) else 1.0
        normed = stabilized_quotient(relevance.to(dtype) * share, out.to(dtype), ctx.epsilon)
        a_m, b_m, g = _as_matrices(a.to(dtype), b.to(dtype), normed)
        relevance_a = relevance_b = None
        if needs_a:
            relevance_a = sum_to_shape((g @ b_m.transpose(-1, -2)) * a_m, a_m.shape)
            relevance_a = relevance_a.reshape(a.shape).to(a.dtype)
        if needs_b:
            relevance_b = sum_to_shape((a_m.transpose(-1, -2) @ g) * b_m, b_m.shape)
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
    return _Matmul.apply(a, b, check_epsilon(epsilon))
