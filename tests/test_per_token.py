"""Per-token attribution: every matrix row equals a separate explanation written out literally (float64)."""

import html.parser
import json
import re

import pytest
import tiny_language_model as tlm
import torch
from conftest import skip_without_smollm2

from lxt_explicit.explain import explain
from lxt_explicit.per_token import TokenMatrix, explain_tokens
from lxt_explicit.presets import attnlrp, cp_lrp

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


@pytest.fixture(scope="module")
def model():
    return tlm.model()


@pytest.fixture(scope="module")
def matrix(model, tokenizer):
    return explain_tokens(model, tokenizer, PROMPT, max_new_tokens=6, stop="eos", chunk=4)


def separate_rows(model, ids, prompt_length, composite_factory=attnlrp, score="token"):
    """One explanation per answer token, written out: forward over the prefix, backward from one logit."""
    composite = composite_factory()
    composite.register(model)
    rows = []
    try:
        for end in range(prompt_length, len(ids)):
            with torch.enable_grad():
                logits = model(input_ids=torch.tensor([ids[:end]]), use_cache=False).logits[0, -1]
                value = logits[ids[end]] if score == "token" else logits.max()
                value.backward(value.detach())
            rows.append(composite.source_relevance()["model.embed_tokens"].detach().sum(-1)[0])
    finally:
        composite.remove()
    return rows


def assert_rows_equal(matrix, rows, atol=1e-6):
    assert matrix.relevance.shape == (len(rows), len(matrix.token_ids))
    for t, row in enumerate(rows):
        end = matrix.prompt_length + t
        torch.testing.assert_close(matrix.relevance[t, :end], row, atol=atol, rtol=0)
        assert matrix.relevance[t, end:].eq(0).all()  # nothing from the token itself or later ones


def test_rows_equal_separate_explanations_in_float64(model, tokenizer, matrix):
    assert len(matrix) == 6 and matrix.relevance.dtype == torch.float64
    assert_rows_equal(matrix, separate_rows(model, matrix.token_ids, matrix.prompt_length), atol=1e-12)
    # the explained logits are those of the separate explanations
    for t in range(len(matrix)):
        end = matrix.prompt_length + t
        with torch.no_grad():
            logit = model(input_ids=torch.tensor([matrix.token_ids[:end]]), use_cache=False).logits[0, -1]
        assert float(matrix.target_values[t]) == pytest.approx(float(logit[matrix.token_ids[end]]), abs=1e-12)


def test_rows_equal_the_public_explain_with_a_target(model, tokenizer, matrix):
    for t in (0, 3):
        row = matrix.row(t)
        prefix = " ".join(tokenizer.convert_ids_to_tokens(row.token_ids))
        expected = explain(model, tokenizer, prefix, target=matrix.token_ids[matrix.prompt_length + t])
        assert expected.token_ids == row.token_ids and row.target_ids == expected.target_ids
        torch.testing.assert_close(row.relevance.float(), expected.relevance, atol=1e-6, rtol=0)
        assert row.target_value == pytest.approx(expected.target_value, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_chunks_give_the_same_rows(model, tokenizer, matrix, chunk):
    again = explain_tokens(model, tokenizer, PROMPT, continuation=matrix.answer_text, chunk=chunk)
    assert again.token_ids == matrix.token_ids
    torch.testing.assert_close(again.relevance, matrix.relevance, atol=1e-12, rtol=0)


def test_largest_logit_rows_and_cp_lrp(model, tokenizer):
    continuation = " paris a city"
    result = explain_tokens(model, tokenizer, PROMPT, continuation=continuation, score="max", method="cp_lrp")
    assert result.method == "cp_lrp" and result.score == "max"
    assert_rows_equal(result, separate_rows(model, result.token_ids, result.prompt_length, cp_lrp, "max"), 1e-12)


def test_rows_of_a_float32_model_and_every_source(tokenizer):
    model = tlm.model(dtype=torch.float32)
    result = explain_tokens(model, tokenizer, PROMPT, continuation=" paris a city")
    assert result.relevance.dtype == torch.float32 and result.dtype == "float32"
    assert_rows_equal(result, separate_rows(model, result.token_ids, result.prompt_length), atol=1e-6)
    assert set(result.source_relevance) == {"model.embed_tokens"}


def test_a_batch_of_prompts_gives_one_matrix_each(model, tokenizer):
    results = explain_tokens(model, tokenizer, [PROMPT, "the river"], continuation=" paris")
    assert [r.prompt for r in results] == [PROMPT, "the river"] and all(len(r) == 1 for r in results)


def test_rules_that_cannot_run_batched_fall_back_to_one_row_at_a_time(model, tokenizer, matrix, monkeypatch):
    real = torch.autograd.grad

    def no_batches(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batches)
    with pytest.warns(RuntimeWarning, match="one backward pass per row"):
        again = explain_tokens(model, tokenizer, PROMPT, continuation=matrix.answer_text, chunk=4)
    torch.testing.assert_close(again.relevance, matrix.relevance, atol=1e-12, rtol=0)


def test_the_model_is_left_as_it_was(model, tokenizer):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain_tokens(model, tokenizer, PROMPT, continuation=" paris")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_requests_are_explained(model, tokenizer, matrix):
    with pytest.raises(ValueError, match="continuation= .* or max_new_tokens="):
        explain_tokens(model, tokenizer, PROMPT)
    with pytest.raises(ValueError, match="score must be"):
        explain_tokens(model, tokenizer, PROMPT, continuation=" paris", score="sum")
    with pytest.raises(ValueError, match="chunk must be a positive"):
        explain_tokens(model, tokenizer, PROMPT, continuation=" paris", chunk=0)
    with pytest.raises(IndexError, match="row must be an answer token index"):
        matrix.row(len(matrix))
    with pytest.raises(ValueError, match="one row per answer token"):
        TokenMatrix(token_ids=[1, 2], tokens=["a", "b"], relevance=torch.zeros(2, 2), prompt_length=1,
                    target_values=torch.zeros(1))


# ------------------------------------------------------------------------------------ views


class _Elements(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.found = []

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def test_matrix_html_has_a_row_selector_values_and_a_hover_element(matrix):
    page = matrix.html()
    parser = _Elements()
    parser.feed(page)
    ids = {attrs.get("id") for _, attrs in parser.found}
    assert {"row-select", "row-tokens", "hover-value", "matrix", "matrix-data"} <= ids
    options = [attrs for tag, attrs in parser.found if tag == "option"]
    assert [o["value"] for o in options] == [str(t) for t in range(len(matrix))]
    shown = [attrs for tag, attrs in parser.found if tag == "span" and "data-relevance" in attrs]  # row 0 at first
    assert [float(a["data-relevance"]) for a in shown] == matrix.relevance[0, : matrix.prompt_length].tolist()
    cells = [attrs for tag, attrs in parser.found if tag == "td" and "data-relevance" in attrs]
    assert len(cells) == sum(matrix.prompt_length + t for t in range(len(matrix)))
    for cell in cells[:5]:  # the table's cells carry the exact values
        assert float(cell["data-relevance"]) == matrix.relevance[0, int(cell["data-position"])].item()
    data = json.loads(re.search(r"id='matrix-data'>(.*?)</script>", page, re.S).group(1))
    assert data["prompt_length"] == matrix.prompt_length
    assert torch.tensor(data["relevance"], dtype=torch.float64).equal(matrix.relevance)


def test_terminal_row_and_png(matrix, tmp_path):
    shown = matrix.terminal(2)
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown) == "".join(matrix.token_texts[: matrix.prompt_length + 2]) + (
        f"[{matrix.token_texts[matrix.prompt_length + 2]}]"
    )
    path = matrix.png(tmp_path / "m.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_tokens_of_a_row(matrix):
    top = matrix.top_tokens(1, k=3)
    values = matrix.relevance[1, : matrix.prompt_length + 1]
    assert [p for p, _, _ in top] == torch.argsort(values, descending=True)[:3].tolist()


# ------------------------------------------------------------------------------------ the real model


@pytest.mark.real_model
@pytest.mark.slow
def test_rows_equal_separate_explanations_on_smollm2_in_float64():
    skip_without_smollm2()
    from lxt_explicit.models.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float64)
    matrix = explain_tokens(model, tokenizer, "The capital of France is", max_new_tokens=4, stop="eos")
    assert len(matrix) == 4 and matrix.answer_text.startswith(" Paris")
    assert_rows_equal(matrix, separate_rows(model, matrix.token_ids, matrix.prompt_length), atol=1e-6)
    # and the public explain (float32 relevance) on the prefix before the answer's third token
    row = matrix.row(2)
    expected = explain(model, tokenizer, row.text + "".join(row.token_texts[len(row.offsets) :]),
                       target=matrix.token_ids[matrix.prompt_length + 2])
    assert expected.token_ids == row.token_ids
    torch.testing.assert_close(row.relevance.float(), expected.relevance, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [4, 64])  # 64: a wide layer, whose rows without relevance are skipped unbatched
def test_batched_relevance_of_a_linear_layer_is_the_literal_rule(width):
    from conftest import stab

    import lxt_explicit.functional as lf
    from lxt_explicit.stabilizer import is_batched

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(width, 5, dtype=torch.float64)
    y = lf.linear_epsilon(x, weight, epsilon=1e-6)
    seeds = torch.randn(6, 3, width, dtype=torch.float64)
    seeds[:, 1:] = 0  # relevance at one position only
    (batched,) = torch.autograd.grad(y, x, seeds, is_grads_batched=True, retain_graph=True)
    literal = torch.stack([x.detach() * ((s / stab(y.detach(), 1e-6)) @ weight) for s in seeds])
    torch.testing.assert_close(batched, literal, atol=1e-12, rtol=0)
    assert not is_batched(x) and not is_batched(seeds)


def test_without_output_embeddings_the_rows_start_at_the_logits(model, tokenizer, matrix, monkeypatch):
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    again = explain_tokens(model, tokenizer, PROMPT, continuation=matrix.answer_text, chunk=4)
    torch.testing.assert_close(again.relevance, matrix.relevance, atol=1e-12, rtol=0)
