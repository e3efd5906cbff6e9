"""What a registered Composite reports while it runs: observers, coverage warnings, unhandled-op errors."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..ops import op_name

__all__ = ["CompositeObserver", "CoverageWarning", "UnhandledOperationError", "Events"]


class UnhandledOperationError(RuntimeError):
    """An operation on the relevance path has no rule (raised in strict mode)."""


class CoverageWarning(UserWarning):
    """An operation on the relevance path has no rule; its relevance is the plain gradient."""


class CompositeObserver:
    """Receives events of a registered Composite during the forward pass (used by the diagnostics)."""

    def on_forward(self, inputs: dict[str, torch.Tensor]) -> None:
        """The registered model starts a forward pass; ``inputs`` are its arguments that carry relevance."""

    def on_source(self, name: str, tensor: torch.Tensor) -> None:
        """A relevance source (:class:`~lxt_explicit.rules.RelevanceSource` module or parameter) produced ``tensor``."""

    def on_rule(self, label: str, rule: Any, output: Any) -> None:
        """A module rule or op rule produced ``output``."""

    def on_op(self, module: str, op: str, status: str, rule: Any) -> None:
        """An op ran on the relevance path; ``status`` is ``'rule'``, ``'neutral'``, ``'unhandled'``, or
        ``'declined'`` for a module rule that does not cover its module (the module then runs as if
        it had no rule)."""


class Events:
    """Sends the events of one registration to the Composite's observers, and reports unhandled calls."""

    def __init__(self, composite, model):
        self.composite = composite
        self.observers = composite.observers
        self.model = model
        self.warned: set = set()

    def forward_started(self, args: tuple, kwargs: dict) -> None:
        if not self.observers or not torch.is_grad_enabled():
            return
        inputs = {f"args[{i}]": a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad}
        inputs.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad})
        for observer in self.observers:
            observer.on_forward(inputs)

    def source(self, name: str, tensor: torch.Tensor) -> None:
        for observer in self.observers:
            observer.on_source(name, tensor)

    def neutral(self, module: str, func) -> None:
        for observer in self.observers:
            observer.on_op(module, op_name(func), "neutral", None)

    def op_rule(self, module: str, group: str, func, rule, output) -> None:
        if not self.observers:
            return
        label = f"{module or '<root>'}:{group}"
        for observer in self.observers:
            observer.on_op(module, op_name(func), "rule", rule)
            observer.on_rule(label, rule, output)

    def module_rule(self, module: str, rule, output) -> None:
        if not self.observers or not torch.is_grad_enabled():
            return
        for observer in self.observers:
            if rule.traced:
                observer.on_rule(module, rule, output)
            else:  # relevance from hooks elsewhere: listed, not traced
                observer.on_op(module, repr(rule), "rule", rule)

    def declined(self, module: str, rule, reason: str) -> None:
        """A module rule declined the module (``reason``); the module runs as if it had no rule."""
        for observer in self.observers:
            observer.on_op(module, repr(rule), "declined", rule)

    def unhandled(self, module: str, what: str, detail: str | None) -> None:
        """``what`` (an op or a module rule) ran without a rule: warn once per op and module, or raise if strict."""
        for observer in self.observers:
            observer.on_op(module, what, "unhandled", None)
        module_type = f" ({type(self.model.get_submodule(module)).__name__})" if module else ""
        message = (
            f"lxt_explicit: {what} on the relevance path in module '{module or '<root>'}'{module_type} has no LRP "
            f"rule{f' ({detail})' if detail else ''}; relevance through it is the plain gradient. Give the module "
            "a rule in the layer map (e.g. IdentityRule for element-wise functions), or the op a rule with "
            "Composite(..., ops={...})."
        )
        if self.composite.strict:
            raise UnhandledOperationError(message)
        key = (what, module)
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, CoverageWarning, stacklevel=4)
