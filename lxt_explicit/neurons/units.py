"""Latent units by spec: how many a spec has, where they live, and their activations in a forward pass.

A spec is what :func:`lxt_explicit.latent.latent_modules` resolves: ``'mlp:K'`` (the neurons of block
K's MLP, the input of its output projection), ``'heads:K'`` (the attention heads of block K, the
input of the attention's output projection split into heads), ``'sae:SITE'`` (the features of a
sparse autoencoder inserted at SITE), or a module name (``'NAME'``, ``'NAME:input'``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..latent import latent_modules

__all__ = ["UnitPoint", "unit_point", "per_unit", "ActivationRecorder"]


@dataclass(frozen=True)
class UnitPoint:
    """Where the units of a spec live.

    Attributes
    ----------
    spec : str
        The spec as given.
    module : str
        Name of the module whose input or output holds the units.
    where : {'input', 'output'}
        Which of the two.
    heads : int
        Number of heads the last dimension is split into (1: every element is a unit).
    units : int or None
        Number of units, where the module tells it before a forward pass (``None`` otherwise).
    """

    spec: str
    module: str
    where: str
    heads: int
    units: int | None


def unit_point(model: nn.Module, spec: str) -> UnitPoint:
    """Resolve ``spec`` on ``model`` to a :class:`UnitPoint`.

    Raises
    ------
    ValueError
        For a spec that names no module of ``model`` (with the forms a spec may take).
    """
    if not isinstance(spec, str):
        raise TypeError(f"a unit spec is a string such as 'mlp:3', 'heads:3' or 'sae:SITE'; got {spec!r}")
    try:
        name, where, heads = latent_modules(model, spec)
    except AttributeError as error:
        raise ValueError(
            f"unknown unit spec {spec!r} ({error}); use 'mlp:K', 'heads:K', 'sae:SITE', a module name, "
            "'NAME:input' or 'NAME:output'"
        ) from None
    module = model.get_submodule(name)
    return UnitPoint(spec, name, where, heads, _count(module, where, heads))


def _count(module: nn.Module, where: str, heads: int) -> int | None:
    if heads > 1:
        return heads
    if isinstance(module, nn.Linear):
        return module.in_features if where == "input" else module.out_features
    return getattr(module, "units", None)


def per_unit(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., units]``: each head's slice summarised by its L2 norm (``heads > 1``), else the tensor itself."""
    if heads > 1:
        return tensor.unflatten(-1, (heads, -1)).norm(dim=-1)
    return tensor


class ActivationRecorder:
    """Record the activations of the units of some specs in every forward pass inside a ``with`` block.

    ``activations[spec]`` is ``[batch, positions, units]`` (float32, detached) from the latest
    forward pass; a head's activation is the L2 norm of its slice.
    """

    def __init__(self, model: nn.Module, specs):
        self.model = model
        self.points = [unit_point(model, spec) for spec in specs]
        self.activations: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self) -> "ActivationRecorder":
        for point in self.points:
            module = self.model.get_submodule(point.module)

            def store(tensor, point=point):
                self.activations[point.spec] = per_unit(tensor.detach().float(), point.heads)

            if point.where == "input":
                self.handles.append(module.register_forward_pre_hook(lambda m, args, s=store: s(args[0])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, s=store: s(out[0] if isinstance(out, tuple) else out)))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False
