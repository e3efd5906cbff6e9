"""Softmax: the deep-Taylor rule with bias (AttnLRP Proposition 3.1)."""

from __future__ import annotations

import math

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .shapes import compute_dtype

__all__ = ["softmax", "masked_logits"]


def masked_logits(logits: torch.Tensor) -> torch.Tensor:
    """Where ``logits`` are masked: ``-inf``, or at most half the dtype's most negative number.

    Transformers' eager attention masks scores by adding ``torch.finfo(dtype).min``; the sum stays
    below half of that minimum (or overflows to ``-inf``) whatever the score was.
    """
    return logits <= torch.finfo(logits.dtype).min / 2


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
        masked = masked_logits(logits)
        dtype = compute_dtype(out)
        relevance = relevance.to(dtype)
        out = out.to(dtype)
        total = relevance.sum(ctx.dim, keepdim=True)
        relevance_x = (relevance - out * total) * logits.to(dtype)
        # Masked logits have zero probability and receive no relevance, whatever relevance arrived
        # there: -inf * R would be NaN, finfo.min * R a huge number.
        relevance_x = relevance_x.masked_fill_(masked, 0.0)
        return relevance_x.to(ctx.input_dtype), None, None, None


def softmax(x, dim: int, *, dtype: torch.dtype | None = None, temperature: float = 1.0):
    r"""Softmax with the deep-Taylor rule (with bias) in the backward pass.

    .. math:: R_{x_i} = x_i \Big(R_i - s_i \sum_j R_j\Big)

    (AttnLRP Proposition 3.1), with ``x`` the logits after the temperature.
    Logits that are masked (``-inf``, or a very negative number such as
    ``torch.finfo(dtype).min``, see :func:`masked_logits`) receive zero relevance.

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
