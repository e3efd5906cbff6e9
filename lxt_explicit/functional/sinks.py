"""Attention sinks: which query rows of an attention put most of their weight on the first attended key.

Language models park attention that a head does not need on the first token of the sequence (the
*attention sink*, Xiao et al., ICLR 2024); in such a row the softmax acts as a gate that mostly
switches the head off.  The attention rule can treat the sink as that gate (``sinks='gate'``: the
weight on the sink a constant, the sink's value a bias of the head, the paper's softmax rule on the
other keys), or treat rows with much weight on the sink as constants (CP-LRP; :func:`sink_rows`);
see :func:`~lxt_explicit.functional.scaled_dot_product_attention` and ``docs/attention_sinks.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "BOS", "GATE", "MIX", "check_sinks", "mass_from_probs", "sink_column", "sink_index", "sink_mass", "sink_rows",
]


#: The ``sinks`` setting that factors every row into a constant gate on the sink and a softmax over the other keys.
GATE = "gate"
#: The ``sinks`` setting that applies :data:`GATE` where the sink is the model's beginning-of-sequence token (a
#: constant of the model, not part of the text) and the paper's rules where it is a token of the text.
BOS = "bos"
#: The ``sinks`` setting that mixes the two rules in every row by the row's weight on the sink.
MIX = "mix"


def check_sinks(sinks) -> float | str | None:
    """Validate ``sinks``: ``None`` (the paper's rules), ``'gate'``, ``'bos'``, ``'mix'`` or a number in ``[0, 1)``."""
    if sinks is None or sinks in (GATE, BOS, MIX):
        return sinks
    if isinstance(sinks, bool) or not isinstance(sinks, (int, float)) or not 0.0 <= float(sinks) < 1.0:
        raise ValueError(
            f"sinks must be None (AttnLRP as published), 'gate' (the weight on the sink a constant gate, the sink's "
            f"value a bias, the softmax rule on the other keys), 'bos' ('gate' where the first token is the "
            f"beginning-of-sequence token, the paper's rules elsewhere), 'mix' (each row's weight on the sink decides "
            f"its share of constant attention weights) or the attention mass on the sink, a number in [0, 1), above "
            f"which a row's attention weights are constants; got {sinks!r}"
        )
    return float(sinks)


def _allowed(attn_mask: torch.Tensor) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


def sink_index(attn_mask, key_len: int, device) -> torch.Tensor | None:
    """The sink's key position per batch element: the first key the last query row attends to.

    Returns ``None`` when it is key 0 everywhere (no mask, a causal flag, or a mask without left
    padding), else an integer tensor of the mask's leading shape (left-padded batches).
    """
    if attn_mask is None:
        return None
    last_row = _allowed(attn_mask)[..., -1, :]
    last_row = last_row.expand(*last_row.shape[:-1], key_len)
    index = last_row.to(torch.int8).argmax(-1)
    return None if not bool(index.any()) else index


def _one_hot(index: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One-hot rows ``(..., kv_heads | 1, S)`` at ``index`` (the mask's leading shape), aligned with ``k``."""
    one_hot = F.one_hot(index, k.size(-2)).to(k.dtype)
    while one_hot.dim() < k.dim() - 1:
        one_hot = one_hot.unsqueeze(0)
    return one_hot


def sink_column(attn_mask, like: torch.Tensor) -> torch.Tensor:
    """1 at each row's sink key, else 0: ``(..., kv_heads | 1, 1, S)``, broadcasting to the scores of keys ``like``."""
    index = sink_index(attn_mask, like.size(-2), like.device)
    if index is None:
        column = torch.zeros(like.size(-2), dtype=like.dtype, device=like.device)
        column[0] = 1.0
        return column
    return _one_hot(index, like).unsqueeze(-2)


def mass_from_probs(probs: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """:func:`sink_mass` read off a written-out attention matrix ``probs`` ``(..., heads, L, S)``."""
    index = sink_index(attn_mask, probs.size(-1), probs.device)
    if index is None:
        return probs[..., 0]
    return (probs * _one_hot(index, probs).unsqueeze(-2)).sum(-1)


def sink_mass(q, k, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
              complement: bool = False) -> torch.Tensor:
    """Attention weight of every query row on its sink key, ``(..., heads, L)``, without a score matrix.

    Computed by the attention itself with a one-hot value vector at the sink (torch's fused kernel).
    ``complement=True``: the weight on all the other keys instead, summed without cancellation
    (``1 - mass`` loses the digits of a row that is almost all sink).
    """
    key_len = k.size(-2)
    index = sink_index(attn_mask, key_len, q.device)
    with torch.no_grad():
        if index is None:
            value = torch.zeros(*k.shape[:-1], 1, dtype=q.dtype, device=q.device)
            value[..., 0, 0] = 1.0
        else:
            value = _one_hot(index, k).unsqueeze(-1).expand(*k.shape[:-1], 1)
        if complement:
            value = 1.0 - value
        mass = F.scaled_dot_product_attention(
            q.detach(), k.detach(), value.contiguous(), attn_mask=attn_mask, is_causal=is_causal,
            scale=scale if scale is not None else 1.0 / math.sqrt(q.size(-1)), enable_gqa=enable_gqa,
        )
    return mass.squeeze(-1)


def sink_rows(mass: torch.Tensor, threshold: float | str) -> torch.Tensor:
    """The share of each row's relevance that treats the attention weights as constants, ``(..., heads, L, 1)``.

    A threshold: 1 for the rows whose weight on the sink exceeds it, else 0.  ``'mix'``: the weight on the
    sink itself (a row that attends only to the sink is all constant, one that ignores it all AttnLRP).
    """
    if threshold == MIX:
        return mass.clamp(0.0, 1.0).unsqueeze(-1)
    return (mass > threshold).to(mass.dtype).unsqueeze(-1)
