"""The support matrix, measured: which transformers families AttnLRP and CP-LRP cover.

For every model type in the installed transformers' causal-LM, masked-LM, sequence-to-sequence-LM
and image-classification auto mappings, :func:`check_family` builds a tiny configuration with a
fixed seed (:mod:`~lxt_explicit.support.configs`) and records whether it builds, the operations on
the relevance path without a rule, whether the output is unchanged with the rules registered,
CP-LRP conservation on a bias-free copy and finiteness in bfloat16.  ``python -m
lxt_explicit.support`` (:mod:`~lxt_explicit.support.command`) runs them all and writes
``docs/support.md`` and ``benchmarks/results/support.json``.

Modules: :mod:`~lxt_explicit.support.configs` (tiny configurations),
:mod:`~lxt_explicit.support.tasks` (families, models, inputs, explained logits),
:mod:`~lxt_explicit.support.checks` (one family), :mod:`~lxt_explicit.support.limits` (time limits),
:mod:`~lxt_explicit.support.report` (JSON and Markdown), :mod:`~lxt_explicit.support.command`.
"""

from .checks import FamilyRecord, check_family
from .configs import tiny_config
from .report import Sweep, render_markdown, summary
from .tasks import families

__all__ = ["FamilyRecord", "check_family", "tiny_config", "families", "Sweep", "render_markdown", "summary"]
