"""explain_seq2seq: an encoder-decoder's output tokens explained by source and target tokens (tiny BART and T5)."""

import pytest
import tiny_dense as td
import tiny_language_model as tlm
import torch
from gxi_reference import gxi_relevance

import lxt_explicit as lxt
from lxt_explicit.seq2seq import explain_seq2seq, token_sources

SOURCE = "the capital of france is paris"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_next_token_relevance_reaches_source_and_target_and_is_conserved(family, tokenizer):
    model = td.build(family, bias_free=True)
    explanation = explain_seq2seq(model, tokenizer, SOURCE, prefix="la capital", method="cp_lrp", epsilon=1e-12)
    assert explanation.source_relevance.shape == (1, len(explanation.source_ids)) == (1, 6)
    assert explanation.target_relevance.shape == (1, len(explanation.target_ids)) == (1, 3)
    assert explanation.source_relevance.abs().sum() > 0 and explanation.target_relevance.abs().sum() > 0
    total = sum(float(r.sum()) for r in explanation.sources.values())  # tokens and positions of both sides
    assert abs(total - explanation.target_values[0]) <= 1e-6 * abs(explanation.target_values[0])
    logits = model(input_ids=torch.tensor([explanation.source_ids]),
                   decoder_input_ids=torch.tensor([explanation.target_ids])).logits
    assert explanation.explained_ids == [int(logits[0, -1].argmax())]
    assert str(explanation).count("most relevant source token") == 1


def test_each_generated_token_equals_gradient_times_input(tokenizer):
    model = td.build("t5")
    explanation = explain_seq2seq(model, tokenizer, SOURCE, max_new_tokens=3, epsilon=1e-12)
    assert len(explanation.explained_ids) == 3 == explanation.source_relevance.shape[0]
    generated = model.generate(torch.tensor([explanation.source_ids]), max_new_tokens=3, do_sample=False)[0].tolist()
    assert explanation.target_ids + explanation.explained_ids[-1:] == generated
    inputs = dict(input_ids=torch.tensor([explanation.source_ids]),
                  decoder_input_ids=torch.tensor([explanation.target_ids]), use_cache=False)
    for row, (position, token) in enumerate(zip(explanation.explained_positions, explanation.explained_ids)):
        reference = gxi_relevance(model, lambda m: m(**inputs).logits[0, position, token])
        for name, ours in (("encoder.embed_tokens", explanation.source_relevance),
                           ("decoder.embed_tokens", explanation.target_relevance)):
            expected = reference[name].sum(-1)[0].float()
            assert ((ours[row] - expected).abs().max() / expected.abs().max()) <= 1e-5, (row, name)
        assert explanation.target_relevance[row, position + 1 :].abs().sum() == 0  # the decoder is causal


def test_an_embedding_module_shared_by_encoder_and_decoder_is_two_sources(tokenizer):
    model = td.build("bart")
    separate = explain_seq2seq(model, tokenizer, SOURCE, prefix="la", epsilon=1e-12)
    shared = td.build("bart")
    shared.model.decoder.embed_tokens = shared.model.encoder.embed_tokens  # one module object, called twice
    assert token_sources(shared) == ("model.encoder.embed_tokens", "model.encoder.embed_tokens#1")
    together = explain_seq2seq(shared, tokenizer, SOURCE, prefix="la", epsilon=1e-12)
    assert {"model.encoder.embed_tokens", "model.encoder.embed_tokens#1"} <= together.sources.keys()
    torch.testing.assert_close(together.source_relevance, separate.source_relevance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(together.target_relevance, separate.target_relevance, rtol=1e-10, atol=1e-12)


def test_a_given_target_and_a_registered_composite(tokenizer):
    model = td.build("bart")
    composite = lxt.cp_lrp().register(model)
    try:
        explanation = explain_seq2seq(model, tokenizer, SOURCE, target="paris", composite=composite)
        assert composite.model is model  # used as is, left registered
    finally:
        composite.remove()
    assert explanation.explained_ids == [tokenizer.convert_tokens_to_ids("paris")]
    assert explanation.method == "custom"


@pytest.mark.parametrize("options,error,match", [
    (dict(source=""), ValueError, "non-empty"),
    (dict(target="paris", max_new_tokens=2), ValueError, "cannot be combined"),
    (dict(max_new_tokens=0), ValueError, "positive"),
    (dict(method="lrp"), ValueError, "method"),
    (dict(target="paris london"), ValueError, "2 tokens"),
    (dict(prefix=[3, 4]), TypeError, "prefix must be text"),
    (dict(source=" ".join(["paris"] * 65)), ValueError, "65 tokens but the model has 64 positions"),
    (dict(max_new_tokens=64), ValueError, "decoder input is 65 tokens"),
])
def test_requests_that_cannot_be_explained_are_clear_errors(tokenizer, options, error, match):
    options = {"source": SOURCE, **options}
    with pytest.raises(error, match=match):
        explain_seq2seq(td.build("bart"), tokenizer, options.pop("source"), **options)


def test_a_causal_language_model_is_refused_with_the_alternative(tokenizer):
    with pytest.raises(ValueError, match="encoder-decoder.*explain"):
        explain_seq2seq(tlm.model(), tokenizer, SOURCE)
