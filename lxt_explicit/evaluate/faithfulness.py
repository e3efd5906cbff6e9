"""Faithfulness of attribution methods over a set of prompts: perturbation curves, ABPC, intervals.

:func:`evaluate_faithfulness` runs every method on every prompt, draws the MoRF and LeRF curves of
each ranking (:func:`~lxt_explicit.evaluate.perturbation.perturbation_curves`, all rankings of a
prompt in one batched set of forward passes) for every removal, and returns a
:class:`FaithfulnessResult` whose :meth:`~FaithfulnessResult.summary` gives the mean ABPC of each
method with its bootstrap interval over prompts and its paired difference to a reference method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..sinks import text_positions
from .baselines import resolve_methods
from .perturbation import Curves, perturbation_curves
from .statistics import bootstrap, paired_difference
from .target import Target, as_target, model_logits

__all__ = ["EvaluationPrompt", "FaithfulnessResult", "evaluate_faithfulness", "make_prompt"]


@dataclass(frozen=True)
class EvaluationPrompt:
    """One prompt to evaluate on.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``[1, tokens]`` on the model's device.
    target : Target
        The explained quantity.
    positions : tuple of int, optional
        The positions that are ranked and removed (default: all).
    name : str
        A label for tables.
    """

    input_ids: torch.Tensor
    target: Target
    positions: tuple[int, ...] | None = None
    name: str = ""


def make_prompt(model: nn.Module, tokenizer, text: str, *, target: Target | int | str | None = None,
                span: str | None = None, add_special_tokens: bool = True, keep_special_tokens: bool = False,
                name: str = "") -> EvaluationPrompt:
    """Tokenize ``text`` into an :class:`EvaluationPrompt`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model (its device and, for the default target, its prediction).
    tokenizer : transformers.PreTrainedTokenizerFast
        Its tokenizer (a fast one where ``span`` is given: offsets are needed).
    text : str
        The prompt.
    target : Target, int or str, optional
        The explained quantity; a string is one token; default: the model's most likely next token.
    span : str, optional
        Restrict the ranked and removed positions to the tokens of the first occurrence of this
        substring (e.g. the document of a question-answering prompt).
    add_special_tokens : bool
        Passed to the tokenizer (``False`` for text that went through a chat template).
    keep_special_tokens : bool
        Leave the tokenizer's special tokens (the BOS token, chat-template markers) in place: they
        are neither ranked nor removed.  Zeroing the BOS token of a model with an attention sink
        changes every head that parks its attention there, whatever the explanation says, so the
        removal order of that one token can decide the ABPC (``benchmarks/results/sinks.md``).
    name : str
        A label.
    """
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=span is not None)
    device = next(model.parameters()).device
    input_ids = torch.tensor([encoded["input_ids"]], device=device)
    if isinstance(target, str):
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"target {target!r} is {len(ids)} tokens; give one token (with its leading space)")
        target = ids[0]
    if target is None:
        with torch.no_grad():
            target = int(model_logits(model, Target(0), input_ids=input_ids)[0, -1].argmax())
    positions = None
    if span is not None:
        start = text.find(span)
        if start < 0 or not span:
            raise ValueError(f"span {span!r} is not part of the prompt")
        offsets = encoded["offset_mapping"]
        positions = tuple(i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < start + len(span))
    if keep_special_tokens:
        positions = text_positions(tokenizer, encoded["input_ids"], positions)
        if not positions:
            raise ValueError("every token of the prompt is a special token: nothing is left to rank and remove")
    return EvaluationPrompt(input_ids, as_target(target), positions, name)


@dataclass
class FaithfulnessResult:
    """Curves and scores of every method on every prompt, per removal.

    Attributes
    ----------
    methods : list of str
        The methods, in order.
    removals : list of str
        Names of the removals (``'zero'``, ``'mean'``, ``'token 103'``, ...).
    curves : dict
        ``removal -> method -> [Curves per prompt]``.
    relevance : dict
        ``method -> [relevance per prompt]``.
    seconds : dict
        ``method -> [seconds per prompt]`` (0 for precomputed relevance).
    names : list of str
        The prompts' names.
    """

    methods: list[str]
    removals: list[str]
    curves: dict[str, dict[str, list[Curves]]]
    relevance: dict[str, list[torch.Tensor]]
    seconds: dict[str, list[float]]
    names: list[str] = field(default_factory=list)

    def scores(self, method: str, *, removal: str | None = None, quantity: str = "value") -> np.ndarray:
        """ABPC of ``method`` per prompt (``quantity``: ``'value'`` or ``'probability'``)."""
        removal = self.removals[0] if removal is None else removal
        if removal not in self.curves or method not in self.curves[removal]:
            raise KeyError(f"no curves for removal {removal!r} and method {method!r}; have {self.removals}, "
                           f"{self.methods}")
        return np.array([c.areas(quantity)["abpc"] for c in self.curves[removal][method]])

    def summary(self, *, removal: str | None = None, quantity: str = "value", reference: str | None = "attnlrp",
                resamples: int = 10000, level: float = 0.95, seed: int = 0) -> dict[str, dict]:
        """Per method: mean ABPC with its bootstrap interval, the paired difference to ``reference``, mean AUCs.

        Returns
        -------
        dict
            ``method -> {'abpc': Interval, 'minus_reference': Interval or None, 'auc_morf': float,
            'auc_lerf': float}``.
        """
        removal = self.removals[0] if removal is None else removal
        options = dict(resamples=resamples, level=level, seed=seed)
        base = self.scores(reference, removal=removal, quantity=quantity) if reference in self.methods else None
        table = {}
        for method in self.methods:
            scores = self.scores(method, removal=removal, quantity=quantity)
            areas = [c.areas(quantity) for c in self.curves[removal][method]]
            table[method] = {
                "abpc": bootstrap(scores, **options),
                "minus_reference": None if base is None or method == reference
                else paired_difference(scores, base, **options),
                "auc_morf": float(np.mean([a["auc_morf"] for a in areas])),
                "auc_lerf": float(np.mean([a["auc_lerf"] for a in areas])),
            }
        return table

    def mean_curves(self, *, removal: str | None = None) -> dict[str, dict[str, list[float]]]:
        """Mean over prompts of the normalized value curves: ``method -> {'morf': [...], 'lerf': [...]}``."""
        removal = self.removals[0] if removal is None else removal
        result = {}
        for method, curves in self.curves[removal].items():
            result[method] = {
                order: np.mean([getattr(c, order) / abs(c.morf[0]) for c in curves], axis=0).tolist()
                for order in ("morf", "lerf")
            }
        return result


def _removal_name(removal) -> str:
    if isinstance(removal, str):
        return removal
    if isinstance(removal, int):
        return f"token {removal}"
    return "vector"


def _relevance_source(method, count: int):
    """A method's per-prompt relevance: given (a sequence of tensors, one per prompt) or to compute (a callable)."""
    if callable(method) or isinstance(method, str):
        return None
    given = list(method)
    if len(given) != count:
        raise ValueError(f"precomputed relevance has {len(given)} entries for {count} prompts")
    return [torch.as_tensor(r, dtype=torch.float32).flatten().cpu() for r in given]


def evaluate_faithfulness(model: nn.Module, prompts: Sequence[EvaluationPrompt],
                          methods: Sequence | Mapping, *, steps: int = 10,
                          removals: Sequence[str | int | torch.Tensor] = ("zero",), batch: int = 16,
                          log: Callable[[str], None] | None = None) -> FaithfulnessResult:
    """Perturbation curves of every method on every prompt.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal or masked language model; freeze its parameters (``model.requires_grad_(False)``).
    prompts : sequence of EvaluationPrompt
        The prompts (:func:`make_prompt`).
    methods : sequence or mapping
        Built-in method names (:data:`~lxt_explicit.evaluate.baselines.METHODS`), callables
        ``method(model, input_ids, target) -> [tokens]``, or a mapping of names to either, or to
        precomputed relevance (a sequence with one ``[tokens]`` tensor per prompt).
    steps : int
        Removal steps per curve.
    removals : sequence
        What replaces removed embeddings: ``'zero'`` (the AttnLRP paper's protocol), ``'mean'``, a
        token id (a mask or unknown token) or a vector; one set of curves each.
    batch : int
        Perturbed copies per forward pass.
    log : callable, optional
        Receives one progress line per prompt.

    Returns
    -------
    FaithfulnessResult
    """
    if not prompts:
        raise ValueError("no prompts given")
    mapping = methods if isinstance(methods, Mapping) else resolve_methods(list(methods))
    given, computed = {}, {}
    for name, method in mapping.items():
        precomputed = _relevance_source(method, len(prompts))
        if precomputed is None:
            computed[name] = resolve_methods({name: method})[name]
        else:
            given[name] = precomputed
    names = list(mapping)
    labels = [_removal_name(r) for r in removals]
    result = FaithfulnessResult(names, labels, {label: {n: [] for n in names} for label in labels},
                                {n: [] for n in names}, {n: [] for n in names}, [p.name for p in prompts])
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        relevance = {}
        for name in names:
            began = time.perf_counter()
            if name in given:
                scores = given[name][index]
            else:
                scores = computed[name](model, prompt.input_ids, prompt.target).detach().float().cpu()
            result.seconds[name].append(0.0 if name in given else time.perf_counter() - began)
            relevance[name] = scores
            result.relevance[name].append(scores)
        for removal in removals:
            curves = perturbation_curves(model, prompt.input_ids, prompt.target, relevance, positions=prompt.positions,
                                         steps=steps, removal=removal, batch=batch)
            for name in names:
                result.curves[_removal_name(removal)][name].append(curves[name])
        if log is not None:
            first = result.removals[0]
            log(f"[{index + 1}/{len(prompts)}] {time.perf_counter() - start:.0f} s; ABPC ({first}): "
                + ", ".join(f"{n} {result.curves[first][n][-1].abpc:.3f}" for n in names))
    return result

