"""Label units by activation maximization over a corpus: where they activate most, where they are most relevant.

:func:`label_units` streams over a corpus (a text file, a list of strings or a
``datasets.Dataset``), runs each text through the model once forward and once backward with an
LRP composite (AttnLRP by default) and keeps, per unit, the text windows around the positions
where the unit's activation is largest and where its relevance is largest.  The relevance starts
at the model's own next-token predictions: at every position, the largest logit (as
:func:`~lxt_explicit.explain.explain` does for a continuation), so a unit's relevance at a
position is its contribution to the predictions at that position and the ones after it.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..heatmap import clean_tokens
from ..latent import LatentRecorder
from ..presets import attnlrp
from .units import ActivationRecorder, unit_point

__all__ = ["Window", "UnitLabel", "iter_corpus", "label_units"]


@dataclass(frozen=True)
class Window:
    """A stretch of text around one token, and the unit's value there.

    Attributes
    ----------
    value : float
        The unit's activation or relevance at the token.
    text_index : int
        Which text of the corpus.
    position : int
        The token's position in that text.
    tokens : list of str
        The window's tokens.
    center : int
        Index of the token in ``tokens``.
    """

    value: float
    text_index: int
    position: int
    tokens: list[str]
    center: int

    @property
    def token(self) -> str:
        """The token the unit's value belongs to."""
        return self.tokens[self.center]

    def highlighted(self, marks: tuple[str, str] = ("[[", "]]")) -> str:
        """The window's text with the token between ``marks``."""
        pieces = list(self.tokens)
        pieces[self.center] = marks[0] + pieces[self.center] + marks[1]
        return "".join(pieces)


@dataclass
class UnitLabel:
    """What a unit responds to: its top windows by activation and by relevance, and a summary."""

    spec: str
    unit: int
    by_activation: list[Window] = field(default_factory=list)
    by_relevance: list[Window] = field(default_factory=list)
    texts: int = 0

    def top_tokens(self, by: str = "activation", n: int = 5) -> list[tuple[str, int]]:
        """The most frequent tokens of the top windows (``by='activation'`` or ``'relevance'``)."""
        windows = self.by_activation if by == "activation" else self.by_relevance
        return Counter(window.token.strip() or window.token for window in windows).most_common(n)

    def summary(self) -> str:
        """One line: the unit and the top tokens by activation and by relevance."""

        def listed(by):
            return ", ".join(f"{token!r}x{count}" for token, count in self.top_tokens(by)) or "-"

        return f"{self.spec} #{self.unit}: activation {listed('activation')}; relevance {listed('relevance')}"

    def __repr__(self) -> str:
        return self.summary()


def iter_corpus(corpus, text_column: str = "text") -> Iterator[str]:
    """The texts of ``corpus``: a path to a text file (one text per non-empty line), a list of strings
    or a ``datasets.Dataset`` (its ``text_column``)."""
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if not path.is_file():
            raise ValueError(f"corpus {str(corpus)!r} is not a file; give a path, a list of texts or a Dataset")
        with path.open(encoding="utf-8") as handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())
        return
    if hasattr(corpus, "column_names"):
        if text_column not in corpus.column_names:
            raise ValueError(f"the dataset has no column {text_column!r} (it has {corpus.column_names}); "
                             "pass text_column=")
        corpus = (row[text_column] for row in corpus)
    for text in corpus:
        if not isinstance(text, str):
            raise TypeError(f"corpus texts must be strings, got {type(text).__name__}")
        if text.strip():
            yield text


class _Best:
    """The ``top`` largest values seen, with what is needed to make their windows."""

    def __init__(self, top: int):
        self.top, self.heap, self.count = top, [], 0

    def offer(self, values: torch.Tensor, text_index: int, tokens: list[str], window: int) -> None:
        for position in values.topk(min(self.top, len(values))).indices.tolist():
            value = float(values[position])
            self.count += 1
            entry = (value, -self.count, text_index, position, tokens, window)
            if len(self.heap) < self.top:
                heapq.heappush(self.heap, entry)
            elif value > self.heap[0][0]:
                heapq.heapreplace(self.heap, entry)

    def windows(self) -> list[Window]:
        result = []
        for value, _, text_index, position, tokens, window in sorted(self.heap, reverse=True):
            start = max(0, position - window)
            result.append(Window(value, text_index, position, tokens[start : position + window + 1], position - start))
        return result


def label_units(
    model: nn.Module,
    tokenizer,
    corpus,
    spec: str,
    units: int | Sequence[int],
    *,
    top: int = 5,
    window: int = 8,
    max_length: int = 128,
    composite=None,
    text_column: str = "text",
    progress: bool = True,
) -> UnitLabel | list[UnitLabel]:
    """Label units of ``spec`` by the text windows where they activate most and are most relevant.

    Parameters
    ----------
    model, tokenizer
        A causal language model and its tokenizer.
    corpus : str, path, list of str or datasets.Dataset
        The texts (see :func:`iter_corpus`); read one at a time.
    spec : str
        Where the units live (``'mlp:K'``, ``'heads:K'``, ``'sae:SITE'``).
    units : int or sequence of int
        The units to label (one pass over the corpus labels them all).
    top, window : int
        How many windows to keep per unit and ranking, and how many tokens on each side.
    max_length : int
        Texts are cut to this many tokens.
    composite : Composite, optional
        The rules (default: a fresh :func:`~lxt_explicit.presets.attnlrp`).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    UnitLabel or list of UnitLabel
        One per unit (a list if ``units`` is a list).
    """
    single = isinstance(units, int)
    indices = [units] if single else list(units)
    point = unit_point(model, spec)
    for unit in indices:
        if isinstance(unit, bool) or not isinstance(unit, int) or unit < 0 or (point.units and unit >= point.units):
            last = point.units - 1 if point.units else "?"
            raise ValueError(f"{spec!r}: unit {unit!r} is not a unit index (0..{last})")
    activation = {unit: _Best(top) for unit in indices}
    relevance = {unit: _Best(top) for unit in indices}
    composite = composite if composite is not None else attnlrp()
    texts = 0
    with composite.context(model):
        for text_index, text in enumerate(_progress(iter_corpus(corpus, text_column), progress)):
            acts, rels, tokens = _run(model, tokenizer, text, spec, max_length)
            for unit in indices:
                activation[unit].offer(acts[:, unit], text_index, tokens, window)
                relevance[unit].offer(rels[:, unit], text_index, tokens, window)
            texts += 1
    if texts == 0:
        raise ValueError("the corpus holds no texts")
    labels = [UnitLabel(spec, u, activation[u].windows(), relevance[u].windows(), texts) for u in indices]
    return labels[0] if single else labels


def _progress(texts: Iterable[str], show: bool) -> Iterable[str]:
    if not show:
        return texts
    from tqdm.auto import tqdm

    return tqdm(texts, desc="labelling", unit=" texts")


def _run(model, tokenizer, text: str, spec: str, max_length: int):
    encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
    input_ids = encoded["input_ids"].to(next(model.parameters()).device)
    with torch.enable_grad(), LatentRecorder(model, [spec]) as recorder, ActivationRecorder(model, [spec]) as acts:
        logits = model(input_ids=input_ids, use_cache=False).logits
        best = logits.max(-1).values
        torch.autograd.backward(best, best.detach())
    tokens = clean_tokens(tokenizer.convert_ids_to_tokens(input_ids[0].tolist()))
    return acts.activations[spec][0].cpu(), recorder.relevance[spec][0].cpu(), tokens
