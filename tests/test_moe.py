"""Mixture-of-experts families: AttnLRP and CP-LRP on every experts implementation transformers offers.

Rules (as the reference implementation defines them for Qwen3-MoE): each expert's gated MLP like a
dense one, the product of routing weight and expert output uniform, dispatch neutral and combine a
sum (epsilon rule), top-k selection neutral; CP-LRP: the routers' outputs are constants.  Checked
against the independent Gradient x Input formulation (float64, per-expert loop), across the
``eager`` / ``grouped_mm`` / ``batched_mm`` experts (float32, the fused kernels have no float64),
and by conservation on bias-free copies.
"""

import warnings

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from gxi_reference import gxi_relevance

import lxt_explicit as lxt
from lxt_explicit.diagnostics import audit

METHODS = {"attnlrp": lxt.attnlrp, "cp_lrp": lxt.cp_lrp}
IDS = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))


def relevance(model, composite):
    """Token relevance (embeddings summed over the hidden dimension) of the top logit at the last position."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxt.CoverageWarning)
        with composite.context(model):
            logits = model(input_ids=IDS, use_cache=False).logits
            goal = logits[0, -1].max()
            goal.backward(goal.detach())
            sources = composite.source_relevance()
    return sources["model.embed_tokens"].sum(-1)[0], goal.detach()


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", tm.MOE_FAMILIES)
def test_no_unhandled_operations_and_logits_unchanged(family):
    model = tm.build_moe(family)
    reference = model(input_ids=IDS, use_cache=False).logits
    for method in METHODS.values():
        report = audit(model, method(strict=True), input_ids=IDS, use_cache=False)
        assert report.unhandled == []
        with method().context(model):
            assert torch.equal(model(input_ids=IDS, use_cache=False).logits, reference)
    assert torch.equal(model(input_ids=IDS, use_cache=False).logits, reference)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", tm.MOE_FAMILIES)
def test_relevance_equals_gradient_times_input_with_the_per_expert_loop(family, method):
    model = tm.build_moe(family)
    ours, _ = relevance(model, METHODS[method](epsilon=1e-12))
    expected = gxi_relevance(
        model, lambda m: m(input_ids=IDS, use_cache=False).logits[0, -1].max(), cp=method == "cp_lrp"
    )["model.embed_tokens"].sum(-1)[0]
    assert F.cosine_similarity(ours, expected, dim=0) >= 0.9999
    assert max_relative_error(ours, expected) <= 1e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", [f for f in tm.MOE_FAMILIES if f != "llama4_text"])
def test_every_experts_implementation_gives_the_same_relevance(family, method):
    results = {}
    for experts in ("eager", "grouped_mm", "batched_mm"):
        model = tm.build_moe(family, dtype=torch.float32, experts=experts)
        results[experts], _ = relevance(model, METHODS[method]())
    for experts in ("grouped_mm", "batched_mm"):
        assert max_relative_error(results[experts], results["eager"]) <= 1e-3, experts


# gpt-oss computes (up + 1) * glu in its experts: the constant 1 absorbs its share, as a bias does
@pytest.mark.parametrize("family", [f for f in tm.MOE_FAMILIES if f != "gpt_oss"])
def test_cp_lrp_conserves_relevance_on_bias_free_models(family):
    model = tm.build_moe(family, bias_free=True)
    composite = lxt.cp_lrp(epsilon=1e-12)
    with composite.context(model):
        logits = model(input_ids=IDS, use_cache=False).logits
        goal = logits[0, -1].max()
        goal.backward(goal.detach())
        total = sum(float(r.sum()) for r in composite.source_relevance().values())
    assert abs(total - goal.item()) <= 1e-6 * abs(goal.item())


def test_cp_lrp_gives_the_routers_no_relevance():
    model = tm.build_moe("qwen3_moe")
    seen = []
    router = model.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda m, a, out: seen.append(out))
    with lxt.cp_lrp().context(model):
        model(input_ids=IDS, use_cache=False)
    handle.remove()
    assert seen and not any(t.requires_grad for t in seen[0] if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("family", [f for f in tm.MOE_FAMILIES if f != "gpt_oss"])  # gpt-oss: eager only (sinks)
def test_eager_and_fused_attention_give_the_same_relevance(family):
    eager, _ = relevance(tm.build_moe(family, attn="eager"), lxt.attnlrp(epsilon=1e-12))
    sdpa, _ = relevance(tm.build_moe(family, attn="sdpa"), lxt.attnlrp(epsilon=1e-12))
    assert max_relative_error(sdpa, eager) <= 1e-6
