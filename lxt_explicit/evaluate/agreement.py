"""Subject-verb agreement: does an attribution put the most relevance on the subject?

The benchmark of Arras et al. (2025, "A Close Look at Decomposition-based XAI-Methods for
Transformer Language Models"), with items generated locally from the templates in
``lxt_explicit/data/agreement.json`` (written for this project): a singular or plural subject,
intervening nouns of the other number (attractors: prepositional phrases, relative clauses), and a
verb whose number follows the subject.  The model predicts the verb (a causal LM: the next token
after the prefix; a masked LM: the masked verb in the full sentence); the explained quantity is the
logit of the correct form minus that of the wrong form (``is`` vs ``are``), and the ground truth is
the subject noun's tokens.  Per item, with the candidate positions (all tokens except special ones)
ranked by relevance, rank 1 the most relevant:

* reciprocal rank ``1 / r``, where ``r`` is the best rank of a subject token (mean: MRR);
* pointing: whether the most relevant candidate is a subject token (mean: pointing accuracy);
* relevance mass: the positive relevance on the subject's tokens over all positive relevance.

Only items the model gets right (the explained difference is positive) are scored, as an
explanation of a wrong prediction has no reason to point at the subject; the model's accuracy is
reported.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .baselines import resolve_methods
from .statistics import Interval, bootstrap
from .target import Target, is_causal_lm, model_logits

__all__ = ["AgreementItem", "AgreementResult", "agreement_items", "evaluate_agreement", "subject_metrics",
           "templates"]


def _data() -> dict:
    return json.loads(resources.files("lxt_explicit.data").joinpath("agreement.json").read_text(encoding="utf-8"))


def templates() -> dict[str, str]:
    """The template names and texts of the shipped data file."""
    return dict(_data()["templates"])


@dataclass(frozen=True)
class AgreementItem:
    """One agreement sentence.

    Attributes
    ----------
    prefix : str
        The sentence up to the verb (without the space before it): a causal LM's prompt.
    correct, wrong : str
        The verb in the subject's number and in the other number.
    ending : str
        The text after the verb (for a masked LM's sentence).
    subject : tuple of (int, int)
        Character span of the subject noun in ``prefix``.
    template : str
        The template's name.
    plural : bool
        Whether the subject is plural.
    """

    prefix: str
    correct: str
    wrong: str
    ending: str
    subject: tuple[int, int]
    template: str = ""
    plural: bool = False

    def masked_text(self, mask_token: str) -> str:
        """The whole sentence with the verb replaced by ``mask_token``."""
        return f"{self.prefix} {mask_token}{self.ending}"


def agreement_items(per_template: int = 8, *, seed: int = 0, names: Sequence[str] | None = None,
                    data: Mapping | None = None) -> list[AgreementItem]:
    """Agreement items generated from the templates, half with singular and half with plural subjects.

    Parameters
    ----------
    per_template : int
        Items per template.
    seed : int
        Seed of the choice of nouns and verbs (the items are reproducible).
    names : sequence of str, optional
        Templates to use (default: all of the data file's).
    data : mapping, optional
        Templates and vocabulary in the data file's format (default: the shipped file).

    Returns
    -------
    list of AgreementItem
    """
    data = _data() if data is None else data
    chosen = list(data["templates"]) if names is None else list(names)
    unknown = [n for n in chosen if n not in data["templates"]]
    if unknown:
        raise ValueError(f"unknown templates {unknown}; available: {list(data['templates'])}")
    rng = random.Random(seed)
    items = []
    for name in chosen:
        for index in range(per_template):
            plural = index % 2 == 1
            subject, attractor = rng.sample(list(data["nouns"]), 2)
            verbs = rng.choice(list(data["verbs"]))
            items.append(_item(data, name, subject[plural], attractor[not plural], verbs, plural))
    return items


def _item(data: Mapping, name: str, subject: str, attractor: str, verbs, plural: bool) -> AgreementItem:
    text = data["templates"][name]
    before_verb = text[: text.index("{verb}")].rstrip()
    start = before_verb.index("{subject}")
    prefix = before_verb.format(subject=subject, attractor=attractor)
    correct, wrong = (verbs[1], verbs[0]) if plural else (verbs[0], verbs[1])
    ending = text[text.index("{verb}") + len("{verb}"):] + data["endings"][verbs[0]]
    return AgreementItem(prefix, correct, wrong, ending, (start, start + len(subject)), name, plural)


def subject_metrics(relevance: torch.Tensor, subject: Sequence[int], candidates: Sequence[int]) -> dict[str, float]:
    """Reciprocal rank of the subject, pointing, relevance mass (see the module docstring).

    Parameters
    ----------
    relevance : torch.Tensor
        One score per token.
    subject : sequence of int
        The subject's token positions.
    candidates : sequence of int
        The positions that are ranked (the subject's among them); ties keep the positions' order.

    Returns
    -------
    dict
        ``reciprocal_rank``, ``pointing`` (1.0 or 0.0), ``mass`` (NaN without positive relevance).
    """
    candidates = list(candidates)
    if not set(subject) or not set(subject) <= set(candidates):
        raise ValueError(f"the subject positions {list(subject)} must be among the candidates {candidates}")
    scores = torch.as_tensor(relevance, dtype=torch.float64).flatten()[candidates]
    ranked = [candidates[i] for i in torch.argsort(scores, descending=True, stable=True).tolist()]
    best = 1 + min(ranked.index(p) for p in subject)
    positive = scores.clamp(min=0)
    on_subject = float(sum(positive[candidates.index(p)] for p in subject))
    total = float(positive.sum())
    return {"reciprocal_rank": 1.0 / best, "pointing": float(best == 1),
            "mass": on_subject / total if total > 0 else float("nan")}


@dataclass
class AgreementResult:
    """Per-item metrics of every method on the items the model predicts correctly.

    Attributes
    ----------
    methods : list of str
    items : list of AgreementItem
        The scored items (the model got them right).
    metrics : dict
        ``method -> [subject_metrics per scored item]``.
    accuracy : float
        Fraction of all items the model predicts correctly.
    total : int
        Number of items evaluated.
    seconds : dict
        ``method -> mean seconds per item``.
    masked : bool
        Whether the model was run as a masked LM.
    """

    methods: list[str]
    items: list[AgreementItem]
    metrics: dict[str, list[dict]]
    accuracy: float
    total: int
    seconds: dict[str, float] = field(default_factory=dict)
    masked: bool = False

    def values(self, method: str, metric: str = "reciprocal_rank") -> np.ndarray:
        """``metric`` (``'reciprocal_rank'``, ``'pointing'``, ``'mass'``) of ``method`` per scored item."""
        return np.array([m[metric] for m in self.metrics[method]], dtype=np.float64)

    def summary(self, *, resamples: int = 10000, seed: int = 0) -> dict[str, dict[str, Interval]]:
        """``method -> {'mrr', 'pointing_accuracy', 'mass'}``: means with bootstrap intervals over items."""
        table = {}
        for method in self.methods:
            entry = {}
            for key, metric in (("mrr", "reciprocal_rank"), ("pointing_accuracy", "pointing"), ("mass", "mass")):
                values = self.values(method, metric)
                values = values[np.isfinite(values)]
                entry[key] = bootstrap(values, resamples=resamples, seed=seed) if len(values) else Interval(
                    float("nan"), float("nan"), float("nan"))
            table[method] = entry
        return table


def _token(tokenizer, word: str, causal: bool) -> int:
    text = f" {word}" if causal else word
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the verb {text!r} is {len(ids)} tokens for this tokenizer; agreement needs one-token "
                         "verbs: pass items whose verbs are single tokens")
    return ids[0]


def encode_item(model: nn.Module, tokenizer, item: AgreementItem, masked: bool):
    """``(input_ids, target, subject positions, candidate positions)`` of one item."""
    text = item.masked_text(tokenizer.mask_token) if masked else item.prefix
    encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets, special = encoded["offset_mapping"], encoded["special_tokens_mask"]
    ids = encoded["input_ids"]
    start, end = item.subject
    subject = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end and not special[i]]
    candidates = [i for i in range(len(ids)) if not special[i] and (not masked or ids[i] != tokenizer.mask_token_id)]
    position = ids.index(tokenizer.mask_token_id) if masked else -1
    target = Target(_token(tokenizer, item.correct, not masked), position, _token(tokenizer, item.wrong, not masked))
    device = next(model.parameters()).device
    return torch.tensor([ids], device=device), target, subject, candidates


def evaluate_agreement(model: nn.Module, tokenizer, items: Sequence[AgreementItem], methods: Sequence | Mapping,
                       *, masked: bool | None = None) -> AgreementResult:
    """Score every method on the agreement items the model predicts correctly.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM (``...ForCausalLM``) or a masked LM (``...ForMaskedLM``); parameters frozen.
    tokenizer : transformers.PreTrainedTokenizerFast
        Its (fast) tokenizer; a masked LM's needs a mask token.
    items : sequence of AgreementItem
        From :func:`agreement_items` or your own.
    methods : sequence or mapping
        Method names, callables ``method(model, input_ids, target) -> [tokens]``, or a mapping of
        names to either (see :func:`~lxt_explicit.evaluate.baselines.resolve_methods`).
    masked : bool, optional
        Run as a masked LM; default: when the model is not a causal LM.

    Returns
    -------
    AgreementResult
    """
    methods = resolve_methods(methods)
    masked = (not is_causal_lm(model)) if masked is None else masked
    if masked and tokenizer.mask_token is None:
        raise ValueError("a masked language model needs a tokenizer with a mask token")
    if not items:
        raise ValueError("no agreement items given")
    scored, metrics, seconds, correct = [], {n: [] for n in methods}, {n: 0.0 for n in methods}, 0
    for item in items:
        input_ids, target, subject, candidates = encode_item(model, tokenizer, item, masked)
        with torch.no_grad():
            if float(target.value(model_logits(model, target, input_ids=input_ids))[0]) <= 0:
                continue
        correct += 1
        scored.append(item)
        for name, method in methods.items():
            began = time.perf_counter()
            relevance = method(model, input_ids, target)
            seconds[name] += time.perf_counter() - began
            metrics[name].append(subject_metrics(relevance, subject, candidates))
    seconds = {n: s / max(correct, 1) for n, s in seconds.items()}
    return AgreementResult(list(methods), scored, metrics, correct / len(items), len(items), seconds, masked)
