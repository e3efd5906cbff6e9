"""Layer and group normalization: identity rule on the division by the standard deviation, epsilon rule on the
centering."""

from __future__ import annotations

import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, sign_shift, stabilized_quotient
from .shapes import compute_dtype

__all__ = ["layer_norm", "group_norm"]


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
        dtype = compute_dtype(out)
        relevance = relevance.to(dtype)
        out = out.to(dtype)
        if bias is not None:
            relevance = _without_bias_share(relevance, out, bias.to(dtype), ctx.epsilon)
        relevance_x = _centering_relevance(x.to(dtype), relevance, ctx.dims, ctx.epsilon)
        return relevance_x.to(ctx.input_dtype), None, None, None, None, None


def _without_bias_share(relevance, out, bias, epsilon):
    """The relevance left when a constant bias absorbs exactly its share (see ``add2``)."""
    shift = sign_shift(out, epsilon)
    return relevance * ((out - bias + shift) / (out + shift))


def _centering_relevance(x, relevance, dims, epsilon):
    """Identity through the weight and the division by the standard deviation, epsilon rule on the centering."""
    centered = x - x.mean(dim=dims, keepdim=True)
    normed = stabilized_quotient(relevance, centered, epsilon)
    return x * (normed - normed.mean(dim=dims, keepdim=True))


class _GroupNorm(Function):
    """The layer-norm rules within every group of channels."""

    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, epsilon):
        out = F.group_norm(x, groups, weight, bias, eps)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, out, bias)
        ctx.groups, ctx.epsilon, ctx.input_dtype = groups, epsilon, x.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        x, out, bias = ctx.saved_tensors
        dtype = compute_dtype(out)
        relevance, out = relevance.to(dtype), out.to(dtype)
        if bias is not None:
            per_channel = bias.to(dtype).view(1, -1, *([1] * (x.dim() - 2)))
            relevance = _without_bias_share(relevance, out, per_channel, ctx.epsilon)
        grouped = (x.shape[0], ctx.groups, -1)
        relevance_x = _centering_relevance(x.to(dtype).reshape(grouped), relevance.reshape(grouped), (-1,), ctx.epsilon)
        return relevance_x.reshape(x.shape).to(ctx.input_dtype), None, None, None, None, None


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, epsilon: float = DEFAULT_EPSILON):
    r"""Group normalization with the rules of :func:`layer_norm` within every group of channels.

    Parameters
    ----------
    x : torch.Tensor
        Input ``(N, C, ...)``.
    num_groups : int
        Number of groups of channels.
    weight, bias : torch.Tensor, optional
        Per-channel affine parameters.
    eps : float
        The layer's variance epsilon (forward pass).
    epsilon : float, optional
        Stabilizer of the relevance denominators (backward pass).

    Returns
    -------
    torch.Tensor
        ``torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)``.
    """
    return _GroupNorm.apply(x, int(num_groups), weight, bias, eps, check_epsilon(epsilon))


def layer_norm(x, weight, bias, eps: float, *, normalized_shape=None, epsilon: float = DEFAULT_EPSILON):
    r"""Layer normalization with the AttnLRP rules in the backward pass.

    ``y = (x - mean(x)) / std(x) * weight + bias`` is decomposed into the
    centering ``c = x - mean(x)``, a linear map that gets the epsilon rule

    .. math::

        R_{x_j} = x_j \Big(\frac{R_j}{c_j + \epsilon\,\mathrm{sign}(c_j)}
                  - \frac{1}{N}\sum_i \frac{R_i}{c_i + \epsilon\,\mathrm{sign}(c_i)}\Big),

    the division by the standard deviation and the multiplication by the
    weight, which get the identity rule (AttnLRP Proposition 3.4), and the
    constant bias, which absorbs its share as in :func:`~lxt_explicit.functional.add2`.

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
    return _LayerNorm.apply(x, tuple(normalized_shape), weight, bias, eps, check_epsilon(epsilon))
