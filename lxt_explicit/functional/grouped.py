"""Grouped linear maps (the fused experts of mixture-of-experts layers): the epsilon rule (AttnLRP Eq. 8).

``torch.nn.functional.grouped_mm(x, W, offs=offs)`` multiplies the rows of ``x`` between
consecutive offsets with one matrix ``W[e]`` each (the tokens routed to expert ``e``).  Every
row is the input of an ordinary linear map, so it gets the epsilon rule, and the backward pass
is one grouped product again: the experts stay fused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, stabilized_quotient
from .shapes import compute_dtype

__all__ = ["grouped_linear_epsilon", "grouped_linear_relevance"]


def _grouped_mm(x, weight, offs):
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return grouped(x, weight, offs=offs)


def grouped_linear_relevance(x, weight, offs, relevance, epsilon: float, bias=None) -> torch.Tensor:
    r"""The epsilon rule of a grouped product written out, one group at a time (the reference).

    Rows ``offs[e-1]:offs[e]`` of ``x`` get ``x * ((R / stab(x W[e] + b)) W[e]^T)`` (Eq. 8).
    """
    relevance_x = torch.zeros_like(x, dtype=compute_dtype(x))
    start = 0
    for group, end in enumerate(offs.tolist()):
        rows = slice(start, end)
        if end > start:
            out = x[rows].to(relevance_x.dtype) @ weight[group].to(relevance_x.dtype)
            if bias is not None:
                out = out + bias[rows].to(relevance_x.dtype)
            normed = stabilized_quotient(relevance[rows].to(relevance_x.dtype), out, epsilon)
            relevance_x[rows] = x[rows].to(relevance_x.dtype) * (normed @ weight[group].to(relevance_x.dtype).T)
        start = end
    return relevance_x.to(x.dtype)


class _GroupedLinearEpsilon(Function):
    """Epsilon rule for ``grouped_mm``."""

    @staticmethod
    def forward(ctx, x, weight, offs, epsilon):
        out = _grouped_mm(x, weight, offs)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, weight, offs, out)
        ctx.epsilon = epsilon
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x, weight, offs, out = ctx.saved_tensors
        dtype = compute_dtype(out)
        normed = stabilized_quotient(relevance.to(dtype), out.to(dtype), ctx.epsilon)
        back = _grouped_mm(normed.to(weight.dtype), weight.transpose(-2, -1), offs)
        return back.to(dtype).mul_(x.to(dtype)).to(x.dtype), None, None, None


def grouped_linear_epsilon(x, weight, offs, *, epsilon: float = DEFAULT_EPSILON):
    r"""``grouped_mm(x, weight, offs=offs)`` with the epsilon rule in the backward pass.

    .. math:: R_{x_{ri}} = \sum_j \frac{x_{ri} W^{(e_r)}_{ij}}{z_{rj} + \epsilon\,\mathrm{sign}(z_{rj})} R_{rj}

    (AttnLRP Eq. 8), where ``e_r`` is the group of row ``r``.  The backward pass is one grouped
    product with the transposed weights.

    Parameters
    ----------
    x : torch.Tensor
        Rows ``(S, in_features)``, sorted by group.
    weight : torch.Tensor
        ``(groups, in_features, out_features)``; receives no relevance.
    offs : torch.Tensor
        Cumulative row counts of the groups (int32).
    epsilon : float, optional
        Stabilizer of the denominator.

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.grouped_mm(x, weight, offs=offs)``.
    """
    return _GroupedLinearEpsilon.apply(x, weight, offs, check_epsilon(epsilon))
