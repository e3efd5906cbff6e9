"""AttnLRP and CP-LRP as Captum attributions, on the tiny float64 language model.

References: :func:`lxt_explicit.explain.explain` (our API), the README's composite recipe in
float64, the logits of the plain model, and Captum's own wrappers and metrics.
"""

import pytest
import torch

pytest.importorskip("captum", reason='the Captum integration needs Captum: pip install "lxt_explicit[captum]"')

import tiny_language_model as tlm  # noqa: E402
from captum.attr import LLMGradientAttribution, TextTemplateInput, TextTokenInput  # noqa: E402
from captum.metrics import infidelity, sensitivity_max  # noqa: E402

import lxt_explicit as lxt  # noqa: E402
from lxt_explicit.captum import CPLRP, AttnLRP, LayerAttnLRP, LLMRelevanceAttribution  # noqa: E402
from lxt_explicit.explain import explain  # noqa: E402

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


@pytest.fixture(scope="module")
def model():
    return tlm.model()


def ids_of(tokenizer, text):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def recipe(model, ids, token, preset=lxt.attnlrp):
    """The README's recipe in float64: relevance per token and the explained logit."""
    composite = preset().register(model)
    try:
        logit = model(input_ids=ids, use_cache=False).logits[0, -1, token]
        logit.backward(logit.detach())
        return composite.source_relevance()["model.embed_tokens"].detach().sum(-1)[0], logit.item()
    finally:
        composite.remove()


def embeddings_forward(model):
    return lambda embeds: model(inputs_embeds=embeds, use_cache=False).logits[:, -1]


@pytest.mark.parametrize(
    "attribution, preset, method", [(AttnLRP, lxt.attnlrp, "attnlrp"), (CPLRP, lxt.cp_lrp, "cp_lrp")]
)
def test_token_ids_relevance_equals_explain(model, tokenizer, attribution, preset, method):
    ids = ids_of(tokenizer, PROMPT)
    paris = tokenizer.convert_tokens_to_ids("paris")
    relevance, delta = attribution(model).attribute(ids, target=paris, return_convergence_delta=True)
    assert relevance.shape == ids.shape and relevance.dtype == torch.float64
    ours = explain(model, tokenizer, PROMPT, target="paris", method=method)
    torch.testing.assert_close(relevance[0].float(), ours.relevance, rtol=1e-6, atol=1e-6)
    reference, logit = recipe(model, ids, paris, preset)
    torch.testing.assert_close(relevance[0], reference, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        plain_logit = float(model(input_ids=ids, use_cache=False).logits[0, -1, paris])
    assert logit == pytest.approx(plain_logit, rel=1e-12)
    assert float(delta[0]) == pytest.approx(plain_logit - float(reference.sum()), rel=1e-9, abs=1e-12)


def test_default_target_is_the_most_likely_token_and_batches_take_one_target_each(model, tokenizer):
    ids = torch.cat([ids_of(tokenizer, PROMPT), ids_of(tokenizer, "the river is a blue")])
    with torch.no_grad():
        best = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    default = AttnLRP(model).attribute(ids)
    given = AttnLRP(model).attribute(ids, target=best)
    torch.testing.assert_close(default, given, rtol=0, atol=0)
    for row, text in enumerate([PROMPT, "the river is a blue"]):
        torch.testing.assert_close(given[row].float(), explain(model, tokenizer, text, target=best[row]).relevance,
                                   rtol=1e-6, atol=1e-6)


def test_epsilon_and_a_registered_composite(model, tokenizer):
    ids = ids_of(tokenizer, PROMPT)
    paris = tokenizer.convert_tokens_to_ids("paris")
    coarse = AttnLRP(model, epsilon=1e-2).attribute(ids, target=paris)
    ours = explain(model, tokenizer, PROMPT, target="paris", epsilon=1e-2)
    torch.testing.assert_close(coarse[0].float(), ours.relevance, rtol=1e-6, atol=1e-6)
    composite = lxt.attnlrp().register(model)
    try:
        given = AttnLRP(model, composite=composite).attribute(ids, target=paris)
        assert composite.model is model  # a Composite registered by the caller stays registered
    finally:
        composite.remove()
    torch.testing.assert_close(given, AttnLRP(model).attribute(ids, target=paris), rtol=0, atol=0)
    assert not torch.allclose(given, coarse)


def test_embedding_inputs_get_relevance_per_feature(model, tokenizer):
    ids = ids_of(tokenizer, PROMPT)
    paris = tokenizer.convert_tokens_to_ids("paris")
    embeds = model.get_input_embeddings()(ids).detach()
    relevance, delta = AttnLRP(embeddings_forward(model), model=model).attribute(
        embeds, target=paris, return_convergence_delta=True
    )
    assert relevance.shape == embeds.shape
    reference, logit = recipe(model, ids, paris)
    torch.testing.assert_close(relevance.sum(-1)[0], reference, rtol=1e-10, atol=1e-12)
    assert float(delta[0]) == pytest.approx(logit - float(relevance.sum()), rel=1e-9, abs=1e-12)


def test_model_is_unchanged_afterwards(tokenizer):
    model = tlm.model()
    model.lm_head.weight.requires_grad_(False)  # a mixed state must come back as it was
    ids = ids_of(tokenizer, PROMPT)
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    AttnLRP(model).attribute(ids, target=3)
    LayerAttnLRP(model, model.model.layers[0]).attribute(ids, target=3)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [n != "lm_head.weight" for n, _ in model.named_parameters()]
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_layer_relevance_of_the_residual_stream(model, tokenizer):
    ids = ids_of(tokenizer, PROMPT)
    paris = tokenizer.convert_tokens_to_ids("paris")
    at_embeddings = LayerAttnLRP(model, model.get_input_embeddings()).attribute(ids, target=paris)
    torch.testing.assert_close(at_embeddings.sum(-1), AttnLRP(model).attribute(ids, target=paris), rtol=0, atol=0)
    # the output of block 0 is the input of block 1: the same tensor, the same relevance
    out0, delta = LayerAttnLRP(model, model.model.layers[0]).attribute(ids, target=paris, return_convergence_delta=True)
    in1 = LayerAttnLRP(model, model.model.layers[1]).attribute(ids, target=paris, attribute_to_layer_input=True)
    assert out0.shape == (1, 5, 32)
    torch.testing.assert_close(out0, in1, rtol=0, atol=0)
    with torch.no_grad():
        logit = float(model(input_ids=ids).logits[0, -1, paris])
    assert float(delta[0]) == pytest.approx(logit - float(out0.sum()), rel=1e-9, abs=1e-12)


def taylor_of_log_probability(model, tokenizer, prefix, token):
    """The documented relevance of log p(token): R(token) - sum_k p_k R(k), each R(k) from explain."""
    with torch.no_grad():
        probabilities = model(input_ids=ids_of(tokenizer, prefix)).logits[0, -1].softmax(-1)
    total = explain(model, tokenizer, prefix, target=token).relevance.double()
    for k in range(len(tlm.WORDS)):
        total -= float(probabilities[k]) * explain(model, tokenizer, prefix, target=k).relevance.double()
    return total


def test_llm_gradient_attribution_with_text_token_input(model, tokenizer):
    llm = LLMGradientAttribution(LayerAttnLRP(model, model.get_input_embeddings()), tokenizer)
    result = llm.attribute(TextTokenInput(PROMPT, tokenizer), target="paris is")
    assert result.output_tokens == ["paris", "is"] and result.input_tokens == PROMPT.split()
    assert result.token_attr.shape == (2, 5)
    for step, (prefix, token) in enumerate([(PROMPT, "paris"), (PROMPT + " paris", "is")]):
        reference = taylor_of_log_probability(model, tokenizer, prefix, token)[:5]
        torch.testing.assert_close(result.token_attr[step], reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))


def test_text_template_input_sums_the_tokens_of_each_value(model, tokenizer):
    llm = LLMRelevanceAttribution(LayerAttnLRP(model, model.get_input_embeddings()), tokenizer)
    tokens = llm.attribute(TextTokenInput(PROMPT, tokenizer), target="paris is").token_attr
    template = TextTemplateInput("the {} of {} is", values=["capital", "france"])
    result = llm.attribute(template, target="paris is")
    assert result.input_tokens == ["capital", "france"] and result.output_tokens == ["paris", "is"]
    torch.testing.assert_close(result.token_attr, tokens[:, [1, 3]], rtol=1e-12, atol=0)
    grouped = TextTemplateInput(
        "{a} {b} of {c} is", values={"a": "the", "b": "capital", "c": "france"}, mask={"a": 0, "b": 0, "c": 1}
    )
    result = llm.attribute(grouped, target="paris is")
    pair = tokens[:, 0] + tokens[:, 1]
    torch.testing.assert_close(result.token_attr, torch.stack([pair, pair, tokens[:, 3]], 1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))
    with pytest.raises(TypeError, match="LayerAttnLRP"):
        LLMRelevanceAttribution(AttnLRP(model), tokenizer)


def test_captum_metrics_run_on_the_relevance(model, tokenizer):
    ids = ids_of(tokenizer, PROMPT)
    paris = tokenizer.convert_tokens_to_ids("paris")
    embeds = model.get_input_embeddings()(ids).detach()
    attribution = AttnLRP(embeddings_forward(model), model=model)
    relevance = attribution.attribute(embeds, target=paris)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    score = infidelity(embeddings_forward(model), perturb, embeds, relevance, target=paris, n_perturb_samples=4)
    sensitivity = sensitivity_max(attribution.attribute, embeds, target=paris, n_perturb_samples=3)
    assert score.shape == (1,) and torch.isfinite(score).all()
    assert sensitivity.shape == (1,) and torch.isfinite(sensitivity).all() and float(sensitivity[0]) > 0


def test_bad_requests_are_explained(model, tokenizer):
    ids = ids_of(tokenizer, PROMPT)
    with pytest.raises(TypeError, match="model="):
        AttnLRP(lambda x: model(x).logits[:, -1])
    embeds = model.get_input_embeddings()(ids).detach()
    with pytest.raises(IndexError, match="does not index the output of shape"):
        AttnLRP(embeddings_forward(model), model=model).attribute(embeds, target=(1, 2))
    with pytest.raises(ValueError, match="one value per example"):
        AttnLRP(lambda e: model(inputs_embeds=e).logits, model=model).attribute(embeds, target=(2,))
    with pytest.raises(ValueError, match="give target="):
        AttnLRP(embeddings_forward(model), model=model).attribute(embeds)
    with pytest.raises(ValueError, match="entries for 1 examples"):
        AttnLRP(model).attribute(ids, target=[1, 2])
    with pytest.raises(ValueError, match="reached no embedding layer"):
        AttnLRP(lambda mask: model(ids * mask).logits[:, -1], model=model).attribute(torch.ones_like(ids), target=3)
    with pytest.raises(ValueError, match="does not depend on the model"):
        AttnLRP(lambda e: e.sum((1, 2)), model=model).attribute(torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="not a module of the model"):
        LayerAttnLRP(model, torch.nn.Linear(2, 2))
    assert not any("forward" in module.__dict__ for module in model.modules())
