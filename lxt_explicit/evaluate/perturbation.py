"""Perturbation curves: remove tokens most-relevant-first and least-relevant-first, read the explained value.

The protocol of the AttnLRP paper (Achtibat et al. 2024, Sec. 4.1): rank the tokens by their
relevance; remove them in ``steps`` equal fractions, most relevant first (MoRF) and least relevant
first (LeRF), by replacing their input embeddings with the zero vector (or the mean embedding, or
the embedding of a mask / unknown token); after every step read the explained value (a logit, or a
logit difference) and the probability of the explained token.  A faithful ranking makes the MoRF
curve fall fast and the LeRF curve stay high: the area between them (ABPC) is the score.

With ``v_k`` the value after step ``k`` of ``K`` (``v_0``: nothing removed), the fractions
``x_k = k / K`` and the trapezoid rule,

.. math::

    \\mathrm{AUC} = \\sum_{k=1}^{K} \\frac{x_k - x_{k-1}}{2} \\, \\frac{v_{k-1} + v_k}{|v_0|}, \\qquad
    \\mathrm{ABPC} = \\mathrm{AUC}_\\mathrm{LeRF} - \\mathrm{AUC}_\\mathrm{MoRF}.

After ``k`` steps the first ``round(n k / K)`` of the ``n`` ranked positions are removed (halves
round up); ties in the relevance keep the positions' order.  All perturbed copies of a prompt go
through the model in batches; for a causal model and the last position, the part of the prompt
before the first removed token is computed once and its keys and values reused.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .target import Target, as_target, embed, is_causal_lm, model_logits

__all__ = [
    "Curves",
    "area_between",
    "cache_arguments",
    "perturbation_curves",
    "perturbed_values",
    "prefix_cache",
    "removal_counts",
    "removal_masks",
    "replacement_embedding",
]


@dataclass(frozen=True)
class Curves:
    """MoRF and LeRF curves of one ranking on one prompt.

    Attributes
    ----------
    fractions : numpy.ndarray
        Removed fraction after each step, ``k / steps`` for ``k = 0 .. steps``.
    morf, lerf : numpy.ndarray
        The explained value after each step, most / least relevant removed first.
    morf_probability, lerf_probability : numpy.ndarray
        The probability of the explained token after each step.
    """

    fractions: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray
    morf_probability: np.ndarray
    lerf_probability: np.ndarray

    @property
    def abpc(self) -> float:
        """Area between the LeRF and the MoRF curve of the value, normalized by the unperturbed value."""
        return area_between(self.morf, self.lerf, self.fractions)["abpc"]

    @property
    def abpc_probability(self) -> float:
        """The same for the probability of the explained token."""
        return area_between(self.morf_probability, self.lerf_probability, self.fractions)["abpc"]

    def areas(self, quantity: str = "value") -> dict[str, float]:
        """``{'auc_morf', 'auc_lerf', 'abpc'}`` of ``quantity`` (``'value'`` or ``'probability'``)."""
        if quantity not in ("value", "probability"):
            raise ValueError(f"quantity must be 'value' or 'probability', got {quantity!r}")
        if quantity == "value":
            return area_between(self.morf, self.lerf, self.fractions)
        return area_between(self.morf_probability, self.lerf_probability, self.fractions)

    def to_dict(self) -> dict:
        """The curves as lists of floats (for JSON)."""
        return {field.name: getattr(self, field.name).tolist() for field in dataclasses.fields(self)}


def area_between(morf, lerf, fractions=None, *, normalize: bool = True) -> dict[str, float]:
    """Areas under the MoRF and LeRF curves (trapezoid rule) and the area between them.

    Parameters
    ----------
    morf, lerf : array_like
        The curves; both start with the unperturbed value.
    fractions : array_like, optional
        The removed fractions (default ``0, 1/K, ..., 1``).
    normalize : bool
        Divide by the absolute unperturbed value ``|morf[0]|`` (as the AttnLRP paper), so prompts
        with different logits weigh the same.

    Returns
    -------
    dict
        ``auc_morf``, ``auc_lerf`` and ``abpc = auc_lerf - auc_morf``.
    """
    morf, lerf = np.asarray(morf, dtype=np.float64), np.asarray(lerf, dtype=np.float64)
    if morf.shape != lerf.shape or morf.ndim != 1 or len(morf) < 2:
        raise ValueError(f"morf and lerf must be curves of the same length >= 2, got {morf.shape} and {lerf.shape}")
    x = np.linspace(0.0, 1.0, len(morf)) if fractions is None else np.asarray(fractions, dtype=np.float64)
    scale = abs(morf[0]) if normalize else 1.0
    if scale == 0.0:
        raise ValueError("the unperturbed value is 0, so the curves cannot be normalized; use normalize=False")
    areas = {name: float(np.trapezoid(curve / scale, x)) for name, curve in (("auc_morf", morf), ("auc_lerf", lerf))}
    areas["abpc"] = areas["auc_lerf"] - areas["auc_morf"]
    return areas


def removal_counts(n: int, steps: int) -> list[int]:
    """How many of ``n`` ranked positions are removed after each of ``steps`` equal steps (from 0 to ``n``)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return [int(math.floor(n * k / steps + 0.5)) for k in range(steps + 1)]


def removal_masks(relevance: torch.Tensor, positions: Sequence[int], length: int,
                  steps: int) -> dict[str, torch.Tensor]:
    """``{'morf': masks, 'lerf': masks}``, each ``[steps + 1, length]`` bool: the removed positions per step.

    MoRF removes ``positions`` in order of decreasing relevance, LeRF in order of increasing
    relevance (ties keep the positions' order).
    """
    index = torch.as_tensor(list(positions), dtype=torch.long)
    scores = torch.as_tensor(relevance, dtype=torch.float64).flatten()[index]
    if not torch.isfinite(scores).all():
        raise ValueError("the relevance contains NaN or infinite values; the ranking is undefined")
    orders = {"morf": index[torch.argsort(scores, descending=True, stable=True)],
              "lerf": index[torch.argsort(scores, stable=True)]}
    masks = {}
    for name, order in orders.items():
        rows = torch.zeros(steps + 1, length, dtype=torch.bool)
        for row, count in enumerate(removal_counts(len(index), steps)):
            rows[row, order[:count]] = True
        masks[name] = rows
    return masks


def replacement_embedding(model: nn.Module, removal: str | int | torch.Tensor = "zero") -> torch.Tensor:
    """The vector that replaces a removed token's embedding.

    ``'zero'`` (the AttnLRP paper's choice), ``'mean'`` (the mean of the embedding matrix's rows),
    a token id (the embedding of a mask or unknown token, e.g. ``tokenizer.mask_token_id``), or a
    vector of the embedding's width.
    """
    weight = model.get_input_embeddings().weight.detach()
    if isinstance(removal, torch.Tensor):
        if removal.shape != weight.shape[1:]:
            raise ValueError(f"a replacement vector must have shape {tuple(weight.shape[1:])}, "
                             f"got {tuple(removal.shape)}")
        return removal.detach().to(device=weight.device, dtype=weight.dtype)
    if isinstance(removal, str):
        if removal == "zero":
            return torch.zeros_like(weight[0])
        if removal == "mean":
            return weight.float().mean(0).to(weight.dtype)
        raise ValueError(f"removal must be 'zero', 'mean', a token id or a vector, got {removal!r}")
    if isinstance(removal, bool) or not isinstance(removal, int) or not 0 <= removal < weight.shape[0]:
        raise ValueError(f"a removal token id must be in 0 .. {weight.shape[0] - 1}, got {removal!r}")
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([removal], device=weight.device))[0].detach()


def prefix_cache(model: nn.Module, input_ids: torch.Tensor | None = None, *,
                 inputs_embeds: torch.Tensor | None = None):
    """The key/value cache of a causal model after the prefix ``input_ids`` (or ``inputs_embeds``)."""
    inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_arguments(model: nn.Module, cache, copies: int) -> dict:
    """Keyword arguments that continue ``copies`` sequences from a copy of ``cache`` (it is left unchanged)."""
    past = copy.deepcopy(cache)
    past.batch_repeat_interleave(copies)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: past, "use_cache": True}


def perturbed_values(model: nn.Module, embeddings: torch.Tensor, masks: torch.Tensor, replacement: torch.Tensor,
                     target: Target | int, batch: int = 16, *,
                     reuse_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The explained value and the token's probability after replacing the masked embeddings.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal or masked language model.
    embeddings : torch.Tensor
        Token embeddings of one prompt, ``[1, tokens, hidden]``.
    masks : torch.Tensor
        ``[n, tokens]`` bool: which positions to replace, one row per perturbed copy.
    replacement : torch.Tensor
        ``[hidden]``: the embedding that replaces the masked ones.
    target : Target or int
        The explained quantity.
    batch : int
        Copies per forward pass.
    reuse_prefix : bool
        For a causal model and the last position: compute the positions before the first replaced
        one once and reuse their keys and values (their outputs do not depend on what follows).

    Returns
    -------
    values, probabilities : torch.Tensor
        ``[n]`` each, float64 on the CPU.
    """
    target = as_target(target)
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    replacement = replacement.to(device=embeddings.device, dtype=embeddings.dtype)
    touched = masks.any(0).nonzero()
    prefix = 0
    if reuse_prefix and is_causal_lm(model) and target.position == -1 and len(touched):
        prefix = min(int(touched[0]), embeddings.shape[1] - 1)
    values, probabilities = [], []
    with torch.no_grad():
        cache = prefix_cache(model, inputs_embeds=embeddings[:, :prefix]) if prefix else None
        for chunk in masks.split(batch):
            chunk = chunk[:, prefix:].to(embeddings.device)[..., None]
            copies = torch.where(chunk, replacement, embeddings[:, prefix:].expand(len(chunk), -1, -1))
            extra = cache_arguments(model, cache, len(chunk)) if cache is not None else {}
            logits = _logits(model, target, copies, extra).double()
            values.append(target.value(logits).cpu())
            probabilities.append(torch.softmax(logits[:, target.position], -1)[:, target.token].cpu())
    return torch.cat(values), torch.cat(probabilities)


def _logits(model: nn.Module, target: Target, embeddings: torch.Tensor, extra: dict) -> torch.Tensor:
    if not extra:
        return model_logits(model, target, inputs_embeds=embeddings)
    return model(inputs_embeds=embeddings, logits_to_keep=1, **extra).logits


def perturbation_curves(model: nn.Module, input_ids: torch.Tensor, target: Target | int,
                        relevance: torch.Tensor | Mapping[str, torch.Tensor], *, positions: Sequence[int] | None = None,
                        steps: int = 10, removal: str | int | torch.Tensor = "zero",
                        batch: int = 16) -> Curves | dict[str, Curves]:
    """MoRF and LeRF curves of one or several rankings of the tokens of one prompt.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal or masked language model (parameters frozen or not; nothing is trained).
    input_ids : torch.Tensor
        ``[1, tokens]`` on the model's device.
    target : Target or int
        The explained quantity (a token id: its logit at the last position).
    relevance : torch.Tensor or mapping of str to torch.Tensor
        One score per token (``[tokens]``), or several rankings by name; all their perturbed copies
        (duplicates removed) go through the model together.
    positions : sequence of int, optional
        The positions that are ranked and removed (default: all; e.g. only a document's tokens).
    steps : int
        Number of equal removal steps.
    removal : 'zero', 'mean', int or torch.Tensor
        What replaces a removed token's embedding (:func:`replacement_embedding`).
    batch : int
        Perturbed copies per forward pass.

    Returns
    -------
    Curves or dict of str to Curves
        As ``relevance`` was given.
    """
    target = as_target(target)
    length = input_ids.shape[-1]
    positions = list(range(length)) if positions is None else [int(p) % length for p in positions]
    if not positions:
        raise ValueError("positions is empty: give at least one position to remove")
    single = isinstance(relevance, torch.Tensor)
    rankings = {"relevance": relevance} if single else dict(relevance)
    for name, scores in rankings.items():
        if torch.as_tensor(scores).numel() != length:
            raise ValueError(f"relevance {name!r} has {torch.as_tensor(scores).numel()} scores for {length} tokens")
    masks = {name: removal_masks(scores, positions, length, steps) for name, scores in rankings.items()}
    stacked = torch.cat([rows for per_ranking in masks.values() for rows in per_ranking.values()])
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    values, probabilities = perturbed_values(
        model, embed(model, input_ids), unique, replacement_embedding(model, removal), target, batch
    )
    values, probabilities = values[inverse].numpy(), probabilities[inverse].numpy()
    fractions = np.linspace(0.0, 1.0, steps + 1)
    curves, row = {}, 0
    for name in masks:
        morf, lerf = slice(row, row + steps + 1), slice(row + steps + 1, row + 2 * steps + 2)
        curves[name] = Curves(fractions, values[morf], values[lerf], probabilities[morf], probabilities[lerf])
        row += 2 * steps + 2
    return curves["relevance"] if single else curves
