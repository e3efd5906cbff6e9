"""Component relevance against activation patching: which heads and MLP neurons carry a behavior?

The check of RelP (Jafari et al. 2025, "RelP: Faithful and Efficient Circuit Discovery via Relevance
Patching"): on prompts with a known circuit (indirect-object identification: "When Mary and John went
to the store, John gave a drink to" -> " Mary"), the metric is the logit difference
``m = logit(IO) - logit(S)``.  A corrupted prompt replaces the second mention of S by a third name, so
that it no longer says who the answer is.  Every estimate below runs in the same direction as the
patching it estimates (from the corrupted into the clean run) and on the same metric.

* **Activation patching** (the ground truth): the effect of unit ``u`` is
  ``m(clean with a_u from the corrupted run) - m(clean)``; one forward pass per unit.
* **Attribution patching** (AtP, the baseline): the first-order estimate
  ``sum_(positions, features of u) dm/da(clean) * (a_corrupt - a_clean)`` from one backward pass.
* **Relevance patching** (RelP): the same with the LRP propagation coefficient ``c`` in place of
  the gradient, RelP's ``effect(u) ~ sum c(clean) * (a_corrupt - a_clean)``.  ``c`` is the
  "modified gradient" of LRP in its Gradient x Input form: the relevance at an activation is
  ``R = a * c``.  The rules here are linear in the relevance they receive and the backward pass
  starts at the two logits with their own values (``R = logit``, coefficient 1 per logit), so the
  relevance the latent API records gives ``c = R / a_clean`` exactly: ``c`` is the derivative of
  ``m`` under the rules (a linear layer's coefficient is its weight, a residual sum passes it
  unchanged, the uniform rule halves it for each factor of a product, the identity rule of an RMS
  norm or an activation gives ``y / x``).  Where ``a_clean`` is exactly 0 its relevance is 0 and
  the coefficient is taken as 0.  Note that RelP is *not* the relevance ``R`` itself: a unit whose
  activation does not change has no effect, however relevant it is in the clean run.

Rule sets (``composite``): AttnLRP (:func:`lxt_explicit.attnlrp`: the uniform rule on ``q k^T``
and on ``A v`` halves every coefficient that passes through attention, and a gated MLP's product
halves those through the MLP), CP-LRP (attention weights and gates constant) and
:func:`relp_rules`, the rules of RelP's own code: normalizations with a constant scale (LN-rule),
activations by the identity rule, the gated product halved, attention by its gradient.  Each rule
that departs from the gradient is a different linearization; where patching a unit changes the
metric almost linearly (single heads and neurons are small changes), the gradient is the exact
first-order term and no rule set can beat it.  RelP reports its gains for large changes (a block's
whole MLP output or residual stream at one position, GPT-2), where the gradient of layer norms and
GELUs is a poor guide.

Units are the latent API's (:func:`lxt_explicit.latent.latent_modules`): ``'mlp:K'`` the neurons
of block K's MLP (the input of its output projection, ``act(gate) * up`` in a gated MLP),
``'heads:K'`` the attention heads (the input of the attention's output projection, one slice per
head), each summed over positions; ``'SPEC@N'`` (``'model.layers.3.mlp.down_proj@5'``, RelP's
components): the whole activation at each of the last N positions.  The agreement with patching
is Pearson's r over units of the effects averaged over prompts; :meth:`PatchingResult.slope` tells
whether an estimate is scaled against the effects.  For a causal model the positions before the
first token where the prompts differ are the same in both runs: computed once, keys and values reused.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..composite import Composite
from ..latent import latent_modules
from ..presets import attnlrp, attnlrp_sinks, cp_lrp
from ..rules import TaylorDecompositionRule
from ..stabilizer import DEFAULT_EPSILON
from .perturbation import cache_arguments, prefix_cache
from .statistics import pearson
from .target import Target, is_causal_lm, model_logits

__all__ = ["PatchingPrompt", "PatchingResult", "activation_patching", "attribution_patching", "ioi_prompts",
           "patching_scores", "relevance_patching", "relp_rules", "unit_count"]


@dataclass(frozen=True)
class PatchingPrompt:
    """A clean prompt, its corrupted version (same length) and the metric.

    Attributes
    ----------
    clean_ids, corrupt_ids : torch.Tensor
        ``[1, tokens]`` each.
    target : Target
        The metric, e.g. the logit of the indirect object minus that of the subject.
    text : str
        The clean prompt's text.
    """

    clean_ids: torch.Tensor
    corrupt_ids: torch.Tensor
    target: Target
    text: str = ""

    def __post_init__(self):
        if self.clean_ids.shape != self.corrupt_ids.shape or self.clean_ids.shape[0] != 1:
            raise ValueError(f"clean and corrupted ids must both be [1, tokens]: {tuple(self.clean_ids.shape)} vs "
                             f"{tuple(self.corrupt_ids.shape)}")


def ioi_prompts(tokenizer, count: int = 8, *, seed: int = 0, device="cpu") -> list[PatchingPrompt]:
    """Indirect-object identification prompts from the templates in ``lxt_explicit/data/ioi.json``.

    Names that are not one known token for ``tokenizer`` (with their leading space) are left out.  The
    target is ``logit(' IO') - logit(' S')`` at the last position.
    """
    data = json.loads(resources.files("lxt_explicit.data").joinpath("ioi.json").read_text(encoding="utf-8"))
    names = {n: tokenizer.encode(f" {n}", add_special_tokens=False) for n in data["names"]}
    names = {n: ids[0] for n, ids in names.items() if len(ids) == 1 and ids[0] != tokenizer.unk_token_id}
    if len(names) < 3:
        raise ValueError("fewer than three of the data file's names are single tokens for this tokenizer")
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        template = data["templates"][index % len(data["templates"])]
        io, s, c = rng.sample(sorted(names), 3)
        place, thing = rng.choice(data["places"]), rng.choice(data["objects"])
        clean = template.format(IO=io, S=s, place=place, object=thing)
        second = template.rindex("{S}")
        corrupt = template[:second].format(IO=io, S=s, place=place, object=thing) + \
            template[second:].format(IO=io, S=c, place=place, object=thing)
        ids = [tokenizer(t, return_tensors="pt")["input_ids"].to(device) for t in (clean, corrupt)]
        if ids[0].shape != ids[1].shape:
            continue
        prompts.append(PatchingPrompt(ids[0], ids[1], Target(names[io], -1, names[s]), clean))
    return prompts


def unit_count(model: nn.Module, spec: str) -> int:
    """Number of units of ``spec``: heads for ``'heads:K'``, N for ``'SPEC@N'``, features (neurons) otherwise."""
    base, last = _split_positions(spec)
    if last:
        return last
    name, where, heads = latent_modules(model, base)
    if heads > 1:
        return heads
    return _features(model, name, where)


def _features(model: nn.Module, name: str, where: str) -> int:
    module = model.get_submodule(name)
    if where == "input" and isinstance(getattr(module, "weight", None), torch.Tensor):
        return int(module.weight.shape[-1])
    if where == "output" and isinstance(getattr(module, "weight", None), torch.Tensor):
        return int(module.weight.shape[0])
    raise ValueError(f"cannot tell the number of units at {name}:{where}; use 'mlp:K', 'heads:K' or a linear layer")


def _split_positions(spec: str) -> tuple[str, int]:
    """``'SPEC@N'`` -> ``('SPEC', N)`` (units: the whole activation at each of the last N positions); else 0."""
    base, at, last = spec.partition("@")
    if at and not (last.isdigit() and int(last) > 0):
        raise ValueError(f"{spec!r}: after '@' comes a number of positions (e.g. 'mlp:3@5'), got {last!r}")
    return base, int(last) if at else 0


class _Point:
    """Hooks at one latent point: record the activation (and its gradient slot), or replace it."""

    def __init__(self, model: nn.Module, spec: str):
        base, self.last = _split_positions(spec)
        self.name, self.where, self.heads = latent_modules(model, base)
        self.module = model.get_submodule(self.name)
        self.activation, self.grad = None, None

    def _hook(self, change: Callable[[torch.Tensor], torch.Tensor]):
        if self.where == "input":
            return self.module.register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
        return self.module.register_forward_hook(lambda m, args, out: change(out))

    def record(self):
        """A hook handle that stores the activation and the gradient slot's value in the backward pass."""

        def store(tensor):
            self.activation = tensor.detach()
            if tensor.requires_grad:
                tensor.register_hook(lambda g: setattr(self, "grad", g.detach()))
            return tensor

        return self._hook(store)

    def replace(self, masks: torch.Tensor, values: torch.Tensor):
        """A hook handle that puts ``values`` where ``masks`` (``[batch, 1, features]``) is set."""
        return self._hook(lambda tensor: torch.where(masks, values.to(tensor.dtype), tensor))

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """``[batch, positions, features] -> [units]``: summed over positions (and a head's features), batch row 0;
        for ``'SPEC@N'`` summed over features at each of the last N positions."""
        if self.last:
            if values.shape[1] < self.last:
                raise ValueError(f"units at the last {self.last} positions, but the prompt has {values.shape[1]}")
            return values[0, -self.last :].double().sum(-1)
        values = values[0].double().sum(0)
        return values.unflatten(-1, (self.heads, -1)).sum(-1) if self.heads > 1 else values


def _prefix_length(model: nn.Module, prompt: PatchingPrompt) -> int:
    if not is_causal_lm(model) or prompt.target.position != -1:
        return 0
    differs = (prompt.clean_ids != prompt.corrupt_ids)[0].nonzero()
    return int(differs[0]) if len(differs) else prompt.clean_ids.shape[1] - 1


def _activations(model: nn.Module, point: _Point, input_ids: torch.Tensor) -> torch.Tensor:
    handle = point.record()
    try:
        with torch.no_grad():
            model_logits(model, Target(0), input_ids=input_ids)
    finally:
        handle.remove()
    return point.activation


def activation_patching(model: nn.Module, spec: str, prompt: PatchingPrompt, *, units: Sequence[int] | None = None,
                        batch: int = 32) -> torch.Tensor:
    """Effect of patching each unit from the corrupted into the clean run on the metric, ``[units]`` (float64)."""
    point = _Point(model, spec)
    count = unit_count(model, spec)
    units = list(range(count)) if units is None else list(units)
    corrupt = _activations(model, point, prompt.corrupt_ids)
    width = corrupt.shape[-1] // (point.heads if point.heads > 1 else count)
    prefix, length = _prefix_length(model, prompt), corrupt.shape[1]
    if point.last > length:
        raise ValueError(f"{spec!r}: units at the last {point.last} positions, but the prompt has {length}")
    cache = prefix_cache(model, prompt.clean_ids[:, :prefix]) if prefix else None
    suffix = prompt.clean_ids[:, prefix:]
    with torch.no_grad():
        clean_value = float(prompt.target.value(model_logits(model, prompt.target, input_ids=prompt.clean_ids))[0])
    effects = []
    for start in range(0, len(units), batch):
        chunk = units[start : start + batch]
        masks = _masks(chunk, point, width, length - prefix, corrupt)
        handle = point.replace(masks, corrupt[:, prefix:])
        try:
            with torch.no_grad():
                extra = cache_arguments(model, cache, len(chunk)) if cache is not None else {}
                inputs = dict(input_ids=suffix.expand(len(chunk), -1), **extra)
                logits = model(**inputs, logits_to_keep=1).logits if extra else \
                    model_logits(model, prompt.target, **inputs)
        finally:
            handle.remove()
        effects.append(prompt.target.value(logits.double()).cpu() - clean_value)
    return torch.cat(effects)


def _masks(chunk, point: _Point, width: int, suffix: int, corrupt: torch.Tensor) -> torch.Tensor:
    """Where each unit of ``chunk`` sits in the activation of the positions after the shared prefix."""
    if point.last:  # position suffix - last + unit; one before the prefix is the same in both runs: no change
        masks = torch.zeros(len(chunk), suffix, 1, dtype=torch.bool, device=corrupt.device)
        for row, unit in enumerate(chunk):
            if suffix - point.last + unit >= 0:
                masks[row, suffix - point.last + unit] = True
        return masks
    masks = torch.zeros(len(chunk), 1, corrupt.shape[-1], dtype=torch.bool, device=corrupt.device)
    for row, unit in enumerate(chunk):
        masks[row, 0, unit * width : (unit + 1) * width] = True
    return masks


def _gradient_slots(model: nn.Module, specs: Sequence[str], prompt: PatchingPrompt, composite: Composite | None):
    """Per spec: its point, the activation on the clean prompt and the value in its gradient slot (gradient or
    LRP relevance), all from one forward and one backward pass."""
    points = {spec: _Point(model, spec) for spec in specs}
    handles = [point.record() for point in points.values()]
    try:
        with torch.enable_grad():
            if composite is None:
                embeddings = model.get_input_embeddings()(prompt.clean_ids).detach().requires_grad_()
                selected, signs = prompt.target.terms(model_logits(model, prompt.target, inputs_embeds=embeddings))
                (selected * signs).sum().backward()
            else:
                with composite.context(model):
                    logits = model_logits(model, prompt.target, input_ids=prompt.clean_ids)
                    selected, signs = prompt.target.terms(logits)
                    torch.autograd.backward(selected, selected.detach() * signs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [spec for spec, point in points.items() if point.grad is None]
    if missing:
        raise RuntimeError(f"no gradient reached {missing}; are they on the path from the input to the logits?")
    return points


def _corrupt_activations(model: nn.Module, specs: Sequence[str], prompt: PatchingPrompt) -> dict[str, torch.Tensor]:
    points = {spec: _Point(model, spec) for spec in specs}
    handles = [point.record() for point in points.values()]
    try:
        with torch.no_grad():
            model_logits(model, Target(0), input_ids=prompt.corrupt_ids)
    finally:
        for handle in handles:
            handle.remove()
    return {spec: point.activation for spec, point in points.items()}


def _estimate(model, specs, prompt, composite, use_relevance: bool):
    single = isinstance(specs, str)
    specs = [specs] if single else list(specs)
    points = _gradient_slots(model, specs, prompt, composite)
    corrupt = _corrupt_activations(model, specs, prompt)
    result = {}
    for spec, point in points.items():
        clean, slot = point.activation.double(), point.grad.double()
        if use_relevance:  # the coefficient R / a (0 where a is exactly 0, and so is R)
            slot = torch.where(clean != 0, slot / torch.where(clean != 0, clean, 1.0), 0.0)
        result[spec] = point.per_unit(slot * (corrupt[spec].double() - clean)).cpu()
    return result[specs[0]] if single else result


def attribution_patching(model: nn.Module, specs: str | Sequence[str], prompt: PatchingPrompt):
    """Attribution patching: ``sum dm/da * (a_corrupt - a_clean)`` per unit (float64).

    One spec: ``[units]``; several: ``{spec: [units]}`` from one backward pass.
    """
    return _estimate(model, specs, prompt, None, use_relevance=False)


def relevance_patching(model: nn.Module, specs: str | Sequence[str], prompt: PatchingPrompt, *,
                       composite: Composite | None = None):
    """Relevance patching (RelP): ``sum (R / a_clean) * (a_corrupt - a_clean)`` per unit (float64).

    ``R`` is the relevance at the unit's activation from one backward pass under ``composite``
    (default :func:`lxt_explicit.attnlrp`), started at the metric's logits with their own values.
    One spec: ``[units]``; several: ``{spec: [units]}`` from one backward pass.
    """
    return _estimate(model, specs, prompt, attnlrp() if composite is None else composite, use_relevance=True)


def relp_rules(*, epsilon: float = DEFAULT_EPSILON) -> Composite:
    """The rules of RelP's code (Jafari et al. 2025) as a composite: AttnLRP with attention by its gradient.

    As there: normalizations with a constant scale (LN-rule; AttnLRP's identity rule of RMS
    norms), element-wise activations by the identity rule, a gated product split uniformly
    between its factors (half rule), and attention (``F.scaled_dot_product_attention``, and the
    matrix products of eager attention) by Gradient x Input
    (:class:`~lxt_explicit.rules.TaylorDecompositionRule` linearized at the input), so that its
    coefficients are the plain gradient, where AttnLRP halves them.  ``nn.MultiheadAttention``
    keeps AttnLRP's rule.
    """
    taylor = TaylorDecompositionRule(epsilon=epsilon)
    return attnlrp(epsilon=epsilon, ops={"attention": taylor, "matmul": taylor})


#: The estimates :func:`patching_scores` computes by default: ``estimate(model, specs, prompt) -> {spec: [units]}``.
ESTIMATES = MappingProxyType({
    "attnlrp": lambda model, specs, prompt: relevance_patching(model, specs, prompt, composite=attnlrp()),
    "attnlrp_sinks": lambda model, specs, prompt: relevance_patching(model, specs, prompt, composite=attnlrp_sinks()),
    "cp_lrp": lambda model, specs, prompt: relevance_patching(model, specs, prompt, composite=cp_lrp()),
    "relp_rules": lambda model, specs, prompt: relevance_patching(model, specs, prompt, composite=relp_rules()),
    "attribution_patching": attribution_patching,
})


@dataclass
class PatchingResult:
    """Patching effects and their estimates, per latent spec.

    Attributes
    ----------
    effects : dict
        ``spec -> [prompts, units]`` activation-patching effects (float64).
    estimates : dict
        ``estimate -> spec -> [prompts, units]``.
    units : dict
        ``spec -> the unit indices`` evaluated.
    """

    effects: dict[str, np.ndarray]
    estimates: dict[str, dict[str, np.ndarray]]
    units: dict[str, list[int]] = field(default_factory=dict)

    def correlation(self, estimate: str, specs: Sequence[str] | str | None = None) -> float:
        """Pearson's r between an estimate and the patching effects over the units of ``specs``, means over prompts.

        ``specs``: a list of specs, ``'mlp'`` or ``'heads'`` (every spec of that kind), or all (default).
        """
        chosen = self._specs(specs)
        truth = np.concatenate([self.effects[s].mean(0) for s in chosen])
        guess = np.concatenate([self.estimates[estimate][s].mean(0) for s in chosen])
        return pearson(guess, truth)

    def slope(self, estimate: str, specs: Sequence[str] | str | None = None) -> float:
        """Least-squares slope of an estimate on the patching effects (with intercept), means over prompts.

        1 for an estimate on the effects' scale; a rule set that shrinks the coefficients of some
        blocks shows it here block by block (``specs=['mlp:3']``).  ``specs`` as in :meth:`correlation`.
        """
        chosen = self._specs(specs)
        truth = np.concatenate([self.effects[s].mean(0) for s in chosen])
        guess = np.concatenate([self.estimates[estimate][s].mean(0) for s in chosen])
        spread = float(((truth - truth.mean()) ** 2).sum())
        if spread == 0:
            raise ValueError(f"the patching effects of {chosen} are all equal; a slope needs effects that differ")
        return float(((truth - truth.mean()) * (guess - guess.mean())).sum() / spread)

    def _specs(self, specs) -> list[str]:
        if specs is None:
            return list(self.effects)
        if isinstance(specs, str):
            chosen = [s for s in self.effects if s.split(":")[0] == specs] or ([specs] if specs in self.effects else [])
            if not chosen:
                raise KeyError(f"no spec {specs!r} was patched; have {list(self.effects)}")
            return chosen
        return list(specs)


def patching_scores(model: nn.Module, prompts: Sequence[PatchingPrompt], specs: Sequence[str], *,
                    estimates: Mapping[str, Callable] | Sequence[str] = ("attnlrp", "cp_lrp", "attribution_patching"),
                    units: Mapping[str, Sequence[int]] | None = None, batch: int = 32,
                    log: Callable[[str], None] | None = None) -> PatchingResult:
    """Activation-patching effects and estimates of every unit of ``specs`` on every prompt.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The model, parameters frozen.
    prompts : sequence of PatchingPrompt
        From :func:`ioi_prompts` or your own.
    specs : sequence of str
        Latent specs (``'mlp:K'``, ``'heads:K'``, a module name).
    estimates : mapping or sequence of str
        Names of the built-in estimates (``'attnlrp'``, ``'cp_lrp'``, ``'relp_rules'``: relevance
        patching with that rule set; ``'attribution_patching'``), or a mapping of names to
        ``estimate(model, specs, prompt) -> {spec: [all units]}``.
    units : mapping, optional
        ``spec -> unit indices`` to patch (default: all; e.g. a random sample of an MLP's neurons).
    batch : int
        Patched copies per forward pass.
    log : callable, optional
        Receives progress lines.

    Returns
    -------
    PatchingResult
    """
    estimates = dict(estimates) if isinstance(estimates, Mapping) else {name: ESTIMATES[name] for name in estimates}
    chosen = {s: list((units or {}).get(s, range(unit_count(model, s)))) for s in specs}
    effects = {s: [] for s in specs}
    guesses = {name: {s: [] for s in specs} for name in estimates}
    for index, prompt in enumerate(prompts):
        for spec in specs:
            effects[spec].append(activation_patching(model, spec, prompt, units=chosen[spec], batch=batch).numpy())
        for name, estimate in estimates.items():
            per_spec = estimate(model, list(specs), prompt)
            for spec in specs:
                guesses[name][spec].append(per_spec[spec][chosen[spec]].numpy())
        if log is not None:
            log(f"[{index + 1}/{len(prompts)}] patched {sum(len(u) for u in chosen.values())} units")
    return PatchingResult({s: np.array(v) for s, v in effects.items()},
                          {n: {s: np.array(v) for s, v in per.items()} for n, per in guesses.items()}, chosen)

