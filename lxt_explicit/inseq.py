"""AttnLRP and CP-LRP as Inseq attribution methods: ``"attnlrp"`` and ``"cp_lrp"``.

Importing this module registers both methods with Inseq (Inseq finds attribution methods as the
subclasses of its ``FeatureAttribution``)::

    import inseq
    import lxt_explicit.inseq  # noqa: F401  registers "attnlrp" and "cp_lrp"

    model = inseq.load_model(hf_model, "attnlrp", tokenizer=tokenizer)
    out = model.attribute(prompt, generation_args={"max_new_tokens": 10}, attributed_fn="logit")
    out.show()

Inseq steps over the generated tokens; at every step the method explains Inseq's attributed
function (its *step function*) for the next token with one AttnLRP backward pass and returns the
relevance of every prefix token (its input embedding's relevance, summed over the hidden
dimension).  With ``attributed_fn="logit"`` each step equals
:func:`lxt_explicit.explain.explain` with ``target=`` the generated token; with
``attributed_fn="contrast_logits_diff"`` and ``contrast_targets=`` it equals ``explain`` with
``contrast=``.  Inseq's default attributed function is the *probability* of the token: its
relevance is the first-order Taylor decomposition of the probability at the logits (see
:mod:`lxt_explicit.captum`), ``p_a * (R(a) - sum_k p_k R(k))``, where ``R(k)`` explains logit ``k``.

The results are per-token scores (Inseq's coarse attributions: no hidden dimension to aggregate),
signed and not normalized, so Inseq's aggregators (``spans``, ``subwords``, ``pair``), ``show()``,
``save()`` and ``load()`` work on them as they are.  Pass ``return_convergence_delta=True`` to
``attribute`` for a step score ``deltas``: the explained value minus the summed relevance.

``inseq.load_model(model, "attnlrp", tokenizer=tokenizer, epsilon=1e-8)`` sets the stabilizer.
The rules are registered on the model only inside each attribution step (one forward and one
backward pass) and removed afterwards; generation and Inseq's step scores run on the model as it
is.  Decoder-only models only.

Needs Inseq, whose declared dependencies pin old libraries; install it without them::

    pip install --no-deps inseq==0.7.1 rich jaxtyping "typeguard<=2.13.3" treescope wadler-lindig
"""

from __future__ import annotations

from typing import Any

from .composite import Composite
from .stabilizer import DEFAULT_EPSILON

try:  # absolute imports: ``inseq`` is the top-level package, not this module
    from inseq.attr.feat import FeatureAttribution
    from inseq.data import CoarseFeatureAttributionStepOutput

    from .captum import CPLRP, AttnLRP
except ImportError as error:  # pragma: no cover - depends on the environment
    error.add_note(
        'lxt_explicit.inseq needs Inseq and Captum: pip install --no-deps inseq==0.7.1 rich jaxtyping '
        '"typeguard<=2.13.3" treescope wadler-lindig && pip install captum'
    )
    raise

__all__ = ["AttnLRPAttribution", "CPLRPAttribution"]


class AttnLRPAttribution(FeatureAttribution):
    """Inseq attribution method ``"attnlrp"``: AttnLRP relevance of every prefix token, step by step.

    Inseq creates it (``inseq.load_model(model, "attnlrp")`` or ``.attribute(..., method="attnlrp")``);
    it computes each step with :class:`lxt_explicit.captum.AttnLRP` on Inseq's forward function.

    Parameters
    ----------
    attribution_model : inseq.models.AttributionModel
        Inseq's wrapper of a decoder-only transformers model.
    epsilon : float, optional
        Stabilizer of the rules (ignored when ``composite`` is given).
    composite : Composite, optional
        Rules to use instead of the preset.
    **kwargs
        Passed on to Inseq's ``FeatureAttribution``.
    """

    method_name = "attnlrp"
    #: The Captum attribution that computes one step.
    captum_method: type[AttnLRP] = AttnLRP

    def __init__(
        self,
        attribution_model: Any,
        epsilon: float = DEFAULT_EPSILON,
        composite: Composite | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(attribution_model, **kwargs)
        if attribution_model.is_encoder_decoder:
            raise ValueError(
                f"{self.method_name}: lxt_explicit's presets cover decoder-only models in Inseq; "
                f"{type(attribution_model.model).__name__} is an encoder-decoder model"
            )
        self.method = self.captum_method(
            attribution_model, model=attribution_model.model, epsilon=epsilon, composite=composite
        )

    def attribute_step(
        self,
        attribute_fn_main_args: dict[str, Any],
        attribution_args: dict[str, Any] | None = None,
    ) -> CoarseFeatureAttributionStepOutput:
        """Relevance of the prefix tokens for one generation step.

        Parameters
        ----------
        attribute_fn_main_args : dict
            What Inseq's input formatter prepared: ``inputs`` (the prefix's embeddings) and
            ``additional_forward_args`` (ids, target ids, attributed function, attention mask, ...).
        attribution_args : dict, optional
            Further arguments of :meth:`lxt_explicit.captum.AttnLRP.attribute`
            (``return_convergence_delta``).

        Returns
        -------
        inseq.data.CoarseFeatureAttributionStepOutput
            ``target_attributions`` of shape ``(batch, prefix length)``, and the step score
            ``deltas`` if ``return_convergence_delta=True``.
        """
        attribution_args = attribution_args or {}
        result = self.method.attribute(**attribute_fn_main_args, **attribution_args)
        deltas = None
        if attribution_args.get("return_convergence_delta", False):
            result, deltas = result
        relevance = result[0] if isinstance(result, tuple) else result
        return CoarseFeatureAttributionStepOutput(
            target_attributions=relevance.sum(-1),
            step_scores={"deltas": deltas} if deltas is not None else {},
        )


class CPLRPAttribution(AttnLRPAttribution):
    """Inseq attribution method ``"cp_lrp"``: CP-LRP (no relevance through attention weights).

    Parameters as in :class:`AttnLRPAttribution`.
    """

    method_name = "cp_lrp"
    captum_method = CPLRP
