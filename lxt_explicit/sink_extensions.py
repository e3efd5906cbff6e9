"""Composite extensions for the attention-sink settings of the attention rules (``attnlrp(sinks=...)``).

:class:`BosSink` tells the rules with ``sinks='bos'`` whether a forward pass starts with the
beginning-of-sequence token; :class:`EagerAttentionWarning` warns where a model's attention is not
the function the sink settings apply to.

In a causal language model the first position attends only to itself, so its keys and values in
every layer are a function of the first token alone.  Where that token is the model's
beginning-of-sequence (BOS) token, which the tokenizer or the chat template puts in front of every
text, the sink's value term ``s_z v_z`` of an attention row is the same for every input: a bias of
the head in the strict sense, which the sink gate (``sinks='gate'``) treats as one.  Where the first
token is a word of the text, its keys and values change with that word, the gate would hide the
word's relevance, and the paper's rules apply (``docs/attention_sinks.md``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch
from torch import nn

from .functional.sinks import BOS

__all__ = ["BosSink", "EagerAttentionWarning", "bos_token_ids", "first_tokens_are_bos"]


def bos_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The beginning-of-sequence token ids of ``model`` (``config.bos_token_id``, an int or a list), or ``()``."""
    ids = getattr(getattr(model, "config", None), "bos_token_id", None)
    if ids is None:
        ids = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
    if ids is None:
        return ()
    return tuple(int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]))


def first_tokens_are_bos(input_ids: torch.Tensor, bos_ids, attention_mask=None) -> bool:
    """Whether every sequence of ``input_ids`` starts with a BOS token (its first unmasked token, under left padding).

    Raises
    ------
    ValueError
        If some sequences start with it and others do not.
    """
    ids = input_ids.reshape(-1, input_ids.shape[-1]) if input_ids.dim() > 1 else input_ids[None]
    first = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape:
        first = attention_mask.reshape(ids.shape).ne(0).to(torch.int8).argmax(-1, keepdim=True)
    starts = ids.gather(1, first).squeeze(1)
    is_bos = torch.isin(starts, torch.tensor(list(bos_ids), dtype=ids.dtype, device=ids.device))
    count = int(is_bos.sum())
    if 0 < count < len(is_bos):
        rows = is_bos.nonzero().flatten().tolist()
        raise ValueError(
            f"lxt_explicit: sinks='bos' needs every sequence of a batch to start with the beginning-of-sequence "
            f"token or none of them; sequences {rows} of {len(is_bos)} start with it. Tokenize the batch the same "
            f"way (with or without special tokens), explain the two kinds in separate batches, or choose sinks='gate'."
        )
    return count > 0


def _takes_input_ids(module: nn.Module) -> bool:
    try:
        return "input_ids" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _is_causal(model: nn.Module) -> bool:
    """True when the model's attention modules are causal (transformers sets ``is_causal`` on each)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


class BosSink:
    """A :class:`~lxt_explicit.composite.Composite` extension for the attention rules with ``sinks='bos'``.

    Before every forward pass of the registered model (and of an inner model that takes
    ``input_ids``, such as a causal LM's base model called alone) it reads ``input_ids`` (and
    ``attention_mask``, for left padding) and tells those rules, for that call, whether the sequences
    start with the model's BOS token: the rules then apply the sink gate, otherwise the paper's rules.
    The decision ends with the call; a layer recomputed by gradient checkpointing gets the decision of
    its own forward pass.  A forward pass without ``input_ids`` (or that continues a filled key-value
    cache), or a layer called on its own, leaves it unknown; the rules
    then raise where relevance is tracked instead of guessing.  A model
    without a BOS token id, or whose attention is not causal, gets the paper's rules (with a warning
    at registration).
    """

    #: Only the rules' per-thread setting changes; the model keeps its hooks and attributes.
    changes_model = False

    def register(self, model: nn.Module, registration) -> dict:
        rules = [rule for _, rule in registration.composite.op_table.values() if getattr(rule, "sinks", None) == BOS]
        if not rules:
            return {}
        bos_ids = bos_token_ids(model)
        reason = None
        if not bos_ids:
            reason = f"{type(model).__name__} has no beginning-of-sequence token id (config.bos_token_id)"
        elif not _is_causal(model):
            reason = (f"the attention of {type(model).__name__} is not causal (or not a transformers attention), so "
                      f"its first token's keys and values depend on the whole input")
        if reason is not None:
            warnings.warn(
                f"lxt_explicit: sinks='bos' gates the sink only where it is the BOS token of a causal language model; "
                f"{reason}, so the paper's rules apply everywhere. Choose sinks='gate' to gate the first token anyway.",
                UserWarning,
                stacklevel=4,
            )
            bos_ids = None
        rules = tuple(dict.fromkeys(rules))
        tell = functools.partial(self._tell, rules, bos_ids)
        for module in model.modules():  # the model and its inner models (a CausalLM's base model, called alone)
            if module is model or _takes_input_ids(module):
                registration.before_call(module, tell)
        registration.keep_for_recomputation(functools.partial(self._capture, rules))
        return {}

    @staticmethod
    def _capture(rules):
        """This forward pass's decision, to be restored when a checkpointed layer is recomputed."""
        return functools.partial(_decided, rules, tuple(rule.first_token_decision() for rule in rules))

    @staticmethod
    def _tell(rules, bos_ids, module, args, kwargs):
        """Decide for this call of ``module``; the decision ends with the call (a context manager)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        is_bos = False if bos_ids is None else None
        readable = isinstance(ids, torch.Tensor) and not ids.is_floating_point() and ids.dim() and ids.shape[-1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers >= 5.24 names it cache
        if cache is not None and callable(getattr(cache, "get_seq_length", None)) and cache.get_seq_length() > 0:
            readable = False  # the first token is in the cache, not in input_ids
        if bos_ids is not None and readable:
            is_bos = first_tokens_are_bos(ids, bos_ids, mask)
        return _decided(rules, (is_bos,) * len(rules))

    def __repr__(self) -> str:
        return "BosSink()"


@contextlib.contextmanager
def _decided(rules, decisions):
    """Tell ``rules`` their ``decisions`` for the duration of a call, then what they had before."""
    previous = [rule.first_token_decision() for rule in rules]
    for rule, decision in zip(rules, decisions):
        rule.first_token_is_bos(decision)
    try:
        yield
    finally:
        for rule, decision in zip(rules, previous):
            rule.first_token_is_bos(decision)


class EagerAttentionWarning:
    """Composite extension: warn at registration when ``sinks`` is set but the model uses eager attention."""

    changes_model = False

    def register(self, model: nn.Module, registration) -> dict:
        config = getattr(model, "config", None)
        if getattr(config, "_attn_implementation", None) == "eager":
            warnings.warn(
                "attnlrp(sinks=...) handles attention sinks in F.scaled_dot_product_attention; this model uses eager "
                "attention (torch.softmax then matmul), which keeps the paper's softmax rule. Load the model with "
                "attn_implementation='sdpa' (or set model.config._attn_implementation = 'sdpa').",
                UserWarning,
                stacklevel=4,  # warn -> this register -> Registration.apply -> Composite.register -> the caller
            )
        return {}

    def __repr__(self) -> str:
        return "EagerAttentionWarning()"
