"""Explain a causal language model's answer: per-token relevance from one relevance backward pass.

:func:`explain` runs a prompt through a model with an LRP composite registered (AttnLRP by
default), starts the relevance at the explained logits, each with its own value, and returns an
:class:`~lxt_explicit.explanation.Explanation`: the prompt's tokens with their relevance, the
relevance of position embeddings where the model has them, and, from the same backward pass, the
relevance of chosen latent units (MLP neurons, attention heads, any module's output; see
:mod:`lxt_explicit.latent`).

Targets (:mod:`lxt_explicit.targets`):

* the next token (default: the most likely one; or a given token),
* a contrast between two next tokens (logit of one minus the other),
* a continuation, given as text or generated greedily by the model, explained at the sentence
  level: the sum over the continuation's positions of each position's largest logit (as in LXT's
  sentence-level explanations), or of the continuation tokens' own logits.  A generated
  continuation is cut where the answer ends (:func:`lxt_explicit.prompts.answer_length`).

Because every rule is linear in the relevance it receives, the explanation of a continuation is
the sum of the explanations of its positions.  Only the logits of the explained positions are
computed (the vocabulary projection of the other positions would start no relevance).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Sequence

import torch
from torch import nn

from .composite import Composite
from .explanation import Explanation
from .explanation_io import model_description
from .latent import LatentRecorder, check_latent_specs, latent_modules
from .presets import attnlrp, attnlrp_sinks, cp_lrp
from .prompts import STOPS, answer_length, check_prompts, encode, eos_ids, generate_greedy, prompt_text, token_texts
from .stabilizer import DEFAULT_EPSILON
from .targets import embedding_name, needed_logits, select_targets, token_id, vocabulary_size

__all__ = ["Explanation", "explain", "latent_modules"]

#: The rule sets ``method=`` selects.
METHODS = MappingProxyType({"attnlrp": attnlrp, "attnlrp_sinks": attnlrp_sinks, "cp_lrp": cp_lrp})


def explain(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[str],
    *,
    target: int | str | Sequence[int | str | None] | None = None,
    contrast: int | str | Sequence[int | str | None] | None = None,
    continuation: str | None = None,
    max_new_tokens: int | None = None,
    continuation_score: str = "max",
    stop: str = "sentence",
    chat: bool = False,
    system: str | None = None,
    prefill: str = "",
    method: str = "attnlrp",
    epsilon: float = DEFAULT_EPSILON,
    latent: Sequence[str] = (),
    composite: Composite | None = None,
) -> Explanation | list[Explanation]:
    """Explain what a causal language model predicts after ``prompt``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal language model (``...ForCausalLM``), as shipped by transformers.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    prompt : str or list of str
        The prompt, or a batch of prompts (explained in one forward and backward pass when no
        continuation is involved; one :class:`Explanation` per prompt is returned).  A prompt must
        not be empty, and with its continuation it must fit in the model's positions
        (``config.max_position_embeddings``).
    target : int or str, or a list of them, optional
        The next token to explain (an id, or a string that is one token); default: the most likely.
        For a batch of prompts, a list gives each prompt its own target (``None``: the most likely).
    contrast : int or str, or a list of them, optional
        Explain ``logit(target) - logit(contrast)`` instead of ``logit(target)``; a token other
        than the target.  For a batch of prompts, a list gives each prompt its own contrast
        (``None``: no contrast).
    continuation : str, optional
        Text after the prompt to explain at the sentence level.
    max_new_tokens : int, optional
        Generate a continuation greedily (up to this many tokens, stopping at end-of-sequence) and
        explain its answer (see ``stop``) at the sentence level.
    continuation_score : {'max', 'token'}
        Per continuation position, start from the largest logit (``'max'``, as in LXT) or from the
        logit of the continuation's own next token (``'token'``).
    stop : {'sentence', 'line', 'eos'}
        Where the explained answer in a generated continuation ends: at the end of its first
        sentence or line (default), of its first line, or only at end-of-sequence or
        ``max_new_tokens`` (``'eos'``: the whole continuation).  The explanation records why the
        continuation ends (``stop_reason``) and the text it left out (``discarded_text``).
    chat : bool
        Wrap the prompt in the tokenizer's chat template (with ``system`` as system message) and
        start the assistant's turn; the tokenizer must have a chat template.
    prefill : str
        Text appended after the prompt (after the template's assistant header with ``chat=True``).
    method : {'attnlrp', 'attnlrp_sinks', 'cp_lrp'}
        Rules to use (ignored if ``composite`` is given): :func:`~lxt_explicit.attnlrp`,
        :func:`~lxt_explicit.attnlrp_sinks` or :func:`~lxt_explicit.cp_lrp`.
    epsilon : float
        Stabilizer of the rules (ignored if ``composite`` is given).
    latent : sequence of str
        Latent units whose relevance to record from the same backward pass: ``'mlp:K'`` (neurons of
        block K's MLP), ``'heads:K'`` (attention heads of block K), a module name (its output) or
        ``'NAME:input'`` (see :func:`latent_modules`); a list, even for one spec.
    composite : Composite, optional
        Rules to use instead of ``method``; registered for the call, or used as is if it is already
        registered on ``model``.

    Returns
    -------
    Explanation or list of Explanation

    Raises
    ------
    ValueError
        For a request that cannot be explained: an empty prompt, a prompt longer than the model's
        positions, a target that is not one token or outside the vocabulary, a contrast equal to the
        target, ``chat=True`` with a tokenizer without a chat template, conflicting options.
    TypeError
        For arguments of the wrong kind: a target that is neither an id nor a string, a latent spec
        given as a string instead of a list.
    """
    prompts, single = check_prompts(prompt)
    options = dict(
        target=target, contrast=contrast, continuation=continuation, max_new_tokens=max_new_tokens,
        continuation_score=continuation_score, stop=stop, chat=chat, system=system, prefill=prefill, method=method,
        epsilon=epsilon, latent=latent, composite=composite,
    )
    _check_options(options)
    _resolve_tokens(model, tokenizer, options, None if single else len(prompts))
    if single:
        return _explain_batch(model, tokenizer, prompts, options)[0]
    if continuation is not None or max_new_tokens is not None:  # continuations have their own lengths
        return [_explain_batch(model, tokenizer, [p], options)[0] for p in prompts]
    return _explain_batch(model, tokenizer, prompts, options)


def _check_options(options: dict) -> None:
    """Errors for option values and combinations that cannot be explained."""
    if options["continuation_score"] not in ("max", "token"):
        raise ValueError(f"continuation_score must be 'max' or 'token', got {options['continuation_score']!r}")
    if options["stop"] not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {options['stop']!r}")
    continuing = options["continuation"] is not None or options["max_new_tokens"] is not None
    if options["continuation"] is not None and options["max_new_tokens"] is not None:
        raise ValueError("give either continuation= (text) or max_new_tokens= (generate), not both")
    if continuing and any(_per_prompt(options[what]) != [None] for what in ("target", "contrast")):
        raise ValueError("target= and contrast= explain the next token; they cannot be combined with a continuation")
    if options["composite"] is None and options["method"] not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {options['method']!r}")
    limit = options["max_new_tokens"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"max_new_tokens must be a positive number of tokens, got {limit!r}")
    if options["continuation"] is not None and not options["continuation"]:
        raise ValueError("continuation is empty; give the text to explain after the prompt")
    options["latent"] = check_latent_specs(options["latent"])


def _per_prompt(value) -> list:
    """A per-prompt list of targets or contrasts as it is; one value (or ``None``) as a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve_tokens(model: nn.Module, tokenizer, options: dict, count: int | None) -> None:
    """Turn ``target`` and ``contrast`` (one, or one per prompt) into checked token ids (before any forward pass)."""
    vocabulary = vocabulary_size(model)
    for what in ("target", "contrast"):
        value = options[what]
        if isinstance(value, (list, tuple)):
            if count is None:
                raise TypeError(f"{what} must be a token id (int) or a string that is one token, got {value!r} "
                                "(a list gives each prompt of a batch its own)")
            if len(value) != count:
                raise ValueError(f"{what} is a list of {len(value)} for {count} prompts; give one {what} per prompt "
                                 f"(None for the default), or a single {what} for all")
            options[what] = [None if v is None else token_id(tokenizer, v, what, vocabulary) for v in value]
        elif value is not None:
            options[what] = token_id(tokenizer, value, what, vocabulary)
    targets, contrasts = _per_prompt(options["target"]), _per_prompt(options["contrast"])
    for index in range(max(len(targets), len(contrasts))):
        target = targets[index % len(targets)]
        if target is not None and target == contrasts[index % len(contrasts)]:
            raise ValueError(
                f"contrast and target are the same token (id {target}): logit minus itself is zero, so "
                "nothing would be explained; give a different contrast token"
            )


def _check_positions(model: nn.Module, prompt_length: int, extra: int, what: str) -> None:
    """A prompt (plus ``extra`` continuation tokens) must fit in the model's position embeddings."""
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_length + extra > limit:
        fix = "shorten the prompt" + (" or lower max_new_tokens" if "max_new_tokens" in what else "")
        raise ValueError(
            f"the prompt is {prompt_length} tokens{what} but the model has {limit} positions "
            f"(config.max_position_embeddings): {fix}"
        )


def _extend(model: nn.Module, tokenizer, sequence: list[int], options: dict) -> tuple[list[int], str, list[int], str]:
    """The sequence with its continuation (given, or generated and cut), why it ends, and what was cut off."""
    if options["continuation"] is not None:
        extra = tokenizer(options["continuation"], add_special_tokens=False)["input_ids"]
        if not extra:
            raise ValueError(f"continuation {options['continuation']!r} gives no tokens")
        _check_positions(model, len(sequence), len(extra), f" and the continuation {len(extra)}")
        return sequence + list(extra), "", [], ""
    limit = options["max_new_tokens"]
    if limit is None:
        _check_positions(model, len(sequence), 0, "")
        return sequence, "", [], ""
    _check_positions(model, len(sequence), limit, f" plus max_new_tokens={limit}")
    generated, reason = generate_greedy(model, sequence, limit, eos_ids(model, tokenizer))
    if not generated:
        raise ValueError("the model ended its answer immediately (no tokens to explain); give continuation=")
    texts = token_texts(tokenizer, sequence + generated)[len(sequence) :]
    length, cut = answer_length(texts, options["stop"])
    return sequence + generated[:length], cut or reason, generated[length:], "".join(texts[length:])


def _explain_batch(model, tokenizer, prompts: list[str], options: dict) -> list[Explanation]:
    chat = options["chat"]
    texts = [prompt_text(tokenizer, p, chat, options["system"], options["prefill"]) for p in prompts]
    encoded = [encode(tokenizer, text, chat) for text in texts]
    extended = [_extend(model, tokenizer, ids, options) for ids, _ in encoded]
    sequences = [sequence for sequence, *_ in extended]
    prompt_lengths = [len(ids) for ids, _ in encoded]
    sources, latent, targets = _relevance(model, tokenizer, sequences, prompt_lengths, options)
    token_source = embedding_name(model)
    if token_source not in sources:
        raise RuntimeError(
            f"no relevance arrived at the input embeddings ({token_source}); the composite needs a "
            "RelevanceSource on them (the presets have one)"
        )
    length = max(len(s) for s in sequences)
    model_name, dtype = model_description(model)
    explanations = []
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length)
        explanations.append(
            Explanation(
                token_ids=list(seq),
                tokens=tokenizer.convert_ids_to_tokens(list(seq)),
                relevance=sources[token_source][row, span].cpu(),
                prompt_length=prompt_lengths[row],
                target=targets.descriptions[row],
                target_value=float(targets.seeds[row].sum()),
                target_ids=targets.ids[row],
                source_relevance={name: r[row, span].cpu() for name, r in sources.items()},
                latent={name: r[row, span].cpu() for name, r in latent.items()},
                method=options["method"] if options["composite"] is None else "custom",
                text=texts[row],
                offsets=encoded[row][1],
                token_texts=token_texts(tokenizer, seq),
                epsilon=options["epsilon"] if options["composite"] is None else None,
                prompt=prompts[row],
                stop_reason=extended[row][1],
                discarded_ids=extended[row][2],
                discarded_text=extended[row][3],
                model=model_name,
                dtype=dtype,
            )
        )
    return explanations


def _batch_inputs(sequences: list[list[int]], pad: int, device) -> dict:
    """Left-padded ``input_ids`` (every sequence ends in the last column), with mask and positions for a batch."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = torch.tensor(seq)
        mask[row, length - len(seq) :] = 1
    inputs = {"input_ids": input_ids.to(device), "use_cache": False}
    if len(sequences) > 1:
        inputs["attention_mask"] = mask.to(device)
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    return inputs


def _relevance(model, tokenizer, sequences, prompt_lengths, options):
    """One forward and one relevance backward pass: relevance at the sources and latent units, the targets."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = _batch_inputs(sequences, pad, next(model.parameters()).device)
    keep = 1 + max(len(seq) - length for seq, length in zip(sequences, prompt_lengths))
    composite = options["composite"]
    if composite is None:
        composite = METHODS[options["method"]](epsilon=options["epsilon"])
    registered_here = composite.model is not model
    if registered_here:
        composite.register(model)
    try:
        with torch.enable_grad(), LatentRecorder(model, options["latent"]) as recorder:
            logits = needed_logits(model, inputs, keep)
            targets = select_targets(logits, sequences, prompt_lengths, tokenizer, options)
            torch.autograd.backward(targets.selected, targets.seeds)
        sources = {name: r.detach().float().sum(-1) for name, r in composite.source_relevance().items()
                   if r is not None and r.dim() == 3}
    finally:
        if registered_here:
            composite.remove()
    return sources, recorder.relevance, targets
