"""Sums and means over dimensions: the epsilon rule (AttnLRP Eq. 8)."""

from __future__ import annotations

import math

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, stabilized_quotient
from .shapes import compute_dtype

__all__ = ["mean", "sum_epsilon"]


def _reduced_dims(x: torch.Tensor, dim) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % max(x.dim(), 1) for d in dims))


class _SumEpsilon(Function):
    """Epsilon rule for sums and means over dimensions."""

    @staticmethod
    def forward(ctx, x, dim, keepdim, epsilon, average):
        out = x.mean(dim=dim, keepdim=keepdim) if average else x.sum(dim=dim, keepdim=keepdim)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, out)
        ctx.dims = _reduced_dims(x, dim)
        ctx.keepdim, ctx.epsilon = keepdim, epsilon
        ctx.factor = 1.0 / math.prod(x.shape[d] for d in ctx.dims) if average else 1.0
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        x, out = ctx.saved_tensors
        dtype = compute_dtype(out)
        normed = stabilized_quotient(relevance.to(dtype), out.to(dtype), ctx.epsilon)
        if not ctx.keepdim:
            for d in ctx.dims:
                normed = normed.unsqueeze(d)
        contribution = x.to(dtype) * ctx.factor if ctx.factor != 1.0 else x.to(dtype)
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

    Raises
    ------
    ValueError
        If a reduced dimension is empty: the mean of nothing is undefined (torch returns NaN).
    """
    empty = [d for d in _reduced_dims(x, dim) if x.dim() and x.shape[d] == 0]
    if empty:
        raise ValueError(
            f"mean over an empty dimension ({empty[0]} of a tensor of shape {tuple(x.shape)}) is undefined; "
            "reduce over non-empty dimensions or skip the empty input"
        )
    return _SumEpsilon.apply(x, dim, keepdim, check_epsilon(epsilon), True)


def sum_epsilon(x, dim=None, keepdim: bool = False, *, epsilon: float = DEFAULT_EPSILON):
    r"""Sum over ``dim`` with the epsilon rule, ``R_{x_i} = x_i / (z + eps sign z) R`` (AttnLRP Eq. 8).

    Parameters and return value as in :func:`mean`, for ``x.sum(dim, keepdim)``.
    """
    return _SumEpsilon.apply(x, dim, keepdim, check_epsilon(epsilon), False)
