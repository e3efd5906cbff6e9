"""AttnLRP and CP-LRP as Inseq attribution methods, on the tiny float64 language model.

Every generation step is compared with :func:`lxt_explicit.explain.explain` for the same prefix
and token; Inseq's own tools (aggregators, ``show``, ``save``/``load``) run on the results.
"""

import pytest
import torch
from conftest import INSEQ_INSTALL

inseq = pytest.importorskip("inseq", reason=f"the Inseq integration needs Inseq: {INSEQ_INSTALL}")

import tiny_language_model as tlm  # noqa: E402

import lxt_explicit.inseq  # noqa: E402,F401  registers "attnlrp" and "cp_lrp"
from lxt_explicit.explain import explain  # noqa: E402

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


def tiny_model():
    model = tlm.model()
    model.config.bos_token_id = 1  # Inseq needs a beginning-of-sequence token; the weights do not change
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def steps(output):
    """``(prefix tokens, target token, relevance of the prefix)`` for every generation step."""
    sequence = output.sequence_attributions[0]
    tokens = [t.token for t in sequence.target]
    start = output.info["attr_pos_start"]
    return [
        (tokens[:position], tokens[position], sequence.target_attributions[:position, position - start])
        for position in range(start, len(tokens))
    ]


def test_methods_are_registered_with_inseq():
    assert {"attnlrp", "cp_lrp"} <= set(inseq.list_feature_attribution_methods())


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_every_generation_step_equals_explain(model, tokenizer, method):
    wrapped = inseq.load_model(model, method, tokenizer=tokenizer)
    output = wrapped.attribute(
        PROMPT, generation_args={"max_new_tokens": 3, "do_sample": False}, attributed_fn="logit",
        return_convergence_delta=True, show_progress=False,
    )
    greedy = model.generate(torch.tensor([tokenizer(PROMPT)["input_ids"]]), max_new_tokens=3, do_sample=False)
    explained = steps(output)
    assert [token for _, token, _ in explained] == tokenizer.convert_ids_to_tokens(greedy[0, 5:].tolist())
    deltas = output.sequence_attributions[0].step_scores["deltas"]
    for step, (prefix, token, relevance) in enumerate(explained):
        ours = explain(model, tokenizer, " ".join(prefix), target=token, method=method)
        torch.testing.assert_close(relevance, ours.relevance, rtol=1e-6, atol=1e-6)
        absorbed = ours.target_value - float(ours.relevance.double().sum())
        assert float(deltas[step]) == pytest.approx(absorbed, rel=1e-5, abs=1e-6)


def test_contrastive_step_function_equals_explain_with_contrast(model, tokenizer):
    wrapped = inseq.load_model(model, "attnlrp", tokenizer=tokenizer)
    with pytest.warns(UserWarning, match="Contrastive inputs do not match"):  # Inseq's note for gradient methods
        output = wrapped.attribute(
            PROMPT, PROMPT + " paris is", attributed_fn="contrast_logits_diff",
            contrast_targets=PROMPT + " london a", show_progress=False,
        )
    (_, token0, first), (_, token1, second) = steps(output)
    assert (token0, token1) == ("london → paris", "a → is")
    cases = [(PROMPT, "paris", "london", first), (PROMPT + " paris", "is", "a", second)]
    for prefix, target, contrast, relevance in cases:
        ours = explain(model, tokenizer, prefix, target=target, contrast=contrast)
        torch.testing.assert_close(relevance, ours.relevance, rtol=1e-6, atol=1e-6)


def test_default_probability_gets_the_taylor_decomposition_at_the_logits(model, tokenizer):
    wrapped = inseq.load_model(model, "attnlrp", tokenizer=tokenizer)
    (_, _, relevance), = steps(wrapped.attribute(PROMPT, PROMPT + " paris", show_progress=False))
    with torch.no_grad():
        probabilities = model(torch.tensor([tokenizer(PROMPT)["input_ids"]])).logits[0, -1].softmax(-1)
    paris = tokenizer.convert_tokens_to_ids("paris")
    expected = explain(model, tokenizer, PROMPT, target=paris).relevance.double()
    for k in range(len(tlm.WORDS)):
        expected -= float(probabilities[k]) * explain(model, tokenizer, PROMPT, target=k).relevance.double()
    torch.testing.assert_close(relevance.double(), float(probabilities[paris]) * expected, rtol=1e-5, atol=1e-8)


def test_model_unchanged_and_inseq_tools_work_on_the_results(tokenizer, tmp_path):
    model = tiny_model()
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    wrapped = inseq.load_model(model, "attnlrp", tokenizer=tokenizer)
    output = wrapped.attribute(PROMPT, PROMPT + " paris is a", attributed_fn="logit", show_progress=False)
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)

    sequence = output.sequence_attributions[0]
    scores = sequence.target_attributions  # (tokens, steps): signed, not normalized
    spans = sequence.aggregate("spans", target_spans=[(1, 3)], aggregate_fn="sum")
    assert [t.token for t in spans.target][:3] == ["the", "capitalof", "france"]
    torch.testing.assert_close(spans.target_attributions[1], scores[1] + scores[2])
    torch.testing.assert_close(sequence.aggregate().target_attributions, scores, equal_nan=True)

    html = output.show(display=False, return_html=True)
    assert "capital" in html and "paris" in html
    path = tmp_path / "attnlrp.json"
    output.save(path)
    loaded = inseq.FeatureAttributionOutput.load(path)
    assert loaded.info["attribution_method"] == "attnlrp"
    torch.testing.assert_close(loaded.sequence_attributions[0].target_attributions, scores, equal_nan=True)


def test_encoder_decoder_models_are_refused_with_a_reason():
    class EncoderDecoder:  # the one property the method checks before anything else
        is_encoder_decoder = True
        model = torch.nn.Linear(1, 1)
        is_hooked = False

    with pytest.raises(ValueError, match="decoder-only"):
        lxt_explicit.inseq.AttnLRPAttribution(EncoderDecoder())
