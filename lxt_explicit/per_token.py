"""Per-token attribution of an answer: one relevance row per answer token, from one shared forward pass.

:func:`explain_tokens` explains every token of a continuation (given, or generated greedily) on
its own: row ``t`` of the returned :class:`TokenMatrix` holds the relevance of every prompt token
and every earlier answer token for answer token ``t`` (its logit at the position before it).  Row
``t`` equals the explanation of the prompt followed by the first ``t`` answer tokens with the
answer's token ``t`` as target (:func:`lxt_explicit.explain.explain` with ``target=``).

Cost: one forward pass over prompt and answer is shared by all rows, and their backward passes
run batched:

1. one backward pass through the output embeddings takes every row's logit to the last hidden
   state (each row starts at its own position, and the output layer acts on each position alone,
   so the rows stay apart);
2. the rest runs as ``torch.autograd.grad(..., is_grads_batched=True)`` on chunks of rows (the
   relevance of ``chunk`` rows travels as one batched tensor through the rules).

A model whose rules cannot run batched falls back to one backward pass per row (still one forward).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .explain import METHODS, _check_options, _extend, _resolve_tokens
from .explanation import Explanation, _check_count
from .explanation_io import load_fields, long_frame, model_description, save_fields
from .prompts import check_prompts, encode, prompt_text, token_texts
from .targets import embedding_name, needed_logits, token_name

__all__ = ["TokenMatrix", "explain_tokens"]


@dataclass
class TokenMatrix:
    """Relevance of every earlier token for each token of an answer: a ``[answer, sequence]`` matrix.

    Attributes
    ----------
    token_ids, tokens, token_texts : list
        The explained sequence (prompt then answer): ids, tokenizer pieces, decoded texts.
    relevance : torch.Tensor
        ``[answer_length, sequence_length]``, float32 (float64 for a float64 model); row ``t`` is the
        relevance for answer token ``t`` (at position ``prompt_length + t``), zero from that position on.
    prompt_length : int
        Number of prompt tokens.
    target_values : torch.Tensor
        The explained logit of each row.
    score : str
        ``'token'`` (each row explains its answer token's logit) or ``'max'`` (the largest logit).
    source_relevance : dict
        Relevance of every relevance source (token embeddings, position embeddings, ...) as matrices.
    method, epsilon, text, offsets, prompt, stop_reason, discarded_ids, discarded_text, model, dtype
        As in :class:`~lxt_explicit.explanation.Explanation`.
    target_names : list of str
        Each row's answer token as the tokenizer names it alone.
    """

    token_ids: list[int]
    tokens: list[str]
    relevance: torch.Tensor
    prompt_length: int
    target_values: torch.Tensor
    score: str = "token"
    source_relevance: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = "attnlrp"
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)
    epsilon: float | None = None
    prompt: str = ""
    stop_reason: str = ""
    discarded_ids: list[int] = field(default_factory=list)
    discarded_text: str = ""
    target_names: list[str] = field(default_factory=list)
    model: str = ""
    dtype: str = ""

    def __post_init__(self):
        if not self.token_texts:
            from .heatmap import clean_tokens

            self.token_texts = clean_tokens(self.tokens)
        rows, columns = self.relevance.shape
        if columns != len(self.tokens) or rows != len(self.tokens) - self.prompt_length:
            raise ValueError(
                f"relevance is {rows} x {columns} but there are {len(self.tokens)} tokens, {self.prompt_length} of "
                "them in the prompt: one row per answer token, one column per token"
            )
        if not self.target_names:
            self.target_names = list(self.token_texts[self.prompt_length :])

    def __len__(self) -> int:
        return self.relevance.shape[0]

    @property
    def answer_text(self) -> str:
        """The answer (the tokens the rows explain) as text."""
        return "".join(self.token_texts[self.prompt_length :])

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not -len(self) <= row < len(self):
            raise IndexError(f"row must be an answer token index from 0 to {len(self) - 1} (or negative), got {row!r}")
        return row % len(self)

    def row(self, row: int) -> Explanation:
        """Row ``row`` as an :class:`~lxt_explicit.explanation.Explanation` of the tokens before its answer token."""
        row = self._check_row(row)
        end = self.prompt_length + row
        token = self.token_ids[end]
        what = "next token" if self.score == "token" else "largest next-token logit, answer token"
        return Explanation(
            token_ids=self.token_ids[:end], tokens=self.tokens[:end], relevance=self.relevance[row, :end].clone(),
            prompt_length=end, target=f"{what} {self.target_names[row]!r} (logit {float(self.target_values[row]):.3f})",
            target_value=float(self.target_values[row]), target_ids=[token],
            source_relevance={k: v[row, :end].clone() for k, v in self.source_relevance.items()},
            method=self.method, text=self.text, offsets=list(self.offsets[:end]), token_texts=self.token_texts[:end],
            epsilon=self.epsilon, prompt=self.prompt, model=self.model, dtype=self.dtype,
        )

    def terminal(self, row: int) -> str:
        """The tokens before answer token ``row`` as a coloured terminal heatmap, followed by that token in brackets."""
        from .heatmap import terminal_heatmap

        row = self._check_row(row)
        end = self.prompt_length + row
        shown = terminal_heatmap(self.token_texts[:end], self.relevance[row, :end], clean=False)
        return f"{shown}\x1b[1m[{self.token_texts[end]}]\x1b[0m"

    def html(self, *, title: str = "Relevance per answer token") -> str:
        """A self-contained HTML page: choose an answer token, hover a token for its relevance."""
        from .matrix_heatmap import html_matrix_heatmap

        return html_matrix_heatmap(self, title=title)

    def png(self, path, **options):
        """The matrix as a PNG image (:func:`lxt_explicit.matrix_heatmap.png_matrix_heatmap`); returns the path."""
        from .matrix_heatmap import png_matrix_heatmap

        return png_matrix_heatmap(self, path, **options)

    def save(self, path) -> Path:
        """Write the matrix as ``NAME.json`` + ``NAME.safetensors`` (:mod:`lxt_explicit.explanation_io`)."""
        return save_fields(self, path, "token_matrix")

    @classmethod
    def load(cls, path) -> TokenMatrix:
        """Read a matrix written by :meth:`save` (equal to the saved one, tensors bit for bit)."""
        return cls(**load_fields(path, "token_matrix"))

    def to_pandas(self):
        """Long table, one row per (answer token, earlier token): row, row_label, position, text, token, relevance.

        Only the entries before each row's own token are listed (the others are zero by causality).
        Needs pandas (``pip install 'lxt_explicit[data]'``).
        """
        columns = {"token": self.tokens, "token_id": self.token_ids,
                   "in_prompt": [i < self.prompt_length for i in range(len(self.tokens))]}
        constants = {"method": self.method, "prompt": self.prompt, "score": self.score}
        valid = [self.prompt_length + r for r in range(len(self))]
        frame = long_frame(self.relevance, self.token_texts, "text", self.token_texts[self.prompt_length :],
                           constants, columns, valid)
        return frame.rename(columns={"index": "position"})

    def top_tokens(self, row: int, k: int = 10) -> list[tuple[int, str, float]]:
        """The ``k`` most relevant tokens for answer token ``row`` as ``(position, text, relevance)``."""
        _check_count(k, "k")
        explanation = self.row(row)
        return explanation.top_tokens(k, span=slice(0, explanation.prompt_length))


def explain_tokens(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[str],
    *,
    continuation: str | None = None,
    max_new_tokens: int | None = None,
    score: str = "token",
    stop: str = "sentence",
    chat: bool = False,
    system: str | None = None,
    prefill: str = "",
    method: str = "attnlrp",
    epsilon: float = 1e-6,
    composite=None,
    chunk: int = 8,
) -> TokenMatrix | list[TokenMatrix]:
    """Explain each token of an answer on its own; one shared forward pass, batched backward passes.

    Parameters
    ----------
    model, tokenizer
        A causal language model and its tokenizer, as for :func:`lxt_explicit.explain.explain`.
    prompt : str or list of str
        The prompt (a list gives a list of matrices, one per prompt).
    continuation : str, optional
        The answer to explain, as text; or
    max_new_tokens : int, optional
        generate the answer greedily (cut as ``stop`` says).  One of the two is required.
    score : {'token', 'max'}
        Row ``t`` explains the logit of answer token ``t`` (``'token'``) or the largest logit at
        its position (``'max'``; the same for a greedy answer).
    stop, chat, system, prefill, method, epsilon, composite
        As for :func:`lxt_explicit.explain.explain`.
    chunk : int
        Rows whose backward passes run batched together (more: faster until memory runs short;
        1: one backward pass per row).

    Returns
    -------
    TokenMatrix or list of TokenMatrix

    Raises
    ------
    ValueError
        Without a continuation or ``max_new_tokens``, or for the bad requests
        :func:`~lxt_explicit.explain.explain` rejects.
    """
    prompts, single = check_prompts(prompt)
    if continuation is None and max_new_tokens is None:
        raise ValueError("explain_tokens explains an answer: give continuation= (text) or max_new_tokens= (generate)")
    if score not in ("token", "max"):
        raise ValueError(f"score must be 'token' or 'max', got {score!r}")
    _check_count(chunk, "chunk")
    options = dict(
        target=None, contrast=None, continuation=continuation, max_new_tokens=max_new_tokens,
        continuation_score=score, stop=stop, chat=chat, system=system, prefill=prefill, method=method,
        epsilon=epsilon, latent=(), composite=composite,
    )
    _check_options(options)
    _resolve_tokens(model, tokenizer, options, None)
    matrices = [_explain_one(model, tokenizer, p, options, chunk) for p in prompts]
    return matrices[0] if single else matrices


def _explain_one(model, tokenizer, prompt: str, options: dict, chunk: int) -> TokenMatrix:
    text = prompt_text(tokenizer, prompt, options["chat"], options["system"], options["prefill"])
    ids, offsets = encode(tokenizer, text, options["chat"])
    sequence, reason, discarded, discarded_text = _extend(model, tokenizer, ids, options)
    composite = options["composite"]
    own = composite is None
    if own:
        composite = METHODS[options["method"]](epsilon=options["epsilon"])
    registered_here = composite.model is not model
    if registered_here:
        composite.register(model)
    try:
        sources, values = _matrix_relevance(model, composite, sequence, len(ids), options["continuation_score"], chunk)
    finally:
        if registered_here:
            composite.remove()
    token_source = embedding_name(model)
    if token_source not in sources:
        raise RuntimeError(f"no relevance arrived at the input embeddings ({token_source}); the composite needs a "
                           "RelevanceSource on them (the presets have one)")
    texts = token_texts(tokenizer, sequence)
    description = model_description(model)
    return TokenMatrix(
        token_ids=list(sequence), tokens=tokenizer.convert_ids_to_tokens(list(sequence)),
        relevance=sources[token_source], prompt_length=len(ids), target_values=values,
        score=options["continuation_score"], source_relevance=sources,
        method=options["method"] if own else "custom", text=text, offsets=offsets, token_texts=texts,
        epsilon=options["epsilon"] if own else None, prompt=prompt, stop_reason=reason, discarded_ids=discarded,
        discarded_text=discarded_text, target_names=[token_name(tokenizer, t) for t in sequence[len(ids):]],
        model=description[0], dtype=description[1],
    )


def _matrix_relevance(model, composite, sequence, prompt_length, score, chunk):
    """Relevance matrices of every source (one row per answer token) and the explained logits."""
    answer = len(sequence) - prompt_length
    device = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    captured = []
    hook = head.register_forward_hook(lambda module, args, out: captured.append(args[0])) if head else None
    try:
        with torch.enable_grad():
            inputs = {"input_ids": torch.tensor([sequence], device=device), "use_cache": False}
            logits = needed_logits(model, inputs, answer + 1)[0, :-1]
    finally:
        if hook is not None:
            hook.remove()
    if score == "max":
        values = logits.max(-1).values
    else:
        values = logits.gather(-1, torch.tensor(sequence[prompt_length:], device=device)[:, None]).squeeze(-1)
    tensors = {name: t for name, t in composite.source_tensors().items() if t.dim() == 3}
    names, leaves = list(tensors), list(tensors.values())
    with torch.enable_grad():
        start, seeds = _start(values, captured, answer)
        rows = _batched_rows(start, seeds, leaves, chunk)
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32  # float64 models keep their precision
    matrices = {name: rows[i].detach().sum(-1).to(dtype).cpu() for i, name in enumerate(names)}
    return matrices, values.detach().to(dtype).cpu()


def _start(values: torch.Tensor, captured: list, answer: int):
    """Where the batched backward passes start, and each row's relevance there (``[rows, *start.shape]``).

    With the output embeddings' input captured (``[1, answer + 1, hidden]``), one backward pass
    takes all logits to it: row ``t`` lands at position ``t`` alone.  Otherwise the rows start at
    the logits themselves.
    """
    if len(captured) == 1 and captured[0].dim() == 3 and captured[0].shape[1] > answer:
        hidden = captured[0]
        (relevance,) = torch.autograd.grad(values, hidden, grad_outputs=values.detach(), retain_graph=True)
        offset = hidden.shape[1] - answer - 1
        seeds = torch.zeros((answer, *hidden.shape), dtype=relevance.dtype, device=relevance.device)
        rows = torch.arange(answer, device=relevance.device)
        seeds[rows, 0, offset + rows] = relevance[0, offset + rows]
        return hidden, seeds
    return values, torch.diag(values.detach())


def _batched_rows(start, seeds, leaves, chunk: int) -> list[torch.Tensor]:
    """Relevance at ``leaves`` per row: batched backward passes over chunks of rows (one at a time if they fail)."""
    pieces = [[] for _ in leaves]
    rows = seeds.shape[0]
    batched = chunk > 1
    for first in range(0, rows, chunk):
        block = seeds[first : first + chunk]
        if batched:
            try:  # the graph is kept: a failed batched pass must leave it whole for the fallback
                grads = torch.autograd.grad(start, leaves, block, retain_graph=True, is_grads_batched=True,
                                            allow_unused=True)
            except RuntimeError as error:
                warnings.warn(f"the rules cannot run batched backward passes ({error}); one backward pass per row",
                              RuntimeWarning, stacklevel=4)
                batched = False
        if not batched:
            single = [torch.autograd.grad(start, leaves, seed, retain_graph=True, allow_unused=True) for seed in block]
            grads = [torch.stack([_zero_if_none(s[j], leaf) for s in single]) for j, leaf in enumerate(leaves)]
        for j, leaf in enumerate(leaves):
            pieces[j].append(_zero_if_none(grads[j], leaf, len(block))[:, 0])
    return [torch.cat(p) for p in pieces]


def _zero_if_none(grad, leaf, rows: int | None = None):
    if grad is not None:
        return grad
    return torch.zeros(leaf.shape if rows is None else (rows, *leaf.shape), dtype=leaf.dtype, device=leaf.device)
