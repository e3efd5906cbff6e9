"""Dtype and broadcasting helpers shared by the operations' backward passes."""

from __future__ import annotations

import torch

__all__ = ["HALF_DTYPES", "compute_dtype", "sum_to_shape", "not_a_view"]

#: Half-precision dtypes; relevance is computed in float32 for them.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Dtype in which relevance is computed: float32 for half precision, else the tensor's own."""
    return torch.float32 if tensor.dtype in HALF_DTYPES else tensor.dtype


def sum_to_shape(relevance: torch.Tensor, shape: torch.Size) -> torch.Tensor:
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


def not_a_view(out: torch.Tensor, *inputs) -> torch.Tensor:
    """``out``, copied if it is a view or an input itself.

    An operation's output must not be a view (``F.linear`` returns one for some input layouts, an
    element-wise function may return its input): autograd forbids in-place changes of views that a
    custom Function returns, and models change outputs in place (``query /= scale``).
    """
    if out._is_view() or any(out is x for x in inputs):
        return out.clone()
    return out
