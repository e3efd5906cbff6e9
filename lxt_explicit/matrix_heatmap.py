"""Heatmaps of a per-token relevance matrix (:class:`lxt_explicit.per_token.TokenMatrix`): HTML and PNG.

The HTML page has a selector of the answer token (one row of the matrix), shows the tokens before
it coloured by their relevance for it (the same diverging colours as
:func:`lxt_explicit.heatmap.html_heatmap`, scaled per row), the whole matrix as a table, and an
element ``id="hover-value"`` that shows the relevance of the hovered token or cell (each carries
its value in ``data-relevance``).  The PNG is the matrix as an image, rows = answer tokens.
"""

from __future__ import annotations

import html as html_lib
import json
import math
from pathlib import Path

from .heatmap import colour, html_page

__all__ = ["html_matrix_heatmap", "png_matrix_heatmap"]

_SCRIPT = """
var data = JSON.parse(document.getElementById('matrix-data').textContent);
function shade(value, scale) {
  if (!(scale > 0) || !isFinite(value)) return 'rgb(255,255,255)';
  var t = Math.max(-1, Math.min(1, value / scale)), fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? 'rgb(255,' + fade + ',' + fade + ')' : 'rgb(' + fade + ',' + fade + ',255)';
}
function showRow(row) {
  var values = data.relevance[row], end = data.prompt_length + row, scale = 0;
  for (var i = 0; i < end; i++) if (values[i] !== null) scale = Math.max(scale, Math.abs(values[i]));
  document.querySelectorAll('#row-tokens .token').forEach(function (span) {
    var i = Number(span.dataset.position), before = i < end;
    if (before) span.dataset.relevance = String(values[i]); else delete span.dataset.relevance;
    span.style.background = before ? shade(values[i], scale) : 'transparent';
    span.style.color = before || i === end ? '#000' : '#aaa';
    span.style.outline = i === end ? '2px solid #333' : 'none';
  });
  document.getElementById('row-select').value = String(row);
  document.querySelectorAll('#matrix tr[data-row]').forEach(function (tr) {
    tr.style.outline = Number(tr.dataset.row) === row ? '2px solid #333' : 'none';
  });
}
document.getElementById('row-select').addEventListener('change', function (e) { showRow(Number(e.target.value)); });
document.querySelectorAll('#matrix tr[data-row]').forEach(function (tr) {
  tr.addEventListener('click', function () { showRow(Number(tr.dataset.row)); });
});
showRow(0);
"""


def _finite(values: list[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def _label(text: str) -> str:
    return html_lib.escape(repr(text))


def html_matrix_heatmap(matrix, *, title: str = "Relevance per answer token") -> str:
    """A self-contained HTML page of ``matrix`` (a :class:`~lxt_explicit.per_token.TokenMatrix`).

    Choose an answer token with the selector (``id="row-select"``) or by clicking its row of the
    table (``id="matrix"``); the tokens before it (``id="row-tokens"``) are coloured by their
    relevance for it, the token itself is outlined.  Hovering a token or a cell shows its value in
    the element ``id="hover-value"``.
    """
    rows = matrix.relevance.detach().double().tolist()
    texts = list(matrix.token_texts)
    prompt_length = matrix.prompt_length
    options = "".join(
        f'<option value="{t}">{t}: {html_lib.escape(repr(texts[prompt_length + t]))}</option>' for t in range(len(rows))
    )
    spans = "".join(_row_span(i, text, rows[0] if rows else [], prompt_length) for i, text in enumerate(texts))
    data = json.dumps({"relevance": [_finite(r) for r in rows], "prompt_length": prompt_length})
    body = (
        f"<h3>{html_lib.escape(title)}</h3>"
        f"<p>{html_lib.escape(f'{matrix.method}, {len(rows)} answer tokens: {matrix.answer_text!r}')}</p>"
        f"<label>answer token <select id='row-select'>{options}</select></label>"
        "<p style='color:#555;font-size:90%'>red = positive, blue = negative relevance for the chosen (outlined) "
        "token, scaled per row; grey: later tokens. Hover a token for its relevance.</p>"
        f"<div id='row-tokens' style='line-height:1.9'>{spans}</div>"
        f"<h4>All rows</h4>{_table(rows, texts, prompt_length)}"
        f"<script type='application/json' id='matrix-data'>{data.replace('</', '<' + chr(92) + '/')}</script>"
        f"<script>{_SCRIPT}</script>"
    )
    return html_page(title, body)


def _row_span(position: int, text: str, row: list[float], end: int) -> str:
    """A token of the row view, coloured for the first row (the page's script recolours it for the chosen one)."""
    style = "white-space:pre-wrap"
    value = ""
    if position < end:
        scale = max((abs(v) for v in row[:end] if math.isfinite(v)), default=0.0)
        r, g, b = colour(row[position], scale)
        style += f";background:rgb({r},{g},{b})"
        value = f' data-relevance="{row[position]!r}"'
    return (f'<span class="token" data-position="{position}" data-index="{position}" '
            f'data-text="{html_lib.escape(text)}" data-note=""{value} '
            f'style="{style}">{html_lib.escape(text).replace(chr(10), "<br>")}</span>')


def _table(rows: list[list[float]], texts: list[str], prompt_length: int) -> str:
    """The matrix as a table: one row per answer token, one cell per token before it; one colour scale."""
    scale = max((abs(v) for t, row in enumerate(rows) for v in row[: prompt_length + t] if math.isfinite(v)), default=0)
    header = "".join(f"<th title='{_label(text)}'>{i}</th>" for i, text in enumerate(texts[:-1]))
    lines = []
    for t, row in enumerate(rows):
        end = prompt_length + t
        cells = []
        for i, value in enumerate(row[:-1]):
            if i >= end:
                cells.append("<td></td>")
                continue
            r, g, b = colour(value, scale)
            cells.append(
                f'<td class="token" data-position="{i}" data-index="{i}" data-note=" (for answer token #{end})" '
                f'data-text="{html_lib.escape(texts[i])}" '
                f'data-relevance="{value!r}" style="background:rgb({r},{g},{b})"></td>'
            )
        lines.append(f"<tr data-row='{t}' style='cursor:pointer'><th>{html_lib.escape(repr(texts[end]))}</th>"
                     f"{''.join(cells)}</tr>")
    return (
        "<table id='matrix' style='border-collapse:collapse;font-size:70%'>"
        "<style>#matrix td{width:0.9em;height:0.9em;padding:0}#matrix th{font-weight:normal;text-align:right}</style>"
        f"<tr><th></th>{header}</tr>{''.join(lines)}</table>"
    )


def png_matrix_heatmap(matrix, path: str | Path, *, title: str = "", cell: float = 0.22, font_size: int = 7) -> Path:
    """Draw ``matrix`` as an image with matplotlib (rows: answer tokens; columns: all tokens) and return the path.

    One diverging colour scale for the whole matrix (blue negative, white zero, red positive); the
    positions from each row's own token on (which get no relevance) are grey.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("png_matrix_heatmap needs matplotlib: pip install matplotlib") from error
    import numpy as np

    values = matrix.relevance.detach().double().numpy().copy()
    answer, length = values.shape
    later = np.arange(length)[None, :] >= matrix.prompt_length + np.arange(answer)[:, None]
    finite = values[~later & np.isfinite(values)]
    scale = float(np.abs(finite).max()) if finite.size else 0.0
    values[later] = np.nan
    colours = ListedColormap([[c / 255 for c in colour(v, 1.0)] for v in np.linspace(-1, 1, 255)]).with_extremes(
        bad=(0.85, 0.85, 0.85))
    labels = [repr(t)[1:-1] for t in matrix.token_texts]
    figure = Figure(figsize=(2.0 + cell * length, 1.5 + cell * answer), dpi=110)
    FigureCanvasAgg(figure)
    axis = figure.add_axes([0.15, 0.25, 0.8, 0.65])
    image = axis.imshow(values, cmap=colours, vmin=-scale or -1, vmax=scale or 1, aspect="auto",
                        interpolation="nearest")
    axis.set_xticks(range(length), labels, rotation=90, fontsize=font_size, family="monospace")
    axis.set_yticks(range(answer), labels[matrix.prompt_length :], fontsize=font_size, family="monospace")
    axis.set_xlabel("relevance of token", fontsize=font_size + 1)
    axis.set_ylabel("for answer token", fontsize=font_size + 1)
    if title:
        axis.set_title(title, fontsize=font_size + 2)
    figure.colorbar(image, ax=axis, fraction=0.03)
    path = Path(path)
    figure.savefig(path, bbox_inches="tight")
    return path
