"""Token cleaning and the three heatmap formats."""

import re

import torch

from lxt_explicit.heatmap import clean_tokens, colour, html_heatmap, png_heatmap, terminal_heatmap


def test_clean_tokens_of_the_three_tokenizer_families():
    assert clean_tokens(["The", "Ġcapital", "Ċ", "Ġis", "ĉx"]) == ["The", " capital", "\n", " is", "\tx"]
    assert clean_tokens(["▁The", "▁capit", "al", "<s>"]) == [" The", " capit", "al", "<s>"]
    assert clean_tokens(["[CLS]", "the", "capit", "##al", "[SEP]"]) == ["[CLS]", " the", " capit", "al", "[SEP]"]


def test_colours_are_diverging_and_symmetric():
    assert colour(0.0, 2.0) == (255, 255, 255)
    assert colour(2.0, 2.0) == (255, 0, 0) and colour(-2.0, 2.0) == (0, 0, 255)
    r, g, b = colour(1.0, 2.0)
    assert (b, g, r) == colour(-1.0, 2.0)  # mirror image
    assert colour(5.0, 2.0) == (255, 0, 0)  # clipped
    assert colour(1.0, 0.0) == (255, 255, 255)


def test_terminal_heatmap_has_one_colour_per_token_and_keeps_newlines():
    text = terminal_heatmap(["ĠA", "Ċ", "ĠB"], torch.tensor([1.0, 0.0, -1.0]))
    assert "\x1b[48;2;255;0;0m" in text and "\x1b[48;2;0;0;255m" in text and "\n" in text
    assert re.sub(r"\x1b\[[0-9;]*m", "", text) == " A\n B"


def test_html_heatmap_is_self_contained_and_shows_values_on_hover():
    page = html_heatmap(["Ġa", "Ġ<b>"], [0.5, -0.25], title="T")
    assert page.startswith("<!DOCTYPE html>") and "http" not in page
    assert 'title="#0 &#x27; a&#x27;: 0.5"' in page and "&lt;b&gt;" in page
    assert "rgb(255,0,0)" in page and "rgb(127,127,255)" in page or "rgb(128,128,255)" in page


def test_html_fragment_has_no_page_styles_and_explanations_render_in_notebooks():
    fragment = html_heatmap(["Ġa"], [1.0], title="T", fragment=True)
    assert fragment.startswith("<div>") and "<body" not in fragment and "<style" not in fragment


def test_png_heatmap_leaves_matplotlib_global_state_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    png_heatmap(["Ġa", "Ġb"], [1.0, -1.0], tmp_path / "x.png")
    assert matplotlib.get_backend() == backend and plt.get_fignums() == []


def test_png_heatmap_writes_an_image(tmp_path):
    path = png_heatmap(["ĠThe"] * 60 + ["Ċ", "Ġend"], torch.linspace(-1, 1, 62), tmp_path / "h.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_clean_tokens_decodes_byte_level_pieces_and_shows_a_split_character_once():
    # ' café 😀' in GPT-2-style byte-level BPE: é is the bytes C3 A9 ('Ã©'), 😀 is F0 9F 98 80 split over two pieces
    assert clean_tokens(["ĠcafÃ©", "ĠðŁĺ", "Ģ"]) == [" café", " ", "😀"]
    assert clean_tokens(["<|im_start|>", "user", "Ċ", "Ã¼", "ber"]) == ["<|im_start|>", "user", "\n", "ü", "ber"]
    assert clean_tokens(["ĠðŁĺ"]) == [" �"]  # a character that never completes: one replacement character
    # display texts (not byte-level: invalid as bytes) and other tokenizers are left alone
    assert clean_tokens(["Łą", "ka"]) == ["Łą", "ka"]
    assert clean_tokens(["▁café", "▁😀"]) == [" café", " 😀"]


def test_heatmaps_show_display_texts_as_given_with_clean_false():
    texts = [" café", " ", "😀", " Ġ"]  # a literal 'Ġ' in the text is not a space marker
    shown = terminal_heatmap(texts, [1.0, 0.5, -1.0, 0.0], clean=False)
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown) == " café 😀 Ġ"
    page = html_heatmap(texts, [1.0, 0.5, -1.0, 0.0], clean=False)
    assert ">&#x27;" not in page and "> café<" in page and ">😀<" in page and "> Ġ<" in page
    assert re.sub(r"\x1b\[[0-9;]*m", "", terminal_heatmap(["ĠcafÃ©", "ĠðŁĺ", "Ģ"], [1, 0, 1])) == " café 😀"
    assert "> café</span>" in html_heatmap(["ĠcafÃ©"], [1.0])  # shown decoded; the hover names the raw piece


def test_png_heatmap_draws_the_decoded_text(tmp_path):
    values = [1.0, -0.5]
    decoded = png_heatmap([" café", " naïve"], values, tmp_path / "decoded.png", clean=False).read_bytes()
    cleaned = png_heatmap(["ĠcafÃ©", "ĠnaÃ¯ve"], values, tmp_path / "cleaned.png").read_bytes()
    raw = png_heatmap(["ĠcafÃ©", "ĠnaÃ¯ve"], values, tmp_path / "raw.png", clean=False).read_bytes()
    assert decoded == cleaned and decoded != raw


def test_html_tokens_carry_their_values_and_the_page_has_a_hover_box():
    page = html_heatmap(["Ġa", "Ġ<b>"], [0.5, -0.25], title="T")
    assert 'data-relevance="0.5"' in page and 'data-relevance="-0.25"' in page
    assert "id='hover-value'" in page and "<script>" in page and "src=" not in page


def test_line_breaks_in_the_heading_are_kept_not_escaped():
    page = html_heatmap(["Ġa"], [1.0], title="answer:\nParis", subtitle="line one\nline two")
    assert "answer:\nParis" in page and "\\n" not in page.split("<script>")[0]


def test_positions_left_out_of_the_colour_scale_keep_their_values():
    values = [8.0, 1.0, -0.5, 2.0]
    page = html_heatmap(["<s>", "Ġa", "Ġb", "Ġc"], values, exclude_from_scale=[0], fragment=True)
    spans = re.findall(r'<span [^>]*data-relevance="([^"]+)"[^>]*style="background:rgb\((\d+),(\d+),(\d+)\)', page)
    assert [float(v) for v, *_ in spans] == values  # the data is all there
    colours = [tuple(int(c) for c in rgb) for _, *rgb in spans]
    assert colours[0] == (255, 255, 255)  # the sink is not coloured
    assert colours[3] == (255, 0, 0)  # the scale is the largest value of the others: 2
    assert colours[1] == (255, 128, 128) or colours[1] == (255, 127, 127)  # 1 / 2 of the scale
    assert "dashed" in page and "not on the colour scale" in page
    text = terminal_heatmap(["<s>", "Ġa"], [8.0, 1.0], exclude_from_scale=[0])
    assert "\x1b[48;2;255;0;0m\x1b[38;2;0;0;0m a" in text and "\x1b[48;2;255;255;255m\x1b[38;2;0;0;0m<s>" in text


def test_excluded_positions_outside_the_tokens_are_an_error(tmp_path):
    import pytest

    for call in (lambda: html_heatmap(["Ġa"], [1.0], exclude_from_scale=[3]),
                 lambda: terminal_heatmap(["Ġa"], [1.0], exclude_from_scale=[-1]),
                 lambda: png_heatmap(["Ġa"], [1.0], tmp_path / "x.png", exclude_from_scale=[1])):
        with pytest.raises(ValueError, match="outside the 1 tokens"):
            call()
    assert png_heatmap(["Ġa", "Ġb"], [5.0, 1.0], tmp_path / "y.png", exclude_from_scale=[0]).stat().st_size > 1000
