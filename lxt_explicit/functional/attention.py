"""Scaled dot-product attention with the AttnLRP (or CP-LRP) rules in the backward pass.

:func:`attention_relevance` writes the rules out on the full score matrix: the reference.
Two faster backward passes compute the same numbers:

* bias-free masks (none, causal, boolean, additive 0 / -inf): torch's own fused attention backward
  evaluated at ``R / stab(o)`` (see :func:`scaled_dot_product_attention`); no score matrix is stored;
* masks with other values (a bias on the scores): :func:`blocked_attention_relevance`, which
  recomputes the scores a block of query rows at a time.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import DEFAULT_EPSILON, check_epsilon, sign_shift, stabilize, stabilized_quotient
from .shapes import compute_dtype, sum_to_shape
from .sinks import BOS, GATE, check_sinks, mass_from_probs, sink_column, sink_mass, sink_rows

__all__ = ["scaled_dot_product_attention", "attention_relevance", "blocked_attention_relevance", "mask_is_pure"]

#: Score elements per block of the blocked backward pass: on the CPU a block that stays in cache
#: (about 4 MB in float32) runs the element-wise steps twice as fast as one large block; on
#: accelerators large blocks keep the kernels busy.
BLOCK_ELEMENTS = MappingProxyType({"cpu": 1 << 20})
BLOCK_ELEMENTS_DEFAULT = 1 << 26


def mask_is_pure(attn_mask) -> bool:
    """Whether a mask only attends or blocks: boolean, or additive with values 0 and (nearly) -inf only.

    Reads the mask's values (one host synchronization on an accelerator).
    """
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return True
    lowest = torch.finfo(attn_mask.dtype).min
    return bool(((attn_mask == 0) | (attn_mask <= lowest / 2)).all())


def score_mask(attn_mask, is_causal, query_len, key_len, dtype, device):
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


def _expand_groups(q, k, v):
    groups = q.size(-3) // k.size(-3)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    return k, v, groups


def _fold_groups(relevance, like, groups):
    """Relevance of repeated key/value heads summed back onto the heads of ``like``."""
    if groups > 1:
        relevance = relevance.unflatten(-3, (like.size(-3), groups)).sum(-3)
    return sum_to_shape(relevance, like.shape).to(like.dtype)


def attention_relevance(q, k, v, relevance, *, attn_mask=None, is_causal=False, scale=None,
                        epsilon: float = DEFAULT_EPSILON, cp: bool = False, sinks: float | str | None = None):
    r"""The AttnLRP rules of attention written out on the full score matrix (the reference backward pass).

    With ``A = q k^T``, scores ``X = scale A + M`` (``M`` the additive mask, a constant),
    ``S = softmax(X)``, ``O = S v`` and ``G = R / stab(O)``:
    ``R_v = 1/2 (S^T G) v`` (Proposition 3.3; all of it for CP-LRP),
    ``R_S = 1/2 S (G v^T)``, ``R_X = X (R_S - S rowsum(R_S))`` (Proposition 3.1),
    the mask absorbs its share ``R_A = R_X (scale A + e) / (X + e)``, and
    ``R_q = 1/2 (R_A / stab(A)) k q``, ``R_k = 1/2 (R_A / stab(A))^T q k`` (Proposition 3.3).
    Without a bias in the mask ``R_A / A = scale (R_S - S rowsum(R_S))`` exactly.

    With ``sinks = t``, the rows whose weight on the sink key (:func:`~lxt_explicit.functional.sinks.sink_mass`)
    exceeds ``t`` are CP-LRP rows: ``R_v`` takes all of their relevance and their ``R_S`` is zero.
    With ``sinks = 'gate'`` each row is ``o = s_z v_z + g o'`` with ``z`` the sink key, ``g = 1 - s_z``
    a constant gate and ``o' = softmax(X without column z) v``: ``s_z v_z`` is a bias (it absorbs
    its share), and the rules above apply to ``o'`` (``S`` without its sink column in ``R_v`` and
    ``R_S``, the row sums of the softmax rule taken with ``S' = S / g``).

    Returns
    -------
    tuple of torch.Tensor
        ``(R_q, R_k, R_v)`` in the dtypes and shapes of ``q, k, v``.
    """
    dtype = compute_dtype(q)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    kc, vc, groups = _expand_groups(qc, kc, vc)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    mask = score_mask(attn_mask, is_causal, qc.size(-2), kc.size(-2), dtype, q.device)
    raw = qc @ kc.transpose(-1, -2)
    scores = raw * scale + (mask if mask is not None else 0.0)
    probs = torch.softmax(scores, -1)
    out = probs @ vc
    G = stabilized_quotient(relevance.to(dtype), out, epsilon)
    sinks = check_sinks(sinks)
    weights, normalized = probs, probs
    if sinks == GATE and not cp:
        weights, normalized = _gated(probs, sink_column(attn_mask, kc))
    rows = sink_rows(mass_from_probs(probs, attn_mask), sinks) if sinks not in (None, GATE) and not cp else 0.0
    R_v = (1.0 if cp else 0.5) * (weights.transpose(-1, -2) @ (G * (1.0 + rows))) * vc
    if cp:
        return torch.zeros_like(q), torch.zeros_like(k), _fold_groups(R_v, v, groups)
    R_S = 0.5 * weights * ((G * (1.0 - rows)) @ vc.transpose(-1, -2))
    T = R_S - normalized * R_S.sum(-1, keepdim=True)
    if mask_is_pure(attn_mask):
        G_A = scale * T
    else:
        e = sign_shift(scores, epsilon)
        G_A = scores * T * (raw * scale + e) / (scores + e) / stabilize(raw, epsilon)
    R_q = 0.5 * (G_A @ kc) * qc
    R_k = 0.5 * (G_A.transpose(-1, -2) @ qc) * kc
    return R_q.to(q.dtype), _fold_groups(R_k, k, groups), _fold_groups(R_v, v, groups)


def _gated(probs, column):
    """The weights of ``o'`` in ``o = s_z v_z + g o'``: ``S`` without the sink column, and that divided by ``g``.

    ``g`` is summed from the other keys' weights (not ``1 - s_z``, which cancels in an almost-all-sink
    row); a row that attends only to the sink has ``g = 0`` and no ``o'``.
    """
    weights = probs * (1.0 - column)
    gate = weights.sum(-1, keepdim=True)
    return weights, torch.where(gate > 0, weights / gate.clamp(min=torch.finfo(gate.dtype).tiny), 0.0)


def blocked_attention_relevance(q, k, v, out, relevance, *, attn_mask=None, is_causal=False, scale=None,
                                epsilon: float = DEFAULT_EPSILON, cp: bool = False, block_elements=None,
                                sinks: float | str | None = None):
    """:func:`attention_relevance`, with the scores recomputed ``block_elements`` at a time (no full score matrix).

    ``out`` is the attention output (the denominator of the value rule).  Returns ``(R_q, R_k, R_v)``.
    """
    dtype = compute_dtype(out)
    sinks = check_sinks(sinks)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    kc, vc, groups = _expand_groups(qc, kc, vc)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    query_len, key_len = qc.size(-2), kc.size(-2)
    mask = score_mask(attn_mask, is_causal, query_len, key_len, dtype, q.device)
    normed_out = stabilized_quotient(relevance.to(dtype), out.to(dtype), epsilon)
    batch_shape = torch.broadcast_shapes(qc.shape[:-2], kc.shape[:-2])
    if block_elements is None:
        block_elements = BLOCK_ELEMENTS.get(q.device.type, BLOCK_ELEMENTS_DEFAULT)
    rows_per_block = max(1, block_elements // max(1, math.prod(batch_shape) * key_len))
    relevance_q = None if cp else torch.zeros_like(qc)
    relevance_k = None if cp else torch.zeros(batch_shape + kc.shape[-2:], dtype=dtype, device=q.device)
    value_sum = torch.zeros(batch_shape + vc.shape[-2:], dtype=dtype, device=q.device)
    for start in range(0, query_len, rows_per_block):
        rows = slice(start, min(start + rows_per_block, query_len))
        q_b, g_b = qc[..., rows, :], normed_out[..., rows, :]
        raw = q_b @ kc.transpose(-1, -2)
        scores = raw * scale
        if mask is not None:
            scores += mask[..., rows, :] if mask.size(-2) != 1 else mask
        probs = normalized = torch.softmax(scores, dim=-1)
        if sinks == GATE and not cp:  # the sink's value a bias; the softmax rule on the other keys
            probs, normalized = _gated(probs, sink_column(attn_mask, kc))
            value_sum += probs.transpose(-1, -2) @ g_b
        elif sinks is not None and not cp:  # sink rows: all relevance to the values (twice the half share)
            rows_b = sink_rows(mass_from_probs(probs, attn_mask), sinks)
            value_sum += probs.transpose(-1, -2) @ (g_b * (1.0 + rows_b))
            g_b = g_b * (1.0 - rows_b)
        else:
            value_sum += probs.transpose(-1, -2) @ g_b  # value side: S^T G
        if cp:
            continue
        # weight side, the factors 1/2 applied at the end: R_S = S (G v^T), then Proposition 3.1
        rel = (g_b @ vc.transpose(-1, -2)).mul_(probs)
        rel.addcmul_(normalized, rel.sum(-1, keepdim=True), value=-1.0)
        del probs, normalized
        # the mask absorbs its share, the scale passes relevance, the q k^T rule divides by stab(q k^T)
        shift = sign_shift(scores, epsilon)
        ratio = (raw * scale).add_(shift).div_(shift.add_(scores))
        rel.mul_(scores).mul_(ratio).div_(stabilize(raw, epsilon))
        del shift, ratio, raw, scores
        relevance_q[..., rows, :] = rel @ kc
        relevance_k += rel.transpose(-1, -2) @ q_b
    relevance_v = _fold_groups(value_sum.mul_(vc).mul_(1.0 if cp else 0.5), v, groups)
    if cp:
        return torch.zeros_like(q), torch.zeros_like(k), relevance_v
    relevance_q = relevance_q.mul_(qc).mul_(0.25).to(q.dtype)
    relevance_k = _fold_groups(relevance_k.mul_(kc).mul_(0.25), k, groups)
    return relevance_q, relevance_k, relevance_v


def _sink_row_grads(out, wanted, normed, rows, v, keep):
    """Gradients of torch's attention for ``wanted``: sink rows (``rows`` = 1) send nothing to the queries
    and keys and twice the usual to the values (all of their relevance: CP-LRP), the other rows the usual."""
    weights = [t for t in wanted if t is not v]
    grads = {}
    if weights:
        grads.update(zip(map(id, weights), torch.autograd.grad(out, weights, normed * (1.0 - rows), retain_graph=True)))
    if any(t is v for t in wanted):
        (grads[id(v)],) = torch.autograd.grad(out, [v], normed * (1.0 + rows), retain_graph=keep)
    return [grads[id(t)] for t in wanted]


def _without_sink(attn_mask, is_causal, like_q, like_k) -> torch.Tensor:
    """Boolean mask ``(..., L, S)``: the keys a row attends to, less its sink key (kept where it is the only one)."""
    query_len, key_len = like_q.size(-2), like_k.size(-2)
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=like_q.device)
    if attn_mask is not None:
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    if is_causal:
        allowed = allowed & torch.ones(query_len, key_len, dtype=torch.bool, device=like_q.device).tril()
    column = sink_column(attn_mask, like_k) > 0
    rest = allowed & ~column
    alone = ~rest.any(-1, keepdim=True)  # only the sink: its gate is 0, the row contributes nothing
    return rest | (alone & column)


def _gated_grads(q, k, v, wanted, normed, gated):
    """Gradients for ``wanted`` of the attention without the sink key, ``o'``, at ``g * R / stab(o)``.

    With the sink key ``z``, ``o = s_z v_z + g o'`` and ``g = 1 - s_z`` a constant: the softmax rule
    on ``o'`` at the normalized relevance ``g G`` is half of torch's score gradient, as for the
    whole attention (see :meth:`_Attention._fused_backward`); ``s_z v_z`` is a bias and gets nothing.
    """
    attn_mask, is_causal, scale, enable_gqa = gated
    gate = sink_mass(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                     complement=True)
    mask = _without_sink(attn_mask, is_causal, q, k)
    leaves = [t.detach().requires_grad_(any(t is w for w in wanted)) for t in (q, k, v)]
    with torch.enable_grad():
        rest = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    chosen = [leaf for leaf, t in zip(leaves, (q, k, v)) if any(t is w for w in wanted)]
    return torch.autograd.grad(rest, chosen, normed * gate.unsqueeze(-1).to(normed.dtype)) if chosen else ()


def _keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``); ``True`` if unknown."""
    getter = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if getter is None else bool(getter())


class _Attention(Function):
    """AttnLRP / CP-LRP rules for scaled dot-product attention."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, enable_gqa, epsilon, cp, fused, sinks):
        ctx.is_causal, ctx.scale, ctx.epsilon, ctx.cp, ctx.sinks = is_causal, scale, epsilon, cp, sinks
        needs = ctx.needs_input_grad[:3]
        ctx.fused = any(needs) and fused
        ctx.rows = ctx.gated = None
        if ctx.fused and sinks == GATE and not cp:
            # the rule runs in the backward pass on the attention without the sink key (see _gated_grads)
            ctx.gated = (attn_mask, is_causal, scale, enable_gqa)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
            )
            ctx.inputs = tuple(t.detach().requires_grad_(need) for t, need in zip((q, k, v), needs))
            ctx.output = out.detach()
            return out.detach()
        if ctx.fused and sinks is not None and not cp:
            mass = sink_mass(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            ctx.rows = sink_rows(mass, sinks)
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
        if ctx.output is None:
            raise RuntimeError(
                "Trying to backward through the graph a second time (or directly access saved tensors after they "
                "have already been freed). Specify retain_graph=True if you need to backward through the graph a "
                "second time."
            )
        q, k, v = ctx.inputs
        out = ctx.output
        keep = _keep_graph()
        if not keep:  # free torch's attention graph as soon as it is used, as autograd frees ours
            ctx.inputs = ctx.output = None
        dtype = compute_dtype(out)
        normed = stabilized_quotient(relevance.to(dtype), out.detach().to(dtype), ctx.epsilon).to(out.dtype)
        shares = (0.0, 0.0, 1.0) if ctx.cp else (0.25, 0.25, 0.5)
        wanted = [t for t, share in zip((q, k, v), shares) if t.requires_grad and share]
        if ctx.gated is not None:
            grads = iter(_gated_grads(q, k, v, wanted, normed, ctx.gated))
        elif ctx.rows is not None:
            grads = iter(_sink_row_grads(out, wanted, normed, ctx.rows.to(normed.dtype), v, keep))
        else:
            grads = iter(torch.autograd.grad(out, wanted, normed, retain_graph=keep) if wanted else ())
        result = []
        for tensor, share, need in zip((q, k, v), shares, ctx.needs_input_grad[:3]):
            if not need:
                result.append(None)
            elif not share:
                # zeros rather than None: hooks on the projections that produced q and k (Zennit's) need a tensor
                result.append(torch.zeros_like(tensor))
            else:
                result.append((next(grads).to(dtype) * tensor.detach().to(dtype)).mul_(share).to(tensor.dtype))
        return tuple(result) + (None,) * 8

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance):
        needs = ctx.needs_input_grad[:3]
        if not any(needs):
            return (None,) * 11
        if ctx.fused:
            return _Attention._fused_backward(ctx, relevance)
        q, k, v, out, attn_mask = ctx.saved_tensors
        relevances = blocked_attention_relevance(
            q, k, v, out, relevance, attn_mask=attn_mask, is_causal=ctx.is_causal, scale=ctx.scale,
            epsilon=ctx.epsilon, cp=ctx.cp, sinks=ctx.sinks,
        )
        return tuple(r if need else None for r, need in zip(relevances, needs)) + (None,) * 8


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
    mask_is_bias_free: bool | None = None,
    sinks: float | str | None = None,
):
    r"""Scaled dot-product attention with the AttnLRP (or CP-LRP) rules in the backward pass.

    The forward pass is :func:`torch.nn.functional.scaled_dot_product_attention`.
    The backward pass decomposes it into the operations of eager attention and
    applies each one's rule (see :func:`attention_relevance`): epsilon/uniform
    rule on ``softmax(.) v`` and on ``q k^T`` (Proposition 3.3), pass-through of
    the scaling, the mask as a constant summand (see
    :func:`~lxt_explicit.functional.add2`), and the softmax rule (Proposition 3.1).
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
    mask_is_bias_free : bool, optional
        Whether ``attn_mask`` only attends or blocks (:func:`mask_is_pure`); checked here (reading
        the mask) if not given.  Callers that see one mask many times can check it once.
    sinks : {None, 'gate', 'mix'} or float, optional
        Attention-sink handling (``None``: AttnLRP as published).  ``'gate'``: each row is
        ``o = s_z v_z + g o'`` with ``z`` the sink key, the gate ``g = 1 - s_z`` a constant, the
        sink's value term a bias (it absorbs its share) and the rules above on ``o'``, the attention
        over the other keys (computed by torch's attention with the sink masked, at ``g R / stab(o)``).
        A threshold ``t`` in ``[0, 1)``:
        query rows whose attention weight on the sink (the first key the sequence attends to,
        :func:`~lxt_explicit.functional.sinks.sink_mass`) exceeds ``t`` get constant attention
        weights (CP-LRP: all of the row's relevance to the values); the other rows keep the
        softmax rule.  ``'mix'``: every row's relevance is split, its weight on the sink with
        constant attention weights, the rest with the softmax rule.  See ``docs/attention_sinks.md``.

    Returns
    -------
    torch.Tensor
        The attention output, ``(..., heads, L, d)``.
    """
    if q.size(-3) != k.size(-3) and not enable_gqa and k.size(-3) != 1:  # one key head broadcasts (multi-query)
        raise ValueError(
            f"queries have {q.size(-3)} heads and keys {k.size(-3)}; pass enable_gqa=True for grouped-query attention"
        )
    if q.size(-3) % k.size(-3) != 0:
        raise ValueError(f"query heads ({q.size(-3)}) must be a multiple of key/value heads ({k.size(-3)})")
    if sinks == BOS:
        raise ValueError(
            "sinks='bos' is a setting of AttentionRule and the presets, which read the input ids of the forward "
            "pass; the functional attention takes sinks='gate' (the first token as a sink) or sinks=None"
        )
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    fused = tracked and (mask_is_pure(attn_mask) if mask_is_bias_free is None else bool(mask_is_bias_free))
    return _Attention.apply(
        q, k, v, attn_mask, bool(is_causal), scale, bool(enable_gqa), check_epsilon(epsilon), bool(cp), fused,
        check_sinks(sinks),
    )
