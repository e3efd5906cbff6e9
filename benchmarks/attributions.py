"""Per-token attribution methods compared by the benchmarks, all explaining one next-token logit.

The methods are those of :mod:`lxt_explicit.evaluate.baselines` (the library's evaluation module);
this file names them for the benchmark scripts and keeps their historical call signatures.

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

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

import lxt_explicit as lxt
from lxt_explicit.evaluate import baselines
from lxt_explicit.evaluate import target as target_module
from lxt_explicit.evaluate.perturbation import perturbed_values
from lxt_explicit.evaluate.target import Target

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
    "attnlrp_sinks": "AttnLRP, sinks='gate'",
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
    "attnlrp_sinks": "#e7969c",
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
# The methods themselves live in the library (lxt_explicit.evaluate.baselines); these wrappers keep the
# benchmarks' historical signatures (a token id instead of a Target, positional options).


def embedding_name(model: nn.Module) -> str:
    """Name of the token-embedding module inside ``model`` (where LRP relevance is read)."""
    return target_module.embedding_name(model)


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings of ``input_ids`` (detached)."""
    return target_module.embed(model, input_ids)


def logit_function(model: nn.Module, token: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embeddings [batch, tokens, hidden] -> logit of token at the last position [batch]``."""
    return baselines.value_function(model, Target(token))


def perturbed_logits(
    model: nn.Module,
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    baseline: torch.Tensor,
    token: int,
    batch: int,
    reuse_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit and log-probability of ``token`` (last position) after replacing masked embeddings by ``baseline``.

    :func:`lxt_explicit.evaluate.perturbation.perturbed_values`; ``[n]`` each, float32 on the CPU.
    """
    values, probabilities = perturbed_values(model, embeddings, masks, baseline, Target(token), batch,
                                             reuse_prefix=reuse_prefix)
    return values.float(), probabilities.log().float()


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
    if not all_logits:
        return baselines.lrp(model, input_ids, Target(token), composite=preset())
    composite = preset()
    with torch.enable_grad(), composite.context(model):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=0).logits
        target = logits[0, -1, token]
        target.backward(target.detach())
        relevance = composite.source_relevance()[embedding_name(model)]
    return relevance[0].detach().float().sum(-1).cpu()


def gradient(model: nn.Module, input_ids: torch.Tensor, token: int) -> torch.Tensor:
    """L2 norm of the gradient with respect to each token embedding."""
    return baselines.gradient(model, input_ids, Target(token))


def input_x_gradient(model: nn.Module, input_ids: torch.Tensor, token: int) -> torch.Tensor:
    """Input x Gradient on the token embeddings, summed over the hidden dimension."""
    return baselines.input_x_gradient(model, input_ids, Target(token))


def integrated_gradients(model: nn.Module, input_ids: torch.Tensor, token: int, steps: int, batch: int) -> torch.Tensor:
    """Captum's Integrated Gradients on the token embeddings from a zero baseline, summed over hidden."""
    return baselines.integrated_gradients(model, input_ids, Target(token), steps=steps, batch=batch)


def smoothgrad(
    model: nn.Module, input_ids: torch.Tensor, token: int, samples: int, batch: int, noise: float, seed: int
) -> torch.Tensor:
    """SmoothGrad (Captum ``NoiseTunnel`` over ``Saliency``), reduced per token by the L2 norm."""
    return baselines.smoothgrad(model, input_ids, Target(token), samples=samples, batch=batch, noise=noise, seed=seed)


def attention_rollout(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention rollout of the last position (head-averaged attention plus identity, per layer)."""
    return baselines.attention_rollout(model, input_ids, Target(0))


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
    return baselines.occlusion(model, input_ids, Target(token), positions=positions, replacement=baseline, batch=batch)


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
    if method == "attnlrp_sinks":
        # the gate itself: random ids start with a word, where attnlrp_sinks() (sinks='bos') is the paper's rules
        return lrp(model, input_ids, token, functools.partial(lxt.attnlrp, sinks="gate"))
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
