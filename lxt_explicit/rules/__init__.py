"""Rules: LRP rules for any module or torch function, one configured object each.

A rule is called as ``rule(fn, *args, **kwargs)`` and returns ``fn(*args, **kwargs)``
unchanged; its backward pass turns the relevance of the output into relevance of the inputs
that require a gradient.  A :class:`~lxt_explicit.composite.Composite` uses the same protocol
for modules (``fn`` is the module's ``forward``) and for the torch functions it routes (``fn``
is ``F.linear``, ``torch.add``, ...).  Where :mod:`lxt_explicit.functional` has an operation
for a torch function, the rule runs it; any other callable gets the rule through a
vector-Jacobian product.  A rule that does not cover a call raises :class:`RuleDeclined`.

Example
-------
>>> rule = EpsilonRule(epsilon=1e-6)
>>> y = rule(linear_module, x)          # same value as linear_module(x)
>>> y.backward(y)                       # x.grad now holds the relevance of x
"""

from .attention import AttentionRule, MultiheadAttentionRule
from .base import Rule, RuleDeclined
from .elementwise import ActivationRule, DivisionRule, DropoutRule, IdentityRule, UniformRule
from .epsilon import EpsilonRule, UniformEpsilonRule
from .operations import LayerNormRule, SoftmaxRule
from .special import PlainGradientRule, RelevanceSource, StopRelevanceRule
from .ssm import EinsumRule, LinearSolveRule, ScanParametersRule
from .taylor import TaylorDecompositionRule

__all__ = [
    "Rule",
    "RuleDeclined",
    "EpsilonRule",
    "UniformEpsilonRule",
    "IdentityRule",
    "ActivationRule",
    "DivisionRule",
    "DropoutRule",
    "UniformRule",
    "StopRelevanceRule",
    "PlainGradientRule",
    "RelevanceSource",
    "TaylorDecompositionRule",
    "SoftmaxRule",
    "LayerNormRule",
    "AttentionRule",
    "MultiheadAttentionRule",
    "ScanParametersRule",
    "EinsumRule",
    "LinearSolveRule",
]
