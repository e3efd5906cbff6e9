"""Latent units of a transformer for :func:`lxt_explicit.explain.explain`: which module holds them, and a recorder.

A latent spec names where relevance is read inside the model during the explanation's backward
pass: ``'mlp:K'`` (the neurons of block K's MLP), ``'heads:K'`` (the attention heads of block K),
``'NAME'`` / ``'NAME:output'`` (the output of module NAME) or ``'NAME:input'`` (its first input).
With a sparse autoencoder inserted at module SITE (:func:`lxt_explicit.neurons.insert_sae`),
``'sae:SITE'`` names its features, ``'sae:SITE:error'`` its reconstruction error and
``'sae:SITE:reconstruction'`` its reconstruction.

:func:`steer` (from :mod:`lxt_explicit.neurons.steer`, re-exported here) sets, scales or shifts
chosen units while the model runs.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

__all__ = ["LatentRecorder", "SAE_CHILD", "check_latent_specs", "decoder_layers", "latent_modules"]

#: The name under which :func:`lxt_explicit.neurons.insert_sae` adds its block to the site module.
SAE_CHILD = "lxt_sae"
_SAE_PARTS = ("features", "error", "reconstruction")

_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "output.dense", "mlp.dense_4h_to_h")
_ATTN_OUT = ("self_attn.o_proj", "attn.c_proj", "attention.output.dense", "self_attn.out_proj", "self_attn.dense")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the longest ``nn.ModuleList`` of identical modules.

    Returns
    -------
    name : str
        Its name in ``model``.
    layers : torch.nn.ModuleList
        The blocks.
    """
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"no list of transformer blocks found in {type(model).__name__}; name the modules instead")
    return best


def check_latent_specs(specs) -> tuple[str, ...]:
    """``specs`` as a tuple of strings; a single string (``'mlp:1'`` instead of ``['mlp:1']``) is an error.

    Raises
    ------
    TypeError
        If ``specs`` is a string or holds something other than strings.
    """
    if isinstance(specs, str):
        raise TypeError(f"latent must be a list of specs, e.g. latent=[{specs!r}], not the string {specs!r}")
    specs = tuple(specs)
    wrong = [spec for spec in specs if not isinstance(spec, str)]
    if wrong:
        raise TypeError(f"latent specs are strings such as 'mlp:3', 'heads:3' or a module name; got {wrong!r}")
    return specs


def latent_modules(model: nn.Module, spec: str) -> tuple[str, str, int]:
    """Resolve a latent-unit spec to ``(module name, 'input' | 'output', heads)``.

    ``'mlp:K'``: the neurons of block K's MLP (the input of its output projection);
    ``'heads:K'``: the attention heads of block K (the input of the attention's output projection,
    split into heads); ``'NAME'`` or ``'NAME:output'``: the output of module NAME; ``'NAME:input'``:
    its first input.  ``heads`` is the number of heads (1 for everything but ``'heads:K'``).
    """
    match = re.fullmatch(r"(mlp|heads):(-?\d+)", spec)
    if match:
        return _block_unit(model, spec, match.group(1), int(match.group(2)))
    if spec.startswith("sae:"):
        return _sae_unit(model, spec), "output", 1
    name, _, where = spec.rpartition(":") if spec.endswith((":input", ":output")) else (spec, "", "output")
    model.get_submodule(name)  # raises AttributeError naming the missing module
    return name, where, 1


def _sae_unit(model: nn.Module, spec: str) -> str:
    site, _, part = spec[4:].rpartition(":") if spec.endswith(tuple(f":{p}" for p in _SAE_PARTS)) else (
        spec[4:], "", "features")
    name = f"{site}.{SAE_CHILD}.{part}"
    try:
        model.get_submodule(name)
    except AttributeError:
        raise ValueError(
            f"{spec!r}: no sparse autoencoder is inserted at {site!r}; insert one first with "
            "lxt_explicit.neurons.insert_sae(model, site, sae)"
        ) from None
    return name


def _block_unit(model: nn.Module, spec: str, kind: str, index: int) -> tuple[str, str, int]:
    prefix, layers = decoder_layers(model)
    try:
        block = layers[index]
    except IndexError:
        raise ValueError(f"{spec!r}: the model has {len(layers)} blocks") from None
    block_name = f"{prefix}.{index % len(layers)}"
    names = dict(block.named_modules())
    candidates = _MLP_OUT if kind == "mlp" else _ATTN_OUT
    for candidate in candidates:
        if candidate in names:
            heads = 1 if kind == "mlp" else int(model.config.num_attention_heads)
            return f"{block_name}.{candidate}", "input", heads
    raise ValueError(f"{spec!r}: no module named one of {candidates} in {block_name}")


class LatentRecorder:
    """Capture the relevance arriving at chosen module inputs/outputs in the backward pass.

    Use as a context manager around the forward and backward pass; afterwards ``relevance`` maps
    each spec to its relevance, ``[batch, positions, units]`` (float32, heads summed per head).
    """

    def __init__(self, model: nn.Module, specs: Sequence[str]):
        self.model = model
        self.points = {spec: latent_modules(model, spec) for spec in check_latent_specs(specs)}
        self.relevance: dict[str, torch.Tensor] = {}
        self.handles = []

    def _watcher(self, spec: str, heads: int):
        def store(grad):
            value = grad.detach().float()
            if heads > 1:
                value = value.unflatten(-1, (heads, -1)).sum(-1)
            self.relevance[spec] = value

        def watch(tensor):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(store)

        return watch

    def __enter__(self):
        for spec, (name, where, heads) in self.points.items():
            module = self.model.get_submodule(name)
            watch = self._watcher(spec, heads)
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



def __getattr__(name: str):
    """``lxt_explicit.latent.steer`` is :func:`lxt_explicit.neurons.steer`, imported when first asked for
    (:mod:`lxt_explicit.neurons` builds on this module, so importing it here eagerly would be circular)."""
    if name == "steer":
        from .neurons.steer import steer

        return steer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
