"""Relevance shares of the first token and of special tokens (attention sinks)."""

import math

import pytest
import tiny_language_model as tlm
import torch
from transformers import AutoTokenizer

from lxt_explicit.explanation import Explanation
from lxt_explicit.sinks import relevance_shares, sink_shares, special_positions


def test_shares_are_absolute_relevance_over_the_total():
    shares = relevance_shares(torch.tensor([3.0, -1.0, 0.5, -0.5]), special=[1, 3])
    assert shares["first_token"] == pytest.approx(3.0 / 5.0)
    assert shares["special_tokens"] == pytest.approx(1.5 / 5.0)
    assert relevance_shares([1.0, 1.0])["special_tokens"] == 0.0
    assert math.isnan(relevance_shares([0.0, 0.0])["first_token"])
    with pytest.raises(ValueError, match="outside the 2 tokens"):
        relevance_shares([1.0, 2.0], special=[2])


def test_special_positions_include_added_special_tokens(tmp_path):
    tokenizer = tlm.tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<system>"]})
    ids = tokenizer("<system> the lake <eos>")["input_ids"]
    assert special_positions(tokenizer, ids) == [0, 3]
    tokenizer.save_pretrained(tmp_path)
    assert special_positions(AutoTokenizer.from_pretrained(tmp_path), ids) == [0, 3]


def test_sink_shares_of_an_explanation():
    tokenizer = tlm.tokenizer()
    ids = tokenizer("<eos> the lake")["input_ids"]
    explanation = Explanation(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids),
                              relevance=torch.tensor([2.0, 1.0, -1.0]), prompt_length=3, target="t", target_value=1.0)
    assert sink_shares(explanation, tokenizer) == {"first_token": 0.5, "special_tokens": 0.5, "special_positions": [0]}


def test_undefined_shares_are_none_in_the_record():
    tokenizer = tlm.tokenizer()
    ids = tokenizer("the lake")["input_ids"]
    explanation = Explanation(token_ids=ids, tokens=tokenizer.convert_ids_to_tokens(ids), relevance=torch.zeros(2),
                              prompt_length=2, target="t", target_value=0.0)
    assert sink_shares(explanation, tokenizer) == {"first_token": None, "special_tokens": None, "special_positions": []}
