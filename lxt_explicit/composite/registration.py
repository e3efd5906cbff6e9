"""One registration of a Composite on a model: every step pushes its own undo onto one stack."""

from __future__ import annotations

import fnmatch
import warnings

import torch
from torch import nn

from .copying import MISSING, install_copy_guards
from .events import Events
from .routing import Router
from .undo import UndoStack

__all__ = ["Registration"]


def _refuse_compiled(model: nn.Module) -> None:
    compiled = type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")
    compiled = compiled or any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    if compiled:
        raise TypeError(
            "lxt_explicit: the model is compiled with torch.compile; compiled code bypasses the rules' routing "
            "(a torch-function mode and instance-level forwards), so relevance would be the plain gradient. "
            "Register the Composite on the uncompiled model (for torch.compile(model): model._orig_mod) and run "
            "the explanation without compiling."
        )


class Registration:
    """Everything one ``Composite.register`` call changed, undone by :meth:`remove` (an :class:`UndoStack`).

    Extensions use :attr:`undo`, :meth:`override`, :meth:`freeze` and :attr:`router`.
    """

    def __init__(self, composite, model: nn.Module):
        self.composite = composite
        self.model = model
        self.undo = UndoStack()
        self.events = Events(composite, model)
        self.router = Router(composite.op_table, self.events, composite)
        self.overrides: dict[int, dict[str, tuple]] = {}
        self.assigned: dict = {}
        self.forwards: list = []
        self.frozen: dict[int, nn.Parameter] = {}
        self.twins: dict[int, nn.Parameter] = {}
        self.calls: dict[int, list] = {}
        self.recomputation_states: list = []
        # canonizers and (unless they say otherwise) extensions change parameters or hooks
        self.changes_parameters = bool(composite.canonizers) or any(
            getattr(extension, "changes_model", True) for extension in composite.extensions
        )

    # -- steps --------------------------------------------------------------------------------
    def apply(self) -> None:
        """Run every registration step; on failure undo the steps done so far and re-raise."""
        model = self.model
        _refuse_compiled(model)
        try:
            if self.changes_parameters:
                self._keep_parameter_objects()
            self.freeze(model)  # before canonizers: tensors computed from parameters are constants too
            for canonizer in self.composite.canonizers:
                for handle in canonizer.apply(model):
                    self.undo.push(handle.remove)
            claimed = {}
            for extension in self.composite.extensions:
                claimed.update(extension.register(model, self))
            self.freeze(model)  # parameters the canonizers created
            self._mark_parameter_sources(model)
            self._install_rules(model, claimed)
        except BaseException:
            self.undo.close()
            raise

    def remove(self) -> None:
        """Undo every step (each one runs even if another fails; the first error is raised afterwards)."""
        self.undo.close()

    def override(self, module: nn.Module, name: str, value) -> None:
        """Set an instance attribute of ``module`` for the registration (undone on removal)."""
        previous = module.__dict__.get(name, MISSING)
        entries = self.overrides.setdefault(id(module), {})
        # overridden twice (an extension's forward, then the Composite's): a copy gets the first value back
        first = entries[name][0] if name in entries else previous
        entries[name] = (first, value)
        module.__dict__[name] = value
        self.undo.push(self._restore_attribute, module, name, previous, value)

    @staticmethod
    def _restore_attribute(module, name, previous, value):
        if module.__dict__.get(name) is not value:
            warnings.warn(
                f"lxt_explicit: the {name} of {type(module).__name__} was replaced after registration (e.g. by "
                "accelerate); it is left as it is now. Register Composites after dispatching a model.",
                RuntimeWarning,
                stacklevel=4,
            )
        elif previous is MISSING:
            del module.__dict__[name]
        else:
            module.__dict__[name] = previous

    def before_call(self, module: nn.Module, callback) -> None:
        """Call ``callback(module, args, kwargs)`` whenever ``module`` is called while registered (for extensions).

        The callback may return a context manager: the call of ``module`` then runs inside it, so
        that a setting made for one call ends with it.
        """
        self.calls.setdefault(id(module), []).append(callback)

    def keep_for_recomputation(self, capture) -> None:
        """Carry a per-forward setting of an extension into recomputations (gradient checkpointing).

        ``capture()`` is called when a checkpointed layer runs in the forward pass; it returns a
        function that gives a context manager restoring that setting, entered around the layer's
        recomputation in the backward pass (which may come after other forward passes).
        """
        self.recomputation_states.append(capture)

    def freeze(self, model: nn.Module) -> None:
        """Treat every parameter (not yet frozen) as a constant of the explanation, until removal."""
        for module in model.modules():
            for key, parameter in module._parameters.items():
                if parameter is not None and parameter.requires_grad:
                    parameter.requires_grad_(False)
                    self.frozen[id(parameter)] = parameter
                    self.undo.push(self._unfreeze, module, key, parameter)

    @staticmethod
    def _unfreeze(module, key, parameter):
        parameter.requires_grad_(True)
        current = module._parameters.get(key)
        if current is not None and current is not parameter:
            current.requires_grad_(True)  # the user replaced it while registered: keep theirs, as it was

    def unfrozen(self, parameter):
        """``parameter`` as it was before registration (a twin sharing its data if it was frozen here)."""
        if parameter is None or id(parameter) not in self.frozen:
            return parameter
        twin = self.twins.get(id(parameter))
        if twin is None:
            twin = self.twins[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=True)
        return twin

    def _keep_parameter_objects(self) -> None:
        """Canonizers and Zennit swap parameter and buffer objects: put the original ones back on removal."""
        slots = []
        for module in self.model.modules():
            shadowed = {k for k in (*module._parameters, *module._buffers) if k in module.__dict__}
            slots.append((module, dict(module._parameters), dict(module._buffers), shadowed))
        self.undo.push(self._restore_slots, slots)

    @staticmethod
    def _restore_slots(slots):
        for module, parameters, buffers, shadowed in slots:
            for store, recorded in ((module._parameters, parameters), (module._buffers, buffers)):
                for key in [k for k in store if k not in recorded]:
                    del store[key]
                for key, value in recorded.items():
                    if store.get(key) is not value:
                        store[key] = value
                    if key not in shadowed:
                        module.__dict__.pop(key, None)

    def _mark_parameter_sources(self, model: nn.Module) -> None:
        patterns = self.composite.parameter_sources
        for name, parameter in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                self.router.parameter_sources[id(parameter)] = (name, parameter)

    def _install_rules(self, model: nn.Module, claimed: dict) -> None:
        composite = self.composite
        used = set()
        ruled_prefixes: list[str] = []
        for name, module in model.named_modules():
            rule = None
            if any(name.startswith(prefix) for prefix in ruled_prefixes):
                pass  # run by the rule of an enclosing module
            elif id(module) in claimed:
                rule = claimed[id(module)]
            else:
                index, rule = composite.match(name, module)
                used.add(index)
            if rule is not None:
                ruled_prefixes.append(f"{name}." if name else "")
                self.assigned[name] = rule
                for handle in rule.attach(module):
                    self.changes_parameters = True
                    self.undo.push(handle.remove)
            self._wrap(name, module, rule)
            install_copy_guards(self, module)
        composite.warn_unused_keys(used, model)

    def _wrap(self, name: str, module: nn.Module, rule) -> None:
        original = module.__dict__.get("forward", module.forward)
        forward = self.router.wrapper(name, module, original, rule, self.calls.get(id(module), ()))
        self.override(module, "forward", forward)
        self.forwards.append(forward)

    # -- per-forward results ------------------------------------------------------------------
    def sources(self) -> dict[str, torch.Tensor]:
        """The relevance sources of the calling thread's latest forward pass."""
        return self.router.state.sources
