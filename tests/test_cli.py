"""The command line, end to end, on a tiny model folder (fast) and on the default model (real_model)."""

import json

import pytest

import tiny_language_model as tlm
from conftest import skip_without_smollm2
from lxt_explicit.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tlm.model(dtype=__import__("torch").float32).save_pretrained(folder)
    tlm.tokenizer().save_pretrained(folder)
    return folder


def test_explain_a_prompt_with_a_model_folder(tiny_folder, tmp_path, capsys):
    code = main([
        "explain", "--model", str(tiny_folder), "--prompt", "the capital of france is", "--max-new-tokens", "3",
        "--output", str(tmp_path), "--method", "cp_lrp",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "most relevant tokens" in out and "\x1b[48;2;" in out
    data = json.loads((tmp_path / "explanation.json").read_text())
    assert data["method"] == "cp_lrp" and data["tokens"][:5] == "the capital of france is".split()
    assert (tmp_path / "explanation.png").stat().st_size > 1000
    assert "<span" in (tmp_path / "explanation.html").read_text()


def test_explain_a_given_target_about_a_context(tiny_folder, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text("ingrid named the lake after her mother .")
    code = main([
        "explain", "--model", str(tiny_folder), "--context-file", str(context), "--question", "what did ingrid name ?",
        "--target", " lake", "--output", str(tmp_path / "out"), "--no-png",
    ])
    assert code == 0
    data = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert data["tokens"][-1] == "lake" and not (tmp_path / "out" / "explanation.png").exists()


def test_context_without_question_is_an_error(tiny_folder, tmp_path, capsys):
    assert main(["explain", "--model", str(tiny_folder), "--context", "a lake", "--output", str(tmp_path)]) == 2
    assert "--question" in capsys.readouterr().err


def test_audit_command(tiny_folder, capsys):
    assert main(["audit", "--model", str(tiny_folder), "--text", "the capital of france is"]) == 0
    assert "unhandled: 0" in capsys.readouterr().out


def test_missing_model_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json|does not exist"):
        main(["explain", "--model", str(tmp_path / "nothing"), "--prompt", "x"])


@pytest.mark.real_model
def test_default_command_explains_the_demo_answer(tmp_path, capsys):
    skip_without_smollm2()
    assert main(["explain", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "explanation.json").read_text())
    assert "Solveig" in data["answer"]
    top = out.split("most relevant tokens")[1]
    assert "Solve" in top or "ig" in top
    assert (tmp_path / "explanation.png").stat().st_size > 10000
    assert (tmp_path / "explanation.html").read_text().count("<span") > 100
