"""A matrix product added to a scaled constant: ``beta * c + alpha * (a @ b)`` (``torch.baddbmm`` and relatives).

BLOOM computes its attention scores as ``alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(d))``: the
ALiBi bias is a summand of the scores, the product of queries and keys the other.  The rules are
those of the operations written one after the other: the epsilon rule of the sum (AttnLRP Eq. 8),
in which a constant summand absorbs exactly its share; the identity rule of the constant factor
``alpha``; and the uniform-epsilon rule of the product (Proposition 3.3).
"""

from __future__ import annotations

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, stabilized_quotient
from .elementwise import add_relevance
from .shapes import compute_dtype, sum_to_shape

__all__ = ["matmul_add", "matmul_add_relevance"]


def _product(a, b, batch_sum: bool):
    product = torch.matmul(a, b)
    return product.sum(0) if batch_sum else product


def matmul_add_relevance(c, a, b, relevance, *, beta=1.0, alpha=1.0, batch_sum=False,
                         epsilon: float = DEFAULT_EPSILON, needs=(False, True, True)):
    r"""The rules of ``z = beta c + alpha P``, ``P = a @ b``, written out (the backward pass of :func:`matmul_add`).

    * sum (Eq. 8): with ``e = eps sign(z)``, a constant ``c`` absorbs its share and the product
      receives ``R_P = R (alpha P + e) / (z + e)``; a relevance-carrying ``c`` receives
      ``R_c = beta c R / stab(z)`` and the product ``R_P = alpha P R / stab(z)``
      (see :func:`~lxt_explicit.functional.add_relevance`);
    * the constant factor ``alpha`` passes relevance unchanged (identity rule, Eq. 9);
    * product (Proposition 3.3), with ``G = R_P / stab(P)`` and ``s = 1/2`` if both factors carry
      relevance (else 1): ``R_a = s a (G b^T)``, ``R_b = s b (a^T G)``.  With ``batch_sum`` the
      product is ``P = sum_n a_n @ b_n`` (``torch.addbmm``) and ``G`` is shared by every batch.

    Returns
    -------
    tuple
        ``(R_c, R_a, R_b)`` (``None`` where ``needs`` is false), in the dtypes of the operands.
    """
    need_c, need_a, need_b = needs
    dtype = compute_dtype(relevance)
    a_c, b_c = a.to(dtype), b.to(dtype)
    product = _product(a_c, b_c, batch_sum)
    summand = (c.to(dtype) if isinstance(c, torch.Tensor) else torch.as_tensor(c, dtype=dtype)) * beta
    if beta == 0:  # torch ignores the input then (even NaN)
        summand = torch.zeros_like(summand)
    out = summand + alpha * product
    relevance_c, relevance_p = add_relevance(
        summand, alpha * product, out, relevance.to(dtype), epsilon, needs=(need_c, need_a or need_b)
    )
    share = 0.5 if (need_a and need_b) else 1.0
    normed = stabilized_quotient(relevance_p * share, product, epsilon) if (need_a or need_b) else None
    relevance_a = (normed @ b_c.transpose(-1, -2)).mul_(a_c).to(a.dtype) if need_a else None
    relevance_b = sum_to_shape(a_c.transpose(-1, -2) @ normed, b.shape).mul_(b_c).to(b.dtype) if need_b else None
    if need_c:
        relevance_c = sum_to_shape(relevance_c, c.shape).to(c.dtype)
    return relevance_c, relevance_a, relevance_b


class _MatmulAdd(Function):
    """The rules of ``beta * c + alpha * (a @ b)``."""

    @staticmethod
    def forward(ctx, c, a, b, beta, alpha, batch_sum, epsilon):
        function = torch.addbmm if batch_sum else (torch.baddbmm if a.dim() == 3 else torch.addmm)
        out = function(c, a, b, beta=beta, alpha=alpha)
        ctx.options = dict(beta=beta, alpha=alpha, batch_sum=batch_sum, epsilon=epsilon)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(c if isinstance(c, torch.Tensor) else None, a, b)
            ctx.constant = None if isinstance(c, torch.Tensor) else c
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return (None,) * 7
        c, a, b = ctx.saved_tensors
        c = ctx.constant if c is None else c
        return matmul_add_relevance(c, a, b, relevance, needs=needs, **ctx.options) + (None,) * 4


def matmul_add(c, a, b, *, beta=1.0, alpha=1.0, batch_sum: bool = False, epsilon: float = DEFAULT_EPSILON):
    r"""``beta * c + alpha * (a @ b)`` (``torch.baddbmm``, ``torch.addmm``; ``torch.addbmm`` with ``batch_sum``).

    .. math::
        R_{a_{ik}} = s \sum_j \frac{a_{ik} b_{kj}}{P_{ij} + \epsilon\,\mathrm{sign}(P_{ij})}
        \frac{\alpha P_{ij} + e_{ij}}{z_{ij} + e_{ij}} R_{ij}, \qquad e = \epsilon\,\mathrm{sign}(z)

    for a constant ``c`` (an ALiBi bias), and symmetrically for ``b``, with ``s = 1/2`` when both
    factors carry relevance (AttnLRP Eq. 8 on the sum, Eq. 9 on the factor ``alpha``,
    Proposition 3.3 on the product; see :func:`matmul_add_relevance`).  A relevance-carrying ``c``
    receives its epsilon-rule share ``beta c R / stab(z)``.

    Parameters
    ----------
    c : torch.Tensor or number
        The summand (``input`` of ``torch.baddbmm``), broadcastable to the output.
    a, b : torch.Tensor
        Factors: ``(n, i, k)`` and ``(n, k, j)`` (``baddbmm``, ``addbmm``) or ``(i, k)`` and
        ``(k, j)`` (``addmm``).
    beta, alpha : float, optional
        Scales of the summand and of the product.
    batch_sum : bool, optional
        Sum the products over the batch (``torch.addbmm``).
    epsilon : float, optional
        Stabilizer of the denominators.

    Returns
    -------
    torch.Tensor
        The value of the torch function.
    """
    if a.dim() not in (2, 3) or a.dim() != b.dim() or (batch_sum and a.dim() != 3):
        raise ValueError(
            f"matmul_add needs two 3-D batches (baddbmm, addbmm) or two matrices (addmm), got {a.dim()}-D "
            f"and {b.dim()}-D factors"
        )
    return _MatmulAdd.apply(c, a, b, beta, alpha, bool(batch_sum), check_epsilon(epsilon))
