"""Layer normalization: identity rule on the division by the standard deviation, epsilon rule on the centering."""

from __future__ import annotations

import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, sign_shift, stabilized_quotient
from .shapes import compute_dtype

__all__ = ["layer_norm"]


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
