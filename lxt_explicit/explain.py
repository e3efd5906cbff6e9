"""Explain a causal language model's answer: per-token relevance from one relevance backward pass.

:func:`explain` runs a prompt through a model with an LRP composite registered (AttnLRP by
default), starts the relevance at the explained logits, each with its own value, and returns an
:class:`Explanation`: the prompt's tokens with their relevance, the relevance of position
embeddings where the model has them, and, from the same backward pass, the relevance of chosen
latent units (MLP neurons, attention heads, any module's output).

Targets:

* the next token (default: the most likely one; or a given token),
* a contrast between two next tokens (logit of one minus the other),
* a continuation, given as text or generated greedily by the model, explained at the sentence
  level: the sum over the continuation's positions of each position's largest logit (as in LXT's
  sentence-level explanations), or of the continuation tokens' own logits.

Because every rule is linear in the relevance it receives, the explanation of a continuation is
the sum of the explanations of its positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .composite import Composite
from .presets import attnlrp, cp_lrp
from .stabilizer import DEFAULT_EPSILON

__all__ = ["Explanation", "explain", "latent_modules"]

METHODS = {"attnlrp": attnlrp, "cp_lrp": cp_lrp}


@dataclass
class Explanation:
    """Relevance of the tokens of a prompt (and continuation) for an explained quantity.

    Attributes
    ----------
    token_ids : list of int
        Ids of the explained sequence: the prompt, followed by the continuation if there is one.
    tokens : list of str
        The tokens as the tokenizer writes them (``'Ġthe'``); see :func:`lxt_explicit.heatmap.clean_tokens`.
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

    def token_span(self, substring: str) -> slice:
        """The positions of the prompt tokens that cover the first occurrence of ``substring`` in ``text``."""
        start = self.text.find(substring)
        if start < 0 or not self.offsets:
            raise ValueError(f"{substring!r} is not part of the prompt text (or the tokenizer gives no offsets)")
        end = start + len(substring)
        inside = [i for i, (a, b) in enumerate(self.offsets) if b > start and a < end and b > a]
        return slice(inside[0], inside[-1] + 1)

    @property
    def continuation(self) -> list[str]:
        """The tokens after the prompt (empty for next-token explanations)."""
        return self.tokens[self.prompt_length :]

    @property
    def conservation(self) -> float:
        """Relevance at all sources divided by the explained quantity (1 = nothing absorbed)."""
        total = sum(float(r.sum()) for r in self.source_relevance.values())
        return total / self.target_value if self.target_value else float("nan")

    def top_tokens(self, k: int = 10, *, span: slice | None = None) -> list[tuple[int, str, float]]:
        """The ``k`` most relevant prompt tokens as ``(position, token, relevance)``, most relevant first.

        ``span`` restricts the ranking to some positions, e.g. ``explanation.token_span(context)``.
        """
        span = span or slice(0, self.prompt_length)
        positions = torch.arange(len(self.relevance))[span]
        order = torch.argsort(self.relevance[span], descending=True)[:k]
        return [(int(positions[i]), self.tokens[int(positions[i])], float(self.relevance[positions[i]])) for i in order]

    def top_units(self, name: str, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` most relevant latent units of ``name`` (summed over positions) as ``(index, relevance)``."""
        totals = self.latent[name].sum(0)
        order = torch.argsort(totals, descending=True)[:k]
        return [(int(i), float(totals[i])) for i in order]

    def _repr_html_(self) -> str:
        from .heatmap import html_heatmap

        return html_heatmap(self.tokens, self.relevance, title=self.method, subtitle=self.target, fragment=True)

    def to_dict(self) -> dict:
        """The explanation as plain Python data (for JSON)."""
        return {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "relevance": self.relevance.tolist(),
            "prompt_length": self.prompt_length,
            "target": self.target,
            "target_value": self.target_value,
            "target_ids": self.target_ids,
            "conservation": self.conservation,
            "method": self.method,
            "source_relevance": {k: v.tolist() for k, v in self.source_relevance.items()},
            "latent": {k: v.sum(0).tolist() for k, v in self.latent.items()},
        }


# ----------------------------------------------------------------------------------- latent units

_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "output.dense", "mlp.dense_4h_to_h")
_ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "self_attn.out_proj", "self_attn.dense")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the longest ``nn.ModuleList`` of identical modules."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"no list of transformer blocks found in {type(model).__name__}; name the modules instead")
    return best


def latent_modules(model: nn.Module, spec: str) -> tuple[str, str, int]:
    """Resolve a latent-unit spec to ``(module name, 'input' | 'output', heads)``.

    ``'mlp:K'``: the neurons of block K's MLP (the input of its output projection);
    ``'heads:K'``: the attention heads of block K (the input of the attention's output projection,
    split into heads); ``'NAME'`` or ``'NAME:output'``: the output of module NAME; ``'NAME:input'``:
    its first input.  ``heads`` is the number of heads (1 for everything but ``'heads:K'``).
    """
    match = re.fullmatch(r"(mlp|heads):(-?\d+)", spec)
    if match:
        prefix, layers = _decoder_layers(model)
        index = int(match.group(2))
        try:
            block = layers[index]
        except IndexError:
            raise ValueError(f"{spec!r}: the model has {len(layers)} blocks") from None
        block_name = f"{prefix}.{index % len(layers)}"
        names = dict(block.named_modules())
        candidates = _MLP_OUT if match.group(1) == "mlp" else _ATTN_OUT
        for candidate in candidates:
            if candidate in names:
                heads = 1 if match.group(1) == "mlp" else int(model.config.num_attention_heads)
                return f"{block_name}.{candidate}", "input", heads
        raise ValueError(f"{spec!r}: no module named one of {candidates} in {block_name}")
    name, _, where = spec.rpartition(":") if spec.endswith((":input", ":output")) else (spec, "", "output")
    model.get_submodule(name)  # raises AttributeError naming the missing module
    return name, where, 1


class _LatentRecorder:
    """Capture the relevance arriving at chosen module inputs/outputs in the backward pass."""

    def __init__(self, model: nn.Module, specs: Sequence[str]):
        self.model = model
        self.points = {spec: latent_modules(model, spec) for spec in specs}
        self.relevance: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for spec, (name, where, heads) in self.points.items():
            module = self.model.get_submodule(name)

            def store(grad, spec=spec, heads=heads):
                value = grad.detach().float()
                if heads > 1:
                    value = value.unflatten(-1, (heads, -1)).sum(-1)
                self.relevance[spec] = value

            def watch(tensor, store=store):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(store)

            if where == "input":
                self.handles.append(module.register_forward_pre_hook(lambda m, args, w=watch: w(args[0])))
            else:
                self.handles.append(
                    module.register_forward_hook(
                        lambda m, args, out, w=watch: w(out[0] if isinstance(out, tuple) else out)
                    )
                )
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


# ----------------------------------------------------------------------------------- prompts


def _token_id(tokenizer, token, what: str) -> int:
    if isinstance(token, int):
        return token
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"{what} {token!r} is {len(ids)} tokens ({tokenizer.convert_ids_to_tokens(ids)}); give one token "
            "(e.g. with its leading space, ' Paris'), a token id, or use continuation= for several tokens"
        )
    return ids[0]


def _prompt_text(tokenizer, prompt: str, chat: bool, system: str | None, prefill: str) -> str:
    if not chat:
        return prompt + prefill
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


def _encode(tokenizer, text: str, chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text`` (a chat template already contains its special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    return tokenizer(text, add_special_tokens=not chat)["input_ids"], []


@torch.no_grad()
def _generate(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    device = next(model.parameters()).device
    output = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=next(iter(eos)) if eos else None,
    )
    generated = output[0, len(ids) :].tolist()
    for position, token in enumerate(generated):
        if token in eos:
            return generated[:position]
    return generated


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


def _source_name(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


# ----------------------------------------------------------------------------------- explain


def explain(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[str],
    *,
    target: int | str | None = None,
    contrast: int | str | None = None,
    continuation: str | None = None,
    max_new_tokens: int | None = None,
    continuation_score: str = "max",
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
        continuation is involved; one :class:`Explanation` per prompt is returned).
    target : int or str, optional
        The next token to explain (an id, or a string that is one token); default: the most likely.
    contrast : int or str, optional
        Explain ``logit(target) - logit(contrast)`` instead of ``logit(target)``.
    continuation : str, optional
        Text after the prompt to explain at the sentence level.
    max_new_tokens : int, optional
        Generate a continuation greedily (up to this many tokens, stopping at end-of-sequence) and
        explain it at the sentence level.
    continuation_score : {'max', 'token'}
        Per continuation position, start from the largest logit (``'max'``, as in LXT) or from the
        logit of the continuation's own next token (``'token'``).
    chat : bool
        Wrap the prompt in the tokenizer's chat template (with ``system`` as system message) and
        start the assistant's turn.
    prefill : str
        Text appended after the prompt (after the template's assistant header with ``chat=True``).
    method : {'attnlrp', 'cp_lrp'}
        Rules to use (ignored if ``composite`` is given).
    epsilon : float
        Stabilizer of the rules (ignored if ``composite`` is given).
    latent : sequence of str
        Latent units whose relevance to record from the same backward pass: ``'mlp:K'`` (neurons of
        block K's MLP), ``'heads:K'`` (attention heads of block K), a module name (its output) or
        ``'NAME:input'`` (see :func:`latent_modules`).
    composite : Composite, optional
        Rules to use instead of ``method``; registered for the call, or used as is if it is already
        registered on ``model``.

    Returns
    -------
    Explanation or list of Explanation
    """
    if continuation_score not in ("max", "token"):
        raise ValueError(f"continuation_score must be 'max' or 'token', got {continuation_score!r}")
    if continuation is not None and max_new_tokens is not None:
        raise ValueError("give either continuation= (text) or max_new_tokens= (generate), not both")
    if (continuation is not None or max_new_tokens is not None) and (target is not None or contrast is not None):
        raise ValueError("target= and contrast= explain the next token; they cannot be combined with a continuation")
    if composite is None and method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    options = dict(
        target=target, contrast=contrast, continuation=continuation, max_new_tokens=max_new_tokens,
        continuation_score=continuation_score, chat=chat, system=system, prefill=prefill, method=method,
        epsilon=epsilon, latent=latent, composite=composite,
    )
    if isinstance(prompt, str):
        return _explain_batch(model, tokenizer, [prompt], options)[0]
    prompts = list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list")
    if continuation is not None or max_new_tokens is not None:  # continuations have their own lengths
        return [_explain_batch(model, tokenizer, [p], options)[0] for p in prompts]
    return _explain_batch(model, tokenizer, prompts, options)


def _explain_batch(model, tokenizer, prompts: list[str], options: dict) -> list[Explanation]:
    chat, device = options["chat"], next(model.parameters()).device
    texts = [_prompt_text(tokenizer, p, chat, options["system"], options["prefill"]) for p in prompts]
    encoded = [_encode(tokenizer, text, chat) for text in texts]
    sequences = [ids for ids, _ in encoded]
    prompt_lengths = [len(s) for s in sequences]
    if options["continuation"] is not None:
        extra = tokenizer(options["continuation"], add_special_tokens=False)["input_ids"]
        if not extra:
            raise ValueError("continuation is empty")
        sequences[0] = sequences[0] + extra
    elif options["max_new_tokens"] is not None:
        extra = _generate(model, sequences[0], options["max_new_tokens"], _eos_ids(model, tokenizer))
        if not extra:
            raise ValueError("the model ended its answer immediately (no tokens to explain); give continuation=")
        sequences[0] = sequences[0] + extra

    length = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):  # left padding: every sequence ends in the last column
        input_ids[row, length - len(seq):] = torch.tensor(seq)
        mask[row, length - len(seq):] = 1
    kwargs = {"input_ids": input_ids.to(device), "use_cache": False}
    if len(sequences) > 1:
        kwargs["attention_mask"] = mask.to(device)
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)

    composite = options["composite"]
    method = options["method"] if composite is None else "custom"
    if composite is None:
        composite = METHODS[options["method"]](epsilon=options["epsilon"])
    registered_here = composite.model is not model
    if registered_here:
        composite.register(model)
    try:
        with torch.enable_grad(), _LatentRecorder(model, options["latent"]) as recorder:
            logits = model(**kwargs).logits
            selected, seeds, descriptions, target_ids = _targets(logits, sequences, prompt_lengths, tokenizer, options)
            torch.autograd.backward(selected, seeds)
        sources = {name: r.detach().float().sum(-1) for name, r in composite.source_relevance().items()
                   if r is not None and r.dim() == 3}
    finally:
        if registered_here:
            composite.remove()

    token_source = _source_name(model)
    if token_source not in sources:
        raise RuntimeError(
            f"no relevance arrived at the input embeddings ({token_source}); the composite needs a "
            "RelevanceSource on them (the presets have one)"
        )
    explanations = []
    for row, seq in enumerate(sequences):
        span = slice(length - len(seq), length)
        explanations.append(
            Explanation(
                token_ids=list(seq),
                tokens=tokenizer.convert_ids_to_tokens(list(seq)),
                relevance=sources[token_source][row, span].cpu(),
                prompt_length=prompt_lengths[row],
                target=descriptions[row],
                target_value=float(seeds[row].sum()),
                target_ids=target_ids[row],
                source_relevance={name: r[row, span].cpu() for name, r in sources.items()},
                latent={name: r[row, span].cpu() for name, r in recorder.relevance.items()},
                method=method,
                text=texts[row],
                offsets=encoded[row][1],
            )
        )
    return explanations


def _targets(logits, sequences, prompt_lengths, tokenizer, options):
    """The logits the relevance starts from, their initial relevance (their own values), descriptions."""
    length = logits.shape[1]
    selected, seeds, descriptions, target_ids = [], [], [], []
    for row, seq in enumerate(sequences):
        if len(seq) > prompt_lengths[row]:  # a continuation: one logit per continuation token
            start = length - len(seq) + prompt_lengths[row] - 1
            positions = torch.arange(start, length - 1, device=logits.device)
            rows = logits[row, positions]
            if options["continuation_score"] == "max":
                values = rows.max(-1).values
            else:
                ids = torch.tensor(seq[prompt_lengths[row]:], device=logits.device)
                values = rows.gather(-1, ids[:, None]).squeeze(-1)
            text = tokenizer.decode(seq[prompt_lengths[row]:])
            descriptions.append(f"continuation {text!r} ({len(positions)} tokens, {options['continuation_score']} logits)")
            selected.append(values)
            seeds.append(values.detach())
            target_ids.append(list(seq[prompt_lengths[row]:]))
            continue
        last = logits[row, -1]
        token = last.argmax().item() if options["target"] is None else _token_id(tokenizer, options["target"], "target")
        name = tokenizer.convert_ids_to_tokens([token])[0]
        if options["contrast"] is None:
            target_ids.append([token])
            selected.append(last[token : token + 1])
            seeds.append(last[token : token + 1].detach())
            descriptions.append(f"next token {name!r} (logit {float(last[token].detach()):.3f})")
        else:
            other = _token_id(tokenizer, options["contrast"], "contrast")
            target_ids.append([token, other])
            pair = torch.stack([last[token], last[other]])
            selected.append(pair)
            seeds.append(torch.stack([last[token], -last[other]]).detach())
            descriptions.append(
                f"logit of {name!r} minus logit of {tokenizer.convert_ids_to_tokens([other])[0]!r} "
                f"({float((last[token] - last[other]).detach()):.3f})"
            )
    return selected, seeds, descriptions, target_ids
