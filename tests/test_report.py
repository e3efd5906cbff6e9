"""The dataset summary and the report page (the browser test is in tests/test_browser.py)."""

import statistics

import pytest

from lxt_explicit.report import dataset_summary, report_html


def row(row_id, relevance, rank=None, special=(), conservation=1.0):
    total = sum(abs(r) for r in relevance)
    explanation = {"token_texts": [f" t{i}" for i in range(len(relevance))], "relevance": relevance,
                   "target": "next token 'x'", "target_value": 1.0, "conservation": conservation,
                   "relevance_shares": {"first_token": abs(relevance[0]) / total,
                                        "special_tokens": sum(abs(relevance[i]) for i in special) / total,
                                        "special_positions": list(special)}}
    if rank is not None:
        explanation["answer_rank"] = rank
    return {"id": row_id, "prompt": "p", "explanation": explanation, "error": None}


ROWS = [row(0, [3.0, 1.0], rank=1), row("b", [1.0, -1.0, 2.0], rank=7, special=[0]), row(2, [0.5, 0.5], rank=1),
        {"id": 3, "prompt": "", "explanation": None, "error": "ValueError: empty"}, row(4, [1.0, 3.0], rank=12)]


def test_summary_counts_shares_and_ranks():
    summary = dataset_summary(ROWS)
    assert summary["rows"] == 5 and summary["explained"] == 4
    assert summary["errors"] == [{"id": 3, "error": "ValueError: empty", "position": 3}]
    first = [0.75, 0.25, 0.5, 0.25]
    assert summary["first_token_share"]["mean"] == pytest.approx(statistics.fmean(first))
    assert summary["first_token_share"]["median"] == pytest.approx(0.375)
    assert (summary["first_token_share"]["min"], summary["first_token_share"]["max"]) == (0.25, 0.75)
    assert summary["special_token_share"]["max"] == pytest.approx(0.25)
    ranks = summary["answer_ranks"]
    assert (ranks["count"], ranks["mean"], ranks["median"], ranks["top1"]) == (4, 5.25, 4.0, 0.5)
    assert ranks["histogram"] == {"1": 2, "2-5": 0, "6-10": 1, ">10": 1}


def test_report_page_lists_errors_and_leaves_special_tokens_off_the_scale_on_request():
    page = report_html(ROWS, title="run <1>", limit=4)
    assert "run &lt;1&gt;" in page and page.count("<section class='row'") == 4 and "(1 more rows not shown)" in page
    assert "<a href='#row-3'>3</a>: ValueError: empty" in page and "ranked first 50.0%" in page
    assert "dashed" not in page
    scaled = report_html(ROWS, exclude_special=True)
    assert scaled.count("outline:1px dashed") == 1  # the special token of row "b"


def test_a_summary_without_rows_with_targets_has_no_ranks():
    summary = dataset_summary([row(0, [1.0, 1.0])])
    assert summary["answer_ranks"]["count"] == 0 and summary["answer_ranks"]["mean"] is None
    assert "answer-ranks" not in report_html([row(0, [1.0, 1.0])])
