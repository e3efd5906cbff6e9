"""Explain an encoder-decoder model's output tokens (translation, summary) by the source and the target prefix.

:func:`explain_seq2seq` runs a source text and a decoder prefix through an encoder-decoder model
(BART, T5, Marian, mBART, Pegasus, ...) with an LRP composite registered (AttnLRP by default) and
starts the relevance at the explained logits, each explained by its own value.  Through the
cross-attention, relevance reaches the encoder's input embeddings (the source tokens) as well as
the decoder's (the target tokens before the explained one).  Explained are

* the next token after the prefix (the most likely one, or a given ``target``), or
* every token of a greedily generated output (``max_new_tokens``), each by its own backward pass
  through one forward pass: a source-by-output relevance matrix, as for word alignment.

The encoder's and the decoder's input embeddings are told apart by module; an embedding module
that both share (one object) is a relevance source twice, ``name`` for the encoder's call and
``name#1`` for the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .composite import Composite
from .presets import attnlrp, cp_lrp
from .prompts import token_texts
from .stabilizer import DEFAULT_EPSILON
from .targets import token_id, vocabulary_size

__all__ = ["Seq2SeqExplanation", "explain_seq2seq", "token_sources"]

_METHODS = {"attnlrp": attnlrp, "cp_lrp": cp_lrp}


@dataclass
class Seq2SeqExplanation:
    """Relevance of the source and target tokens for the explained output tokens of an encoder-decoder model.

    Attributes
    ----------
    source_ids, target_ids : list of int
        The encoder's input ids and the decoder's (the start token, then the prefix or the generated output).
    source_tokens, target_tokens : list of str
        Each token as the tokenizer decodes it.
    explained_ids : list of int
        The explained tokens, one per row of the relevance matrices; row ``r`` explains
        ``explained_ids[r]`` as the output at decoder position ``explained_positions[r]``.
    explained_tokens : list of str
        The explained tokens as the tokenizer decodes them.
    explained_positions : list of int
        The decoder positions whose logits were explained.
    source_relevance : torch.Tensor
        ``(rows, source length)``: relevance of the source tokens (their input embeddings, summed
        over the hidden dimension), float32.
    target_relevance : torch.Tensor
        ``(rows, target length)``: relevance of the decoder's input tokens.  A decoder is causal,
        so row ``r`` is zero after position ``explained_positions[r]``.
    target_values : list of float
        The explained logits.
    sources : dict
        Every relevance source (token and position embeddings of both sides) per row,
        ``name -> (rows, length)``.
    method : str
        ``'attnlrp'``, ``'cp_lrp'`` or ``'custom'``.
    """

    source_ids: list[int]
    target_ids: list[int]
    source_tokens: list[str]
    target_tokens: list[str]
    explained_ids: list[int]
    explained_tokens: list[str]
    explained_positions: list[int]
    source_relevance: torch.Tensor
    target_relevance: torch.Tensor
    target_values: list[float]
    sources: dict = field(default_factory=dict)
    method: str = "attnlrp"

    def __str__(self) -> str:
        lines = []
        for row, token in enumerate(self.explained_tokens):
            best = self.source_tokens[int(self.source_relevance[row].argmax())]
            lines.append(f"{token!r} (logit {self.target_values[row]:.3g}): most relevant source token {best!r}")
        return "\n".join(lines)


def token_sources(model: nn.Module) -> tuple[str, str]:
    """The relevance-source names of the encoder's and of the decoder's input embeddings.

    An embedding module shared by encoder and decoder (one object) is named once; its second call
    (the decoder's) is the source ``name#1``.
    """
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    try:
        encoder = model.get_encoder().get_input_embeddings()
        decoder = model.get_decoder().get_input_embeddings()
    except (AttributeError, NotImplementedError) as error:
        error.add_note("lxt_explicit: explain_seq2seq needs an encoder-decoder model (get_encoder, get_decoder)")
        raise
    encoder_name, decoder_name = names[id(encoder)], names[id(decoder)]
    return encoder_name, (decoder_name if decoder is not encoder else f"{encoder_name}#1")


def _decoder_start(model: nn.Module) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError("the model's config has no decoder_start_token_id; set model.config.decoder_start_token_id")
    return int(start)


def _sequences(model, tokenizer, source: str, prefix: str, max_new_tokens: int | None):
    """Encoder ids, decoder input ids, and the explained (position, token) pairs (token ``None``: the most likely)."""
    if not isinstance(source, str) or not source:
        raise ValueError("source must be a non-empty text to explain the output for")
    source_ids = tokenizer(source)["input_ids"]
    if not source_ids:
        raise ValueError(f"the source {source!r} gives no tokens; give text the tokenizer keeps")
    start = _decoder_start(model)
    prefix_ids = tokenizer(text_target=prefix, add_special_tokens=False)["input_ids"] if prefix else []
    decoder_ids = [start, *prefix_ids]
    limit = getattr(model.config, "max_position_embeddings", None)
    for what, length in (("source", len(source_ids)), ("decoder input", len(decoder_ids) + (max_new_tokens or 0))):
        if limit is not None and length > limit:
            raise ValueError(
                f"the {what} is {length} tokens but the model has {limit} positions (config.max_position_embeddings): "
                "shorten the source, the prefix or max_new_tokens"
            )
    if max_new_tokens is None:
        return source_ids, decoder_ids, [(len(decoder_ids) - 1, None)]
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([source_ids], device=device),
            decoder_input_ids=torch.tensor([decoder_ids], device=device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1,
        )
    generated = output[0, len(decoder_ids) :].tolist()
    if not generated:
        raise ValueError("the model generated no tokens to explain")
    full = decoder_ids + generated
    explained = [(position - 1, full[position]) for position in range(len(decoder_ids), len(full))]
    return source_ids, full[:-1], explained


def _check(method, composite, max_new_tokens, target, prefix) -> None:
    if composite is None and method not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be a positive number of tokens, got {max_new_tokens!r}")
    if max_new_tokens is not None and target is not None:
        raise ValueError("target= explains the next token; it cannot be combined with max_new_tokens=")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be text (the decoder's output so far), got {type(prefix).__name__}")


def explain_seq2seq(
    model: nn.Module,
    tokenizer,
    source: str,
    *,
    prefix: str = "",
    target: int | str | None = None,
    max_new_tokens: int | None = None,
    method: str = "attnlrp",
    epsilon: float = DEFAULT_EPSILON,
    composite: Composite | None = None,
) -> Seq2SeqExplanation:
    """Explain an encoder-decoder model's next token, or each token of its greedy output, by source and prefix.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        An encoder-decoder model with a language-modelling head (``BartForConditionalGeneration``,
        ``T5ForConditionalGeneration``, ``MarianMTModel``, ...).
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer; the prefix is tokenized as target text (``text_target=``).
    source : str
        The encoder's input (the text to translate or summarize).
    prefix : str
        The decoder's output so far, after its start token.
    target : int or str, optional
        The next token to explain (an id or a string that is one token); default: the most likely.
    max_new_tokens : int, optional
        Generate the output greedily (up to this many tokens, with its end-of-sequence token if the
        model ends it) and explain each of its tokens.
    method : {'attnlrp', 'cp_lrp'}
        Rules (ignored if ``composite`` is given).
    epsilon : float
        Stabilizer of the rules (ignored if ``composite`` is given).
    composite : Composite, optional
        Rules to use instead of ``method``; registered for the call, or used as is if it already is.

    Returns
    -------
    Seq2SeqExplanation

    Raises
    ------
    ValueError
        For a model that is not an encoder-decoder, an empty source, a source or output longer than
        the model's positions, a target that is not one token, conflicting options, or a model
        without a decoder start token.
    """
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"explain_seq2seq needs an encoder-decoder model (config.is_encoder_decoder); {type(model).__name__} is "
            "not one. Use lxt_explicit.explain.explain for causal language models"
        )
    _check(method, composite, max_new_tokens, target, prefix)
    if target is not None:
        target = token_id(tokenizer, target, "target", vocabulary_size(model))
    source_ids, decoder_ids, explained = _sequences(model, tokenizer, source, prefix, max_new_tokens)
    rules = composite if composite is not None else _METHODS[method](epsilon=epsilon)
    rows, values, relevance = _explain_rows(model, rules, source_ids, decoder_ids, explained, target)
    encoder_name, decoder_name = token_sources(model)
    missing = [name for name in (encoder_name, decoder_name) if name not in relevance]
    if missing:
        raise RuntimeError(
            f"no relevance arrived at {missing}; the composite needs a RelevanceSource on the input embeddings "
            "(the presets have one)"
        )
    return Seq2SeqExplanation(
        source_ids=source_ids, target_ids=decoder_ids, source_tokens=token_texts(tokenizer, source_ids),
        target_tokens=token_texts(tokenizer, decoder_ids), explained_ids=[token for _, token in rows],
        explained_tokens=[token_texts(tokenizer, [token])[0] for _, token in rows],
        explained_positions=[position for position, _ in rows], source_relevance=relevance[encoder_name],
        target_relevance=relevance[decoder_name], target_values=values, sources=relevance,
        method=method if composite is None else "custom",
    )


def _explain_rows(model, composite, source_ids, decoder_ids, explained, target):
    """One forward pass, one relevance backward pass per explained token: rows, logits, relevance per source."""
    device = next(model.parameters()).device
    inputs = dict(input_ids=torch.tensor([source_ids], device=device),
                  decoder_input_ids=torch.tensor([decoder_ids], device=device), use_cache=False)
    registered_here = composite.model is not model
    if registered_here:
        composite.register(model)
    try:
        with torch.enable_grad():
            logits = model(**inputs).logits[0]
            tensors = composite.source_tensors()
            rows, values, per_row = [], [], []
            for number, (position, token) in enumerate(explained):
                if token is None:
                    token = target if target is not None else int(logits[position].argmax())
                goal = logits[position, token]
                grads = torch.autograd.grad(goal, list(tensors.values()), goal.detach(), allow_unused=True,
                                            retain_graph=number < len(explained) - 1)
                rows.append((position, token))
                values.append(float(goal.detach()))
                per_row.append([_per_token(g, t) for g, t in zip(grads, tensors.values())])
    finally:
        if registered_here:
            composite.remove()
    relevance = {name: torch.stack([row[index] for row in per_row]) for index, name in enumerate(tensors)}
    return rows, values, relevance


def _per_token(relevance, source: torch.Tensor) -> torch.Tensor:
    """Relevance of a source summed over its hidden dimension, one value per token (zeros if none arrived)."""
    if relevance is None:
        return torch.zeros(source.shape[:-1]).reshape(-1)
    return relevance.detach().float().sum(-1).reshape(-1).cpu()
