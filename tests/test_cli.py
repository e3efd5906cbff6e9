"""The command line, end to end, on a tiny model folder (fast) and on the default model (real_model)."""

import json
import shutil

import pytest
import tiny_language_model as tlm
import torch
import transformers
from conftest import skip_without_smollm2

import lxt_explicit
import lxt_explicit.explain
from lxt_explicit.cli import main
from lxt_explicit.stabilizer import DEFAULT_EPSILON


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


def test_explain_with_the_sink_preset(tiny_folder, tmp_path):
    relevance = {}
    for method in ("attnlrp", "attnlrp_sinks"):
        code = main(["explain", "--model", str(tiny_folder), "--prompt", "the capital of france is", "--target",
                     " paris", "--output", str(tmp_path / method), "--method", method, "--no-png"])
        assert code == 0
        data = json.loads((tmp_path / method / "explanation.json").read_text())
        assert data["method"] == method
        relevance[method] = data["relevance"]
    # the tiny model has no beginning-of-sequence token: its first token is a word, which keeps the paper's rules
    # (tests/test_bos_sink.py: the gate after a BOS token)
    assert relevance["attnlrp_sinks"] == relevance["attnlrp"] and relevance["attnlrp"][0] != 0.0


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


def test_missing_model_folder_is_explained(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path / "nothing"), "--prompt", "x", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nothing does not exist" in err and "save_pretrained" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("byte_level")
    tokenizer = tlm.byte_level_tokenizer()
    tlm.model(dtype=torch.float32, vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def strict_json(path):
    """The file parsed as strict JSON: NaN and Infinity, which json.dumps writes by default, are errors."""

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_non_ascii_text_is_shown_as_decoded_everywhere(byte_level_folder, tmp_path, capsys):
    code = main(["explain", "--model", str(byte_level_folder), "--prompt", "the café 😀 über", "--target", " café",
                 "--output", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    heatmap = out.split("most relevant tokens")[0]
    assert "café" in heatmap and "😀" in heatmap and "Ã" not in out and "ð" not in out and "�" not in out
    data = strict_json(tmp_path / "explanation.json")
    assert "".join(data["token_texts"]) == "the café 😀 über café" and data["answer"] == "café"
    assert "ĠcafÃ©" in data["tokens"]  # the raw pieces are kept too
    html = (tmp_path / "explanation.html").read_text(encoding="utf-8")
    assert ">😀</span>" in html and "> café</span>" in html and "Ã" not in html


def test_explanation_json_says_how_to_reproduce_it(tiny_folder, tmp_path):
    arguments = ["explain", "--model", str(tiny_folder), "--prompt", "the capital of france is", "--max-new-tokens",
                 "3", "--output", str(tmp_path), "--method", "cp_lrp", "--no-png", "--dtype", "float64"]
    assert main(arguments) == 0
    data = strict_json(tmp_path / "explanation.json")
    assert data["model"] == {"name": str(tiny_folder), "folder": str(tiny_folder.absolute()), "dtype": "float64",
                             "device": "cpu"}
    assert data["versions"]["lxt_explicit"] == lxt_explicit.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert data["versions"]["transformers"] == transformers.__version__
    assert data["command"] == ["lxt-explicit", *arguments]
    assert data["method"] == "cp_lrp" and data["epsilon"] == DEFAULT_EPSILON
    assert data["prompt"] == "the capital of france is" and data["text"] == "the capital of france is"
    assert data["target"].startswith("continuation") and data["target_ids"] == data["token_ids"][5:]
    relevance = torch.tensor(data["relevance"], dtype=torch.float64).abs()
    assert data["relevance_shares"] == {"first_token": pytest.approx(float(relevance[0] / relevance.sum())),
                                        "special_tokens": 0.0, "special_positions": []}
    assert data["explain_arguments"] == {"prompt": "the capital of france is", "chat": False, "system": None,
                                         "method": "cp_lrp", "epsilon": DEFAULT_EPSILON, "max_new_tokens": 3,
                                         "stop": "sentence"}


def test_explanation_to_dict_is_strict_json():
    result = lxt_explicit.explain.Explanation(
        token_ids=[1, 2], tokens=["a", "b"], relevance=torch.tensor([float("nan"), 1.0]), prompt_length=2,
        target="next token 'c'", target_value=0.0, source_relevance={"embed": torch.tensor([float("inf"), 0.0])},
    )
    data = result.to_dict()
    assert data["conservation"] is None and data["relevance"] == [None, 1.0]
    assert data["source_relevance"]["embed"] == [None, 0.0]
    json.dumps(data, allow_nan=False)


def no_explanation(*args, **kwargs):
    raise AssertionError("the command computed an explanation before it checked its arguments")


def without_weights(tiny_folder, tmp_path):
    folder = tmp_path / "no_weights"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()
    return ["--model", str(folder), "--prompt", "the lake"], "has no weights (none of model.safetensors"


def user_errors(tiny_folder, tmp_path):
    """(arguments, what the message must say) for every user error the command explains."""
    (tmp_path / "a_file").write_text("x")
    empty_context = tmp_path / "empty.txt"
    empty_context.write_text("  \n")
    model = ["--model", str(tiny_folder)]
    return {
        "missing model folder": (["--model", str(tmp_path / "nothing"), "--prompt", "x"], "nothing does not exist"),
        "folder without weights": without_weights(tiny_folder, tmp_path),
        "empty prompt": ([*model, "--prompt", ""], "--prompt is empty; give the text"),
        "blank prompt": ([*model, "--prompt", "  "], "--prompt is empty"),
        "empty question": ([*model, "--context", "a lake", "--question", ""], "--question is empty"),
        "missing context file": ([*model, "--context-file", str(tmp_path / "none.txt"), "--question", "q"],
                                 "none.txt does not exist"),
        "empty context file": ([*model, "--context-file", str(empty_context), "--question", "q"], "empty.txt is empty"),
        "unknown device": ([*model, "--prompt", "x", "--device", "gpu7"], "'gpu7' is not a device"),
        "unavailable device": ([*model, "--prompt", "x", "--device", "cuda:99"], "not available on this machine"),
        "output is a file": ([*model, "--prompt", "x", "--output", str(tmp_path / "a_file")], "a_file is a file"),
        "output inside a file": ([*model, "--prompt", "x", "--output", str(tmp_path / "a_file" / "out")],
                                 "cannot be created because"),
        "zero new tokens": ([*model, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
        "top zero": ([*model, "--prompt", "x", "--top", "0"], "--top: must be at least 1"),
        "top negative": ([*model, "--prompt", "x", "--top", "-3"], "--top: must be at least 1"),
        "top not a number": ([*model, "--prompt", "x", "--top", "many"], "'many' is not a whole number"),
    }


USER_ERRORS = (
    "missing model folder", "folder without weights", "empty prompt", "blank prompt", "empty question",
    "missing context file", "empty context file", "unknown device", "unavailable device", "output is a file",
    "output inside a file", "zero new tokens", "top zero", "top negative", "top not a number",
)


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_are_one_line_exit_code_2_and_come_before_any_work(tiny_folder, tmp_path, capsys, monkeypatch,
                                                                       case):
    cases = user_errors(tiny_folder, tmp_path)
    assert tuple(cases) == USER_ERRORS
    arguments, message = cases[case]
    monkeypatch.setattr(lxt_explicit.explain, "explain", no_explanation)
    output = [] if "--output" in arguments else ["--output", str(tmp_path / "out")]
    assert main(["explain", *arguments, *output]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("lxt-explicit: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_model_that_cannot_answer_is_one_line_too(tiny_folder, tmp_path, capsys):
    prompt = " ".join(["the"] * 300)  # longer than the tiny model's 256 positions
    assert main(["explain", "--model", str(tiny_folder), "--prompt", prompt, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "256 positions" in err and err.count("\n") == 1


def test_the_output_folder_is_checked_before_the_model_is_loaded(tiny_folder, tmp_path, capsys, monkeypatch):
    import lxt_explicit.models.smollm2

    (tmp_path / "taken").write_text("x")
    monkeypatch.setattr(lxt_explicit.models.smollm2, "load_pretrained", no_explanation)
    assert main(["explain", "--model", str(tiny_folder), "--prompt", "x", "--output", str(tmp_path / "taken")]) == 2
    assert "taken is a file" in capsys.readouterr().err


@pytest.mark.real_model
def test_a_raw_prompt_is_explained_up_to_the_end_of_its_answer(tmp_path, capsys):
    skip_without_smollm2()
    assert main(["explain", "--prompt", "The capital of France is", "--output", str(tmp_path), "--no-png"]) == 0
    out = capsys.readouterr().out
    data = strict_json(tmp_path / "explanation.json")
    assert data["answer"] == "Paris." and data["stop_reason"] == "sentence" and len(data["target_ids"]) == 2
    assert data["discarded_text"].startswith("\n") and len(data["discarded_ids"]) > 10
    assert "cut: the answer ends with its first sentence" in out and "--full-continuation" in out
    assert main(["explain", "--prompt", "The capital of France is", "--output", str(tmp_path), "--no-png",
                 "--full-continuation"]) == 0
    full = strict_json(tmp_path / "explanation.json")
    assert full["answer"].startswith("Paris.\n") and len(full["target_ids"]) == 2 + len(data["discarded_ids"])
    assert full["stop_reason"] in ("eos", "max_new_tokens") and "cut:" not in capsys.readouterr().out


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


def test_method_choices_are_the_presets_of_explain():
    import argparse

    from lxt_explicit.cli import _parser
    from lxt_explicit.explain import METHODS

    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    with_method = {name: next(a.choices for a in sub._actions if a.dest == "method")
                   for name, sub in commands.items() if any(a.dest == "method" for a in sub._actions)}
    assert set(with_method) >= {"explain", "audit", "explain-dataset"}
    assert all(set(choices) == set(METHODS) for choices in with_method.values()), with_method
