"""The rule protocol: one configured object per rule, for modules and torch functions alike."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

__all__ = ["Rule", "RuleDeclined", "carries_relevance", "describe"]


class RuleDeclined(ValueError):
    """A rule does not cover a call (a Composite then reports the call as unhandled)."""


def carries_relevance(value: Any) -> bool:
    """Whether ``value`` is a tensor on the relevance path (one that requires a gradient)."""
    return isinstance(value, torch.Tensor) and value.requires_grad


def describe(fn: Callable) -> str:
    """A readable name of a module or function."""
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return type(owner).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class Rule:
    """Base class of the rules: a configured, stateless LRP rule for any module or torch function.

    ``rule(fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)`` unchanged; its backward pass
    turns the relevance of the output into relevance of the inputs that carry relevance
    (require a gradient).  A Composite calls the same protocol, :meth:`apply`, with a module's
    original ``forward`` or with a torch function it routes.  A rule that does not cover a call
    (the wrong number of relevance-carrying inputs, say) raises :class:`RuleDeclined`, a
    ``ValueError`` that names what it needs.

    Subclasses implement :meth:`explain_call`, which runs only when some input carries relevance
    and gradients are enabled; the others run ``fn`` as it is.
    """

    #: The outputs of this rule are inputs of the explanation (relevance sources).
    is_source: bool = False
    #: The backward pass of this rule's outputs computes the relevance (``False`` for rules whose
    #: relevance comes from hooks elsewhere); diagnostics trace the relevance in and out.
    traced: bool = True

    def __call__(self, fn: Callable, *args, **kwargs):
        """Return ``fn(*args, **kwargs)``; the backward pass applies this rule.

        Parameters
        ----------
        fn : callable
            Module or function to explain.
        *args
            Positional arguments; the tensors among them that require a gradient receive relevance.
        **kwargs
            Passed to ``fn``.
        """
        return self.apply(fn, args, kwargs)

    def apply(self, fn: Callable, args: tuple, kwargs: dict):
        """The call protocol shared by modules and ops: ``fn(*args, **kwargs)`` under this rule."""
        if not torch.is_grad_enabled() or not (
            any(carries_relevance(a) for a in args) or any(carries_relevance(v) for v in kwargs.values())
        ):
            return fn(*args, **kwargs)
        return self.explain_call(fn, args, kwargs)

    def explain_call(self, fn: Callable, args: tuple, kwargs: dict):  # pragma: no cover - abstract
        """Run ``fn`` with this rule's relevance in the backward pass (some input carries relevance)."""
        raise NotImplementedError

    def attach(self, module: torch.nn.Module) -> list:
        """Prepare ``module`` for this rule when a Composite registers it; return removable handles."""
        return []

    def copy(self) -> "Rule":
        """Return an independent copy of this rule (each module of a Composite gets one)."""
        return copy.copy(self)

    def options(self) -> dict:
        """The rule's configuration (used by ``repr`` and equality)."""
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({options})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.options().items(), key=lambda kv: kv[0]))))
