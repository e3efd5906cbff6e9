"""The default model's one-time conversion and loading: progress output, folder checks."""

import io
import shutil

import pytest
import tiny_language_model as tlm
import torch
from conftest import skip_without_smollm2

from lxt_explicit.models.smollm2 import FOLDER_NAME, load_pretrained, progress_style, smollm2_folder


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Closed(io.StringIO):
    def isatty(self):
        raise ValueError("I/O operation on closed file")


def test_progress_bar_only_on_a_terminal():
    assert progress_style(True, Terminal()) == "bar"
    assert progress_style(True, io.StringIO()) == "lines"  # a log file, a pipe, CI
    assert progress_style(True, Closed()) == "lines"
    assert progress_style(True, object()) == "lines"  # no isatty at all
    assert progress_style(False, Terminal()) == "off"


@pytest.mark.real_model
@pytest.mark.slow
def test_conversion_writes_one_line_per_stage_when_stderr_is_not_a_terminal(tmp_path, capfd):
    skip_without_smollm2()
    folder = smollm2_folder(tmp_path)
    err = capfd.readouterr().err
    assert folder == tmp_path / FOLDER_NAME and (folder / "config.json").is_file()
    lines = err.splitlines()
    assert "\r" not in err and "it/s" not in err and "%|" not in err, err[:500]  # no progress bar redraws
    assert [line.split(":")[0] for line in lines] == ["lxt_explicit"] * 5, lines
    assert "converting" in lines[0] and "dequantizing" in lines[2] and lines[-1].startswith("lxt_explicit: saved to")
    assert smollm2_folder(tmp_path) == folder and capfd.readouterr().err == ""  # converted once


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tlm.model(dtype=torch.float32).save_pretrained(folder)
    tlm.tokenizer().save_pretrained(folder)
    return folder


def test_load_pretrained_names_what_a_folder_lacks(tiny_folder, tmp_path):
    model, tokenizer = load_pretrained(tiny_folder)
    assert model.config.vocab_size == len(tlm.WORDS) and not model.training and tokenizer.pad_token == "<pad>"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_pretrained(tmp_path / "file")
    for missing, message in [("model.safetensors", "has no weights"), ("tokenizer.json", "has no tokenizer files"),
                             ("config.json", "has no config.json")]:
        folder = tmp_path / missing
        shutil.copytree(tiny_folder, folder)
        (folder / missing).unlink()
        if missing == "tokenizer.json":
            (folder / "tokenizer_config.json").unlink()
        with pytest.raises(FileNotFoundError, match=message):
            load_pretrained(folder)
