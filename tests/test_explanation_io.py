"""Explanations as data: lossless save/load (JSON + safetensors), long pandas tables, concatenation."""

import json
import math

import pytest
import tiny_language_model as tlm
import torch
from safetensors.torch import load_file

from lxt_explicit.explain import explain
from lxt_explicit.explanation import Explanation
from lxt_explicit.explanation_io import SCHEMA_VERSION, to_table
from lxt_explicit.per_token import TokenMatrix, explain_tokens

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def tokenizer():
    return tlm.tokenizer()


@pytest.fixture(scope="module")
def model():
    return tlm.model()


def assert_same(loaded, original):
    assert type(loaded) is type(original)
    for name, value in vars(original).items():
        other = getattr(loaded, name)
        if isinstance(value, torch.Tensor):
            assert other.dtype == value.dtype and torch.equal(other, value), name
        elif isinstance(value, dict):
            assert set(other) == set(value), name
            for key in value:
                assert torch.equal(other[key], value[key]), (name, key)
        elif isinstance(value, float) and math.isnan(value):
            assert math.isnan(other), name
        else:
            assert other == value, name


def test_an_explanation_round_trips_and_records_how_to_reproduce_it(model, tokenizer, tmp_path):
    original = explain(model, tokenizer, PROMPT, latent=["mlp:0"])
    path = original.save(tmp_path / "one")
    assert path.name == "one.json" and (tmp_path / "one.safetensors").is_file()
    assert_same(Explanation.load(path), original)
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["schema_version"] == SCHEMA_VERSION == 1 and document["kind"] == "explanation"
    reproduce = document["reproduce"]
    assert reproduce["model"].startswith("LlamaForCausalLM") and reproduce["dtype"] == "float64"
    assert reproduce["method"] == "attnlrp" and reproduce["epsilon"] == 1e-6 and reproduce["prompt"] == PROMPT
    assert reproduce["target"] == original.target and reproduce["token_ids"] == original.token_ids
    assert {"python", "torch", "transformers", "lxt_explicit"} <= set(reproduce["versions"])
    numbers = load_file(str(tmp_path / "one.safetensors"))
    assert torch.equal(numbers["relevance"], original.relevance) and torch.equal(
        numbers["latent/mlp:0"], original.latent["mlp:0"])


def test_non_ascii_text_nan_and_a_custom_composite_round_trip(tmp_path):
    tokenizer = tlm.byte_level_tokenizer()
    model = tlm.model(vocab_size=len(tokenizer))
    original = explain(model, tokenizer, " café 😀 über", continuation=" paris")
    original.target_value = float("nan")
    original.epsilon = None
    assert_same(Explanation.load(original.save(tmp_path / "x.json")), original)
    assert "café 😀" in (tmp_path / "x.json").read_text(encoding="utf-8")  # readable UTF-8, strict JSON
    json.loads((tmp_path / "x.json").read_text(encoding="utf-8"), parse_constant=pytest.fail)


def test_a_matrix_round_trips(model, tokenizer, tmp_path):
    original = explain_tokens(model, tokenizer, PROMPT, continuation=" paris a city")
    assert_same(TokenMatrix.load(original.save(tmp_path / "m")), original)
    with pytest.raises(ValueError, match="holds a 'token_matrix', not a 'explanation'"):
        Explanation.load(tmp_path / "m.json")


def test_bad_files_are_explained(model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved explanation"):
        Explanation.load(tmp_path / "missing.json")
    path = explain(model, tokenizer, PROMPT).save(tmp_path / "e.json")
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(ValueError, match="upgrade lxt_explicit"):
        Explanation.load(path)
    path.write_text(json.dumps(document))
    (tmp_path / "e.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="which is missing"):
        Explanation.load(path)


def test_long_tables_and_their_concatenation(model, tokenizer):
    first = explain(model, tokenizer, PROMPT)
    second = explain(model, tokenizer, "the river", continuation=" paris")
    table = first.to_pandas()
    assert list(table["position"]) == list(range(len(first.tokens))) and list(table["token"]) == first.tokens
    assert table["relevance"].tolist() == first.relevance.double().tolist()
    assert table["in_prompt"].all() and set(table["method"]) == {"attnlrp"}
    both = to_table([first, second], keys=["a", "b"])
    assert len(both) == len(first.tokens) + len(second.tokens) and list(both["explanation"].unique()) == ["a", "b"]
    assert both.loc[both["explanation"] == "b", "in_prompt"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="keys has 1 entries for 2"):
        to_table([first, second], keys=["a"])


def test_a_matrix_table_has_one_row_per_answer_token_and_earlier_token(model, tokenizer):
    matrix = explain_tokens(model, tokenizer, PROMPT, continuation=" paris a city")
    table = matrix.to_pandas()
    prompt, answer = matrix.prompt_length, len(matrix)
    assert len(table) == sum(prompt + t for t in range(answer))
    for t in range(answer):
        rows = table[table["row"] == t]
        assert rows["position"].tolist() == list(range(prompt + t))
        assert rows["relevance"].tolist() == matrix.relevance[t, : prompt + t].tolist()
        assert set(rows["row_label"]) == {matrix.token_texts[prompt + t]}
    mixed = to_table([matrix, explain(model, tokenizer, PROMPT)])
    assert mixed["row"].isna().sum() == len(matrix.tokens) - answer
