"""Copies of a registered model: ``copy.deepcopy``, ``pickle`` and ``torch.save`` give the model without the rules.

The registration overrides instance attributes (``forward``) and freezes parameters.  A copy
made while it is registered is the model as it was before registration: the overridden
attributes are left out (or their earlier values put back) and frozen parameters are copied
with the ``requires_grad`` they had.  Registrations whose canonizers, extensions or hooks
changed the model in other ways refuse to be copied.
"""

from __future__ import annotations

import copy
import copyreg

from torch import nn

__all__ = ["MISSING", "install_copy_guards"]

#: Marks an instance attribute that did not exist before the registration.
MISSING = object()


def _clean_state(module: nn.Module, registration) -> dict:
    """``module.__dict__`` as it was before ``registration``, with parameters that require grad again."""
    state = dict(module.__dict__)
    for name, (previous, value) in registration.overrides.get(id(module), {}).items():
        if state.get(name) is value:
            if previous is MISSING:
                del state[name]
            else:
                state[name] = previous
    state["_parameters"] = {key: registration.unfrozen(p) for key, p in module._parameters.items()}
    return state


def _refuse_if_changed(registration, module) -> None:
    if registration.changes_parameters:
        raise RuntimeError(
            f"lxt_explicit: cannot copy or pickle {type(module).__name__} while a Composite with canonizers, "
            "extensions or hook-based rules is registered on it (they change its parameters or hooks); call "
            "composite.remove() first"
        )


def install_copy_guards(registration, module: nn.Module) -> None:
    """Make ``copy.deepcopy``, pickling and ``torch.save`` of ``module`` give the unregistered module."""

    def deepcopy(memo):
        _refuse_if_changed(registration, module)
        clone = type(module).__new__(type(module))
        memo[id(module)] = clone
        clone.__setstate__(copy.deepcopy(_clean_state(module, registration), memo))
        return clone

    def reduce_ex(protocol):
        _refuse_if_changed(registration, module)
        return copyreg.__newobj__, (type(module),), _clean_state(module, registration)

    registration.override(module, "__deepcopy__", deepcopy)
    registration.override(module, "__reduce_ex__", reduce_ex)
