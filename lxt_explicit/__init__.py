"""lxt_explicit: explicit-rule Layer-wise Relevance Propagation (AttnLRP) for PyTorch transformers.

Layers, from the bottom up: :mod:`~lxt_explicit.stabilizer` ->
:mod:`~lxt_explicit.functional` (one autograd Function per operation) ->
:mod:`~lxt_explicit.rules` (super-functions for any module) and
:mod:`~lxt_explicit.oprules` (torch functions -> operations) ->
:mod:`~lxt_explicit.composite` -> :mod:`~lxt_explicit.presets` -> tools
(:mod:`~lxt_explicit.diagnostics`, ...).

Relevance travels in the gradient slot: after ``y.backward(y)`` the ``.grad``
of an input is its relevance.
"""

from . import functional, oprules, rules
from .composite import Composite, CoverageWarning, RelevanceSource, UnhandledOperationError
from .presets import SUPPORTED_ARCHITECTURES, attnlrp, cp_lrp
from .stabilizer import DEFAULT_EPSILON, stabilize

from . import diagnostics, explain  # noqa: E402  (tools, above the core layers)

__version__ = "0.1.0"

__all__ = [
    "functional",
    "rules",
    "oprules",
    "Composite",
    "RelevanceSource",
    "CoverageWarning",
    "UnhandledOperationError",
    "attnlrp",
    "cp_lrp",
    "SUPPORTED_ARCHITECTURES",
    "DEFAULT_EPSILON",
    "stabilize",
    "diagnostics",
    "explain",
]
