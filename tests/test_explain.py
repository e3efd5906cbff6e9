"""The explanation API on a tiny model: targets, linearity, batches, latent relevance, errors."""

import pytest
import torch

import lxt_explicit as lxt
import tiny_language_model as tlm
from lxt_explicit.diagnostics import RelevanceTrace
from lxt_explicit.explain import explain, latent_modules

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


@pytest.fixture(scope="module")
def model():
    return tlm.model()


def logits_of(model, tokenizer, text):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0]


def test_next_token_defaults_to_the_most_likely_token(model, tokenizer):
    result = explain(model, tokenizer, PROMPT)
    logits = logits_of(model, tokenizer, PROMPT)[-1]
    assert result.tokens == PROMPT.split() and result.prompt_length == 5
    assert result.target_value == pytest.approx(float(logits.max()), rel=1e-12)
    assert tlm.WORDS[int(logits.argmax())] in result.target
    assert result.relevance.shape == (5,) and result.relevance.dtype == torch.float32
    assert torch.isfinite(result.relevance).all()
    assert "forward" not in model.__dict__  # the composite was removed again
    positions = [p for p, _, _ in result.top_tokens(3)]
    assert positions == torch.argsort(result.relevance, descending=True)[:3].tolist()


def test_given_target_and_contrast_are_linear(model, tokenizer):
    paris = explain(model, tokenizer, PROMPT, target="paris")
    london = explain(model, tokenizer, PROMPT, target=tokenizer.convert_tokens_to_ids("london"))
    contrast = explain(model, tokenizer, PROMPT, target="paris", contrast="london")
    logits = logits_of(model, tokenizer, PROMPT)[-1]
    ids = tokenizer.convert_tokens_to_ids(["paris", "london"])
    assert contrast.target_value == pytest.approx(float(logits[ids[0]] - logits[ids[1]]), rel=1e-10)
    assert contrast.target_ids == ids and paris.target_ids == ids[:1]
    torch.testing.assert_close(contrast.relevance, paris.relevance - london.relevance, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="2 tokens"):
        explain(model, tokenizer, PROMPT, target="paris london")


@pytest.mark.parametrize("score", ["max", "token"])
def test_continuation_equals_sum_of_per_position_explanations(model, tokenizer, score):
    continuation = " paris is a city"
    joint = explain(model, tokenizer, PROMPT, continuation=continuation, continuation_score=score)
    tokens = PROMPT.split() + continuation.split()
    assert joint.tokens == tokens and joint.continuation == continuation.split()
    assert joint.target_ids == tokenizer.convert_tokens_to_ids(continuation.split())
    total = torch.zeros(len(tokens), dtype=torch.float64)
    value = 0.0
    for end in range(5, len(tokens)):
        prefix = " ".join(tokens[:end])
        target = None if score == "max" else tokens[end]
        part = explain(model, tokenizer, prefix, target=target)
        total[:end] += part.relevance.double()
        value += part.target_value
    assert joint.target_value == pytest.approx(value, rel=1e-6)  # rotary tables are float32 in transformers
    torch.testing.assert_close(joint.relevance.double(), total, rtol=1e-5, atol=1e-6)


def test_generated_continuation_is_the_greedy_answer(model, tokenizer):
    generated = explain(model, tokenizer, PROMPT, max_new_tokens=3)
    assert 1 <= len(generated.continuation) <= 3
    given = explain(model, tokenizer, PROMPT, continuation=" " + " ".join(generated.continuation))
    torch.testing.assert_close(generated.relevance, given.relevance)
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert generated.token_ids[5:] == greedy[: len(generated.continuation)]


def test_batch_equals_prompts_one_by_one(tokenizer):
    model = tlm.model(dtype=torch.float32)
    prompts = [PROMPT, "the river is blue", "ingrid and tomas found a lake named after her mother"]
    batch = explain(model, tokenizer, prompts)
    for prompt, result in zip(prompts, batch):
        single = explain(model, tokenizer, prompt)
        assert result.tokens == single.tokens and result.target == single.target
        torch.testing.assert_close(result.relevance, single.relevance, rtol=1e-4, atol=1e-6)


def test_chat_template_and_token_span(model, tokenizer):
    result = explain(model, tokenizer, PROMPT, chat=True, system="answer ?", prefill="the")
    assert result.tokens[:4] == ["<system>", "answer", "?", "<user>"] and result.tokens[-2:] == ["<assistant>", "the"]
    span = result.token_span(PROMPT)
    assert result.tokens[span] == PROMPT.split()
    assert all(span.start <= p < span.stop for p, _, _ in result.top_tokens(3, span=span))


def test_latent_units_come_from_the_same_backward_pass(tokenizer):
    model = tlm.model()
    composite = lxt.attnlrp()
    with RelevanceTrace(composite.register(model)) as trace:
        result = explain(
            model, tokenizer, PROMPT, composite=composite,
            latent=["mlp:1", "heads:0", "model.layers.0.mlp.down_proj:input", "model.layers.1.mlp"],
        )
    composite.remove()
    assert result.method == "custom"
    assert result.latent["mlp:1"].shape == (5, 48) and result.latent["heads:0"].shape == (5, 4)
    assert result.latent["model.layers.1.mlp"].shape == (5, 32)
    # mlp:K is the input of block K's down projection: the relevance the trace saw leaving that layer's rule
    down = [r for r in trace.report().records if r.label == "model.layers.1.mlp.down_proj:linear"]
    assert len(down) == 1
    assert float(result.latent["mlp:1"].sum()) == pytest.approx(down[0].relevance_out, rel=1e-6)
    units = result.top_units("mlp:1", 5)
    assert [u for u, _ in units] == torch.argsort(result.latent["mlp:1"].sum(0), descending=True)[:5].tolist()
    assert latent_modules(model, "heads:-1") == ("model.layers.1.self_attn.o_proj", "input", 4)


def test_cp_lrp_explanation_conserves_on_a_bias_free_model(model, tokenizer):
    result = explain(model, tokenizer, PROMPT, method="cp_lrp", epsilon=1e-12)
    assert result.conservation == pytest.approx(1.0, abs=1e-6)
    assert set(result.source_relevance) == {"model.embed_tokens"}


def test_explanation_serializes(model, tokenizer):
    result = explain(model, tokenizer, PROMPT, latent=["mlp:0"])
    assert "title=" in result._repr_html_() and result._repr_html_().startswith("<div>")
    data = result.to_dict()
    assert data["tokens"] == PROMPT.split() and len(data["relevance"]) == 5 and len(data["latent"]["mlp:0"]) == 48


def test_bad_requests_are_explained(model, tokenizer):
    with pytest.raises(ValueError, match="either continuation"):
        explain(model, tokenizer, PROMPT, continuation=" paris", max_new_tokens=2)
    with pytest.raises(ValueError, match="cannot be combined"):
        explain(model, tokenizer, PROMPT, continuation=" paris", target="paris")
    with pytest.raises(ValueError, match="method"):
        explain(model, tokenizer, PROMPT, method="gradient")
    with pytest.raises(ValueError, match="blocks"):
        explain(model, tokenizer, PROMPT, latent=["mlp:7"])
    with pytest.raises(AttributeError):
        explain(model, tokenizer, PROMPT, latent=["model.no_such_module"])
