"""Verify that the units relevance selects matter: ablation curves against the most activated and random units.

For each prompt, the explained logit (the model's next token, or a given target) is measured with
the ``k`` units of one spec ablated at every position (set to zero, or to their mean over the
prompts' positions), for units chosen three ways: the ``k`` most relevant (largest relevance,
summed over positions, from one AttnLRP explanation), the ``k`` most activated (largest mean
absolute activation over the prompt's positions) and ``k`` random units of the same spec.  The
drop of the logit against the unablated model, averaged over the prompts, is a curve over ``k``
per selection.  All ``k`` of one selection run as one batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from .find import unit_relevance
from .units import ActivationRecorder, unit_point

__all__ = ["AblationCurves", "ablation_curves", "SELECTIONS"]

#: The unit selections compared.
SELECTIONS = ("relevance", "activation", "random")


@dataclass
class AblationCurves:
    """Mean drop of the explained logit with the top-``k`` units of each selection ablated.

    Attributes
    ----------
    spec : str
        The units' spec.
    mode : {'zero', 'mean'}
        How units were ablated.
    ks : list of int
        The numbers of units.
    drops : dict
        Selection -> mean drop per ``k`` (``'random'``: also averaged over the draws).
    per_prompt : dict
        Selection -> one list of drops per prompt.
    base_logits : list of float
        The explained logit of each prompt without ablation.
    """

    spec: str
    mode: str
    ks: list[int]
    drops: dict[str, list[float]] = field(default_factory=dict)
    per_prompt: dict[str, list[list[float]]] = field(default_factory=dict)
    base_logits: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The curves as plain Python values (for json)."""
        return asdict(self)


def _ablation_hook(point, masks: torch.Tensor, values: torch.Tensor):
    """Replace the masked units of row ``b`` (``masks[b]``) by ``values`` (zeros or means)."""

    def edit(tensor):
        width = tensor.shape[-1]
        mask = masks.to(tensor.device)
        if point.heads > 1:
            mask = mask.repeat_interleave(width // point.heads, dim=-1)
        return torch.where(mask[:, None, :], values.to(tensor), tensor)

    if point.where == "input":
        return lambda module, args: (edit(args[0]), *args[1:])
    return lambda module, args, out: edit(out) if isinstance(out, torch.Tensor) else (edit(out[0]), *out[1:])


def _last_logits(model, input_ids):
    try:
        return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    except TypeError:  # a model without logits_to_keep
        return model(input_ids=input_ids, use_cache=False).logits[:, -1]


def _ablated(model, point, input_ids, target: int, masks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    module = model.get_submodule(point.module)
    hook = _ablation_hook(point, masks, values)
    handle = module.register_forward_pre_hook(hook) if point.where == "input" else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return _last_logits(model, input_ids.expand(len(masks), -1))[:, target].double().cpu()
    finally:
        handle.remove()


def _masks(order: torch.Tensor, ks: Sequence[int], units: int) -> torch.Tensor:
    masks = torch.zeros(len(ks), units, dtype=torch.bool)
    for row, k in enumerate(ks):
        masks[row, order[:k]] = True
    return masks


def _raw_recorder(model, point):
    """Record the raw tensor at the point (all positions) for the mean replacement."""
    rows = []
    module = model.get_submodule(point.module)
    if point.where == "input":
        handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].detach().flatten(0, -2)))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: rows.append((out[0] if isinstance(out, tuple) else out).detach().flatten(0, -2)))
    return rows, handle


def ablation_curves(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    spec: str,
    *,
    ks: Sequence[int] = tuple(range(1, 33)),
    mode: str = "zero",
    targets: Sequence[int | str | None] | None = None,
    random_draws: int = 3,
    seed: int = 0,
    explain_options: dict | None = None,
) -> AblationCurves:
    """Ablation curves of the ``k`` most relevant, most activated and random units of ``spec``.

    Parameters
    ----------
    model, tokenizer
        A causal language model and its tokenizer.
    prompts : sequence of str
        The prompts, tokenized as :func:`~lxt_explicit.explain.explain` does.
    spec : str
        The units (``'mlp:K'``, ``'heads:K'``, ``'sae:SITE'``); ``k`` must not exceed their number.
    ks : sequence of int
        The numbers of units to ablate.
    mode : {'zero', 'mean'}
        Ablate to zero or to each unit's mean over all positions of all prompts.
    targets : sequence, optional
        The token to explain per prompt (default: the model's next token).
    random_draws : int
        Random selections per prompt (averaged).
    explain_options : dict, optional
        More keyword arguments for :func:`~lxt_explicit.explain.explain` (``composite=``, ``chat=`` ...).

    Returns
    -------
    AblationCurves
    """
    from ..explain import explain  # at call time: lxt_explicit.latent re-exports steer, and explain imports latent

    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    point = unit_point(model, spec)
    ks = [int(k) for k in ks]
    targets = list(targets) if targets is not None else [None] * len(prompts)
    if not prompts or len(targets) != len(prompts):
        raise ValueError("give at least one prompt, and as many targets as prompts")
    runs, raw = [], []
    rows, handle = _raw_recorder(model, point)
    try:
        for prompt, target in zip(prompts, targets):
            with ActivationRecorder(model, [spec]) as recorder:
                explanation = explain(model, tokenizer, prompt, target=target, latent=[spec],
                                      **(explain_options or {}))
            raw.extend(rows)
            rows.clear()
            runs.append((explanation, recorder.activations[spec][0]))
    finally:
        handle.remove()
    units = runs[0][1].shape[-1]
    if max(ks) > units or min(ks) < 1:
        raise ValueError(f"ks must lie in 1..{units} (the number of units of {spec!r}), got {min(ks)}..{max(ks)}")
    width = raw[0].shape[-1]
    values = torch.cat(raw).mean(0) if mode == "mean" else torch.zeros(width, dtype=raw[0].dtype, device=raw[0].device)
    generator = torch.Generator().manual_seed(seed)
    curves = AblationCurves(spec, mode, ks, per_prompt={name: [] for name in SELECTIONS})
    for explanation, activations in runs:
        input_ids = torch.tensor([explanation.token_ids], device=next(model.parameters()).device)
        target = explanation.target_ids[0]
        with torch.no_grad():
            base = float(_last_logits(model, input_ids)[0, target])
        curves.base_logits.append(base)
        orders = {
            "relevance": unit_relevance(explanation, spec).argsort(descending=True),
            "activation": activations.abs().mean(0).argsort(descending=True),
        }
        for name, order in orders.items():
            drops = base - _ablated(model, point, input_ids, target, _masks(order, ks, units), values)
            curves.per_prompt[name].append(drops.tolist())
        draws = [base - _ablated(model, point, input_ids, target, _masks(torch.randperm(units, generator=generator),
                                                                           ks, units), values)
                 for _ in range(random_draws)]
        curves.per_prompt["random"].append(torch.stack(draws).mean(0).tolist())
    curves.drops = {name: torch.tensor(v, dtype=torch.float64).mean(0).tolist()
                    for name, v in curves.per_prompt.items()}
    return curves
