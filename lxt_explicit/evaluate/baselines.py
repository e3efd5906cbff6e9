"""Attribution methods by name, all with one signature: ``method(model, input_ids, target) -> relevance per token``.

A method explains a :class:`~lxt_explicit.evaluate.target.Target` (one logit, or the difference of
two, at one position) of ``model`` on ``input_ids`` (``[1, tokens]``) and returns one score per
input token (``[tokens]``, float32, on the CPU; larger = more relevant).  Any callable with this
signature can be evaluated next to the built-in ones; options are given with
:func:`get_method` (``get_method("integrated_gradients", steps=32)``) or ``functools.partial``.

=========================  =========================================================================
``attnlrp``, ``cp_lrp``,   relevance of the token embeddings (summed over hidden) from one forward and
``attnlrp_sinks``          one relevance backward pass under :func:`lxt_explicit.attnlrp` /
                           :func:`lxt_explicit.cp_lrp` / :func:`lxt_explicit.attnlrp_sinks`.
``gradient``               L2 norm over hidden of the gradient with respect to the token embeddings.
``input_x_gradient``       embeddings times gradient, summed over hidden.
``integrated_gradients``   Captum's ``IntegratedGradients`` on the embeddings from a zero baseline
                           (Gauss-Legendre steps), summed over hidden.
``smoothgrad``             Captum's ``NoiseTunnel(Saliency)``: gradients averaged over noisy copies of
                           the embeddings (noise 10 % of their range), then the L2 norm over hidden.
``occlusion``              the drop of the explained value when one token's embedding is replaced by
                           the zero vector (every token in turn, copies batched).
``attention_rollout``      Abnar & Zuidema (2020): head-averaged attention plus identity, rows
                           normalized, multiplied over the layers; the row of the target position.
``random``                 a random permutation (seeded by the input ids, or by ``seed``).
=========================  =========================================================================

Integrated Gradients and SmoothGrad need Captum (``pip install captum``).  Model parameters should
be frozen (``model.requires_grad_(False)``): every method needs gradients of the input only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from types import MappingProxyType
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..composite import Composite
from ..presets import attnlrp as attnlrp_preset
from ..presets import attnlrp_sinks as attnlrp_sinks_preset
from ..presets import cp_lrp as cp_lrp_preset
from .perturbation import perturbed_values
from .target import Target, as_target, embed, embedding_name, model_logits

__all__ = [
    "METHODS",
    "Method",
    "attention_rollout",
    "attnlrp",
    "attnlrp_sinks",
    "cp_lrp",
    "get_method",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "lrp",
    "occlusion",
    "random_scores",
    "resolve_methods",
    "smoothgrad",
]

#: The signature every attribution method has.
Method = Callable[[nn.Module, torch.Tensor, Target], torch.Tensor]


def _check_ids(input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a tensor of shape [1, tokens] (one prompt), got {shape}")


def value_function(model: nn.Module, target: Target) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embeddings [batch, tokens, hidden] -> explained value [batch]`` (embeddings cast to the model's dtype)."""
    dtype = model.get_input_embeddings().weight.dtype

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        return target.value(model_logits(model, target, inputs_embeds=embeddings.to(dtype)))

    return forward


def lrp(model: nn.Module, input_ids: torch.Tensor, target: Target | int, *, composite: Composite | None = None,
        method: str = "attnlrp", epsilon: float | None = None) -> torch.Tensor:
    """Relevance of each token under a composite registered for this call (AttnLRP unless told otherwise).

    Parameters
    ----------
    model, input_ids, target
        As for every method (see the module docstring).
    composite : Composite, optional
        The rules; default ``lxt_explicit.attnlrp()`` (``method='cp_lrp'``: ``lxt_explicit.cp_lrp()``).
    method : {'attnlrp', 'attnlrp_sinks', 'cp_lrp'}
        The preset used when no composite is given.
    epsilon : float, optional
        The presets' stabilizer (their default if not given).

    Returns
    -------
    torch.Tensor
        ``[tokens]``: the relevance of the token embeddings, summed over the hidden dimension.  The
        explained logits start with their own values (a contrast with its negated value), as in
        :func:`lxt_explicit.explain.explain`.
    """
    _check_ids(input_ids)
    target = as_target(target)
    if composite is None:
        presets = {"attnlrp": attnlrp_preset, "attnlrp_sinks": attnlrp_sinks_preset, "cp_lrp": cp_lrp_preset}
        if method not in presets:
            raise ValueError(f"method must be one of {sorted(presets)}, got {method!r}")
        composite = presets[method](**({} if epsilon is None else {"epsilon": epsilon}))
    with torch.enable_grad(), composite.context(model):
        selected, signs = target.terms(model_logits(model, target, input_ids=input_ids))
        torch.autograd.backward(selected, selected.detach() * signs)
        relevance = composite.source_relevance()[embedding_name(model)]
    return relevance[0].detach().float().sum(-1).cpu()


def attnlrp(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """AttnLRP relevance per token (:func:`lrp` with :func:`lxt_explicit.attnlrp`)."""
    return lrp(model, input_ids, target, method="attnlrp")


def attnlrp_sinks(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """AttnLRP with the attention-sink gate after a BOS token (:func:`lrp` with :func:`lxt_explicit.attnlrp_sinks`)."""
    return lrp(model, input_ids, target, method="attnlrp_sinks")


def cp_lrp(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """CP-LRP relevance per token (:func:`lrp` with :func:`lxt_explicit.cp_lrp`)."""
    return lrp(model, input_ids, target, method="cp_lrp")


def _embedding_gradient(model: nn.Module, input_ids: torch.Tensor, target: Target | int):
    _check_ids(input_ids)
    embeddings = embed(model, input_ids).requires_grad_()
    with torch.enable_grad():
        value_function(model, as_target(target))(embeddings).sum().backward()
    return embeddings.detach(), embeddings.grad


def gradient(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """L2 norm over hidden of the gradient of the explained value with respect to each token embedding."""
    return _embedding_gradient(model, input_ids, target)[1][0].float().norm(dim=-1).cpu()


def input_x_gradient(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """Embedding times gradient, summed over hidden (Gradient x Input)."""
    embeddings, grad = _embedding_gradient(model, input_ids, target)
    return (embeddings * grad)[0].float().sum(-1).cpu()


def _captum():
    try:
        import captum.attr
    except ImportError as error:
        error.add_note("Integrated Gradients and SmoothGrad use Captum: pip install captum")
        raise
    return captum.attr


def integrated_gradients(model: nn.Module, input_ids: torch.Tensor, target: Target | int, *, steps: int = 16,
                         batch: int = 16) -> torch.Tensor:
    """Captum's Integrated Gradients on the token embeddings from a zero baseline, summed over hidden.

    ``steps`` Gauss-Legendre integration steps, ``batch`` of them per forward/backward pass.
    """
    _check_ids(input_ids)
    embeddings = embed(model, input_ids)
    attribution = _captum().IntegratedGradients(value_function(model, as_target(target))).attribute(
        embeddings, baselines=torch.zeros_like(embeddings), n_steps=steps, internal_batch_size=batch
    )
    return attribution[0].float().sum(-1).cpu()


def smoothgrad(model: nn.Module, input_ids: torch.Tensor, target: Target | int, *, samples: int = 16,
               batch: int = 16, noise: float = 0.1, seed: int = 0) -> torch.Tensor:
    """SmoothGrad (Captum's ``NoiseTunnel`` over ``Saliency``), reduced per token by the L2 norm over hidden.

    The noise's standard deviation is ``noise`` times the range (max - min) of the prompt's embedding
    values (Smilkov et al. 2017 recommend 10-20 %); ``samples`` noisy copies, ``batch`` per pass.
    """
    _check_ids(input_ids)
    embeddings = embed(model, input_ids)
    std = noise * float(embeddings.max() - embeddings.min())
    devices = [embeddings.device] if embeddings.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        attribution = _captum().NoiseTunnel(_captum().Saliency(value_function(model, as_target(target)))).attribute(
            embeddings, nt_type="smoothgrad", nt_samples=samples, nt_samples_batch_size=batch, stdevs=std, abs=False
        )
    return attribution[0].float().norm(dim=-1).cpu()


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Switch ``model`` to the attention implementation ``name`` inside a ``with`` block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def attention_rollout(model: nn.Module, input_ids: torch.Tensor, target: Target | int) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of the target position: per layer ``0.5 A + 0.5 I``, rows normalized."""
    _check_ids(input_ids)
    target = as_target(target)
    with torch.no_grad(), attention_implementation(model, "eager"):
        attentions = model(input_ids=input_ids, output_attentions=True).attentions
    length = input_ids.shape[1]
    row = torch.zeros(length, dtype=torch.float32, device=input_ids.device)
    row[target.position] = 1.0
    identity = torch.eye(length, dtype=torch.float32, device=input_ids.device)
    for attention in reversed(attentions):  # row <- row @ A_L @ ... @ A_1, without forming the product
        mixed = 0.5 * attention[0].float().mean(0) + 0.5 * identity
        row = row @ (mixed / mixed.sum(-1, keepdim=True))
    return row.cpu()


def occlusion(model: nn.Module, input_ids: torch.Tensor, target: Target | int, *,
              positions: Sequence[int] | None = None, replacement: torch.Tensor | None = None,
              batch: int = 16) -> torch.Tensor:
    """The drop of the explained value when one token's embedding at a time is replaced (zero vector by default).

    Positions not in ``positions`` (default: all) get the score 0.
    """
    _check_ids(input_ids)
    embeddings = embed(model, input_ids)
    length = embeddings.shape[1]
    positions = list(range(length)) if positions is None else [p % length for p in positions]
    replacement = torch.zeros(embeddings.shape[-1]) if replacement is None else replacement
    masks = torch.zeros(len(positions) + 1, length, dtype=torch.bool)  # row 0: nothing occluded
    if positions:
        masks[torch.arange(1, len(positions) + 1), torch.tensor(positions, dtype=torch.long)] = True
    values, _ = perturbed_values(model, embeddings, masks, replacement, as_target(target), batch)
    scores = torch.zeros(length)
    scores[positions] = (values[0] - values[1:]).float()
    return scores


def random_scores(model: nn.Module, input_ids: torch.Tensor, target: Target | int, *,
                  seed: int | None = None) -> torch.Tensor:
    """A random permutation of ``0 .. tokens-1`` as scores; the seed defaults to a hash of the input ids."""
    _check_ids(input_ids)
    if seed is None:
        digest = hashlib.sha256(str(input_ids[0].tolist()).encode()).digest()
        seed = int.from_bytes(digest[:8], "little")
    return torch.randperm(input_ids.shape[1], generator=torch.Generator().manual_seed(seed)).float()


#: Every built-in method by name, in the order result tables list them.
METHODS = MappingProxyType({
    "attnlrp": attnlrp,
    "attnlrp_sinks": attnlrp_sinks,
    "cp_lrp": cp_lrp,
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "occlusion": occlusion,
    "attention_rollout": attention_rollout,
    "random": random_scores,
})


def get_method(name: str, **options) -> Method:
    """The built-in method ``name`` (see :data:`METHODS`), with keyword ``options`` bound.

    Raises
    ------
    ValueError
        If ``name`` is not a built-in method.
    """
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; built-in methods: {list(METHODS)}, "
                         "or pass your own callable method(model, input_ids, target) -> relevance per token")
    return functools.partial(METHODS[name], **options) if options else METHODS[name]


def resolve_methods(methods) -> dict[str, Method]:
    """``{name: callable}`` from names, callables or a mapping of names to names or callables."""
    if isinstance(methods, str) or callable(methods):
        methods = [methods]
    items = methods.items() if hasattr(methods, "items") else ((_name_of(m), m) for m in methods)
    resolved = {}
    for name, method in items:
        resolved[name] = get_method(method) if isinstance(method, str) else method
        if not callable(resolved[name]):
            raise TypeError(f"method {name!r} is neither a built-in name nor a callable: {method!r}")
    if not resolved:
        raise ValueError("no attribution methods given")
    return resolved


def _name_of(method) -> str:
    if isinstance(method, str):
        return method
    return getattr(method, "__name__", None) or getattr(getattr(method, "func", None), "__name__", repr(method))
