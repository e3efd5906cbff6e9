"""The default real model, SmolLM2-135M-Instruct (select with ``-m real_model``)."""

import time

import pytest
import torch
from conftest import skip_without_smollm2

from lxt_explicit.data.demo import DEMO_CONTEXT
from lxt_explicit.data.reading_comprehension import (
    ANSWER_PREFILL,
    ITEMS,
    SYSTEM_PROMPT,
    answer_token_positions,
    first_word,
)
from lxt_explicit.explain import explain

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    skip_without_smollm2()
    from lxt_explicit.models.smollm2 import load_smollm2

    return load_smollm2()


def ask(item):
    return f"Context: {item.context}\nQuestion: {item.question}"


@pytest.mark.parametrize("index", range(0, 55, 6))
def test_answer_is_correct_and_its_context_word_is_among_the_top_three(smollm2, index):
    model, tokenizer = smollm2
    item = ITEMS[index]
    result = explain(model, tokenizer, ask(item), chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL)
    generated = explain(model, tokenizer, ask(item), chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL,
                        max_new_tokens=6)
    assert first_word(tokenizer.decode(generated.token_ids[generated.prompt_length:])) == first_word(item.answer)
    context = result.token_span(item.context)
    top3 = [position for position, _, _ in result.top_tokens(3, span=context)]
    answer = set(answer_token_positions(tokenizer, result.text, item))
    assert answer & set(top3), (item.answer, result.top_tokens(3, span=context))


def test_sentence_explanation_is_the_sum_of_its_positions(smollm2):
    model, tokenizer = smollm2
    prompt = "The capital of France is"
    joint = explain(model, tokenizer, prompt, max_new_tokens=4)
    n = joint.prompt_length
    total = torch.zeros(len(joint.tokens))
    for end in range(n, len(joint.tokens)):
        part = explain(model, tokenizer, tokenizer.decode(joint.token_ids[:end]))
        assert part.token_ids == joint.token_ids[:end]
        total[:end] += part.relevance
    torch.testing.assert_close(joint.relevance, total, rtol=1e-3, atol=1e-3 * float(total.abs().max()))


def test_batch_of_chat_prompts_equals_one_by_one(smollm2):
    model, tokenizer = smollm2
    prompts = [ask(item) for item in ITEMS[:3]]
    batch = explain(model, tokenizer, prompts, chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL)
    for prompt, result in zip(prompts, batch):
        single = explain(model, tokenizer, prompt, chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL)
        assert result.target == single.target
        scale = float(single.relevance.abs().max())
        torch.testing.assert_close(result.relevance, single.relevance, rtol=1e-3, atol=1e-3 * scale)


def test_long_context_of_two_thousand_tokens(smollm2):
    model, tokenizer = smollm2
    filler = " ".join(item.context for item in ITEMS)
    context = filler + " " + filler[: len(filler) // 2] + " " + DEMO_CONTEXT
    prompt = f"Context: {context}\nQuestion: What did Halvorsen name the lake?"
    start = time.perf_counter()
    result = explain(model, tokenizer, prompt, chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL)
    seconds = time.perf_counter() - start
    assert 2000 <= result.prompt_length <= 2600
    assert torch.isfinite(result.relevance).all() and result.relevance.abs().sum() > 0
    print(f"{result.prompt_length} tokens explained in {seconds:.1f} s: {result.target}")


def test_non_ascii_text_is_shown_as_the_tokenizer_decodes_it(smollm2):
    model, tokenizer = smollm2
    result = explain(model, tokenizer, "Le café 😀 est", continuation=" très bon 🎉")
    assert result.tokens[:5] == ["Le", "ĠcafÃ©", "ĠðŁĺ", "Ģ", "Ġest"]  # SmolLM2's byte-level BPE pieces, kept
    assert result.token_texts[:5] == ["Le", " café", " ", "😀", " est"]  # the emoji once, not as '�' twice
    assert "".join(result.token_texts) == "Le café 😀 est très bon 🎉"
    assert result.continuation_text == " très bon 🎉" and "très bon 🎉" in result.target
    assert [text for _, text, _ in result.top_tokens(5)].count("😀") == 1
