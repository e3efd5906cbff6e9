"""Aggregation of token relevance into words, sentences and character spans (byte-level BPE, non-ASCII text)."""

import pytest
import tiny_language_model as tlm
import torch

from lxt_explicit.aggregation import REDUCTIONS, aggregate, sentences, spans, token_character_spans, words
from lxt_explicit.explain import explain
from lxt_explicit.per_token import explain_tokens

TEXT = "the café 😀 is closed. paris is a city"


@pytest.fixture(scope="module")
def byte_level():
    tokenizer = tlm.byte_level_tokenizer()
    return tlm.model(vocab_size=len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def explanation(byte_level):
    model, tokenizer = byte_level
    return explain(model, tokenizer, TEXT)


def test_pieces_of_a_word_are_one_word_by_the_tokenizers_word_ids(explanation, byte_level):
    _, tokenizer = byte_level
    # the emoji is four one-byte pieces after a lone space piece; ' closed' and ' city' are split too
    assert explanation.tokens[:7] == ["the", "ĠcafÃ©", "Ġ", "ð", "Ł", "ĺ", "Ģ"]
    result = words(explanation, tokenizer)
    assert result.labels == ["the", " café", " 😀", " is", " closed", ".", " paris", " is", " a", " city"]
    assert result.groups == [[0], [1], [2, 3, 4, 5, 6], [7], [8, 9], [10], [11], [12], [13, 14], [15, 16, 17]]
    r = explanation.relevance
    expected = [r[g].sum() for g in ([0], [1], [2, 3, 4, 5, 6], [7], [8, 9], [10], [11], [12], [13, 14], [15, 16, 17])]
    torch.testing.assert_close(result.relevance, torch.stack(expected), atol=0, rtol=0)
    assert float(result.relevance.sum()) == pytest.approx(float(r.sum()), abs=1e-6)  # a partition of the tokens
    assert result.group_of(4) == 2 and result.spans[2] == (8, 10) and TEXT[8:10] == " 😀"
    assert result.top(1)[0][0] == int(result.relevance.argmax())


@pytest.mark.parametrize("reduce", ["mean", "max", "min", "absmax"])
def test_other_reductions(explanation, byte_level, reduce):
    _, tokenizer = byte_level
    result = words(explanation, tokenizer, reduce=reduce)
    pieces = explanation.relevance[[2, 3, 4, 5, 6]]
    literal = {"mean": sum(pieces.tolist()) / 5, "max": max(pieces.tolist()), "min": min(pieces.tolist()),
               "absmax": max(pieces.tolist(), key=abs)}[reduce]
    assert float(result.relevance[2]) == pytest.approx(literal, abs=1e-7) and result.reduce == reduce


def test_a_reduction_function_and_bad_reductions(explanation, byte_level):
    _, tokenizer = byte_level
    result = words(explanation, tokenizer, reduce=lambda values, dim: values.abs().sum(dim))
    assert float(result.relevance[2]) == pytest.approx(float(explanation.relevance[2:7].abs().sum()), abs=1e-7)
    with pytest.raises(ValueError, match="reduce must be one of"):
        words(explanation, tokenizer, reduce="median")
    assert set(REDUCTIONS) == {"sum", "mean", "max", "min", "absmax"}
    with pytest.raises(ValueError, match="without tokens"):
        aggregate(torch.ones(3), [[0], []])


def test_words_to_sentences(explanation, byte_level):
    _, tokenizer = byte_level
    result = sentences(explanation, tokenizer)
    assert result.labels == ["the café 😀 is closed.", " paris is a city"]
    assert result.groups == [list(range(11)), list(range(11, 18))]
    r = explanation.relevance
    torch.testing.assert_close(result.relevance, torch.stack([r[:11].sum(), r[11:].sum()]), atol=0, rtol=0)


def test_character_spans_overlap_and_the_rest(explanation):
    result = spans(explanation, ["café 😀", (0, 3), (4, 8)], rest=True)
    assert result.labels == ["café 😀", "the", "café", "(rest)"]
    assert result.groups == [[1, 2, 3, 4, 5, 6], [0], [1], list(range(7, 18))]
    assert result.spans[:3] == [(4, 10), (0, 3), (4, 8)]
    r = explanation.relevance
    torch.testing.assert_close(result.relevance, torch.stack([r[1:7].sum(), r[0], r[1], r[7:].sum()]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not part of the explained text"):
        spans(explanation, ["tea"])
    with pytest.raises(ValueError, match="0 <= start < end"):
        spans(explanation, [(5, 5)])


def test_a_matrix_aggregates_its_columns_and_answer_tokens_are_placed_after_the_prompt(byte_level):
    model, tokenizer = byte_level
    matrix = explain_tokens(model, tokenizer, "the café", continuation=" 😀 is closed. paris")
    located = token_character_spans(matrix)
    # the first three pieces of the emoji decode to nothing: empty spans at the emoji, then the emoji
    assert located[2:7] == [(8, 9), (9, 9), (9, 9), (9, 9), (9, 10)]
    result = words(matrix, tokenizer)
    assert result.labels == ["the", " café", " 😀", " is", " closed", ".", " paris"]
    assert result.relevance.shape == (len(matrix), 7) and result.row_labels == matrix.token_texts[2:]
    torch.testing.assert_close(result.relevance[:, 2], matrix.relevance[:, 2:7].sum(-1), atol=0, rtol=0)
    both = words(matrix, tokenizer, rows=True)  # answer words as rows too: ' 😀' is one row, the sum of five
    assert both.row_labels == [" 😀", " is", " closed", ".", " paris"] and both.row_groups[0] == [0, 1, 2, 3, 4]
    # sums over rows (dim 0) against the library's sums over a transposed last dimension: the order of the
    # additions may differ between CPU kernels, so allow float32 rounding (a few ulp), nothing more
    torch.testing.assert_close(both.relevance[0], result.relevance[:5].sum(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(both.relevance[2], result.relevance[6:8].sum(0), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="rows=True aggregates the rows of a matrix"):
        words(explain(model, tokenizer, "the café"), tokenizer, rows=True)
    table = result.to_pandas()
    assert len(table) == len(matrix) * 7 and set(table["level"]) == {"word"}
    assert table.loc[(table["row"] == 5) & (table["index"] == 2), "relevance"].item() == pytest.approx(
        float(result.relevance[5, 2]))


def test_tokens_without_text_stay_alone(explanation, byte_level):
    _, tokenizer = byte_level
    special = type(explanation)(**{**explanation.__dict__, "offsets": [(0, 0)] + explanation.offsets[1:]})
    result = words(special, tokenizer)
    assert result.groups[0] == [0] and result.labels[0] == "the"  # its own group, labelled with its text


def test_aggregation_needs_offsets_and_a_fast_tokenizer(explanation):
    without = type(explanation)(**{**explanation.__dict__, "offsets": []})
    with pytest.raises(ValueError, match="fast tokenizer"):
        spans(without, ["café"])
