"""Prompts for :func:`lxt_explicit.explain.explain`: checking, templating, tokenizing, generating, cutting.

* :func:`check_prompts` rejects what cannot be explained (an empty prompt, a non-string);
* :func:`prompt_text` applies the chat template (and says what to do when the tokenizer has none);
* :func:`token_texts` gives every token's text as the tokenizer decodes it, so byte-level BPE
  pieces such as ``'ĠcafÃ©'`` read ``' café'``;
* :func:`generate_greedy` lets the model continue a prompt, and :func:`answer_length` finds where
  the answer in that continuation ends (end of its first sentence or line, or end of sequence).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

__all__ = ["STOPS", "answer_length", "check_prompts", "encode", "eos_ids", "generate_greedy", "prompt_text",
           "token_texts"]

#: Where a generated answer ends: ``'sentence'`` (the end of its first sentence or line),
#: ``'line'`` (the end of its first line), ``'eos'`` (only the end-of-sequence token or the
#: token limit).
STOPS = ("sentence", "line", "eos")

# a sentence ends at . ! ? or an ellipsis (after closing quotes or brackets) followed by white space,
# or at a CJK full stop, question or exclamation mark
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s)|[\u3002\uff01\uff1f]")
# tokens of context decoded before a token: enough for a character of four bytes split over four tokens
_CONTEXT = 8


def check_prompts(prompt) -> tuple[list[str], bool]:
    """The prompts as a list and whether one string was given; empty prompts are errors.

    Raises
    ------
    TypeError
        If ``prompt`` is neither a string nor a sequence of strings.
    ValueError
        If a prompt is empty (or the list is).
    """
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None:
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompts:
        raise ValueError("prompt is an empty list; give at least one prompt")
    for index, text in enumerate(prompts):
        where = "" if single else f" (element {index} of the batch)"
        if not isinstance(text, str):
            raise TypeError(f"prompt{where} must be a string, got {type(text).__name__}")
        if not text:
            raise ValueError(f"prompt{where} is empty; give the text the model should continue or answer")
    return prompts, single


def prompt_text(tokenizer, prompt: str, chat: bool, system: str | None, prefill: str) -> str:
    """The text to tokenize: ``prompt + prefill``, or with ``chat`` the chat template around the prompt."""
    if not chat:
        return prompt + prefill
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"chat=True needs the tokenizer's chat template, and this {type(tokenizer).__name__} has no chat template; "
            "use chat=False and write the prompt in the model's format (e.g. 'Question: ...\\nAnswer:')"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def encode(tokenizer, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (a chat template already contains its special tokens).

    Raises
    ------
    ValueError
        If ``text`` gives no tokens.
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    else:
        ids, offsets = tokenizer(text, add_special_tokens=not chat)["input_ids"], []
    if not ids:
        raise ValueError(f"the prompt {text!r} gives no tokens; give text the tokenizer keeps")
    return list(ids), offsets


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Every token's text as the tokenizer decodes it, in the context of the tokens before it.

    The texts join to the decoded sequence.  A character whose bytes are split over several
    tokens (byte-level BPE, byte fallback) appears once, with the token that completes it; the
    tokens before show the text they complete (possibly nothing).

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The tokenizer of ``ids``.
    ids : sequence of int
        Token ids.

    Returns
    -------
    list of str
        One string per token.
    """
    ids = [int(i) for i in ids]
    windows = [ids[max(0, i - _CONTEXT) : i + 1] for i in range(len(ids))]
    options = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    after = tokenizer.batch_decode(windows, **options)
    before = tokenizer.batch_decode([w[:-1] for w in windows], **options)
    texts = []
    for index, (full, prefix) in enumerate(zip(after, before)):
        last = index == len(ids) - 1
        full, prefix = (full if last else full.rstrip("\ufffd")), prefix.rstrip("\ufffd")
        texts.append(full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode([ids[index]], **options))
    return texts


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a generated answer: the model's generation config and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


@torch.no_grad()
def generate_greedy(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], str]:
    """Greedy continuation of ``ids`` without its end-of-sequence token, and why it ended.

    Returns
    -------
    tokens : list of int
        The generated ids before the first end-of-sequence id.
    reason : str
        ``'eos'`` (the model ended it) or ``'max_new_tokens'`` (the limit was reached).
    """
    device = next(model.parameters()).device
    output = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=min(eos) if eos else None,
    )
    generated = output[0, len(ids) :].tolist()
    for position, token in enumerate(generated):
        if token in eos:
            return generated[:position], "eos"
    return generated, "max_new_tokens"


def answer_length(texts: Sequence[str], stop: str) -> tuple[int, str | None]:
    """How many of the continuation's tokens (with texts ``texts``) belong to the answer.

    Parameters
    ----------
    texts : sequence of str
        The continuation's tokens as decoded (:func:`token_texts`).
    stop : {'sentence', 'line', 'eos'}
        ``'sentence'``: the answer ends with its first sentence (``.``, ``!``, ``?`` or an ellipsis,
        after closing quotes, followed by white space) or its first line; ``'line'``: with its first
        line; ``'eos'``: it is the whole continuation.  Text before the first letter or digit never
        ends it (a continuation may start with a newline), and an abbreviation such as ``'Dr. '``
        does end a sentence.

    Returns
    -------
    length : int
        Number of tokens of the answer (``len(texts)`` when nothing is cut).
    cut : str or None
        ``'sentence'`` or ``'line'`` where the continuation was cut, ``None`` where it was not.
    """
    if stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {stop!r}")
    text = "".join(texts)
    end, cut = _answer_end(text, stop)
    if end is None or not text[end:].strip():
        return len(texts), None
    length, start = 0, 0
    for token_text in texts:
        if start >= end:
            break
        length, start = length + 1, start + len(token_text)
    return length, cut


def _answer_end(text: str, stop: str) -> tuple[int | None, str | None]:
    """Character index where the answer ends in ``text`` and what ends it (``None`` if nothing does)."""
    first_word = re.search(r"\w", text)
    if stop == "eos" or first_word is None:
        return None, None
    ends = []
    sentence = _SENTENCE_END.search(text, first_word.start())
    if stop == "sentence" and sentence is not None:
        ends.append((sentence.end(), "sentence"))
    newline = text.find("\n", first_word.start())
    if newline >= 0:
        ends.append((newline, "line"))
    return min(ends, key=lambda end: end[0]) if ends else (None, None)
