"""Steer latent units: set, scale or shift chosen units' activations while a model runs, and undo it on exit.

``with steer(model, {"mlp:3": {17: 0.0}}):`` sets neuron 17 of block 3's MLP to zero in every
forward pass (and every step of ``generate()``) of that model instance inside the block.  The
edit is a forward (pre-)hook on the module that holds the units, registered in front of every
other hook of that module, so that a :class:`~lxt_explicit.latent.LatentRecorder` (and
:func:`~lxt_explicit.explain.explain`'s ``latent=``) reads the steered units: the relevance of a
steered unit can be read in the same run.  Leaving the block removes the hooks and nothing else
was changed (module types, parameters, ``requires_grad``, ``state_dict``, hook dictionaries).

How relevance passes a steered unit under the AttnLRP rules: a set unit is a constant (the
relevance it receives stays there); a scaled unit is the unit times a constant (identity rule);
a shifted unit is a sum with a constant (epsilon rule, the constant absorbs its share).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .units import UnitPoint, unit_point

__all__ = ["steer", "Steering", "MODES"]

#: What a value does to its unit: replace it, multiply it, or add to it.
MODES = ("set", "scale", "add")


class Steering:
    """The context manager :func:`steer` returns; ``remove()`` undoes it early (idempotent)."""

    def __init__(self, model: nn.Module, edits: Mapping[str, Mapping[int, float]], mode: str = "set"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"steer needs an nn.Module, got {type(model).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(edits, Mapping) or not edits:
            raise TypeError("edits must be a non-empty dict {spec: {unit: value}}, e.g. {'mlp:3': {17: 0.0}}")
        self.model = model
        self.mode = mode
        self.edits = [(_check_edit(model, spec, units)) for spec, units in edits.items()]
        self.handles: list = []

    def __enter__(self) -> "Steering":
        if self.handles:
            raise RuntimeError("this steering is already active; leave its with block before entering it again")
        try:
            for point, units, values in self.edits:
                module = self.model.get_submodule(point.module)
                edit = _editor(point, units, values, self.mode)
                if point.where == "input":
                    hook = module.register_forward_pre_hook(_pre_hook(edit), prepend=True)
                else:
                    hook = module.register_forward_hook(_post_hook(edit), prepend=True)
                self.handles.append(hook)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Remove the hooks (every one, even if one fails)."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()


def steer(model: nn.Module, edits: Mapping[str, Mapping[int, float]], *, mode: str = "set") -> Steering:
    """Set (``mode='set'``), scale (``'scale'``) or shift (``'add'``) chosen units while ``model`` runs.

    Parameters
    ----------
    model : nn.Module
        The model; only this instance is steered.
    edits : dict
        ``{spec: {unit: value}}``: specs as in :mod:`lxt_explicit.latent` (``'mlp:K'``,
        ``'heads:K'``, ``'sae:SITE'``, a module name, ``'NAME:input'``), units as indices into the
        spec's last dimension (a head index for ``'heads:K'``: every element of the head gets
        the value).
    mode : {'set', 'scale', 'add'}
        What the values do, at every position of every forward pass.

    Returns
    -------
    Steering
        A context manager: ``with steer(model, {...}): model.generate(...)``.

    Raises
    ------
    ValueError
        For an unknown spec, a unit out of range, a non-finite value or an unknown mode.
    TypeError
        For edits that are not ``{str: {int: number}}``.
    """
    return Steering(model, edits, mode)


def _check_edit(model: nn.Module, spec, units) -> tuple[UnitPoint, list[int], list[float]]:
    point = unit_point(model, spec)
    if not isinstance(units, Mapping) or not units:
        raise TypeError(f"the edits of {spec!r} must be a non-empty dict {{unit: value}}, got {units!r}")
    indices, values = [], []
    for unit, value in units.items():
        if isinstance(unit, bool) or not isinstance(unit, int):
            raise TypeError(f"{spec!r}: units are integer indices, got {unit!r}")
        if unit < 0 or (point.units is not None and unit >= point.units):
            raise ValueError(f"{spec!r}: unit {unit} is out of range; it has {point.units} units (0..{point.units - 1})"
                             if point.units is not None else f"{spec!r}: unit {unit} must not be negative")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{spec!r}: the value of unit {unit} must be a finite number, got {value!r}")
        indices.append(unit)
        values.append(float(value))
    return point, indices, values


def _editor(point: UnitPoint, units: list[int], values: list[float], mode: str):
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        width = tensor.shape[-1]
        size = width // point.heads if point.heads > 1 else 1
        if point.units is None and max(units) >= width:
            raise ValueError(f"{point.spec!r}: unit {max(units)} is out of range; it has {width} units")
        mask = torch.zeros(width, dtype=torch.bool, device=tensor.device)
        target = torch.zeros(width, dtype=tensor.dtype, device=tensor.device)
        for unit, value in zip(units, values):
            mask[unit * size : (unit + 1) * size] = True
            target[unit * size : (unit + 1) * size] = value
        if mode == "set":
            return torch.where(mask, target, tensor)
        if mode == "scale":
            return tensor * torch.where(mask, target, torch.ones_like(target))
        return tensor + target

    return edit


def _pre_hook(edit):
    def hook(module, args, kwargs=None):
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        return (edit(args[0]), *args[1:])

    return hook


def _post_hook(edit):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return edit(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (edit(output[0]), *output[1:])
        return None

    return hook
