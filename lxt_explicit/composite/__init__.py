"""Composite: register LRP rules on any ``nn.Module``, reversibly.

A :class:`Composite` maps modules (by class, name, name pattern or predicate)
and torch functions (by op name, see :data:`~lxt_explicit.ops.OP_GROUPS`) to
:mod:`~lxt_explicit.rules`.  ``register(model)`` applies them to the model
instance as it is; no class, file or registry is changed:

* every module gets an instance-level ``forward`` that applies its rule (if
  it has one) and keeps track of the module being run;
* while the model runs, a :class:`torch.overrides.TorchFunctionMode` hands
  each torch function call whose operands carry relevance to its rule;
* the model's parameters are constants of the explanation: their
  ``requires_grad`` is switched off, and a tensor carries relevance exactly
  when it requires a gradient.

Every registration step pushes its own undo onto one stack; ``remove()`` runs
them all, leaving module types, the module tree, parameters, state-dict keys
and hooks as they were.
"""

from .composite import Composite
from .events import CompositeObserver, CoverageWarning, UnhandledOperationError
from .registration import Registration
from .undo import UndoStack

__all__ = ["Composite", "CompositeObserver", "CoverageWarning", "UnhandledOperationError", "Registration", "UndoStack"]
