"""Aggregate token relevance into words, sentences or given character spans, keeping the map back to tokens.

Works on an :class:`~lxt_explicit.explanation.Explanation` (a vector) and on a
:class:`~lxt_explicit.per_token.TokenMatrix` (a matrix: its columns are aggregated, one row per
answer token stays).  Tokens are placed in the text by the tokenizer's character offsets (prompt
tokens) and by the lengths of their decoded texts (answer tokens, which follow the prompt text):

* :func:`words` - the tokenizer's own words (``word_ids`` of its pre-tokenizer, computed with
  offsets on the explained text), so a word split into several pieces (``' café'``, an emoji of
  four byte-level pieces) is one word; tokens outside any word (special tokens) stay alone;
* :func:`sentences` - the words grouped into sentences (ends at ``. ! ?`` and similar marks
  followed by white space, and at line breaks);
* :func:`spans` - given character spans of the text (or substrings, first occurrence).

Each returns an :class:`Aggregated`: one value per group (summed by default; ``reduce='mean'``,
``'max'``, ``'min'``, ``'absmax'`` or a function), with the token positions of each group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

__all__ = ["Aggregated", "REDUCTIONS", "aggregate", "sentences", "spans", "token_character_spans", "words"]


def _absmax(values: torch.Tensor, dim: int) -> torch.Tensor:
    index = values.abs().argmax(dim, keepdim=True)
    return values.gather(dim, index).squeeze(dim)


#: Reductions by name: each takes ``(values, dim)`` and removes ``dim``.
REDUCTIONS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "sum": lambda v, d: v.sum(d),
    "mean": lambda v, d: v.mean(d),
    "max": lambda v, d: v.amax(d),
    "min": lambda v, d: v.amin(d),
    "absmax": _absmax,
}

_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n+")


@dataclass
class Aggregated:
    """Relevance of groups of tokens (words, sentences, spans) and the tokens of each group.

    Attributes
    ----------
    labels : list of str
        Each group's text.
    groups : list of list of int
        Token positions of each group (the map back to the tokens).
    spans : list of (int, int)
        Character span of each group in ``text``.
    relevance : torch.Tensor
        ``[groups]`` for an explanation, ``[answer tokens, groups]`` for a matrix.
    level : str
        ``'word'``, ``'sentence'`` or ``'span'``.
    reduce : str
        How token values were combined.
    text : str
        The explained text (prompt text followed by the answer).
    row_labels : list of str
        For a matrix: the answer token (or word, sentence with ``rows=True``) of each row.
    row_groups : list of list of int
        For a matrix: the answer tokens (row numbers of the matrix) of each row.
    """

    labels: list[str]
    groups: list[list[int]]
    spans: list[tuple[int, int]]
    relevance: torch.Tensor
    level: str
    reduce: str = "sum"
    text: str = ""
    row_labels: list[str] = field(default_factory=list)
    row_groups: list[list[int]] = field(default_factory=list)

    def group_of(self, position: int) -> int | None:
        """The index of the (first) group that holds token ``position``; ``None`` if none does."""
        return next((g for g, members in enumerate(self.groups) if position in members), None)

    def top(self, k: int = 10, *, row: int | None = None) -> list[tuple[int, str, float]]:
        """The ``k`` most relevant groups as ``(index, label, relevance)`` (of answer token ``row`` for a matrix)."""
        values = self.relevance if row is None else self.relevance[row]
        if values.dim() != 1:
            raise ValueError("this aggregates a matrix: give row= (the answer token) to rank its groups")
        order = torch.argsort(values, descending=True)[:k]
        return [(int(i), self.labels[int(i)], float(values[i])) for i in order]

    def to_pandas(self):
        """Long table: one row per group (per answer token and group for a matrix); needs pandas."""
        from .explanation_io import long_frame

        return long_frame(self.relevance, self.labels, "group", self.row_labels,
                          {"level": self.level, "reduce": self.reduce},
                          {"tokens": [list(g) for g in self.groups], "start": [a for a, _ in self.spans],
                           "end": [b for _, b in self.spans]})


def full_text(explained) -> str:
    """The prompt text followed by the decoded tokens after the prompt's offsets."""
    return explained.text + "".join(explained.token_texts[len(explained.offsets) :])


def token_character_spans(explained) -> list[tuple[int, int] | None]:
    """Character span of each token in :func:`full_text`; ``None`` for a token with no text (a special token).

    Prompt tokens have the tokenizer's offsets; tokens after them follow the prompt text with the
    lengths of their decoded texts (a token that is the first piece of a split character has an
    empty span at that character).
    """
    if not explained.offsets:
        raise ValueError("aggregation needs the tokenizer's character offsets: use a fast tokenizer (is_fast=True)")
    located: list[tuple[int, int] | None] = [(a, b) if b > a else None for a, b in explained.offsets]
    cursor = len(explained.text)
    for text in explained.token_texts[len(explained.offsets) :]:
        located.append((cursor, cursor + len(text)))
        cursor += len(text)
    return located


def aggregate(relevance: torch.Tensor, groups: Sequence[Sequence[int]], reduce: str | Callable = "sum"):
    """Combine the last dimension of ``relevance`` over each group of positions; ``[..., groups]``."""
    function = REDUCTIONS.get(reduce) if isinstance(reduce, str) else reduce
    if function is None:
        raise ValueError(f"reduce must be one of {sorted(REDUCTIONS)} or a function (values, dim), got {reduce!r}")
    if any(len(g) == 0 for g in groups):
        raise ValueError("a group without tokens cannot be aggregated")
    columns = [function(relevance[..., list(g)], -1) for g in groups]
    return torch.stack(columns, -1) if columns else relevance.new_zeros((*relevance.shape[:-1], 0))


def _anchor(span: tuple[int, int], text: str) -> int:
    """The first character of ``span`` that is not white space (its start if there is none)."""
    start, end = span
    return next((i for i in range(start, end) if not text[i].isspace()), start)


def _word_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character spans of the tokenizer's words in ``text`` (from ``word_ids`` and offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("words come from the tokenizer's word_ids, which need a fast tokenizer (is_fast=True)")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    found: dict[int, list[int]] = {}
    for word, (start, end) in zip(encoding.word_ids(), encoding["offset_mapping"]):
        if word is not None and end > start:
            span = found.setdefault(word, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    return [tuple(span) for _, span in sorted(found.items())]


def _assign(located, text: str, units: list[tuple[int, int]]) -> list[list[int]]:
    """Groups of token positions: each unit span with its tokens; tokens in no unit stay alone, in order."""
    members: dict[tuple, list[int]] = {}
    for position, span in enumerate(located):
        if span is None:
            members[("token", position)] = [position]
            continue
        anchor = _anchor(span, text)
        unit = next((u for u, (a, b) in enumerate(units) if a <= anchor < b or a == anchor == b), None)
        key = ("unit", unit) if unit is not None else ("token", position)
        members.setdefault(key, []).append(position)
    return list(members.values())


def _result(explained, text, located, groups, level, reduce, rows: bool = False) -> Aggregated:
    group_spans = []
    for group in groups:
        placed = [located[p] for p in group if located[p] is not None]
        group_spans.append((min(a for a, _ in placed), max(b for _, b in placed)) if placed else (0, 0))
    labels = [
        text[a:b] if b > a else "".join(explained.token_texts[p] for p in group)
        for group, (a, b) in zip(groups, group_spans)
    ]
    relevance = aggregate(explained.relevance, groups, reduce)
    matrix = explained.relevance.dim() == 2
    row_labels = list(explained.token_texts[explained.prompt_length :]) if matrix else []
    row_groups = [[p - explained.prompt_length] for p in range(explained.prompt_length, len(located))]
    if rows and matrix:  # the answer's rows too: the answer part of each group that reaches into the answer
        row_groups = [[p - explained.prompt_length for p in g if p >= explained.prompt_length] for g in groups]
        row_groups = [g for g in row_groups if g]
        row_labels = ["".join(explained.token_texts[explained.prompt_length + r] for r in g) for g in row_groups]
        relevance = aggregate(relevance.transpose(0, 1), row_groups, reduce).transpose(0, 1)
    elif rows:
        raise ValueError("rows=True aggregates the rows of a matrix (a TokenMatrix); this is a vector")
    return Aggregated(
        labels=labels, groups=[list(g) for g in groups], spans=group_spans, relevance=relevance, level=level,
        reduce=reduce if isinstance(reduce, str) else getattr(reduce, "__name__", "custom"), text=text,
        row_labels=row_labels, row_groups=row_groups if matrix else [],
    )


def words(explained, tokenizer, *, reduce: str | Callable = "sum", rows: bool = False) -> Aggregated:
    """Relevance per word of the tokenizer (pieces of one word combined with ``reduce``).

    For a matrix, ``rows=True`` combines its rows (answer tokens) into answer words as well.
    """
    text = full_text(explained)
    located = token_character_spans(explained)
    groups = _assign(located, text, _word_spans(tokenizer, text))
    return _result(explained, text, located, groups, "word", reduce, rows)


def sentences(explained, tokenizer, *, reduce: str | Callable = "sum", rows: bool = False) -> Aggregated:
    """Relevance per sentence: the tokenizer's words grouped by the sentence their first letter is in.

    For a matrix, ``rows=True`` combines its rows (answer tokens) into answer sentences as well.
    """
    text = full_text(explained)
    located = token_character_spans(explained)
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    units = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    word_groups = _assign(located, text, _word_spans(tokenizer, text))
    merged: dict[tuple, list[int]] = {}
    for group in word_groups:
        placed = [located[p] for p in group if located[p] is not None]
        if not placed:
            merged[("token", group[0])] = list(group)
            continue
        anchor = _anchor(placed[0], text)
        unit = next((u for u, (a, b) in enumerate(units) if a <= anchor < b), len(units) - 1)
        merged.setdefault(("unit", unit), []).extend(group)
    return _result(explained, text, located, list(merged.values()), "sentence", reduce, rows)


def spans(
    explained, character_spans: Sequence[tuple[int, int] | str], *, reduce: str | Callable = "sum", rest: bool = False
) -> Aggregated:
    """Relevance of given character spans of :func:`full_text` (or substrings: their first occurrence).

    A token belongs to every span it overlaps (spans may overlap).  ``rest=True`` adds a last group
    with the tokens in no span.

    Raises
    ------
    ValueError
        For a span outside the text, an empty span, a substring not in the text, or a span with no token.
    """
    text = full_text(explained)
    located = token_character_spans(explained)
    resolved = []
    for span in character_spans:
        if isinstance(span, str):
            start = text.find(span) if span else -1
            if start < 0:
                raise ValueError(f"{span!r} is not part of the explained text {text!r}")
            span = (start, start + len(span))
        start, end = (int(v) for v in span)
        if not 0 <= start < end <= len(text):
            raise ValueError(f"span {span!r} must satisfy 0 <= start < end <= {len(text)} (the text's length)")
        resolved.append((start, end))
    groups = []
    for start, end in resolved:
        inside = [p for p, s in enumerate(located) if s is not None and (s[0] < end and s[1] > start
                                                                          or s[0] == s[1] and start <= s[0] < end)]
        if not inside:
            raise ValueError(f"span {(start, end)} ({text[start:end]!r}) holds no token")
        groups.append(inside)
    leftover = [p for p in range(len(located)) if not any(p in g for g in groups)] if rest else []
    result = _result(explained, text, located, groups + ([leftover] if leftover else []), "span", reduce)
    result.spans[: len(resolved)] = resolved
    result.labels[: len(resolved)] = [text[a:b] for a, b in resolved]
    if leftover:
        result.labels[-1] = "(rest)"
    return result
