"""Composite: register LRP rules on any ``nn.Module``, reversibly.

A :class:`Composite` maps modules (by class, name, name pattern or predicate)
to :mod:`~lxt_explicit.rules` and torch functions (by op name, see
:data:`~lxt_explicit.oprules.OP_GROUPS`) to :mod:`~lxt_explicit.oprules`.
``register(model)`` applies them to the model instance as it is; no class,
file or registry is changed:

* every module gets an instance-level ``forward`` that applies its rule (if
  it has one) and keeps track of the module being run;
* while the model runs, a :class:`torch.overrides.TorchFunctionMode` hands
  each torch function call whose operands carry relevance to its op rule;
* the model's parameters are constants of the explanation: their
  ``requires_grad`` is switched off, and a tensor carries relevance exactly
  when it requires a gradient.

``remove()`` deletes the instance attributes, reverts canonizers, puts back
every parameter and buffer object and restores ``requires_grad``, leaving
module types, the module tree, parameters, state-dict keys and hooks as they
were.
"""

from __future__ import annotations

import fnmatch
import functools
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .oprules import OP_GROUPS, RELEVANCE_NEUTRAL, OpRule, op_name
from .rules import Rule

__all__ = [
    "Composite",
    "RelevanceSource",
    "UnhandledOperationError",
    "CoverageWarning",
    "CompositeObserver",
]


class UnhandledOperationError(RuntimeError):
    """An operation on the relevance path has no rule (raised in strict mode)."""


class CoverageWarning(UserWarning):
    """An operation on the relevance path has no rule; its relevance is the plain gradient."""


class RelevanceSource(Rule):
    """Mark a module's output as an input of the explanation.

    The output is returned as a new leaf tensor that requires a gradient, so
    relevance is collected there: after the backward pass
    :meth:`Composite.source_relevance` returns it.  Embedding layers are the
    usual sources: token, position and token-type embeddings.
    """

    def __call__(self, fn: Callable, *inputs, **kwargs):
        output = fn(*inputs, **kwargs)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
            output = output.detach().requires_grad_()
        return output


class CompositeObserver:
    """Receives events of a registered Composite during the forward pass (used by the diagnostics)."""

    def on_forward(self, inputs: dict[str, torch.Tensor]) -> None:
        """The registered model starts a forward pass; ``inputs`` are its arguments that carry relevance."""

    def on_source(self, name: str, tensor: torch.Tensor) -> None:
        """A :class:`~lxt_explicit.composite.RelevanceSource` module produced ``tensor``."""

    def on_rule(self, label: str, rule: Any, output: Any) -> None:
        """A module rule or op rule produced ``output``."""

    def on_op(self, module: str, op: str, status: str, rule: Any) -> None:
        """An op ran on the relevance path; ``status`` is ``'rule'``, ``'neutral'`` or ``'unhandled'``."""


def _matcher(key) -> Callable[[str, nn.Module], bool]:
    # classes are matched with isinstance, which also covers abstract groups such as zennit.types.Linear
    if isinstance(key, type) or (isinstance(key, tuple) and key and all(isinstance(k, type) for k in key)):
        return lambda name, module: isinstance(module, key)
    if isinstance(key, str):
        if any(ch in key for ch in "*?["):
            return lambda name, module: fnmatch.fnmatchcase(name, key)
        return lambda name, module: name == key
    if isinstance(key, re.Pattern):
        return lambda name, module: key.fullmatch(name) is not None
    if callable(key) and not isinstance(key, type):
        return key
    raise TypeError(
        f"unsupported layer-map key {key!r}: use a module class (or a tuple of them), a module name, "
        "a name pattern (glob string or compiled regular expression), or a predicate (name, module) -> bool"
    )


class ExternalHook:
    """A layer-map value that follows Zennit's hook protocol (``copy()``, ``register(module) -> handles``).

    Zennit's rules (``zennit.rules.Gamma(gamma=0.25)``, ...) are such hooks: they compute a module's
    relevance from backward hooks on its input and output.  The Composite registers a copy on each
    matched module and runs the module's own forward unrouted, so that the hook alone decides the
    module's relevance.
    """

    def __init__(self, hook):
        self.hook = hook

    def copy(self) -> "ExternalHook":
        return ExternalHook(self.hook.copy())

    def __repr__(self) -> str:
        if self.hook is None:
            return "zennit composite hook"
        return f"{type(self.hook).__module__}.{type(self.hook).__name__}"


#: Marks the modules that a registered Zennit composite put hooks on (they run unrouted).
_HOOKED_BY_ZENNIT_COMPOSITE = ExternalHook(None)


def _is_external_hook(value) -> bool:
    return (
        not isinstance(value, (type, Rule))
        and callable(getattr(value, "copy", None))
        and callable(getattr(value, "register", None))
    )


def _rule_template(key, value):
    if value is None:
        return None
    if isinstance(value, type) and issubclass(value, Rule):
        return value()
    if isinstance(value, Rule):
        return value
    if _is_external_hook(value):
        return ExternalHook(value)
    raise TypeError(
        f"the rule for layer-map key {key!r} must be a Rule subclass, a configured Rule instance, a Zennit rule "
        f"(an object with copy() and register(module)), or None; got {value!r}"
    )


def _resolve_ops(ops) -> dict:
    table: dict[Callable, tuple[str, OpRule]] = {}
    for key, value in (ops or {}).items():
        if isinstance(value, type) and issubclass(value, OpRule):
            value = value()
        if not isinstance(value, OpRule):
            raise TypeError(f"the op rule for {key!r} must be an OpRule subclass or instance, got {value!r}")
        if isinstance(key, str):
            if key not in OP_GROUPS:
                raise KeyError(f"unknown op name {key!r}; known op names: {', '.join(sorted(OP_GROUPS))}")
            for func in OP_GROUPS[key]:
                table[func] = (key, value)
        elif callable(key):
            table[key] = (op_name(key), value)
        else:
            raise TypeError(f"op-map keys are op names ({', '.join(sorted(OP_GROUPS))}) or torch functions, got {key!r}")
    return table


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


class _ThreadState(threading.local):
    def __init__(self):
        self.active = False
        self.paused = 0
        self.stack: list[str] = []


class _RoutingMode(TorchFunctionMode):
    """Hands torch function calls on the relevance path to their op rules while a registered model runs."""

    def __init__(self, registration: "_Registration"):
        super().__init__()
        self.registration = registration

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        reg = self.registration
        if reg.state.paused or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if reg.parameter_sources:
            args, kwargs = reg.substitute_parameter_sources(args, kwargs)
        try:
            entry = reg.ops.get(func)
        except TypeError:
            entry = None
        if entry is not None:
            if not _any_relevant(args, kwargs):
                return func(*args, **kwargs)
            name, rule = entry
            output = rule(func, args, kwargs)
            if output is NotImplemented:
                output = func(*args, **kwargs)
                reg.unhandled(func, f"no case of {rule!r} covers this call")
            else:
                reg.rule_applied(name, func, rule, output)
            return output
        output = func(*args, **kwargs)
        if not _output_relevant(output):
            return output
        try:
            neutral = func in RELEVANCE_NEUTRAL
        except TypeError:
            neutral = False
        if neutral:
            if reg.composite._observers:
                reg.notify_op(func, "neutral", None)
        elif _any_relevant(args, kwargs):
            reg.unhandled(func, None)
        return output


class _Registration:
    """Everything one ``Composite.register`` call changed, and the per-call state of the routing."""

    def __init__(self, composite: "Composite", model: nn.Module):
        self.composite = composite
        self.model = model
        self.ops = composite._op_table
        self.state = _ThreadState()
        self.mode = _RoutingMode(self)
        self.wrapped: list[tuple[nn.Module, bool, Any, Callable]] = []
        self.assigned: dict[str, Rule] = {}
        self.checkpointing: list[tuple[nn.Module, Callable, Callable]] = []
        self.frozen: list[tuple[nn.Parameter, bool]] = []
        self.canonizer_handles: list = []
        self.hook_handles: list = []
        self.zennit_composite = None
        self.slots: list[tuple[nn.Module, dict, dict, set]] = []
        self.sources: dict[str, torch.Tensor] = {}
        self.parameter_sources: dict[int, tuple[str, nn.Parameter]] = {}
        self.parameter_leaves: dict[int, torch.Tensor] = {}
        self.warned: set = set()

    # -- events -------------------------------------------------------------------
    def module_name(self) -> str:
        return self.state.stack[-1] if self.state.stack else ""

    def notify_op(self, func, status, rule):
        module = self.module_name()
        for observer in self.composite._observers:
            observer.on_op(module, op_name(func), status, rule)

    def rule_applied(self, name, func, rule, output):
        observers = self.composite._observers
        if observers:
            module = self.module_name()
            label = f"{module or '<root>'}:{name}"
            for observer in observers:
                observer.on_op(module, op_name(func), "rule", rule)
                observer.on_rule(label, rule, output)

    def unhandled(self, func, detail):
        module = self.module_name()
        name = op_name(func)
        for observer in self.composite._observers:
            observer.on_op(module, name, "unhandled", None)
        module_type = f" ({type(self.model.get_submodule(module)).__name__})" if module else ""
        message = (
            f"lxt_explicit: {name} on the relevance path in module '{module or '<root>'}'{module_type} has no LRP "
            f"rule{f' ({detail})' if detail else ''}; relevance through it is the plain gradient. Give the module "
            "a rule in the layer map (e.g. IdentityRule for element-wise functions), or the op a rule with "
            "Composite(..., ops={...})."
        )
        if self.composite.strict:
            raise UnhandledOperationError(message)
        key = (func, module)
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, CoverageWarning, stacklevel=3)

    # -- module wrappers ----------------------------------------------------------
    def wrap(self, name: str, module: nn.Module, rule: Rule | None):
        had_own = "forward" in module.__dict__
        original = module.__dict__["forward"] if had_own else module.forward
        state = self.state
        composite = self.composite
        is_root = module is self.model

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if "_gradient_checkpointing_func" in module.__dict__:
                self.route_checkpointing(name, module)
            if not state.active:
                return self.enter(forward, is_root, args, kwargs)
            state.stack.append(name)
            try:
                if rule is None or state.paused:
                    return original(*args, **kwargs)
                state.paused += 1
                if isinstance(rule, ExternalHook):  # the hook computes this module's relevance
                    try:
                        output = original(*args, **kwargs)
                    finally:
                        state.paused -= 1
                    for observer in composite._observers:
                        observer.on_op(name, repr(rule), "rule", rule)
                    return output
                try:
                    output = rule(original, *args, **kwargs)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"lxt_explicit: {rule!r} on module '{name}': {error}") from error
                finally:
                    state.paused -= 1
                if isinstance(rule, RelevanceSource):
                    self.source_created(name, output)
                elif composite._observers and torch.is_grad_enabled():
                    for observer in composite._observers:
                        observer.on_rule(name, rule, output)
                return output
            finally:
                state.stack.pop()

        forward.__lxt_composite__ = composite
        module.forward = forward
        if rule is not None:
            self.assigned[name] = rule
        self.wrapped.append((module, had_own, original, forward))

    def record_slots(self, model: nn.Module):
        """Remember every module's parameter and buffer objects, and which attributes shadow them."""
        for module in model.modules():
            shadowed = {k for k in (*module._parameters, *module._buffers) if k in module.__dict__}
            self.slots.append((module, dict(module._parameters), dict(module._buffers), shadowed))

    def restore_slots(self):
        """Put back the recorded parameter and buffer objects (canonizers and Zennit 1.0 replace them)."""
        for module, parameters, buffers, shadowed in self.slots:
            for store, recorded in ((module._parameters, parameters), (module._buffers, buffers)):
                for key in list(store):
                    if key not in recorded:
                        del store[key]
                for key, value in recorded.items():
                    if store.get(key) is not value:
                        store[key] = value
                    if key not in shadowed:
                        module.__dict__.pop(key, None)
        self.slots.clear()

    def freeze(self, model: nn.Module):
        """Treat every parameter (not yet frozen) as a constant; remember how to restore it."""
        for parameter in model.parameters():
            if parameter.requires_grad:
                self.frozen.append((parameter, True))
                parameter.requires_grad_(False)

    def register_zennit_composite(self, model: nn.Module, zennit_composite) -> set[int]:
        """Register a Zennit composite; return the ids of the modules it put hooks on."""
        if zennit_composite is None:
            return set()
        before = {id(m): len(m._forward_pre_hooks) for m in model.modules()}
        zennit_composite.register(model)
        self.zennit_composite = zennit_composite
        return {id(m) for m in model.modules() if len(m._forward_pre_hooks) > before.get(id(m), 0)}

    def route_checkpointing(self, name: str, module: nn.Module):
        """Make the recomputation of a checkpointed layer (transformers' ``_gradient_checkpointing_func``) run routed.

        transformers checkpoints a layer's class ``forward``, so the backward pass recomputes it without
        passing through the instance wrappers; the recomputation must use the same rules as the forward pass.
        """
        checkpoint = module.__dict__["_gradient_checkpointing_func"]
        if getattr(checkpoint, "__lxt_composite__", None) is self.composite:
            return
        state = self.state

        def routed_checkpoint(function, *args, **kwargs):
            def run(*inner_args, **inner_kwargs):
                if state.active:
                    return function(*inner_args, **inner_kwargs)
                state.active = True
                state.stack.append(name)
                try:
                    with self.mode:
                        return function(*inner_args, **inner_kwargs)
                finally:
                    state.stack.pop()
                    state.active = False

            return checkpoint(run, *args, **kwargs)

        routed_checkpoint.__lxt_composite__ = self.composite
        module._gradient_checkpointing_func = routed_checkpoint
        self.checkpointing.append((module, checkpoint, routed_checkpoint))

    def enter(self, forward, is_root, args, kwargs):
        state = self.state
        if is_root:
            self.sources = {}
            self.parameter_leaves = {}
            observers = self.composite._observers
            if observers and torch.is_grad_enabled():
                inputs = {f"args[{i}]": a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad}
                inputs.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad})
                for observer in observers:
                    observer.on_forward(inputs)
        state.active = True
        try:
            with self.mode:
                return forward(*args, **kwargs)
        finally:
            state.active = False

    def substitute_parameter_sources(self, args, kwargs):
        """Replace parameters that are relevance sources by this forward pass's leaf copy of them."""
        sources = self.parameter_sources

        def swap(value):
            if isinstance(value, torch.Tensor) and id(value) in sources:
                key = id(value)
                leaf = self.parameter_leaves.get(key)
                if leaf is None:
                    leaf = value.detach().requires_grad_()
                    self.parameter_leaves[key] = leaf
                    self.source_created(sources[key][0], leaf)
                return leaf
            return value

        if any(isinstance(a, torch.Tensor) and id(a) in sources for a in args) or any(
            isinstance(v, torch.Tensor) and id(v) in sources for v in kwargs.values()
        ):
            args = tuple(swap(a) for a in args)
            kwargs = {k: swap(v) for k, v in kwargs.items()}
        return args, kwargs

    def source_created(self, name, output):
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        key, index = name, 1
        while key in self.sources:
            key, index = f"{name}#{index}", index + 1
        self.sources[key] = output
        for observer in self.composite._observers:
            observer.on_source(key, output)

    def undo(self):
        for module, had_own, original, forward in reversed(self.wrapped):
            if module.__dict__.get("forward") is not forward:
                warnings.warn(
                    f"lxt_explicit: the forward of {type(module).__name__} was replaced after registration "
                    "(e.g. by accelerate); it is left as it is now. Register Composites after dispatching a model.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            if had_own:
                module.forward = original
            else:
                del module.forward
        self.wrapped.clear()
        for module, checkpoint, routed in reversed(self.checkpointing):
            if module.__dict__.get("_gradient_checkpointing_func") is routed:
                module._gradient_checkpointing_func = checkpoint
        self.checkpointing.clear()
        for handle in reversed(self.hook_handles):
            handle.remove()
        self.hook_handles.clear()
        if self.zennit_composite is not None:
            self.zennit_composite.remove()
            self.zennit_composite = None
        for handle in reversed(self.canonizer_handles):
            handle.remove()
        self.canonizer_handles.clear()
        self.restore_slots()
        for parameter, requires_grad in reversed(self.frozen):
            parameter.requires_grad_(requires_grad)
        self.frozen.clear()
        self.sources = {}
        self.parameter_leaves = {}
        self.parameter_sources = {}


class Composite:
    """Map modules and torch functions to LRP rules and register them on a model.

    Parameters
    ----------
    layer_map : dict, optional
        Keys select modules: a module class (matched with ``isinstance``, so
        subclasses and abstract groups such as ``zennit.types.Convolution`` are
        covered) or a tuple of them, a module
        name (``"model.layers.0.mlp"``), a glob pattern of names
        (``"*.mlp.act_fn"``) or compiled regular expression, or a predicate
        ``(name, module) -> bool``.  Values are :class:`~lxt_explicit.rules.Rule`
        subclasses or configured instances (each module gets its own copy), or
        ``None`` for "no rule".  Keys are tried in order and the first match
        wins; the submodules of a module with a rule are run by that rule and
        get none of their own.
    ops : dict, optional
        Keys are op names of :data:`~lxt_explicit.oprules.OP_GROUPS` (``"add"``
        covers ``torch.add``, ``Tensor.add``, ``a + b`` ...) or single torch
        functions; values are :class:`~lxt_explicit.oprules.OpRule` subclasses or
        instances.
    canonizers : list, optional
        Objects with ``apply(model) -> handles`` (Zennit's canonizers and ours),
        applied on :meth:`register` before the rules and undone on :meth:`remove`.
    zennit_composite : zennit.core.Composite, optional
        A Zennit composite (e.g. ``EpsilonPlusFlat()``) registered together with this one: its
        canonizers and hooks are applied after this Composite's canonizers, the modules it hooks run
        unrouted (the hook decides their relevance), and everything else gets this Composite's rules,
        in one backward pass.
    parameter_sources : iterable of str, optional
        Names or glob patterns of parameters that are inputs of the explanation
        (e.g. ViT's ``"*embeddings.cls_token"``): in each forward pass they are
        replaced by a leaf copy that collects relevance, returned by
        :meth:`source_relevance` under the parameter's name.
    strict : bool, optional
        Raise :class:`UnhandledOperationError` on the first operation on the
        relevance path without a rule, instead of warning once per op and module.
    warn_unmatched : bool, optional
        Warn about layer-map keys that match no module of the registered model.

    Notes
    -----
    Relevance travels in the gradient slot: call ``y.backward(r)`` with the
    initial relevance ``r`` of the output ``y`` (``y.backward(y)`` explains
    ``y`` by its own value), then the ``.grad`` of every input is its
    relevance.  A Composite is registered on one model at a time;
    ``register`` first removes an earlier registration of the same Composite.
    """

    def __init__(
        self,
        layer_map: dict | None = None,
        *,
        ops: dict | None = None,
        canonizers: Iterable | None = None,
        parameter_sources: Iterable[str] = (),
        zennit_composite=None,
        strict: bool = False,
        warn_unmatched: bool = True,
    ):
        layer_map = dict(layer_map or {})
        self.zennit_composite = zennit_composite
        self.parameter_sources = tuple(parameter_sources)
        self._layer_map = [(key, _matcher(key), _rule_template(key, value)) for key, value in layer_map.items()]
        self.ops = dict(ops or {})
        self._op_table = _resolve_ops(self.ops)
        self.canonizers = list(canonizers or [])
        self.strict = bool(strict)
        self.warn_unmatched = bool(warn_unmatched)
        self._observers: list[CompositeObserver] = []
        self._registration: _Registration | None = None

    # -- public API -------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        """The model this Composite is registered on, or ``None``."""
        return self._registration.model if self._registration else None

    @property
    def handles(self) -> list:
        """Non-empty while registered (Zennit's attributors check it to know whether to register)."""
        if self._registration is None:
            return []
        return [forward for _, _, _, forward in self._registration.wrapped]

    @contextmanager
    def inactive(self) -> Iterator["Composite"]:
        """Run forward passes without the rules inside a ``with`` block (Zennit's composite protocol)."""
        state = self._registration.state if self._registration is not None else None
        if state is not None:
            state.paused += 1
        try:
            yield self
        finally:
            if state is not None:
                state.paused -= 1

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        """The rule template the layer map gives ``module`` (named ``name``), or ``None``."""
        for _, match, template in self._layer_map:
            if match(name, module):
                return template
        return None

    def register(self, model: nn.Module) -> "Composite":
        """Apply canonizers, freeze parameters, and install the rules on ``model``.

        Parameters
        ----------
        model : nn.Module
            The model to explain.

        Returns
        -------
        Composite
            ``self``, so that ``composite = attnlrp().register(model)`` works.

        Raises
        ------
        RuntimeError
            If another Composite is registered on ``model`` or one of its submodules.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Composite.register needs an nn.Module, got {type(model).__name__}")
        for name, module in model.named_modules():
            owner = getattr(module.__dict__.get("forward"), "__lxt_composite__", None)
            if owner is not None and owner is not self:
                where = f"submodule '{name}'" if name else type(model).__name__
                raise RuntimeError(
                    f"lxt_explicit: another Composite is already registered on {where}; call its remove() "
                    "before registering this one"
                )
        self.remove()
        registration = _Registration(self, model)
        try:
            # Parameters are frozen before canonizers run, so that tensors computed from them (merged
            # batch-norm weights) are constants too; parameters the canonizers create are frozen after.
            registration.record_slots(model)
            registration.freeze(model)
            for canonizer in self.canonizers:
                registration.canonizer_handles.extend(canonizer.apply(model))
            hooked = registration.register_zennit_composite(model, self.zennit_composite)
            registration.freeze(model)
            for name, parameter in model.named_parameters():
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.parameter_sources):
                    registration.parameter_sources[id(parameter)] = (name, parameter)
            used = [False] * len(self._layer_map)
            ruled_prefixes: list[str] = []
            for name, module in model.named_modules():
                rule = None
                if any(name.startswith(prefix) for prefix in ruled_prefixes):
                    pass  # run by the rule of an enclosing module
                elif id(module) in hooked:
                    rule = _HOOKED_BY_ZENNIT_COMPOSITE
                else:
                    for index, (_, match, template) in enumerate(self._layer_map):
                        if match(name, module):
                            used[index] = True
                            rule = template.copy() if template is not None else None
                            break
                    if isinstance(rule, ExternalHook):
                        registration.hook_handles.extend(rule.hook.register(module))
                if rule is not None:
                    ruled_prefixes.append(f"{name}." if name else "")
                registration.wrap(name, module, rule)
        except BaseException:
            registration.undo()
            raise
        self._registration = registration
        if self.warn_unmatched:
            for (key, _, _), was_used in zip(self._layer_map, used):
                if not was_used:
                    warnings.warn(
                        f"lxt_explicit: layer-map key {key!r} matches no module of {type(model).__name__}; "
                        "check the class, name or pattern",
                        UserWarning,
                        stacklevel=2,
                    )
        return self

    def remove(self) -> None:
        """Undo :meth:`register`: remove wrappers, restore ``requires_grad``, revert canonizers."""
        if self._registration is not None:
            registration, self._registration = self._registration, None
            registration.undo()

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Register on ``model`` for the duration of a ``with`` block, which receives the model."""
        self.register(model)
        try:
            yield model
        finally:
            self.remove()

    def assignments(self) -> dict[str, Rule]:
        """Module name -> the rule instance registered on it (modules without a rule are left out)."""
        if self._registration is None:
            return {}
        return dict(self._registration.assigned)

    def source_relevance(self) -> dict[str, torch.Tensor | None]:
        """Relevance collected at the :class:`RelevanceSource` modules in the latest forward pass.

        Returns
        -------
        dict
            Module name -> relevance tensor (the gradient of the source's
            output after the backward pass; ``None`` before it).
        """
        if self._registration is None:
            return {}
        return {name: tensor.grad for name, tensor in self._registration.sources.items()}

    def source_tensors(self) -> dict[str, torch.Tensor]:
        """The output tensors of the :class:`RelevanceSource` modules in the latest forward pass."""
        return dict(self._registration.sources) if self._registration else {}

    @contextmanager
    def observe(self, observer: CompositeObserver) -> Iterator[CompositeObserver]:
        """Send the forward-pass events of this Composite to ``observer`` inside a ``with`` block."""
        self._observers.append(observer)
        try:
            yield observer
        finally:
            self._observers.remove(observer)

    def __repr__(self) -> str:
        rules = ", ".join(f"{key!r}: {template!r}" for key, _, template in self._layer_map)
        ops = ", ".join(f"{key!r}: {value!r}" for key, value in self.ops.items())
        return f"Composite({{{rules}}}, ops={{{ops}}})"
