"""Targets of :func:`lxt_explicit.explain.explain`: the logits an explanation starts from.

* :func:`token_id` turns a target given as a token id or a one-token string into a checked id;
* :func:`needed_logits` runs the model and computes the logits of the last positions only (the
  vocabulary projection of every other position is never computed: on a 262k-token vocabulary it
  costs as much as the rest of the model);
* :func:`select_targets` picks the explained logits and their initial relevance.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from dataclasses import dataclass

import torch
from torch import nn

from .prompts import token_texts

__all__ = [
    "Targets", "embedding_name", "is_integer", "needed_logits", "select_targets", "token_id", "token_name",
    "vocabulary_size",
]


@dataclass
class Targets:
    """The explained logits of a batch: per row the logits, their initial relevance, a description, the ids."""

    selected: list[torch.Tensor]
    seeds: list[torch.Tensor]
    descriptions: list[str]
    ids: list[list[int]]


def vocabulary_size(model: nn.Module) -> int:
    """Number of logits per position (rows of the output embeddings, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def token_id(tokenizer, token, what: str, vocabulary: int) -> int:
    """The id of ``token`` (an id, or a string that is one token), checked against the vocabulary.

    Raises
    ------
    TypeError
        If ``token`` is neither an integer nor a string.
    ValueError
        If the string is not exactly one token or the id is outside ``0 .. vocabulary - 1``.
    """
    if isinstance(token, str):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"{what} {token!r} is {len(ids)} tokens ({token_texts(tokenizer, ids)}); give one token "
                "(e.g. with its leading space, ' Paris'), a token id, or use continuation= for several tokens"
            )
        token = ids[0]
    elif not is_integer(token):
        raise TypeError(f"{what} must be a token id (int) or a string that is one token, got {token!r}")
    token = operator.index(token)
    if not 0 <= token < vocabulary:
        raise ValueError(f"{what} id {token} is outside the model's vocabulary (ids 0 to {vocabulary - 1})")
    return token


def is_integer(value) -> bool:
    """Whether ``value`` is an integer (``int``, a NumPy or 0-d integer tensor: anything ``operator.index``
    takes), ``bool`` excluded."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def embedding_name(model: nn.Module) -> str:
    """Name of the token-embedding module inside ``model`` (where token relevance is read)."""
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def needed_logits(model: nn.Module, inputs: dict, keep: int) -> torch.Tensor:
    """Run ``model(**inputs)`` and return the logits of the last ``keep`` positions, ``[batch, keep, vocab]``.

    Uses the model's ``logits_to_keep`` argument where its ``forward`` has one, else slices the
    hidden states in front of the output embeddings; the logits are the same as those of a full
    forward pass, the relevance too (the other positions' logits would start no relevance).
    """
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        return model(**inputs, logits_to_keep=keep).logits[:, -keep:]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with _last_positions_into(head, keep) if head is not None else contextlib.nullcontext():
        return model(**inputs).logits[:, -keep:]


@contextlib.contextmanager
def _last_positions_into(head: nn.Module, keep: int):
    """While active, ``head`` receives only the last ``keep`` positions of its input."""

    def last_positions(module, args):
        return (args[0][:, -keep:], *args[1:])

    handle = head.register_forward_pre_hook(last_positions)
    try:
        yield
    finally:
        handle.remove()


def select_targets(logits, sequences, prompt_lengths, tokenizer, options) -> Targets:
    """The logits the relevance starts from, their initial relevance (their own values), descriptions.

    ``logits`` are those of the last positions of the left-padded batch (:func:`needed_logits`):
    every sequence ends in the last column.
    """
    targets = Targets([], [], [], [])
    for row, seq in enumerate(sequences):
        if len(seq) > prompt_lengths[row]:
            _continuation_target(targets, logits[row], seq, prompt_lengths[row], tokenizer, options)
        else:
            _next_token_target(targets, logits[row, -1], tokenizer, _for_row(options["target"], row),
                               _for_row(options["contrast"], row))
    return targets


def _for_row(value, row: int):
    """The target or contrast of one row: its element of a per-prompt list, else the one value for all."""
    return value[row] if isinstance(value, list) else value


def _continuation_target(targets: Targets, logits, seq, prompt_length: int, tokenizer, options) -> None:
    """One logit per continuation token: at each position before it, its own or the largest logit."""
    continuation = list(seq[prompt_length:])
    rows = logits[-len(continuation) - 1 : -1]
    if options["continuation_score"] == "max":
        values = rows.max(-1).values
    else:
        values = rows.gather(-1, torch.tensor(continuation, device=logits.device)[:, None]).squeeze(-1)
    text = tokenizer.decode(continuation)
    targets.descriptions.append(
        f"continuation {text!r} ({len(continuation)} tokens, {options['continuation_score']} logits)"
    )
    targets.selected.append(values)
    targets.seeds.append(values.detach())
    targets.ids.append(continuation)


def _next_token_target(targets: Targets, last, tokenizer, given, other) -> None:
    """The next token's logit, or the difference of two next tokens' logits (ids checked by :func:`token_id`)."""
    token = int(last.argmax()) if given is None else given
    name = token_name(tokenizer, token)
    if other is None:
        targets.ids.append([token])
        targets.selected.append(last[token : token + 1])
        targets.seeds.append(last[token : token + 1].detach())
        targets.descriptions.append(f"next token {name!r} (logit {float(last[token].detach()):.3f})")
        return
    if other == token:
        chosen = "the target" if given is not None else "the most likely next token"
        raise ValueError(
            f"contrast {name!r} is {chosen}: logit minus itself is zero, so nothing would be explained; "
            "give a different contrast token"
        )
    targets.ids.append([token, other])
    targets.selected.append(torch.stack([last[token], last[other]]))
    targets.seeds.append(torch.stack([last[token], -last[other]]).detach())
    targets.descriptions.append(
        f"logit of {name!r} minus logit of {token_name(tokenizer, other)!r} "
        f"({float((last[token] - last[other]).detach()):.3f})"
    )


def token_name(tokenizer, token: int) -> str:
    """A token as the tokenizer decodes it (its raw piece where it is part of a character, e.g. one byte)."""
    text = tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text if "\ufffd" not in text else tokenizer.convert_ids_to_tokens([token])[0]
