"""Per-token attribution methods compared by the benchmarks, all explaining one next-token logit.

Every method explains the same quantity, ``model(...).logits[0, -1, token]`` (the logit of ``token``
at the last position), and returns one score per input token, float32, on the CPU:

=====================  ==========================================================================
``attnlrp``            :func:`lxt_explicit.attnlrp` relevance of the token embeddings, summed
                       over the hidden dimension (one forward + one relevance backward pass).
``cp_lrp``             the same with :func:`lxt_explicit.cp_lrp`.
``attnlrp_all_logits`` ``attnlrp`` with the logits of every position computed (the speed benchmark
                       only: what ``explain()`` cost before it kept only the explained logits).
``gradient``           L2 norm over the hidden dimension of the gradient of the logit with
                       respect to the token embeddings (saliency).
``input_x_gradient``   Captum ``InputXGradient`` on the token embeddings, summed over hidden.
``integrated_gradients``  Captum ``IntegratedGradients`` on the token embeddings, zero baseline,
                       ``ig_steps`` Gauss-Legendre steps in batches of ``ig_batch``, summed.
``smoothgrad``         Captum ``NoiseTunnel(Saliency)`` (SmoothGrad): the gradient averaged over
                       ``smoothgrad_samples`` copies of the embeddings with Gaussian noise of
                       standard deviation ``smoothgrad_noise`` times the range (max - min) of
                       the prompt's embedding values (Smilkov et al. 2017 recommend 10-20 %),
                       then the L2 norm over hidden, like ``gradient``.
``attention_rollout``  Abnar & Zuidema (2020): per layer the head-averaged attention plus the
                       identity (residual), rows normalized, multiplied over the layers; the row
                       of the last position (computed with eager attention).
``occlusion``          the drop of the logit when one token's embedding is replaced by the
                       baseline embedding (every token, or the given positions), the occluded
                       copies batched ``occlusion_batch`` at a time.
``random``             a random permutation of the positions (seeded by the caller).
=====================  ==========================================================================

Model parameters are expected to be frozen (``model.requires_grad_(False)``), as every method here
needs gradients with respect to the input only.  Only the last position's logits are computed
(``logits_to_keep=1``) so that no method pays for the vocabulary projection of every position
(except ``attnlrp_all_logits``, which shows that cost).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

import lxt_explicit as lxt

#: Every method :func:`attribute` knows, in the order the result tables list them.
METHODS = (
    "attnlrp",
    "cp_lrp",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "attention_rollout",
    "occlusion",
    "random",
)

#: Names for tables and plots.
LABELS = {
    "forward": "forward only",
    "gradient": "gradient",
    "attnlrp": "AttnLRP",
    "cp_lrp": "CP-LRP",
    "attnlrp_all_logits": "AttnLRP, logits of all positions",
    "explain": "explain()",
    "input_x_gradient": "Input x Gradient",
    "integrated_gradients": "Integrated Gradients",
    "smoothgrad": "SmoothGrad",
    "attention_rollout": "attention rollout",
    "occlusion": "occlusion",
    "random": "random",
}


#: Colors for plots, fixed per method so that every figure uses the same ones.
COLORS = {
    "forward": "#7f7f7f",
    "gradient": "#1f77b4",
    "attnlrp": "#d62728",
    "cp_lrp": "#ff7f0e",
    "attnlrp_all_logits": "#8b0000",
    "explain": "#bcbd22",
    "input_x_gradient": "#2ca02c",
    "integrated_gradients": "#9467bd",
    "smoothgrad": "#8c564b",
    "attention_rollout": "#e377c2",
    "occlusion": "#17becf",
    "random": "#000000",
}


@dataclass(frozen=True)
class Settings:
    """Hyper-parameters of the attribution methods.

    Attributes
    ----------
    ig_steps : int
        Integration steps of Integrated Gradients.
    ig_batch : int
        Steps per forward/backward pass of Integrated Gradients (Captum's ``internal_batch_size``).
    smoothgrad_samples : int
        Noisy samples of SmoothGrad.
    smoothgrad_batch : int
        Samples per forward/backward pass of SmoothGrad.
    smoothgrad_noise : float
        Noise standard deviation as a fraction of the range of the prompt's embedding values.
    occlusion_batch : int
        Occluded copies per forward pass.
    seed : int
        Seed of the random generators (SmoothGrad noise, random ranking).
    """

    ig_steps: int = 16
    ig_batch: int = 4
    smoothgrad_samples: int = 16
    smoothgrad_batch: int = 4
    smoothgrad_noise: float = 0.1
    occlusion_batch: int = 8
    seed: int = 0


# ------------------------------------------------------------------------------------ helpers


def embedding_name(model: nn.Module) -> str:
    """Name of the token-embedding module inside ``model`` (where LRP relevance is read)."""
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings of ``input_ids`` (detached)."""
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids).detach()


def logit_function(model: nn.Module, token: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embeddings [batch, tokens, hidden] -> logit of token at the last position [batch]``.

    The embeddings are cast to the model's dtype (Captum's SmoothGrad adds float32 noise).
    """
    dtype = model.get_input_embeddings().weight.dtype

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeddings.to(dtype), use_cache=False, logits_to_keep=1).logits[:, -1, token]

    return forward


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Switch ``model`` to attention implementation ``name`` inside a ``with`` block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def perturbed_logits(
    model: nn.Module,
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    baseline: torch.Tensor,
    token: int,
    batch: int,
    reuse_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit and log-probability of ``token`` after replacing masked embeddings by ``baseline``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The causal language model.
    embeddings : torch.Tensor
        Token embeddings of one prompt, ``[1, tokens, hidden]``.
    masks : torch.Tensor
        ``[n, tokens]`` bool: which positions to replace, one row per perturbed copy.
    baseline : torch.Tensor
        ``[hidden]``: the embedding that replaces the masked ones.
    token : int
        The token whose logit is tracked (at the last position).
    batch : int
        Copies per forward pass.
    reuse_prefix : bool
        Run the positions before the first masked one once and reuse their keys and values (a
        causal model's prefix does not depend on what follows) instead of once per copy.

    Returns
    -------
    logits, log_probabilities : torch.Tensor
        ``[n]`` each, float32 on the CPU.
    """
    logits, log_probs = [], []
    baseline = baseline.to(device=embeddings.device, dtype=embeddings.dtype)
    touched = masks.any(0).nonzero()
    prefix = min(int(touched[0]), embeddings.shape[1] - 1) if reuse_prefix and len(touched) else 0
    with torch.no_grad():
        cache = _cache_of(model(inputs_embeds=embeddings[:, :prefix], use_cache=True)) if prefix else None
        for chunk in masks.split(batch):
            chunk = chunk[:, prefix:].to(embeddings.device)[..., None]
            copies = torch.where(chunk, baseline, embeddings[:, prefix:].expand(len(chunk), -1, -1))
            past = None
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(chunk))
            cache_argument = _cache_argument(model, past)
            output = model(inputs_embeds=copies, use_cache=past is not None, logits_to_keep=1, **cache_argument)
            last = output.logits[:, -1].float()
            logits.append(last[:, token].cpu())
            log_probs.append(torch.log_softmax(last, -1)[:, token].cpu())
    return torch.cat(logits), torch.cat(log_probs)


def _cache_of(output):
    """The key/value cache of a model output (``cache`` from transformers 5.2x, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _cache_argument(model: nn.Module, cache) -> dict:
    """``{'cache': cache}`` or ``{'past_key_values': cache}``, whichever ``model.forward`` takes."""
    if cache is None:
        return {}
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


# ------------------------------------------------------------------------------------ methods


def lrp(
    model: nn.Module,
    input_ids: torch.Tensor,
    token: int,
    preset: Callable[[], lxt.Composite],
    all_logits: bool = False,
) -> torch.Tensor:
    """Relevance of each token under the composite ``preset()`` (registered for this call only).

    ``all_logits`` computes the logits of every position (as ``explain()`` did before it kept only
    the explained ones): the relevance is the same, the cost is not.
    """
    composite = preset()
    with torch.enable_grad(), composite.context(model):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=0 if all_logits else 1).logits
        target = logits[0, -1, token]
        target.backward(target.detach())
        relevance = composite.source_relevance()[embedding_name(model)]
    return relevance[0].detach().float().sum(-1).cpu()


def gradient(model: nn.Module, input_ids: torch.Tensor, token: int) -> torch.Tensor:
    """L2 norm of the gradient with respect to each token embedding."""
    embeddings = embed(model, input_ids).requires_grad_()
    with torch.enable_grad():
        logit_function(model, token)(embeddings).sum().backward()
    return embeddings.grad[0].float().norm(dim=-1).cpu()


def input_x_gradient(model: nn.Module, input_ids: torch.Tensor, token: int) -> torch.Tensor:
    """Captum's Input x Gradient on the token embeddings, summed over the hidden dimension."""
    from captum.attr import InputXGradient

    embeddings = embed(model, input_ids).requires_grad_()
    attributions = InputXGradient(logit_function(model, token)).attribute(embeddings)
    return attributions[0].float().sum(-1).cpu()


def integrated_gradients(model: nn.Module, input_ids: torch.Tensor, token: int, steps: int, batch: int) -> torch.Tensor:
    """Captum's Integrated Gradients on the token embeddings from a zero baseline, summed over hidden."""
    from captum.attr import IntegratedGradients

    embeddings = embed(model, input_ids)
    attributions = IntegratedGradients(logit_function(model, token)).attribute(
        embeddings, baselines=torch.zeros_like(embeddings), n_steps=steps, internal_batch_size=batch
    )
    return attributions[0].float().sum(-1).cpu()


def smoothgrad(
    model: nn.Module, input_ids: torch.Tensor, token: int, samples: int, batch: int, noise: float, seed: int
) -> torch.Tensor:
    """SmoothGrad (Captum ``NoiseTunnel`` over ``Saliency``), reduced per token by the L2 norm."""
    from captum.attr import NoiseTunnel, Saliency

    embeddings = embed(model, input_ids)
    std = noise * float(embeddings.max() - embeddings.min())
    devices = [embeddings.device] if embeddings.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        attributions = NoiseTunnel(Saliency(logit_function(model, token))).attribute(
            embeddings, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=batch, stdevs=std, abs=False
        )
    return attributions[0].float().norm(dim=-1).cpu()


def attention_rollout(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention rollout of the last position (head-averaged attention plus identity, per layer)."""
    with torch.no_grad(), attention_implementation(model, "eager"):
        attentions = model(input_ids=input_ids, use_cache=False, output_attentions=True, logits_to_keep=1).attentions
    length = input_ids.shape[1]
    row = torch.zeros(length, dtype=torch.float32, device=input_ids.device)
    row[-1] = 1.0
    identity = torch.eye(length, dtype=torch.float32, device=input_ids.device)
    for attention in reversed(attentions):  # row <- row @ A_L @ ... @ A_1, without forming the product
        mixed = 0.5 * attention[0].float().mean(0) + 0.5 * identity
        row = row @ (mixed / mixed.sum(-1, keepdim=True))
    return row.cpu()


def occlusion(
    model: nn.Module,
    input_ids: torch.Tensor,
    token: int,
    batch: int,
    positions: Sequence[int] | None = None,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop of the logit when one token embedding at a time is replaced by ``baseline`` (zero by default).

    Positions not in ``positions`` (default: all) get the score 0.
    """
    embeddings = embed(model, input_ids)
    length = embeddings.shape[1]
    positions = list(range(length)) if positions is None else list(positions)
    baseline = torch.zeros(embeddings.shape[-1], device=embeddings.device) if baseline is None else baseline
    masks = torch.zeros(len(positions) + 1, length, dtype=torch.bool)  # row 0: nothing occluded
    masks[torch.arange(1, len(positions) + 1), torch.tensor(positions, dtype=torch.long)] = True
    logits, _ = perturbed_logits(model, embeddings, masks, baseline, token, batch)
    scores = torch.zeros(length)
    scores[positions] = logits[0] - logits[1:]
    return scores


def random_scores(length: int, seed: int) -> torch.Tensor:
    """A random permutation of ``0 .. length-1`` as scores (a random ranking)."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed)).float()


def attribute(
    method: str,
    model: nn.Module,
    input_ids: torch.Tensor,
    token: int,
    settings: Settings = Settings(),
    *,
    positions: Sequence[int] | None = None,
    baseline: torch.Tensor | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Scores of the tokens of ``input_ids`` (``[1, tokens]``) for the logit of ``token`` at the last position.

    Parameters
    ----------
    method : str
        One of :data:`METHODS`.
    model : transformers.PreTrainedModel
        A causal language model with frozen parameters.
    input_ids : torch.Tensor
        ``[1, tokens]`` on the model's device.
    token : int
        The explained next token.
    settings : Settings
        Hyper-parameters.
    positions : sequence of int, optional
        Positions that occlusion perturbs (default all); ignored by the other methods.
    baseline : torch.Tensor, optional
        ``[hidden]`` embedding that occlusion puts in (default zero).
    seed : int, optional
        Seed for the random methods (default ``settings.seed``).

    Returns
    -------
    torch.Tensor
        ``[tokens]`` float32 scores on the CPU; larger = more relevant.
    """
    seed = settings.seed if seed is None else seed
    return _attribute(method, model, input_ids, token, settings, positions, baseline, seed).detach()


def _attribute(method, model, input_ids, token, settings, positions, baseline, seed) -> torch.Tensor:
    if method == "attnlrp":
        return lrp(model, input_ids, token, lxt.attnlrp)
    if method == "cp_lrp":
        return lrp(model, input_ids, token, lxt.cp_lrp)
    if method == "attnlrp_all_logits":
        return lrp(model, input_ids, token, lxt.attnlrp, all_logits=True)
    if method == "gradient":
        return gradient(model, input_ids, token)
    if method == "input_x_gradient":
        return input_x_gradient(model, input_ids, token)
    if method == "integrated_gradients":
        return integrated_gradients(model, input_ids, token, settings.ig_steps, settings.ig_batch)
    if method == "smoothgrad":
        return smoothgrad(
            model, input_ids, token, settings.smoothgrad_samples, settings.smoothgrad_batch,
            settings.smoothgrad_noise, seed,
        )
    if method == "attention_rollout":
        return attention_rollout(model, input_ids)
    if method == "occlusion":
        return occlusion(model, input_ids, token, settings.occlusion_batch, positions, baseline)
    if method == "random":
        return random_scores(input_ids.shape[1], seed)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
