"""The HTML pages in a real browser (chromium through Playwright, see tests/browser.py): no console
errors, the hovered token's value shown on the page, the colours of the most and least relevant tokens."""

import json

import pytest
import tiny_language_model as tlm
import torch
from browser import background, browser, browser_page, hover_value  # noqa: F401 - fixtures

from lxt_explicit.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tlm.model(dtype=torch.float32).save_pretrained(folder)
    tlm.tokenizer().save_pretrained(folder)
    return folder


def expected_colour(value: float, scale: float) -> tuple[int, int, int]:
    """The diverging scale written out: white at 0, pure red at +scale, pure blue at -scale."""
    fade = round(255 * (1 - abs(value) / scale))
    return (255, fade, fade) if value >= 0 else (fade, fade, 255)


def check_tokens(page, errors, values, scope="body"):
    """Hover the most relevant token of ``scope`` and check the shown value and the colours of the extremes."""
    shown = page.eval_on_selector_all(f"{scope} [data-relevance]", "spans => spans.map(s => s.dataset.relevance)")
    assert [float(v) for v in shown] == pytest.approx(values, rel=1e-5, abs=1e-9)
    most = max(range(len(values)), key=lambda i: abs(values[i]))
    least = min(range(len(values)), key=lambda i: abs(values[i]))
    scale = abs(values[most])
    text = hover_value(page, f"{scope} [data-index='{most}']")
    assert text.startswith(f"#{most} ") and float(text.rsplit(": ", 1)[1]) == pytest.approx(values[most], rel=1e-5)
    assert background(page, f"{scope} [data-index='{most}']") == ((255, 0, 0) if values[most] > 0 else (0, 0, 255))
    got = background(page, f"{scope} [data-index='{least}']")
    assert max(abs(a - b) for a, b in zip(got, expected_colour(values[least], scale))) <= 1
    assert errors == []


def test_the_explanation_page_in_a_browser(tiny_folder, tmp_path, browser_page):  # noqa: F811
    assert main(["explain", "--model", str(tiny_folder), "--prompt", "ingrid named the lake after her mother .",
                 "--max-new-tokens", "4", "--full-continuation", "--output", str(tmp_path), "--no-png"]) == 0
    data = json.loads((tmp_path / "explanation.json").read_text())
    page, errors = browser_page(tmp_path / "explanation.html")
    heading = page.inner_text("h3")
    assert heading.startswith("attnlrp: relevance for the answer") and "\\n" not in heading
    assert page.is_visible("#hover-value")
    check_tokens(page, errors, data["relevance"][: data["prompt_length"]])


def test_the_dataset_report_in_a_browser(tiny_folder, tmp_path, browser_page):  # noqa: F811
    rows = [{"prompt": "ingrid named the lake after her", "target": "mother"}, {"prompt": ""},
            {"prompt": "the capital of france is", "target": "paris", "contrast": "london"},
            {"prompt": "the expedition led by ingrid found blue"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output, report = tmp_path / "out.jsonl", tmp_path / "report.html"
    assert main(["explain-dataset", str(source), "--output", str(output), "--model", str(tiny_folder),
                 "--report", str(report), "--no-progress"]) == 0
    written = [json.loads(line) for line in output.read_text().splitlines()]
    page, errors = browser_page(report)
    assert page.inner_text("#error-count") == "1" and "prompt' must be a non-empty string" in page.inner_text("#errors")
    assert "answer ranks of the 2 rows with a target" in page.inner_text("#answer-ranks")
    assert page.locator("section.row").count() == 4 and page.locator("section.row .row-error").count() == 1
    for index in (0, 2, 3):
        check_tokens(page, errors, written[index]["explanation"]["relevance"], scope=f"#row-{index}")


def test_the_per_token_matrix_page_in_a_browser(tmp_path, browser_page):  # noqa: F811
    from lxt_explicit.per_token import explain_tokens

    matrix = explain_tokens(tlm.model(dtype=torch.float32), tlm.tokenizer(), "ingrid named the lake after her",
                            continuation=" mother . the lake")
    path = tmp_path / "matrix.html"
    path.write_text(matrix.html(), encoding="utf-8")
    page, errors = browser_page(path)
    start = matrix.prompt_length
    assert len(matrix) >= 3 and page.is_visible("#hover-value") and page.is_visible("#row-select")
    check_tokens(page, errors, matrix.relevance[0, :start].tolist(), scope="#row-tokens")
    page.select_option("#row-select", "2")  # a reader picks answer token 2: the tokens before it, scaled for it
    check_tokens(page, errors, matrix.relevance[2, : start + 2].tolist(), scope="#row-tokens")
    page.click("#matrix tr[data-row='1'] th")  # or clicks its row of the table
    assert page.input_value("#row-select") == "1"
    check_tokens(page, errors, matrix.relevance[1, : start + 1].tolist(), scope="#row-tokens")
    cell = page.locator("#matrix tr[data-row='1'] td[data-relevance]").first
    cell.hover()
    assert page.inner_text("#hover-value").startswith("#0 ") and "(for answer token" in page.inner_text("#hover-value")
