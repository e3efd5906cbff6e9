"""lxt_explicit: explicit-rule Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers.

Layers, from the bottom up: :mod:`~lxt_explicit.stabilizer` ->
:mod:`~lxt_explicit.functional` (one autograd Function per operation; the rules' math) ->
:mod:`~lxt_explicit.ops` (the torch functions that are routed) ->
:mod:`~lxt_explicit.rules` (one rule concept for modules and torch functions) ->
:mod:`~lxt_explicit.composite` (registration and routing) ->
:mod:`~lxt_explicit.presets`, :mod:`~lxt_explicit.checkpointing`, :mod:`~lxt_explicit.zennit_interop`
(adapters) -> tools (:mod:`~lxt_explicit.diagnostics`, :mod:`~lxt_explicit.explain`, ...).

Relevance travels in the gradient slot: after ``y.backward(y)`` the ``.grad``
of an input is its relevance.
"""

from . import diagnostics, explain, functional, ops, rules  # noqa: E402  (tools, above the core layers)
from .composite import Composite, CoverageWarning, UnhandledOperationError
from .presets import SUPPORTED_ARCHITECTURES, attnlrp, attnlrp_sinks, cp_lrp
from .rules import RelevanceSource
from .seq2seq import explain_seq2seq
from .stabilizer import DEFAULT_EPSILON, stabilize

__version__ = "0.2.0"

__all__ = [
    "functional",
    "ops",
    "rules",
    "Composite",
    "RelevanceSource",
    "CoverageWarning",
    "UnhandledOperationError",
    "attnlrp",
    "attnlrp_sinks",
    "cp_lrp",
    "SUPPORTED_ARCHITECTURES",
    "DEFAULT_EPSILON",
    "stabilize",
    "diagnostics",
    "explain",
    "explain_seq2seq",
]
