"""Attention sinks: how much of an explanation's relevance sits on the first token and on special tokens.

Relevance often pools on the first token of a sequence (the beginning-of-sequence token where the
tokenizer adds one) and on special tokens (chat-template markers, separators), whatever the prompt
says.  These functions measure it, so that a dataset's explanations can be compared with and
without the sinks and a heatmap can leave them out of its colour scale
(``exclude_from_scale=`` of the :mod:`lxt_explicit.heatmap` functions).

The **share** of a set of tokens is their absolute relevance over the total absolute relevance of
the explained sequence (prompt and continuation)::

    share(S) = sum_{i in S} |R_i| / sum_i |R_i|

so shares lie in [0, 1] whatever the signs, and the share of the first token plus that of all other
tokens is 1.  A sequence whose relevance is zero everywhere has no share (``NaN``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["json_shares", "relevance_shares", "special_positions", "sink_shares", "text_positions"]


def special_positions(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """Positions of ``token_ids`` that are special tokens of ``tokenizer`` (``tokenizer.all_special_ids``).

    Added tokens that the tokenizer marks as special count too (chat-template markers usually are).
    """
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    return [position for position, token in enumerate(token_ids) if int(token) in special]


def text_positions(tokenizer, token_ids: Sequence[int], positions: Sequence[int] | None = None) -> tuple[int, ...]:
    """``positions`` (default: every position of ``token_ids``) less the special tokens' (:func:`special_positions`)."""
    special = set(special_positions(tokenizer, token_ids))
    return tuple(i for i in (range(len(token_ids)) if positions is None else positions) if i not in special)


def relevance_shares(relevance, special: Sequence[int] = ()) -> dict[str, float]:
    """Share of the absolute relevance on the first token and on the tokens at the positions ``special``.

    Parameters
    ----------
    relevance : tensor or sequence of float
        One value per token.
    special : sequence of int
        Positions of the special tokens (see :func:`special_positions`).

    Returns
    -------
    dict
        ``{'first_token': share, 'special_tokens': share}`` (``NaN`` where all relevance is zero or
        there are no tokens; ``special_tokens`` is 0 when there are no special tokens).
    """
    values = torch.as_tensor(relevance, dtype=torch.float64).abs().flatten()
    positions = sorted(set(int(p) for p in special))
    if any(not 0 <= p < len(values) for p in positions):
        raise ValueError(f"special positions {positions} are outside the {len(values)} tokens")
    total = float(values.sum())
    if not len(values) or total == 0 or total != total:
        return {"first_token": float("nan"), "special_tokens": float("nan")}
    return {
        "first_token": float(values[0]) / total,
        "special_tokens": float(values[positions].sum()) / total if positions else 0.0,
    }


def sink_shares(explanation, tokenizer) -> dict:
    """:func:`relevance_shares` of an :class:`~lxt_explicit.explanation.Explanation`, with the special positions.

    Returns
    -------
    dict
        ``{'first_token': share, 'special_tokens': share, 'special_positions': [...]}``, ready for
        strict JSON: a share that is not defined (all relevance zero) is ``None``.
    """
    positions = special_positions(tokenizer, explanation.token_ids)
    return {**json_shares(explanation.relevance, positions), "special_positions": positions}


def json_shares(relevance, special: Sequence[int] = ()) -> dict:
    """:func:`relevance_shares` for strict JSON: a share that is not defined (all relevance zero) is ``None``."""
    return {k: (v if math.isfinite(v) else None) for k, v in relevance_shares(relevance, special).items()}
