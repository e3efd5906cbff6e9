"""AttnLRP and CP-LRP on the dense families beyond the decoder-only core (tiny configs, fixed seed, float64).

ALiBi decoders (BLOOM's ``baddbmm`` scores, MPT), Cohere's written-out layer norms, encoder-decoders
(BART, mBART, Marian, Pegasus, T5, mT5, LongT5), vision encoders (DINOv2, SigLIP, SigLIP2, CLIP,
DeiT, BEiT, Swin) and CNN classifiers (ResNet, ConvNeXt, ConvNeXt V2, EfficientNet), each unmodified
as transformers ships it: zero unhandled operations, outputs unchanged, relevance equal to the
independent Gradient x Input formulation of ``gxi_reference.py``, CP-LRP conservation on bias-free
copies (relevance at every source and at the pixels sums to the explained logit), eager == sdpa.
The CNNs also through Zennit composites (:func:`~lxt_explicit.zennit_interop.convolutional`).
"""

import warnings

import pytest
import tiny_dense as td
import torch
import torch.nn.functional as F
from gxi_reference import gxi_relevance
from zennit.composites import EpsilonPlusFlat, LayerMapComposite
from zennit.rules import Epsilon
from zennit.types import Convolution, Linear

import lxt_explicit as lxt
from lxt_explicit.diagnostics import audit
from lxt_explicit.zennit_interop import ExactSequentialMergeBatchNorm, convolutional

METHODS = {"attnlrp": lxt.attnlrp, "cp_lrp": lxt.cp_lrp}
PIXELS = td.VISION + td.CNNS


def with_pixel_leaf(family, inputs):
    """The inputs with pixels that require a gradient (vision families), and the pixel leaf."""
    inputs = dict(inputs)
    if family not in PIXELS:
        return inputs, ()
    inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
    return inputs, (("pixels", inputs["pixel_values"]),)


def explain(model, family, inputs, composite):
    """Relevance of every source (summed over the hidden dimension) and of the pixels; the explained logit."""
    inputs, leaves = with_pixel_leaf(family, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxt.CoverageWarning)
        with composite.context(model):
            goal = td.target(family, model(**inputs))
            goal.backward(goal.detach())
            relevance = {name: r.sum(-1) for name, r in composite.source_relevance().items()}
    relevance.update({name: leaf.grad for name, leaf in leaves})
    return relevance, goal.detach()


def frozen_logits(model, inputs):
    """The unmodified model's logits with its parameters frozen, as a registered Composite freezes them.

    (LongT5's forward pass rounds differently, by 1e-15, when no parameter requires a gradient.)
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        return model(**inputs).logits
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", td.FAMILIES)
def test_no_unhandled_operations_and_outputs_unchanged(family):
    model = td.build(family)
    inputs = td.inputs(family, batch=2)
    flags = [p.requires_grad for p in model.parameters()]
    reference = frozen_logits(model, inputs)
    report = audit(model, lxt.attnlrp(strict=True), **inputs)
    assert report.unhandled == []
    assert report.counts()["rule"] >= 10
    with lxt.attnlrp().context(model):
        assert torch.equal(model(**inputs).logits, reference)
    assert torch.equal(frozen_logits(model, inputs), reference)
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("family", td.FAMILIES)
def test_relevance_equals_gradient_times_input_formulation(family):
    model = td.build(family)
    inputs = td.inputs(family)
    for method in METHODS:
        ours, _ = explain(model, family, inputs, METHODS[method](epsilon=1e-12))
        gxi_inputs, leaves = with_pixel_leaf(family, inputs)
        reference = gxi_relevance(model, lambda m: td.target(family, m(**gxi_inputs)), cp=method == "cp_lrp",
                                  leaf_inputs=leaves)
        assert reference.keys() <= ours.keys() and reference, (method, ours.keys(), reference.keys())
        for name, expected in reference.items():
            expected = expected if name == "pixels" else expected.sum(-1)
            a, b = ours[name].flatten(), expected.flatten()
            assert F.cosine_similarity(a, b, dim=0) >= 0.9999, (method, name)
            assert max_relative_error(a, b) <= 1e-6, (method, name)


@pytest.mark.parametrize("family", td.FAMILIES)
def test_cp_lrp_conserves_relevance_on_bias_free_copies(family):
    model = td.build(family, bias_free=True)
    relevance, goal = explain(model, family, td.inputs(family), lxt.cp_lrp(epsilon=1e-12))
    total = sum(r.sum() for r in relevance.values())
    assert abs((total - goal).item()) <= 1e-6 * abs(goal.item()), {k: v.sum().item() for k, v in relevance.items()}


@pytest.mark.parametrize("family", [f for f in td.FAMILIES if f not in td.EAGER_ONLY])
def test_eager_and_sdpa_give_the_same_relevance(family):
    inputs = td.inputs(family)
    eager, _ = explain(td.build(family, attn="eager"), family, inputs, lxt.attnlrp(epsilon=1e-12))
    sdpa, _ = explain(td.build(family, attn="sdpa"), family, inputs, lxt.attnlrp(epsilon=1e-12))
    assert eager.keys() == sdpa.keys()
    for name in eager:
        assert max_relative_error(eager[name], sdpa[name]) <= 1e-6, name


def test_alibi_scores_of_bloom_get_the_product_rule_and_the_bias_is_a_constant():
    model = td.build("bloom")
    report = audit(model, lxt.attnlrp(strict=True), **td.inputs("bloom"))
    rows = [r for r in report.rows if r.op == "Tensor.baddbmm"]
    assert len(rows) == 2 and all(r.status == "rule" and r.rule.startswith("UniformEpsilonRule") for r in rows)
    gelu = [r for r in report.rows if r.module.endswith("gelu_impl")]
    assert gelu and all(r.rule == "ActivationRule()" for r in gelu)  # its custom autograd Function is bypassed


def test_t5_relative_attention_biases_are_constants_not_sources():
    model = td.build("t5")
    relevance, _ = explain(model, "t5", td.inputs("t5"), lxt.attnlrp())
    assert set(relevance) == {"encoder.embed_tokens", "decoder.embed_tokens"}


def test_dinov2_at_another_image_size_resizes_its_position_embeddings_with_the_epsilon_rule():
    model = td.build("dinov2", bias_free=True)
    inputs = {"pixel_values": torch.randn(1, 3, 24, 20, generator=torch.Generator().manual_seed(3),
                                          dtype=torch.float64)}
    report = audit(model, lxt.cp_lrp(strict=True), **inputs)
    assert report.unhandled == [] and any(r.op == "F.interpolate" for r in report.rows)
    relevance, goal = explain(model, "dinov2", inputs, lxt.cp_lrp(epsilon=1e-12))
    assert relevance["dinov2.embeddings.position_embeddings"].abs().sum() > 0
    total = sum(r.sum() for r in relevance.values())
    assert abs((total - goal).item()) <= 1e-6 * abs(goal.item())


# ------------------------------------------------------------------- CNNs through Zennit composites


def zennit_composite():
    return EpsilonPlusFlat(canonizers=[ExactSequentialMergeBatchNorm()])


def pixel_relevance(model, composite, pixels, target=1):
    """Relevance at the pixels of logit ``target`` (explained by its own value), and the logits."""
    pixels = pixels.clone().requires_grad_()
    with composite.context(model):
        out = model(pixel_values=pixels).logits
        out.backward(torch.eye(out.shape[-1], dtype=out.dtype)[[target]] * out.detach())
    return pixels.grad, out.detach()


def test_resnet_through_a_zennit_composite_equals_zennit_alone():
    model = td.build("resnet")
    pixels = td.inputs("resnet")["pixel_values"]
    plain = frozen_logits(model, {"pixel_values": pixels})
    reference, _ = pixel_relevance(model, zennit_composite(), pixels)
    ours, out = pixel_relevance(model, convolutional(zennit_composite(), residual_rule=False), pixels)
    assert max_relative_error(ours, reference) <= 1e-6
    torch.testing.assert_close(out, plain, rtol=1e-10, atol=1e-12)  # batch norms merged: equal to rounding
    report = audit(model, convolutional(zennit_composite()), pixel_values=pixels)
    assert report.unhandled == []
    residual = [r for r in report.rows if r.op == "torch.add"]  # the in-place `hidden_state += residual`
    assert residual and all(r.rule.startswith("EpsilonRule") for r in residual)
    with_rule, _ = pixel_relevance(model, convolutional(zennit_composite()), pixels)
    assert torch.isfinite(with_rule).all() and max_relative_error(with_rule, reference) > 1e-3


@pytest.mark.parametrize("family", ["convnext", "convnextv2", "efficientnet"])
def test_cnns_with_layer_norms_layer_scales_and_gates_through_a_zennit_composite(family):
    model = td.build(family)
    pixels = td.inputs(family)["pixel_values"]
    report = audit(model, convolutional(zennit_composite()), pixel_values=pixels)
    assert report.unhandled == []
    rules = {r.rule.split("(")[0] for r in report.rows if r.status == "rule"}
    assert rules >= ({"UniformRule"} | ({"LayerNormRule", "ActivationRule"} if family != "efficientnet" else set()))
    relevance, out = pixel_relevance(model, convolutional(zennit_composite()), pixels)
    torch.testing.assert_close(out, frozen_logits(model, {"pixel_values": pixels}), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0


@pytest.mark.parametrize("family", ["convnext", "convnextv2"])
def test_zennit_epsilon_on_the_layers_and_our_rules_elsewhere_equal_attnlrp(family):
    # Zennit's epsilon rule on every convolution and linear layer, convolutional()'s rules on layer norms,
    # GELU, layer scales, GRN, means and residual sums: AttnLRP, whose linear rule is the epsilon rule
    model = td.build(family)
    pixels = td.inputs(family)["pixel_values"]
    layers = LayerMapComposite([(Convolution, Epsilon(epsilon=1e-12)), (Linear, Epsilon(epsilon=1e-12))])
    mixed, _ = pixel_relevance(model, convolutional(layers, epsilon=1e-12), pixels)
    ours, _ = pixel_relevance(model, lxt.attnlrp(epsilon=1e-12), pixels)
    assert max_relative_error(mixed, ours) <= 1e-6
