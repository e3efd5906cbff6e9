"""The explanation API on tiny models: targets, linearity, batches, latent relevance, decoded text, errors."""

import pytest
import tiny_language_model as tlm
import torch
import transformers

import lxt_explicit as lxt
from lxt_explicit.diagnostics import RelevanceTrace
from lxt_explicit.explain import explain, latent_modules
from lxt_explicit.prompts import answer_length
from lxt_explicit.targets import needed_logits

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


# ------------------------------------------------------------------------------------ text as decoded


@pytest.fixture(scope="module")
def byte_level():
    tokenizer = tlm.byte_level_tokenizer()
    return tlm.model(vocab_size=len(tokenizer)), tokenizer


def test_tokens_are_shown_as_decoded_and_a_split_character_once(byte_level):
    model, tokenizer = byte_level
    result = explain(model, tokenizer, " café 😀 über")
    # the tokenizer's raw pieces stay available: byte-level BPE writes bytes as characters
    assert result.tokens == ["ĠcafÃ©", "Ġ", "ð", "Ł", "ĺ", "Ģ", "Ġ", "Ã", "¼", "b", "er"]
    # shown as decoded: the emoji (4 one-byte pieces) and the ü (2 pieces) once, with the piece that completes them
    assert result.token_texts == [" café", " ", "", "", "", "😀", " ", "", "ü", "b", "er"]
    assert "".join(result.token_texts) == " café 😀 über"
    assert [text for _, text, _ in result.top_tokens(11)].count("😀") == 1
    data = result.to_dict()
    assert data["token_texts"] == result.token_texts and data["tokens"] == result.tokens
    html = result._repr_html_()
    assert "café" in html and "😀" in html and "Ã" not in html


def test_a_generated_continuation_is_shown_as_decoded(byte_level):
    model, tokenizer = byte_level
    result = explain(model, tokenizer, "the café", continuation=" 😀 über")
    assert result.continuation_text == " 😀 über" and "�" not in "".join(result.token_texts)
    assert "😀" in result.target  # the description quotes the decoded text


# ------------------------------------------------------------------------------------ bad requests


def test_an_empty_prompt_is_an_error_alone_and_in_a_batch(model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        explain(model, tokenizer, "")
    with pytest.raises(ValueError, match=r"element 1 of the batch\) is empty"):
        explain(model, tokenizer, [PROMPT, ""])
    with pytest.raises(ValueError, match="element 0 of the batch"):
        explain(model, tokenizer, ["", PROMPT], max_new_tokens=2)
    with pytest.raises(ValueError, match="gives no tokens"):
        explain(model, tokenizer, "   ")  # the word-level tokenizer drops spaces
    with pytest.raises(TypeError, match="list of strings"):
        explain(model, tokenizer, 3)


def test_contrast_equal_to_target_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match="same token"):
        explain(model, tokenizer, PROMPT, target="paris", contrast=tokenizer.convert_tokens_to_ids("paris"))
    most_likely = int(logits_of(model, tokenizer, PROMPT)[-1].argmax())
    with pytest.raises(ValueError, match="most likely next token"):
        explain(model, tokenizer, PROMPT, contrast=most_likely)


@pytest.mark.parametrize("what", ["target", "contrast"])
def test_target_ids_must_be_integers_inside_the_vocabulary(model, tokenizer, what):
    others = {"contrast": "paris"} if what == "target" else {"target": "london"}
    for bad in (len(tlm.WORDS), -1, 10**30):
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            explain(model, tokenizer, PROMPT, **{what: bad}, **others)
    for bad in (3.0, True, [3]):
        with pytest.raises(TypeError, match="token id"):
            explain(model, tokenizer, PROMPT, **{what: bad}, **others)
    numpy = pytest.importorskip("numpy")
    value = explain(model, tokenizer, PROMPT, **{what: numpy.int64(8)}, **others).target_value  # 'paris' is id 11
    assert value == explain(model, tokenizer, PROMPT, **{what: 8}, **others).target_value


def test_a_latent_spec_given_as_a_string_is_an_error(model, tokenizer):
    with pytest.raises(TypeError, match=r"latent=\['mlp:1'\]"):
        explain(model, tokenizer, PROMPT, latent="mlp:1")


def test_a_prompt_longer_than_the_model_positions_is_an_error(model, tokenizer):
    limit = model.config.max_position_embeddings
    words = " ".join(["the"] * limit)
    assert len(explain(model, tokenizer, words).tokens) == limit  # exactly the positions: fine
    with pytest.raises(ValueError, match=f"{limit + 1} tokens but the model has {limit} positions"):
        explain(model, tokenizer, words + " the")
    with pytest.raises(ValueError, match="continuation 2 but the model has"):
        explain(model, tokenizer, words, continuation=" paris city")
    with pytest.raises(ValueError, match="max_new_tokens=3"):
        explain(model, tokenizer, " ".join(["the"] * (limit - 2)), max_new_tokens=3)


def test_counts_of_top_entries_must_be_positive(model, tokenizer):
    result = explain(model, tokenizer, PROMPT, latent=["mlp:0"])
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="positive"):
            result.top_tokens(bad)
        with pytest.raises(ValueError, match="positive"):
            result.top_units("mlp:0", bad)
    with pytest.raises(KeyError, match="mlp:1"):
        result.top_units("mlp:1")


def test_chat_without_a_chat_template_is_an_error(model):
    plain = tlm.tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template.*chat=False"):
        explain(model, plain, PROMPT, chat=True)


def test_bad_generation_options_are_errors(model, tokenizer):
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens"):
            explain(model, tokenizer, PROMPT, max_new_tokens=bad)
    with pytest.raises(ValueError, match="stop must be one of"):
        explain(model, tokenizer, PROMPT, max_new_tokens=2, stop="word")
    with pytest.raises(ValueError, match="continuation is empty"):
        explain(model, tokenizer, PROMPT, continuation="")


# ------------------------------------------------------------------------------------ where the answer ends


def greedy_words(model, tokenizer, prompt, n):
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    generated = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    return [tlm.WORDS[i] for i in generated]


def test_a_generated_continuation_ends_with_its_first_sentence(model, tokenizer):
    prompt = "the river is blue"
    words = greedy_words(model, tokenizer, prompt, 8)
    assert "." in words[:-1] and "<eos>" not in words  # this tiny model says: '<unk> tomas . name city ...'
    end = words.index(".") + 1
    result = explain(model, tokenizer, prompt, max_new_tokens=8)
    assert result.continuation == words[:end] and result.stop_reason == "sentence"
    assert result.discarded_ids == tokenizer.convert_tokens_to_ids(words[end:])
    assert result.discarded_text == "".join(" " + w for w in words[end:])
    full = explain(model, tokenizer, prompt, max_new_tokens=8, stop="eos")
    assert full.continuation == words and full.stop_reason == "max_new_tokens" and full.discarded_ids == []


def test_a_continuation_that_the_model_ends_is_not_cut(model, tokenizer):
    prompt = "ingrid and tomas found a lake"
    words = greedy_words(model, tokenizer, prompt, 8)
    assert "<eos>" in words and "." not in words
    result = explain(model, tokenizer, prompt, max_new_tokens=8)
    assert result.continuation == words[: words.index("<eos>")] and result.stop_reason == "eos"
    assert result.discarded_text == ""


@pytest.mark.parametrize(
    "texts, stop, expected",
    [
        ([" Paris", ".", "\n\n", "The", " answer", " is", ":", " 2018"], "sentence", (2, "sentence")),
        ([" Paris", ".", "\n\n", "The", " answer", " is", ":", " 2018"], "line", (2, "line")),  # newline left out
        ([" Paris", ".", "\n\n", "The", " answer"], "eos", (5, None)),
        ([" Paris", "."], "sentence", (2, None)),  # nothing after the sentence: nothing to cut
        (["\n", "Paris", " is", " big", "!", " It", " is"], "sentence", (5, "sentence")),  # a leading newline stays
        ([" 3", ".", "5", " million", ".", " More"], "sentence", (5, "sentence")),  # a decimal point ends nothing
        ([" He", " said", ' "', "Hi", '."', " Then"], "sentence", (5, "sentence")),  # after the closing quote
        ([" one", " line", "\n", "two"], "sentence", (2, "line")),
        ([" no", " end", " here"], "sentence", (3, None)),
        ([" 東京", "。", "次"], "sentence", (2, "sentence")),
    ],
)
def test_answer_length(texts, stop, expected):
    assert answer_length(texts, stop) == expected


# ------------------------------------------------------------------------------------ only the needed logits


class NoLogitsToKeep(transformers.LlamaForCausalLM):
    """A causal LM whose forward has no ``logits_to_keep`` argument (like many custom models)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache)


def reference_relevance(model, ids, positions, score):
    """Literal AttnLRP relevance from the full logits (every position), seeded at ``positions``."""
    composite = lxt.attnlrp()
    with torch.enable_grad(), composite.context(model):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        rows = logits[positions]
        values = rows.max(-1).values if score is None else rows.gather(-1, torch.tensor(score)[:, None]).squeeze(-1)
        values.backward(values.detach())
        relevance = composite.source_relevance()["model.embed_tokens"][0].sum(-1)
    return relevance.detach(), float(values.detach().sum())


def head_positions(model):
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen, handle


@pytest.mark.parametrize("kind", ["logits_to_keep", "sliced_hidden_states"])
def test_only_the_explained_positions_get_logits_and_relevance_is_unchanged(tokenizer, kind):
    model = tlm.model() if kind == "logits_to_keep" else NoLogitsToKeep(tlm.model().config).to(torch.float64)
    if kind != "logits_to_keep":
        model.load_state_dict(tlm.model().state_dict())
        model.eval()
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    seen, handle = head_positions(model)
    try:
        next_token = explain(model, tokenizer, PROMPT)
        joint = explain(model, tokenizer, PROMPT, continuation=" paris is a city", continuation_score="token")
    finally:
        handle.remove()
    assert seen == [1, 5]  # the last position; the 4 continuation positions and the last one
    expected, value = reference_relevance(model, ids, [4], None)
    assert next_token.target_value == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(next_token.relevance, expected.float(), rtol=1e-6, atol=1e-9)
    full = ids + tokenizer.convert_tokens_to_ids("paris is a city".split())
    expected, value = reference_relevance(model, full, [4, 5, 6, 7], full[5:])
    assert joint.target_value == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(joint.relevance, expected.float(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["logits_to_keep", "sliced_hidden_states"])
def test_needed_logits_give_the_relevance_of_all_logits_in_float64(tokenizer, kind):
    model = tlm.model()
    if kind != "logits_to_keep":
        model = NoLogitsToKeep(model.config).to(torch.float64).eval()
        model.load_state_dict(tlm.model().state_dict())
    ids = torch.tensor([tokenizer(PROMPT + " paris is", add_special_tokens=False)["input_ids"]])
    token = int(logits_of(model, tokenizer, PROMPT + " paris is")[-3].argmax())
    results = []
    for keep in (None, 3):
        composite = lxt.attnlrp()
        with torch.enable_grad(), composite.context(model):
            logits = model(input_ids=ids, use_cache=False).logits if keep is None else needed_logits(
                model, {"input_ids": ids, "use_cache": False}, keep
            )
            assert logits.shape[1] == (7 if keep is None else 3)
            target = logits[0, -3, token] + logits[0, -2].max()
            target.backward(target.detach())
            results.append(composite.source_relevance()["model.embed_tokens"][0].sum(-1).detach())
    assert results[0].dtype == torch.float64
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-12)
