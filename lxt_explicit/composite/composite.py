"""The Composite: a map from modules and torch functions to rules, registered on a model reversibly."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from ..rules import Rule
from .events import CompositeObserver
from .matching import matcher, op_table, rule_template
from .registration import Registration

__all__ = ["Composite"]


class Composite:
    """Map modules and torch functions to LRP rules and register them on a model.

    Parameters
    ----------
    layer_map : dict, optional
        Keys select modules: a module class (matched with ``isinstance``, so
        subclasses and abstract groups such as ``zennit.types.Convolution`` are
        covered) or a tuple of them, a module name (``"model.layers.0.mlp"``), a
        glob pattern of names (``"*.mlp.act_fn"``) or compiled regular expression,
        or a predicate ``(name, module) -> bool``.  Values are
        :class:`~lxt_explicit.rules.Rule` subclasses or configured instances (each
        module gets its own copy), or ``None`` for "no rule".  Keys are tried in
        order and the first match wins; the submodules of a module with a rule
        are run by that rule and get none of their own.
    ops : dict, optional
        Keys are op names of :data:`~lxt_explicit.ops.OP_GROUPS` (``"add"``
        covers ``torch.add``, ``Tensor.add``, ``a + b`` ...) or single torch
        functions; values are :class:`~lxt_explicit.rules.Rule` subclasses or instances.
    canonizers : list, optional
        Objects with ``apply(model) -> handles`` (Zennit's canonizers and ours),
        applied on :meth:`register` before the rules and undone on :meth:`remove`.
    parameter_sources : iterable of str, optional
        Names or glob patterns of parameters that are inputs of the explanation
        (e.g. ViT's ``"*embeddings.cls_token"``): in each forward pass they are
        replaced by a leaf copy that collects relevance, returned by
        :meth:`source_relevance` under the parameter's name.
    extensions : iterable, optional
        Adapters for other frameworks, applied on :meth:`register` after the
        canonizers: objects with ``register(model, registration) -> {id(module): rule}``
        that push their own undo steps onto ``registration.undo`` and may claim
        modules (e.g. :class:`~lxt_explicit.zennit_interop.ZennitComposite`,
        :class:`~lxt_explicit.checkpointing.TransformersCheckpointing`).
    strict : bool, optional
        Raise :class:`~lxt_explicit.composite.UnhandledOperationError` on the first operation on
        the relevance path without a rule, instead of warning once per op and module.
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
        extensions: Iterable = (),
        strict: bool = False,
        warn_unmatched: bool = True,
    ):
        layer_map = dict(layer_map or {})
        self._layer_map = [(key, matcher(key), rule_template(key, value)) for key, value in layer_map.items()]
        self.ops = dict(ops or {})
        self.op_table = op_table(self.ops)
        self.canonizers = list(canonizers or [])
        self.parameter_sources = tuple(parameter_sources)
        self.extensions = list(extensions)
        self.strict = bool(strict)
        self.warn_unmatched = bool(warn_unmatched)
        self.observers: list[CompositeObserver] = []
        self._registration: Registration | None = None
        self._lock = threading.RLock()
        self._context_depth = 0
        self._context_registered = False

    # -- registration ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        """The model this Composite is registered on, or ``None``."""
        return self._registration.model if self._registration else None

    @property
    def handles(self) -> list:
        """Non-empty while registered (Zennit's attributors check it to know whether to register)."""
        return list(self._registration.forwards) if self._registration else []

    def rule_for(self, name: str, module: nn.Module) -> Rule | None:
        """The rule template the layer map gives ``module`` (named ``name``), or ``None``."""
        for _, match, template in self._layer_map:
            if match(name, module):
                return template
        return None

    def match(self, name: str, module: nn.Module) -> tuple[int | None, Rule | None]:
        """The index of the first layer-map key matching ``module`` and a fresh copy of its rule."""
        for index, (_, match, template) in enumerate(self._layer_map):
            if match(name, module):
                return index, (template.copy() if template is not None else None)
        return None, None

    def warn_unused_keys(self, used: set, model: nn.Module) -> None:
        """Warn (if ``warn_unmatched``) about layer-map keys that matched no module of ``model``."""
        if not self.warn_unmatched:
            return
        for index, (key, _, _) in enumerate(self._layer_map):
            if index not in used:
                warnings.warn(
                    f"lxt_explicit: layer-map key {key!r} matches no module of {type(model).__name__}; "
                    "check the class, name or pattern",
                    UserWarning,
                    stacklevel=4,
                )

    def register(self, model: nn.Module) -> "Composite":
        """Apply canonizers and extensions, freeze parameters, and install the rules on ``model``.

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
            If another Composite is registered on ``model`` or one of its submodules, or this one
            is in use by a :meth:`context` block on another model.
        TypeError
            If ``model`` is not an ``nn.Module`` or is compiled with ``torch.compile``.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"Composite.register needs an nn.Module, got {type(model).__name__}")
        with self._lock:
            self._check_available(model)
            self.remove()
            registration = Registration(self, model)
            registration.apply()
            self._registration = registration
        return self

    def _check_available(self, model: nn.Module) -> None:
        if self._context_depth and self.model is not model:
            raise RuntimeError(
                "lxt_explicit: this Composite is in use by a context() block on another model; leave that block, "
                "or use a second Composite for this model"
            )
        for name, module in model.named_modules():
            owner = getattr(module.__dict__.get("forward"), "__lxt_composite__", None)
            if owner is not None and owner is not self:
                where = f"submodule '{name}'" if name else type(model).__name__
                raise RuntimeError(
                    f"lxt_explicit: another Composite is already registered on {where}; call its remove() "
                    "before registering this one"
                )

    def remove(self) -> None:
        """Undo :meth:`register`: every step is undone even if one fails (the first error is raised afterwards)."""
        with self._lock:
            if self._registration is not None:
                registration, self._registration = self._registration, None
                registration.remove()

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Register on ``model`` for the duration of a ``with`` block, which receives the model.

        Blocks nest, also across threads: the Composite is registered when the first block on
        ``model`` starts (unless it already was) and removed when the last one ends (unless it was
        registered before the first).  A block on another model while one is open is refused.
        """
        with self._lock:
            if self._context_depth == 0:
                self._context_registered = self.model is not model
                if self._context_registered:
                    self.register(model)
            elif self.model is not model:
                raise RuntimeError(
                    "lxt_explicit: this Composite is in use by a context() block on another model; use a second "
                    "Composite for this model"
                )
            self._context_depth += 1
        try:
            yield model
        finally:
            with self._lock:
                self._context_depth -= 1
                if self._context_depth == 0 and self._context_registered:
                    self.remove()

    @contextmanager
    def inactive(self) -> Iterator["Composite"]:
        """Run forward passes without the rules inside a ``with`` block (Zennit's composite protocol)."""
        state = self._registration.router.state if self._registration is not None else None
        if state is not None:
            state.paused += 1
        try:
            yield self
        finally:
            if state is not None:
                state.paused -= 1

    # -- results --------------------------------------------------------------------------------
    def assignments(self) -> dict[str, Rule]:
        """Module name -> the rule instance registered on it (modules without a rule are left out)."""
        return dict(self._registration.assigned) if self._registration else {}

    def source_relevance(self) -> dict[str, torch.Tensor | None]:
        """Relevance collected at the relevance sources in the calling thread's latest forward pass.

        Returns
        -------
        dict
            Source name -> relevance tensor (the gradient of the source's output after the
            backward pass; ``None`` before it).
        """
        if self._registration is None:
            return {}
        return {name: tensor.grad for name, tensor in self._registration.sources().items()}

    def source_tensors(self) -> dict[str, torch.Tensor]:
        """The outputs of the relevance sources in the calling thread's latest forward pass."""
        return dict(self._registration.sources()) if self._registration else {}

    @contextmanager
    def observe(self, observer: CompositeObserver) -> Iterator[CompositeObserver]:
        """Send the forward-pass events of this Composite to ``observer`` inside a ``with`` block."""
        self.observers.append(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    def __repr__(self) -> str:
        rules = ", ".join(f"{key!r}: {template!r}" for key, _, template in self._layer_map)
        ops = ", ".join(f"{key!r}: {value!r}" for key, value in self.ops.items())
        return f"Composite({{{rules}}}, ops={{{ops}}})"
