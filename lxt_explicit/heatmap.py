"""Token heatmaps: coloured terminal text, self-contained HTML and PNG.

Colours are diverging and symmetric around zero: white for no relevance, red for positive and
blue for negative relevance, with the strongest colour at the largest absolute relevance.
Raw tokenizer pieces are cleaned for display first (:func:`clean_tokens`); pass the tokenizer's own
decoding (:attr:`lxt_explicit.explanation.Explanation.token_texts`) with ``clean=False``.
"""

from __future__ import annotations

import codecs
import html as html_lib
from pathlib import Path
from types import MappingProxyType
from typing import Sequence

import torch

__all__ = ["clean_tokens", "colour", "terminal_heatmap", "html_heatmap", "png_heatmap"]

_SPACE_MARKERS = MappingProxyType({"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "č": "\r"})


def _byte_level_alphabet() -> MappingProxyType:
    """Character -> byte of byte-level BPE (GPT-2): printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, soft hyphen) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
    return MappingProxyType(table)


_BYTE_OF = _byte_level_alphabet()
_SHIFTED = frozenset(chr(c) for c in range(256, 256 + 68))


def clean_tokens(tokens: Sequence[str]) -> list[str]:
    """Display strings of raw tokenizer pieces (prefer the tokenizer's own decoding where there is one).

    Byte-level BPE pieces are decoded from their bytes (``'Ġthe'`` -> ``' the'``, ``'Ċ'`` -> newline,
    ``'ĠcafÃ©'`` -> ``' café'``; a character split over several pieces is shown once, with the piece
    that completes it), SentencePiece (``'▁the'`` -> ``' the'``) and WordPiece continuations
    (``'##ing'`` -> ``'ing'``; other WordPiece tokens get a leading space) are handled; special
    tokens stay as they are.  Pieces are read as byte-level BPE when one of them has a character
    that only byte-level BPE writes (U+0100 to U+0143, e.g. ``'Ġ'``) and all of them together are
    valid UTF-8 bytes.
    """
    if any(t.startswith("##") for t in tokens):
        return _clean_wordpiece(tokens)
    if _is_byte_level(tokens):
        return _decode_byte_level(tokens)
    cleaned = []
    for token in tokens:
        text = token.replace("▁", " ")
        for marker, replacement in _SPACE_MARKERS.items():
            text = text.replace(marker, replacement)
        cleaned.append(text)
    return cleaned


def _clean_wordpiece(tokens: Sequence[str]) -> list[str]:
    return [
        token[2:] if token.startswith("##") else token if index == 0 or token.startswith("[") else " " + token
        for index, token in enumerate(tokens)
    ]


def _is_byte_level(tokens: Sequence[str]) -> bool:
    if not any(_SHIFTED.intersection(token) for token in tokens):
        return False
    pieces = [token for token in tokens if all(c in _BYTE_OF for c in token)]
    try:
        b"".join(bytes(_BYTE_OF[c] for c in token) for token in pieces).decode("utf-8")
    except UnicodeDecodeError as error:
        return error.reason == "unexpected end of data"  # only the last character is incomplete
    return True


def _decode_byte_level(tokens: Sequence[str]) -> list[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    cleaned = []
    for token in tokens:
        if all(c in _BYTE_OF for c in token):
            cleaned.append(decoder.decode(bytes(_BYTE_OF[c] for c in token)))
        else:  # an added token written as text: whatever is pending is incomplete
            cleaned.append(decoder.decode(b"", final=True) + token)
            decoder.reset()
    if cleaned:
        cleaned[-1] += decoder.decode(b"", final=True)
    return cleaned


def _as_list(relevance) -> list[float]:
    if isinstance(relevance, torch.Tensor):
        return relevance.detach().float().cpu().tolist()
    return [float(r) for r in relevance]


def colour(value: float, scale: float) -> tuple[int, int, int]:
    """RGB colour of ``value`` on a diverging scale from ``-scale`` (blue) through 0 (white) to ``scale`` (red)."""
    if scale <= 0 or value != value:
        return (255, 255, 255)
    t = max(-1.0, min(1.0, value / scale))
    fade = int(round(255 * (1 - abs(t))))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def _scale(values: list[float]) -> float:
    return max((abs(v) for v in values), default=0.0)


def terminal_heatmap(tokens: Sequence[str], relevance, *, clean: bool = True) -> str:
    """The tokens as text with 24-bit ANSI background colours (newlines kept)."""
    values = _as_list(relevance)
    scale = _scale(values)
    texts = clean_tokens(tokens) if clean else list(tokens)
    parts = []
    for text, value in zip(texts, values):
        r, g, b = colour(value, scale)
        for i, line in enumerate(text.split("\n")):
            if i:
                parts.append("\x1b[0m\n")
            if line:
                parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{line}\x1b[0m")
    return "".join(parts)


def html_heatmap(
    tokens: Sequence[str],
    relevance,
    *,
    title: str = "Relevance",
    subtitle: str = "",
    fragment: bool = False,
    clean: bool = True,
) -> str:
    """The tokens on coloured backgrounds as HTML; hovering a token shows its position and value.

    Parameters
    ----------
    tokens : sequence of str
        Tokenizer pieces (cleaned for display here), or display texts with ``clean=False``.
    relevance : tensor or sequence of float
        One value per token.
    title, subtitle : str
        Heading and a line below it.
    fragment : bool
        Return a ``<div>`` with inline styles only (for notebooks and other pages) instead of a
        self-contained page.
    clean : bool
        Clean ``tokens`` with :func:`clean_tokens` (``False``: they are display texts already).
    """
    values = _as_list(relevance)
    scale = _scale(values)
    spans = []
    for index, (text, value) in enumerate(zip(clean_tokens(tokens) if clean else list(tokens), values)):
        r, g, b = colour(value, scale)
        escaped = html_lib.escape(text).replace("\n", "<br>")
        label = html_lib.escape(repr(tokens[index]))
        spans.append(
            f'<span class="token" data-position="{index}" data-label="{label}" data-relevance="{value!r}" '
            f'style="background:rgb({r},{g},{b});color:#000;white-space:pre-wrap" '
            f'title="#{index} {label}: {value:.6g}">{escaped}</span>'
        )
    legend = f"colour scale: blue = -{scale:.4g}, white = 0, red = +{scale:.4g}; hover a token for its relevance"
    body = (
        f"<h3>{html_lib.escape(title)}</h3>" if title else ""
    ) + (f"<p>{html_lib.escape(subtitle)}</p>" if subtitle else "") + (
        f"<p style='color:#555;font-size:90%'>{html_lib.escape(legend)}</p>"
        f"<div style='line-height:1.9;font-family:sans-serif'>{''.join(spans)}</div>"
    )
    if fragment:
        return f"<div>{body}</div>"
    return page(title, body + HOVER_BOX + f"<script>{HOVER_SCRIPT}</script>")


#: The element that shows the hovered token's relevance (``id="hover-value"``), and the script that fills it
#: from the ``data-position``, ``data-label`` and ``data-relevance`` attributes of elements of class ``token``.
HOVER_BOX = (
    "<div id='hover-value' style='position:sticky;bottom:0;background:#f4f4f4;border-top:1px solid #ccc;"
    "padding:0.3em;font-family:monospace;min-height:1.2em'>hover a token</div>"
)
HOVER_SCRIPT = """
document.addEventListener('mouseover', function (event) {
  var token = event.target.closest('.token');
  if (!token || token.dataset.relevance === undefined) return;
  var value = Number(token.dataset.relevance);
  var shown = isFinite(value) ? value.toPrecision(6) : token.dataset.relevance;
  document.getElementById('hover-value').textContent =
    '#' + token.dataset.position + ' ' + token.dataset.label + ': ' + shown;
});
"""


def page(title: str, body: str) -> str:
    """A self-contained HTML page (UTF-8) with ``body``."""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html_lib.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def png_heatmap(
    tokens: Sequence[str],
    relevance,
    path: str | Path,
    *,
    title: str = "",
    width: float = 10.0,
    font_size: int = 11,
    clean: bool = True,
) -> Path:
    """Render the heatmap to a PNG file with matplotlib (``pip install matplotlib``) and return its path.

    ``tokens`` are cleaned with :func:`clean_tokens` unless ``clean=False`` (display texts).
    Characters that the monospace font lacks (emoji; CJK without a CJK font installed) are drawn as
    boxes, and matplotlib warns about them; the HTML heatmap shows every character.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("png_heatmap needs matplotlib: pip install matplotlib") from error
    values = _as_list(relevance)
    scale = _scale(values)
    texts = [t.replace("\t", " ") for t in (clean_tokens(tokens) if clean else tokens)]
    dpi = 110
    # a monospace font: every character advances by the same, measured width
    # Figures without pyplot: no global backend or figure state is touched
    probe = Figure(figsize=(width, 1), dpi=dpi)
    sample = probe.text(0, 0, "M" * 50, fontsize=font_size, family="monospace")
    char_px = sample.get_window_extent(FigureCanvasAgg(probe).get_renderer()).width / 50
    line_px = font_size * 1.9 * dpi / 72
    usable_px = width * dpi * 0.96
    layout, x, line = [], 0.0, 0
    for text, value in zip(texts, values):
        for i, piece in enumerate(text.split("\n")):
            if i:
                x, line = 0.0, line + 1
            if not piece:
                continue
            advance = len(piece) * char_px
            if x + advance > usable_px and x > 0:
                x, line = 0.0, line + 1
            layout.append((x, line, piece, value))
            x += advance
    rows = line + 1 + (1 if title else 0) + 2  # title, tokens, blank, legend
    height_px = rows * line_px + 0.2 * dpi
    figure = Figure(figsize=(width, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axis = figure.add_axes([0.02, 0.0, 0.96, 1.0])
    axis.set_axis_off()
    axis.set_xlim(0, usable_px)
    axis.set_ylim(height_px, 0)
    top = (1.0 if title else 0.0) * line_px + 0.1 * dpi
    if title:
        axis.text(0, 0.6 * line_px, title, fontsize=font_size + 1, fontweight="bold", va="center", family="monospace")
    for x, row, piece, value in layout:
        r, g, b = colour(value, scale)
        y = top + (row + 0.5) * line_px
        axis.add_patch(
            Rectangle(
                (x, y - 0.42 * line_px), len(piece) * char_px, 0.84 * line_px, facecolor=(r / 255, g / 255, b / 255),
                edgecolor="none",
            )
        )
        axis.text(x, y, piece, fontsize=font_size, family="monospace", va="center", ha="left")
    axis.text(0, top + (line + 2) * line_px, f"blue = -{scale:.3g}   white = 0   red = +{scale:.3g}",
              fontsize=font_size - 2, color="#555555", family="monospace", va="center")
    path = Path(path)
    figure.savefig(path, dpi=dpi)
    return path
