"""Evaluate explanations: faithfulness, plausibility against linguistic ground truth, agreement with patching.

Point it at your own model, data and attribution method:

* :mod:`~lxt_explicit.evaluate.perturbation` / :mod:`~lxt_explicit.evaluate.faithfulness`:
  perturbation curves (tokens removed most- and least-relevant-first), the area between them
  (ABPC), batched, with bootstrap intervals over prompts and paired differences between methods;
* :mod:`~lxt_explicit.evaluate.agreement`: subject-verb agreement with attractors, generated from
  templates; does the attribution point at the subject (mean reciprocal rank, pointing accuracy)?
* :mod:`~lxt_explicit.evaluate.patching`: relevance of attention heads and MLP neurons against
  their activation-patching effects, next to attribution patching;
* :mod:`~lxt_explicit.evaluate.baselines`: the methods by name (AttnLRP, CP-LRP, gradient, Input x
  Gradient, Integrated Gradients, SmoothGrad, occlusion, attention rollout, random); any callable
  ``method(model, input_ids, target) -> relevance per token`` or precomputed relevance works too;
* :mod:`~lxt_explicit.evaluate.statistics`: bootstrap intervals, paired differences, Pearson.

Every method explains a :class:`~lxt_explicit.evaluate.target.Target`: a logit (or the difference
of two) at one position.
"""

from .agreement import AgreementItem, AgreementResult, agreement_items, evaluate_agreement, subject_metrics
from .baselines import METHODS, Method, get_method, lrp, resolve_methods
from .faithfulness import EvaluationPrompt, FaithfulnessResult, evaluate_faithfulness, make_prompt
from .patching import PatchingResult, ioi_prompts, patching_scores
from .perturbation import Curves, area_between, perturbation_curves, removal_masks
from .statistics import Interval, bootstrap, paired_difference, pearson
from .target import Target

__all__ = [
    "AgreementItem",
    "AgreementResult",
    "Curves",
    "EvaluationPrompt",
    "FaithfulnessResult",
    "Interval",
    "METHODS",
    "Method",
    "PatchingResult",
    "Target",
    "agreement_items",
    "area_between",
    "bootstrap",
    "evaluate_agreement",
    "evaluate_faithfulness",
    "get_method",
    "ioi_prompts",
    "lrp",
    "make_prompt",
    "paired_difference",
    "patching_scores",
    "pearson",
    "perturbation_curves",
    "removal_masks",
    "resolve_methods",
    "subject_metrics",
]
