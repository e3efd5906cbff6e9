"""The result of :func:`lxt_explicit.explain.explain`: tokens, their relevance and how it was computed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .explanation_io import load_fields, long_frame, save_fields

__all__ = ["Explanation"]


@dataclass
class Explanation:
    """Relevance of the tokens of a prompt (and continuation) for an explained quantity.

    Attributes
    ----------
    token_ids : list of int
        Ids of the explained sequence: the prompt, followed by the continuation if there is one.
    tokens : list of str
        The tokenizer's own pieces (``convert_ids_to_tokens``): ``'Ġthe'``, and for byte-level BPE
        the bytes of non-ASCII text as characters (``'ĠcafÃ©'`` for ``' café'``).  For display,
        use ``token_texts``.
    relevance : torch.Tensor
        Relevance of each token (of its input embedding, summed over the hidden dimension), float32.
    prompt_length : int
        Number of prompt tokens; ``tokens[prompt_length:]`` is the continuation.
    target : str
        What was explained, in words.
    target_value : float
        The explained quantity (the sum of the logits the relevance started from).
    target_ids : list of int
        Ids of the explained tokens: the next token, the target and contrast token, or the
        continuation's tokens.
    source_relevance : dict
        Relevance of every relevance source per token (token embeddings, position embeddings, ...).
    latent : dict
        Relevance of latent units per position, ``name -> (positions, units)``.
    method : str
        ``'attnlrp'``, ``'cp_lrp'`` or ``'custom'``.
    text : str
        The prompt text as tokenized (with the chat template and pre-fill, if any).
    offsets : list of (int, int)
        Character span of each prompt token in ``text`` (empty for tokenizers without offsets).
    token_texts : list of str
        Each token as the tokenizer decodes it (``' café'``); they join to the decoded sequence.
        A character split over several tokens is shown once, with the token that completes it.
        Filled from ``tokens`` (:func:`lxt_explicit.heatmap.clean_tokens`) if not given.
    epsilon : float or None
        Stabilizer of the rules (``None`` for a custom composite).
    prompt : str
        The prompt as given (``text`` is what was tokenized).
    stop_reason : str
        For a generated continuation, why it ends: ``'eos'`` (the model ended it), ``'max_new_tokens'``
        (the limit), ``'sentence'`` or ``'line'`` (cut at the end of the answer's first sentence or
        line); ``''`` otherwise.
    discarded_ids : list of int
        Ids of the generated tokens after the cut, not explained (empty if nothing was cut).
    discarded_text : str
        Their text.
    model : str
        The model's class and the name or folder it was loaded from (``''`` if not recorded).
    dtype : str
        The dtype of the model's parameters (``'float32'``; ``''`` if not recorded).
    """

    token_ids: list[int]
    tokens: list[str]
    relevance: torch.Tensor
    prompt_length: int
    target: str
    target_value: float
    target_ids: list[int] = field(default_factory=list)
    source_relevance: dict[str, torch.Tensor] = field(default_factory=dict)
    latent: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "attnlrp"
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    epsilon: float | None = None
    prompt: str = ""
    stop_reason: str = ""
    discarded_ids: list[int] = field(default_factory=list)
    discarded_text: str = ""
    model: str = ""
    dtype: str = ""

    def __post_init__(self):
        if not self.token_texts:
            from .heatmap import clean_tokens

            self.token_texts = clean_tokens(self.tokens)
        if len(self.token_texts) != len(self.tokens):
            raise ValueError(f"token_texts has {len(self.token_texts)} entries for {len(self.tokens)} tokens")

    def token_span(self, substring: str) -> slice:
        """The positions of the prompt tokens that cover the first occurrence of ``substring`` in ``text``."""
        start = self.text.find(substring) if substring else -1
        if start < 0 or not self.offsets:
            raise ValueError(f"{substring!r} is not part of the prompt text (or the tokenizer gives no offsets)")
        end = start + len(substring)
        inside = [i for i, (a, b) in enumerate(self.offsets) if b > start and a < end and b > a]
        return slice(inside[0], inside[-1] + 1)

    @property
    def continuation(self) -> list[str]:
        """The tokenizer pieces after the prompt (empty for next-token explanations)."""
        return self.tokens[self.prompt_length :]

    @property
    def continuation_text(self) -> str:
        """The continuation as text (empty for next-token explanations)."""
        return "".join(self.token_texts[self.prompt_length :])

    @property
    def conservation(self) -> float:
        """Relevance at all sources divided by the explained quantity (1 = nothing absorbed; NaN if it is 0)."""
        total = sum(float(r.sum()) for r in self.source_relevance.values())
        return total / self.target_value if self.target_value else float("nan")

    def top_tokens(self, k: int = 10, *, span: slice | None = None) -> list[tuple[int, str, float]]:
        """The ``k`` most relevant prompt tokens as ``(position, text, relevance)``, most relevant first.

        ``text`` is the token as decoded (``token_texts``; the raw piece is ``tokens[position]``).
        ``span`` restricts the ranking to some positions, e.g. ``explanation.token_span(context)``.
        """
        _check_count(k, "k")
        span = span or slice(0, self.prompt_length)
        positions = torch.arange(len(self.relevance))[span]
        order = torch.argsort(self.relevance[span], descending=True)[:k]
        chosen = [int(positions[i]) for i in order]
        return [(p, self.token_texts[p], float(self.relevance[p])) for p in chosen]

    def top_units(self, name: str, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` most relevant latent units of ``name`` (summed over positions) as ``(index, relevance)``."""
        _check_count(k, "k")
        if name not in self.latent:
            raise KeyError(f"no latent units {name!r} were recorded; recorded: {sorted(self.latent)} (see latent=)")
        totals = self.latent[name].sum(0)
        order = torch.argsort(totals, descending=True)[:k]
        return [(int(i), float(totals[i])) for i in order]

    def _repr_html_(self) -> str:
        from .heatmap import html_heatmap

        return html_heatmap(
            self.token_texts, self.relevance, title=self.method, subtitle=self.target, fragment=True, clean=False
        )

    def save(self, path) -> Path:
        """Write the explanation as ``NAME.json`` + ``NAME.safetensors`` (:mod:`lxt_explicit.explanation_io`)."""
        return save_fields(self, path, "explanation")

    @classmethod
    def load(cls, path) -> Explanation:
        """Read an explanation written by :meth:`save` (equal to the saved one, tensors bit for bit)."""
        return cls(**load_fields(path, "explanation"))

    def to_pandas(self):
        """Long table, one row per token: position, token, text, id, in_prompt, relevance (and the target, method).

        Needs pandas (``pip install 'lxt_explicit[data]'``).
        """
        columns = {"token": self.tokens, "token_id": self.token_ids,
                   "in_prompt": [i < self.prompt_length for i in range(len(self.tokens))]}
        constants = {"target": self.target, "method": self.method, "prompt": self.prompt}
        return long_frame(self.relevance, self.token_texts, "text", [], constants, columns).rename(
            columns={"index": "position"})

    def to_dict(self) -> dict:
        """The explanation as plain Python data for strict JSON: non-finite numbers become ``None``."""
        return {
            "tokens": self.tokens,
            "token_texts": self.token_texts,
            "token_ids": self.token_ids,
            "relevance": _finite(self.relevance.tolist()),
            "prompt_length": self.prompt_length,
            "target": self.target,
            "target_value": _finite(self.target_value),
            "target_ids": self.target_ids,
            "conservation": _finite(self.conservation),
            "method": self.method,
            "epsilon": self.epsilon,
            "prompt": self.prompt,
            "text": self.text,
            "offsets": [list(o) for o in self.offsets],
            "stop_reason": self.stop_reason,
            "discarded_ids": self.discarded_ids,
            "discarded_text": self.discarded_text,
            "source_relevance": {k: _finite(v.tolist()) for k, v in self.source_relevance.items()},
            "latent": {k: _finite(v.sum(0).tolist()) for k, v in self.latent.items()},
        }


def _check_count(k, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be a positive number of entries, got {k!r}")


def _finite(value):
    """``value`` (a number or nested lists of numbers) with NaN and infinities replaced by ``None``."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value if math.isfinite(value) else None
