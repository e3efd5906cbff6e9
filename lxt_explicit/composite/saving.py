"""Tensors saved for the backward pass, copied before an in-place operation overwrites them.

The rules save more than plain autograd does (the epsilon rule needs a sum's operands, for
example), so an in-place operation of the model (``weights /= weights.sum(-1, keepdim=True)``
in a mixture-of-experts router, ``out.add_(bias)``) can overwrite a tensor that a rule saved.
While a registered model runs, every tensor saved for the backward pass is kept in a holder
(:class:`SavedTensors`, installed with :func:`torch.autograd.graph.saved_tensors_hooks`);
before a routed in-place operation changes a tensor, the holders of that tensor's memory (the
tensor, its views and aliases) get a copy of what they hold (copy on write).  Autograd's own
check stays: a saved tensor changed in any other way raises the usual error when the backward
pass needs it.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["SavedTensors"]


def _storage(tensor: torch.Tensor):
    """The memory a tensor lives in: views and aliases of one tensor share it."""
    try:
        return tensor.untyped_storage().data_ptr()
    except RuntimeError:  # tensors without storage (sparse, some subclasses)
        return id(tensor)


class _Holder:
    """One saved tensor (an alias, no reference cycle), the version it had, and what outer hooks packed."""

    __slots__ = ("tensor", "version", "packed", "copied", "__weakref__")

    def __init__(self, tensor: torch.Tensor, packed):
        self.tensor = tensor.detach()  # shares memory and version counter with the saved tensor
        self.version = tensor._version
        self.packed = packed
        self.copied = False


def _outer_hooks():
    """The saved-tensor hooks active around ours (``torch.autograd.graph.save_on_cpu``, a memory probe, ...)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class SavedTensors:
    """Pack and unpack hooks for saved tensors, with copy on write before in-place operations.

    Hooks that were active when these were installed keep working: each saved tensor goes through
    them as well (their packed value is unpacked unless the tensor was copied).
    """

    def __init__(self):
        self.holders: dict[int, list] = {}
        self.outer = None

    def pack(self, tensor: torch.Tensor) -> _Holder:
        packed = self.outer[0](tensor) if self.outer is not None else None
        holder = _Holder(tensor, packed)
        self.holders.setdefault(_storage(tensor), []).append(weakref.ref(holder))
        return holder

    def unpack(self, holder: _Holder) -> torch.Tensor:
        tensor = holder.tensor
        if tensor._version != holder.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace operation: "
                f"[{type(tensor).__name__} of shape {list(tensor.shape)}] is at version {tensor._version}; "
                f"expected version {holder.version} instead. lxt_explicit copies saved tensors before the in-place "
                "operations of a registered model; this one was changed outside it (in a module rule, or after the "
                "forward pass)."
            )
        if self.outer is not None and not holder.copied:
            return self.outer[1](holder.packed)
        return tensor

    def copy_on_write(self, tensor) -> None:
        """Give every holder of ``tensor``'s memory its own copy, before ``tensor`` is changed in place."""
        if not isinstance(tensor, torch.Tensor):
            return
        references = self.holders.pop(_storage(tensor), None)
        for reference in references or ():
            holder = reference()
            if holder is not None:  # the tensor itself, or a view or alias of its memory
                copy = holder.tensor.clone()
                holder.tensor, holder.version, holder.copied = copy, copy._version, True

    def hooks(self):
        """The context manager that saves through this object (and through the hooks active now)."""
        self.outer = _outer_hooks()
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
