"""The data shipped with the library: the reading-comprehension prompts live in a JSON data file."""

import hashlib
import json
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import lxt_explicit.data.reading_comprehension as rc

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "lxt_explicit" / "data"


def test_prompts_are_a_json_data_file_shipped_as_package_data():
    data = json.loads((DATA / "reading_comprehension.json").read_text(encoding="utf-8"))
    assert rc.ITEMS == tuple(rc.QAItem(**item) for item in data["items"])
    assert (rc.SYSTEM_PROMPT, rc.ANSWER_PREFILL) == (data["system_prompt"], data["answer_prefill"])
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch("reading_comprehension.json", p) for p in patterns["lxt_explicit.data"])
    assert len((DATA / "reading_comprehension.py").read_text().splitlines()) < 250  # code, not data


def test_the_items_are_the_ones_measured():
    # the 55 items (and their order) that passed the check with SmolLM2, as they were written in Python before
    assert len(rc.ITEMS) == 55 and isinstance(rc.ITEMS, tuple)
    assert hashlib.sha256(repr(rc.ITEMS).encode()).hexdigest() == (
        "e129e9ce5783e28ccaceed37a7b61eea83cb6668febecbfd4cd0847fe4f06cc9"
    )
    assert rc.SYSTEM_PROMPT == "You are a helpful assistant. Answer questions about the context briefly."
    assert rc.ANSWER_PREFILL == 'The answer is "'
    for item in rc.ITEMS:
        assert re.search(rf"(?<!\w){re.escape(item.answer)}(?!\w)", item.context), item
