"""Routing while a registered model runs: module wrappers, the torch-function mode and per-forward state.

Everything a forward pass changes lives in :class:`ForwardState`, one per thread, so that one
registered model can run in several threads and every thread reads its own relevance sources.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from ..ops import IN_PLACE, OVERWRITING, RELEVANCE_NEUTRAL, op_name
from ..rules import RuleDeclined
from .events import Events
from .saving import SavedTensors

__all__ = ["ForwardState", "Router"]


class ForwardState(threading.local):
    """The routing state of one thread: inside the model or not, paused by a module rule, sources made."""

    def __init__(self):
        self.active = False
        self.paused = 0
        self.stack: list[str] = []
        self.sources: dict[str, torch.Tensor] = {}
        self.parameter_leaves: dict[int, torch.Tensor] = {}
        self.saved = SavedTensors()


def _any_relevant(args, kwargs) -> bool:
    for value in args:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor) and item.requires_grad:
                    return True
    for value in kwargs.values():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return True
    return False


def _output_relevant(output) -> bool:
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    if isinstance(output, (list, tuple)):
        return any(isinstance(o, torch.Tensor) and o.requires_grad for o in output)
    return False


def _is_neutral(func) -> bool:
    try:
        return func in RELEVANCE_NEUTRAL
    except TypeError:
        return False


def _is_overwriting(func) -> bool:
    try:
        return func in OVERWRITING
    except TypeError:
        return False


def _lookup(table, func):
    try:
        return table.get(func)
    except TypeError:  # an unhashable callable
        return None


class _RoutingMode(TorchFunctionMode):
    """Hands torch function calls on the relevance path to their rules while a registered model runs."""

    def __init__(self, router: "Router"):
        super().__init__()
        self.router = router

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.router.route(func, args, kwargs or {})


class Router:
    """Routes the calls of one registered model to rules: module wrappers and the torch-function mode."""

    def __init__(self, ops: dict, events: Events, composite):
        self.ops = ops
        self.events = events
        self.composite = composite
        self.state = ForwardState()
        self.mode = _RoutingMode(self)
        self.parameter_sources: dict[int, tuple[str, torch.nn.Parameter]] = {}

    def module_name(self) -> str:
        return self.state.stack[-1] if self.state.stack else ""

    # -- torch functions --------------------------------------------------------------------------
    def route(self, func, args, kwargs):
        if self.state.paused or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if self.parameter_sources:
            args, kwargs = self._substitute_parameter_sources(args, kwargs)
        entry = _lookup(self.ops, func)
        if entry is not None:
            return self._apply_op_rule(entry, func, args, kwargs)
        out_of_place = _lookup(IN_PLACE, func)
        if out_of_place is not None:
            return self._in_place(func, out_of_place, args, kwargs)
        if args and _is_overwriting(func):
            self.state.saved.copy_on_write(args[0])
        output = func(*args, **kwargs)
        if not _output_relevant(output):
            return output
        if _is_neutral(func):
            if self.events.observers:
                self.events.neutral(self.module_name(), func)
        elif _any_relevant(args, kwargs):
            self.events.unhandled(self.module_name(), op_name(func), None)
        return output

    def _apply_op_rule(self, entry, func, args, kwargs):
        if not _any_relevant(args, kwargs):
            return func(*args, **kwargs)
        if kwargs.get("inplace"):  # F.relu(x, inplace=True) and the like change their input
            self.state.saved.copy_on_write(args[0])
        group, rule = entry
        try:
            output = rule.apply(func, args, kwargs)
        except RuleDeclined as declined:
            output = func(*args, **kwargs)
            self.events.unhandled(self.module_name(), op_name(func), f"{rule!r} declined: {declined}")
            return output
        self.events.op_rule(self.module_name(), group, func, rule, output)
        return output

    def _in_place(self, func, out_of_place, args, kwargs):
        """``target.op_(...)``: ``op``'s result with its rule, copied into the target (saved copies are kept)."""
        target = args[0]
        saved = self.state.saved
        saved.copy_on_write(target)
        if not _any_relevant(args, kwargs):
            return func(*args, **kwargs)
        entry = _lookup(self.ops, out_of_place)
        if entry is None:
            output = func(*args, **kwargs)
            self.events.unhandled(self.module_name(), op_name(func), f"no rule for {op_name(out_of_place)}")
            return output
        result = self._apply_op_rule(entry, out_of_place, args, kwargs)
        saved.copy_on_write(target)  # the rule may have saved the target itself
        return target.copy_(result)

    def _substitute_parameter_sources(self, args, kwargs):
        """Replace parameters that are relevance sources by this forward pass's leaf copy of them."""
        sources = self.parameter_sources
        if not any(isinstance(a, torch.Tensor) and id(a) in sources for a in args) and not any(
            isinstance(v, torch.Tensor) and id(v) in sources for v in kwargs.values()
        ):
            return args, kwargs
        leaves = self.state.parameter_leaves

        def swap(value):
            if isinstance(value, torch.Tensor) and id(value) in sources:
                leaf = leaves.get(id(value))
                if leaf is None:
                    leaf = leaves[id(value)] = value.detach().requires_grad_()
                    self.source_created(sources[id(value)][0], leaf)
                return leaf
            return value

        return tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}

    # -- modules ----------------------------------------------------------------------------------
    def wrapper(self, name: str, module, original: Callable, rule, callbacks=()) -> Callable:
        """The instance-level ``forward`` of ``module``: track the module, apply its rule.

        ``original`` is the forward it replaces; ``callbacks`` are called with the module and the
        call's arguments first, and the call runs inside the context managers they return (see
        ``Registration.before_call``).
        """
        state = self.state
        is_root = module is self.events.model

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if callbacks:
                with contextlib.ExitStack() as settings:
                    for callback in callbacks:
                        setting = callback(module, args, kwargs)
                        if setting is not None:
                            settings.enter_context(setting)
                    return routed(*args, **kwargs)
            return routed(*args, **kwargs)

        def routed(*args, **kwargs):
            if not state.active:
                return self.enter(routed, is_root, args, kwargs)
            state.stack.append(name)
            try:
                if rule is None or state.paused:
                    return original(*args, **kwargs)
                return self._apply_module_rule(name, module, rule, original, args, kwargs)
            finally:
                state.stack.pop()

        forward.__lxt_composite__ = self.composite
        return forward

    def _apply_module_rule(self, name, module, rule, original, args, kwargs):
        state = self.state
        if getattr(module, "inplace", False) is True:  # nn.ReLU(inplace=True) and the like change their input
            for value in args:
                state.saved.copy_on_write(value)
        state.paused += 1  # a module with a rule is run by the rule: the ops inside are not routed
        try:
            output = rule.apply(original, args, kwargs)
            if rule.is_source:
                self.source_created(name, output)
                if isinstance(output, torch.Tensor) and output.is_leaf and output.requires_grad:
                    output = output.clone()  # the model may change it in place; relevance stays at the leaf
        except RuleDeclined as declined:
            output, reason = None, str(declined)
        except (TypeError, ValueError) as error:
            error.add_note(f"lxt_explicit: raised by {rule!r} on module '{name}'")
            raise
        else:
            reason = None
        finally:
            state.paused -= 1
        if reason is not None:  # as if the module had no rule: its operations get their own rules
            self.events.declined(name, rule, reason)
            return original(*args, **kwargs)
        if not rule.is_source:
            self.events.module_rule(name, rule, output)
        return output

    def enter(self, forward, is_root, args, kwargs):
        """Start routing for a call of the model (or of one of its modules, called directly)."""
        state = self.state
        if is_root:
            state.sources = {}
            state.parameter_leaves = {}
            state.saved = SavedTensors()
            self.events.forward_started(args, kwargs)
        state.active = True
        try:
            with self.mode, state.saved.hooks():
                return forward(*args, **kwargs)
        finally:
            state.active = False

    def run_routed(self, name: str, function: Callable, args: tuple, kwargs: dict):
        """Run ``function`` routed, as if inside module ``name`` (a recomputation in the backward pass)."""
        state = self.state
        if state.active:
            return function(*args, **kwargs)
        state.active = True
        state.stack.append(name)
        try:
            with self.mode:
                return function(*args, **kwargs)
        finally:
            state.stack.pop()
            state.active = False

    def source_created(self, name: str, output) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        sources = self.state.sources
        key, index = name, 1
        while key in sources:
            key, index = f"{name}#{index}", index + 1
        sources[key] = output
        self.events.source(key, output)
