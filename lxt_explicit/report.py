"""One HTML page for a dataset run: a summary and every row's heatmap.

:func:`dataset_summary` condenses the output rows of :func:`lxt_explicit.dataset.explain_dataset`
(or of :func:`~lxt_explicit.dataset.explain_rows`): how many rows were explained or failed, the
share of the absolute relevance on the first token and on special tokens (the attention sinks,
:mod:`lxt_explicit.sinks`), the conservation, and, where rows had a target, the ranks of the target
answers among the model's next-token logits.  :func:`write_report` writes that summary, the
errors and every row's heatmap (hover a token for its value) as one self-contained page.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Iterable, Mapping

from .heatmap import html_page, html_tokens

__all__ = ["dataset_summary", "report_html", "write_report"]


def _mean_median(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"count": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def dataset_summary(rows: Iterable[Mapping]) -> dict:
    """Counts and statistics of a dataset run's output rows.

    Returns
    -------
    dict
        ``rows``, ``explained``, ``errors`` (a list of ``{'id', 'error', 'position'}``, the position
        in ``rows``), ``first_token_share`` and ``special_token_share`` (count, mean, median, min,
        max of the per-row shares of absolute relevance, see :mod:`lxt_explicit.sinks`),
        ``conservation`` (the same statistics), and
        ``answer_ranks``: for rows with a target, the count, mean and median rank (1 = the model's
        most likely next token), the fraction ranked first, and a histogram
        ``{'1': n, '2-5': n, '6-10': n, '>10': n}``.
    """
    rows = list(rows)
    explained = [row["explanation"] for row in rows if row.get("explanation")]
    shares = [e.get("relevance_shares") or {} for e in explained]
    ranks = [e["answer_rank"] for e in explained if e.get("answer_rank") is not None]
    histogram = {"1": 0, "2-5": 0, "6-10": 0, ">10": 0}
    for rank in ranks:
        histogram["1" if rank == 1 else "2-5" if rank <= 5 else "6-10" if rank <= 10 else ">10"] += 1
    return {
        "rows": len(rows),
        "explained": len(explained),
        "errors": [{"id": row.get("id"), "error": row["error"], "position": position}
                   for position, row in enumerate(rows) if row.get("error")],
        "first_token_share": _mean_median([s.get("first_token") for s in shares]),
        "special_token_share": _mean_median([s.get("special_tokens") for s in shares]),
        "conservation": _mean_median([e.get("conservation") for e in explained]),
        "answer_ranks": {
            "count": len(ranks),
            "mean": statistics.fmean(ranks) if ranks else None,
            "median": statistics.median(ranks) if ranks else None,
            "top1": sum(r == 1 for r in ranks) / len(ranks) if ranks else None,
            "histogram": histogram,
        },
    }


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _statistic_row(name: str, stats: dict) -> str:
    cells = "".join(f"<td>{_number(stats[key])}</td>" for key in ("mean", "median", "min", "max"))
    return f"<tr><th>{html.escape(name)}</th><td>{stats['count']}</td>{cells}</tr>"


def _summary_html(summary: dict) -> str:
    ranks = summary["answer_ranks"]
    parts = [
        f"<p id='counts'>{summary['rows']} rows: {summary['explained']} explained, "
        f"<span id='error-count'>{len(summary['errors'])}</span> with an error.</p>",
        "<table id='shares' border='1' cellpadding='4' style='border-collapse:collapse'>"
        "<tr><th></th><th>rows</th><th>mean</th><th>median</th><th>min</th><th>max</th></tr>",
        _statistic_row("relevance share on the first token", summary["first_token_share"]),
        _statistic_row("relevance share on special tokens", summary["special_token_share"]),
        _statistic_row("conservation (relevance at the inputs / explained value)", summary["conservation"]),
        "</table>",
        "<p style='color:#555;font-size:90%'>share = |relevance of the token(s)| / sum of |relevance| over all "
        "tokens of the row</p>",
    ]
    if ranks["count"]:
        histogram = ", ".join(f"rank {k}: {v}" for k, v in ranks["histogram"].items())
        parts.append(
            f"<p id='answer-ranks'>answer ranks of the {ranks['count']} rows with a target (1 = the model's most "
            f"likely next token): mean {_number(ranks['mean'], 2)}, median {_number(ranks['median'], 1)}, "
            f"ranked first {_number(100 * ranks['top1'], 1)}%; {histogram}</p>"
        )
    if summary["errors"]:
        items = "".join(f"<li><a href='#row-{e['position']}'>{html.escape(json.dumps(e['id']))}</a>: "
                        f"{html.escape(e['error'])}</li>" for e in summary["errors"])
        parts.append(f"<h3>Errors</h3><ul id='errors'>{items}</ul>")
    return "".join(parts)


def _row_html(position: int, row: Mapping, exclude_special: bool) -> str:
    row_id = row.get("id")
    head = f"<h4>row {html.escape(json.dumps(row_id, ensure_ascii=False))}</h4>"
    explanation = row.get("explanation")
    if not explanation:
        body = f"<p class='row-error' style='color:#a00'>error: {html.escape(str(row.get('error')))}</p>"
        return f"<section class='row' id='row-{position}'>{head}{body}</section>"
    shares = explanation.get("relevance_shares") or {}
    facts = [html.escape(explanation.get("target", "")),
             f"value {_number(explanation.get('target_value'))}",
             f"conservation {_number(explanation.get('conservation'))}",
             f"first-token share {_number(shares.get('first_token'))}"]
    if explanation.get("answer_rank") is not None:
        facts.append(f"answer rank {explanation['answer_rank']}")
    excluded = frozenset(shares.get("special_positions") or ()) if exclude_special else frozenset()
    values = [float("nan") if v is None else v for v in explanation["relevance"]]
    tokens = html_tokens(explanation["token_texts"], values, excluded=excluded)
    return (f"<section class='row' id='row-{position}'>{head}"
            f"<p style='color:#333'>{'; '.join(facts)}</p>{tokens}</section>")


def report_html(rows: Iterable[Mapping], *, title: str = "Explanations", exclude_special: bool = False,
                limit: int | None = None) -> str:
    """The report page: summary, errors and the heatmaps of the first ``limit`` rows (default: all).

    Each row's section has the id ``row-N`` (``N``: its position in ``rows``); the errors link to them.

    Parameters
    ----------
    rows : iterable of mapping
        Output rows of a dataset run (:func:`lxt_explicit.dataset.read_rows`).
    title : str
        Heading of the page.
    exclude_special : bool
        Leave special tokens (``relevance_shares['special_positions']``) out of each heatmap's colour
        scale (they keep their values, shown on hover).
    limit : int, optional
        Show the heatmaps of only this many rows (the summary covers all).
    """
    rows = list(rows)
    summary = dataset_summary(rows)
    shown = rows if limit is None else rows[:limit]
    sections = "".join(_row_html(position, row, exclude_special) for position, row in enumerate(shown))
    more = "" if len(shown) == len(rows) else f"<p>({len(rows) - len(shown)} more rows not shown)</p>"
    body = (f"<h2>{html.escape(title)}</h2><h3>Summary</h3>{_summary_html(summary)}"
            f"<h3>Rows</h3>{sections}{more}")
    return html_page(title, body)


def write_report(rows: Iterable[Mapping], path, **options) -> Path:
    """Write :func:`report_html` of ``rows`` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(rows, **options), encoding="utf-8")
    return path
