"""Dataset runs: batches equal one row at a time, per-row errors, resume after an interruption, two processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_language_model as tlm
import torch

from lxt_explicit.cli import main
from lxt_explicit.dataset import explain_dataset, explain_rows, read_rows
from lxt_explicit.explain import explain
from lxt_explicit.per_token import explain_tokens
from lxt_explicit.runfiles import complete_lines, drop_partial_line

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"prompt": "the capital of france is"},
    {"prompt": "the capital of", "target": "paris", "id": "q-capital"},
    {"prompt": "ingrid named the lake after her", "source": "notes"},
    {"prompt": "the city", "target": "paris", "contrast": "london"},
    {"prompt": "a river", "target": "paris"},
    {"prompt": "the expedition led by ingrid found", "target": 12},
    {"prompt": "what did ingrid name ?", "continuation": " the lake"},
    {"prompt": "the blue ice", "target": "paris", "contrast": "london"},
]


@pytest.fixture(scope="module")
def tiny():
    return tlm.model(dtype=torch.float32), tlm.tokenizer()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tlm.model(dtype=torch.float32).save_pretrained(folder)
    tlm.tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def close_rows(a, b, tolerance=1e-5):
    """Output rows equal up to float rounding of the relevance (everything else exactly)."""
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert x["error"] == y["error"] and set(x) == set(y)
        assert {k: v for k, v in x.items() if k != "explanation"} == {k: v for k, v in y.items() if k != "explanation"}
        if x["explanation"] is None:
            assert y["explanation"] is None
            continue
        ex, ey = x["explanation"], y["explanation"]
        for key in ("tokens", "token_ids", "target_ids", "answer_rank", "prompt_length"):
            assert ex.get(key) == ey.get(key), key
        torch.testing.assert_close(torch.tensor(ex["relevance"]), torch.tensor(ey["relevance"]), atol=tolerance,
                                   rtol=tolerance)
        assert ex["target_value"] == pytest.approx(ey["target_value"], abs=tolerance)


def test_batches_equal_one_row_at_a_time_and_each_row_equals_explain(tiny):
    model, tokenizer = tiny
    batched = [row for _, row in explain_rows(model, tokenizer, ROWS, batch_size=5)]
    single = [row for _, row in explain_rows(model, tokenizer, ROWS, batch_size=1)]
    close_rows(batched, single)
    assert [r["id"] for r in batched] == [0, "q-capital", 2, 3, 4, 5, 6, 7]
    assert batched[2]["source"] == "notes" and all(r["error"] is None for r in batched)
    for row, out in zip(ROWS, batched):
        request = {k: row[k] for k in ("target", "contrast", "continuation") if k in row}
        reference = explain(model, tokenizer, row["prompt"], **request)
        torch.testing.assert_close(torch.tensor(out["explanation"]["relevance"]), reference.relevance,
                                   atol=1e-5, rtol=1e-5)
        assert out["explanation"]["target"] == reference.target


def test_answer_ranks_and_sink_shares_match_literal_formulas(tiny):
    model, tokenizer = tiny
    rows = [row for _, row in explain_rows(model, tokenizer, ROWS, batch_size=4)]
    for row, out in zip(ROWS, rows):
        explanation = out["explanation"]
        relevance = torch.tensor(explanation["relevance"], dtype=torch.float64)
        shares = explanation["relevance_shares"]
        assert shares["first_token"] == pytest.approx(float(relevance[0].abs() / relevance.abs().sum()))
        assert shares["special_tokens"] == 0.0 and shares["special_positions"] == []  # no special tokens here
        if "target" not in row:
            assert "answer_rank" not in explanation
            continue
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        target = explanation["target_ids"][0]
        assert explanation["answer_rank"] == 1 + sum(float(v) > float(logits[target]) for v in logits)


def test_a_row_that_fails_records_its_error_and_the_run_goes_on(tiny):
    model, tokenizer = tiny
    rows = [
        {"prompt": "the lake"},
        {"prompt": ""},
        "not a row",
        {"prompt": "the lake", "target": "paris lake"},
        {"prompt": " ".join(["the"] * 300)},  # longer than the model's 256 positions
        {"prompt": "the city", "target": "paris", "contrast": "paris"},
        {"prompt": "a river", "target": "paris"},
    ]
    out = [row for _, row in explain_rows(model, tokenizer, rows, batch_size=4)]
    errors = [row["error"] for row in out]
    assert errors[0] is None and errors[-1] is None and out[-1]["explanation"]["answer_rank"] >= 1
    assert errors[1] == "ValueError: the row's 'prompt' must be a non-empty string, got ''"
    assert "must be a mapping with a 'prompt'" in errors[2] and out[2]["input"] == "not a row"
    assert errors[3].startswith("ValueError: target 'paris lake' is 2 tokens")
    assert "positions" in errors[4] and "shorten the prompt" in errors[4]
    assert "contrast and target are the same token" in errors[5]
    assert all(row["explanation"] is None for row in out[1:6])


def test_bad_options_and_duplicate_ids_stop_before_any_row(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="same id 'a'"):
        list(explain_rows(model, tokenizer, [{"prompt": "x", "id": "a"}, {"prompt": "y", "id": "a"}]))
    with pytest.raises(ValueError, match="come from each row"):
        list(explain_rows(model, tokenizer, ROWS, target="paris"))
    with pytest.raises(TypeError, match="no option"):
        list(explain_rows(model, tokenizer, ROWS, temperature=0.5))
    with pytest.raises(ValueError, match="method must be one of"):
        list(explain_rows(model, tokenizer, ROWS, method="lrp"))
    with pytest.raises(ValueError, match="batch_size"):
        list(explain_rows(model, tokenizer, ROWS, batch_size=0))
    with pytest.raises(TypeError, match=r"explain_tokens\(\) \(per-token rows\) has no option"):
        list(explain_rows(model, tokenizer, ROWS, per_token=True, latent=["mlp:0"]))


def test_per_token_rows_hold_each_answer_tokens_relevance_and_their_sum(tiny):
    model, tokenizer = tiny
    rows = [{"prompt": "what did ingrid name ?", "continuation": " the lake"},
            {"prompt": "the capital of", "target": " paris is"},
            {"prompt": "the blue ice"},
            {"prompt": "the city", "target": 12}]
    written = dict(explain_rows(model, tokenizer, rows, per_token=True, max_new_tokens=3))
    for index, answer in ((0, " the lake"), (1, " paris is")):
        expected = explain_tokens(model, tokenizer, rows[index]["prompt"], continuation=answer)
        explanation = written[index]["explanation"]
        start = expected.prompt_length
        assert explanation["prompt_length"] == start and explanation["answer"] == expected.answer_text
        assert len(explanation["matrix"]) == len(expected) >= 2
        for t, values in enumerate(explanation["matrix"]):  # row t: the tokens before answer token t
            assert values == expected.relevance[t, : start + t].double().tolist()
        summed = [sum(row[i] for row in explanation["matrix"] if i < len(row)) for i in range(len(expected.tokens))]
        assert explanation["relevance"] == pytest.approx(summed, rel=1e-6, abs=1e-6)
        value = sum(expected.target_values.double().tolist())
        assert explanation["conservation"] == pytest.approx(sum(summed) / value, rel=1e-6)
        first = abs(summed[0]) / sum(abs(v) for v in summed)
        assert explanation["relevance_shares"]["first_token"] == pytest.approx(first, rel=1e-9)
        shares = explanation["relevance_shares_per_token"]
        assert shares[1]["first_token"] == pytest.approx(
            abs(explanation["matrix"][1][0]) / sum(abs(v) for v in explanation["matrix"][1]), rel=1e-9)
    generated = written[2]["explanation"]
    assert written[2]["error"] is None and 1 <= len(generated["matrix"]) <= 3  # generated: max_new_tokens=3
    assert written[3]["explanation"] is None and "'target' is the answer's text" in written[3]["error"]


def test_rows_from_a_generator_and_from_a_datasets_dataset(tiny, tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    model, tokenizer = tiny
    rows = [{"prompt": r["prompt"], "target": r.get("target")} for r in ROWS[:5]]
    from_list = [row for _, row in explain_rows(model, tokenizer, rows, batch_size=3)]
    from_generator = [row for _, row in explain_rows(model, tokenizer, (r for r in rows), batch_size=3)]
    close_rows(from_list, from_generator, tolerance=0)
    summary = explain_dataset(model, tokenizer, datasets.Dataset.from_list(rows), tmp_path / "out.jsonl",
                              batch_size=3, progress=False)
    assert summary.explained == 5 and summary.skipped == 0
    close_rows(read_rows(tmp_path / "out.jsonl"), from_list, tolerance=0)


def test_resume_after_a_run_cut_off_mid_line(tiny, tmp_path):
    model, tokenizer = tiny
    reference = tmp_path / "reference.jsonl"
    explain_dataset(model, tokenizer, ROWS, reference, batch_size=1, progress=False)
    lines = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == len(ROWS)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2], encoding="utf-8")  # killed mid-write
    assert len(list(complete_lines(cut))) == 3
    summary = explain_dataset(model, tokenizer, ROWS, cut, batch_size=1, progress=False)
    assert (summary.explained, summary.skipped, summary.errors) == (len(ROWS) - 3, 3, 0)
    assert cut.read_text(encoding="utf-8") == reference.read_text(encoding="utf-8")
    again = explain_dataset(model, tokenizer, ROWS, cut, batch_size=1, progress=False)
    assert (again.explained, again.skipped) == (0, len(ROWS))


def test_drop_partial_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": 0}\n{"id": 1}\n{"id"')
    assert drop_partial_line(path) == 5 and path.read_bytes() == b'{"id": 0}\n{"id": 1}\n'
    assert drop_partial_line(path) == 0
    path.write_bytes(b'{"id": 0')
    assert drop_partial_line(path) == 8 and path.read_bytes() == b""


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tiny_folder, tmp_path):
    rows = [{"prompt": " ".join(["the capital of france is"] * (1 + i % 7)), "target": "paris"} for i in range(400)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "lxt_explicit.cli", "explain-dataset", str(source), "--output", str(output),
               "--model", str(tiny_folder), "--batch-size", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not output.exists() or output.read_bytes().count(b"\n") < 20):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    written = output.read_bytes().count(b"\n")
    assert 20 <= written < len(rows), "the run should have been killed part of the way through"
    assert main(["explain-dataset", str(source), "--output", str(output), "--model", str(tiny_folder),
                 "--batch-size", "8", "--no-progress"]) == 0
    ids = [row["id"] for row in read_rows(output)]
    assert ids == list(range(len(rows))) and output.read_bytes().count(b"\n") == len(rows)


def test_shards_left_by_an_interrupted_run_are_merged_without_duplicates(tiny, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out.jsonl"
    reference = read_rows(explain_dataset(model, tokenizer, ROWS, tmp_path / "ref.jsonl", batch_size=1,
                                          progress=False).output)
    # process 0 of 2 wrote rows 0, 2, 4 (the last cut off); process 1 wrote row 1; row 2 is already merged
    shard0 = [json.dumps({"index": i, "row": reference[i]}) for i in (0, 2, 4)]
    (tmp_path / "out.jsonl.part-0-of-2").write_text("\n".join(shard0)[:-10], encoding="utf-8")
    (tmp_path / "out.jsonl.part-1-of-2").write_text(json.dumps({"index": 1, "row": reference[1]}) + "\n")
    output.write_text(json.dumps(reference[2]) + "\n", encoding="utf-8")
    summary = explain_dataset(model, tokenizer, ROWS, output, batch_size=1, progress=False)
    assert summary.skipped == 3 and summary.explained == len(ROWS) - 3
    merged = read_rows(output)
    assert [r["id"] for r in merged] == [reference[i]["id"] for i in (2, 0, 1, 3, 4, 5, 6, 7)]
    assert not list(tmp_path.glob("out.jsonl.part-*"))
    close_rows(sorted(merged, key=lambda r: str(r["id"])), sorted(reference, key=lambda r: str(r["id"])), 0)


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tiny_folder, tmp_path):
    rows = ROWS + [{"prompt": ""}, {"prompt": "the lake", "target": "paris lake"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    arguments = ["explain-dataset", str(source), "--model", str(tiny_folder), "--batch-size", "3", "--no-progress"]
    assert main([*arguments, "--output", str(one)]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "lxt_explicit.cli", *arguments, "--output", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    close_rows(read_rows(two), read_rows(one))
    assert not list(tmp_path.glob("two.jsonl.part-*"))


def test_the_command_explains_a_file_and_prints_a_summary(tiny_folder, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", ROWS[:3] + [{"prompt": ""}])
    output, report = tmp_path / "out" / "out.jsonl", tmp_path / "report.html"
    arguments = ["explain-dataset", str(source), "--output", str(output), "--model", str(tiny_folder),
                 "--method", "cp_lrp", "--report", str(report), "--no-progress", "--scale-without-special"]
    assert main(arguments) == 0
    out = capsys.readouterr().out
    assert "explained 4 rows" in out and "1 with an error" in out and "relevance share on the first token" in out
    assert "answer ranks of the 1 rows with a target" in out and "row 3: ValueError" in out
    rows = read_rows(output)
    assert [r["id"] for r in rows] == [0, "q-capital", 2, 3] and rows[0]["explanation"]["method"] == "cp_lrp"
    assert "<section class='row'" in report.read_text()
    assert main(arguments) == 0 and "explained 0 rows" in capsys.readouterr().out


def test_the_command_explains_every_answer_token_with_per_token(tiny_folder, tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what did ingrid name ?", "continuation": " the lake"},
                                                 {"prompt": "the blue ice"}])
    output, report = tmp_path / "out.jsonl", tmp_path / "report.html"
    assert main(["explain-dataset", str(source), "--output", str(output), "--model", str(tiny_folder), "--per-token",
                 "--max-new-tokens", "2", "--report", str(report), "--no-progress"]) == 0
    rows = read_rows(output)
    assert [r["error"] for r in rows] == [None, None]
    assert [len(r["explanation"]["matrix"]) for r in rows][1] <= 2 and rows[0]["explanation"]["answer"] == " the lake"
    assert "explained 2 rows" in capsys.readouterr().out and report.read_text().count("<section class='row'") == 2


def dataset_errors(tiny_folder, tmp_path):
    """(arguments, what the message must say) for the mistakes the dataset command explains."""
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:2])
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "list.jsonl").write_text('["a"]\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    model = ["--model", str(tiny_folder)]
    out = ["--output", str(tmp_path / "out.jsonl")]
    cases = {
        "missing input": ([str(tmp_path / "nothing.jsonl"), *out, *model], "nothing.jsonl does not exist"),
        "not JSON": ([str(tmp_path / "bad.jsonl"), *out, *model], "bad.jsonl line 2 is not JSON"),
        "not an object": ([str(tmp_path / "list.jsonl"), *out, *model], "line 1 is a list, not an object"),
        "no rows": ([str(tmp_path / "empty.jsonl"), *out, *model], "has no rows"),
        "output is the input": ([str(good), "--output", str(good), *model], "--output is the input file"),
        "output is a folder": ([str(good), "--output", str(tmp_path), *model], "is a folder; give a file path"),
        "no output": ([str(good), *model], "the following arguments are required: --output"),
        "batch size": ([str(good), *out, *model, "--batch-size", "0"], "must be at least 1"),
        "missing model": ([str(good), *out, "--model", str(tmp_path / "no_model")], "no_model does not exist"),
    }
    duplicate = write_jsonl(tmp_path / "duplicate.jsonl", [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}])
    cases["duplicate ids"] = ([str(duplicate), *out, *model], "duplicate.jsonl: rows 0 and 1 have the same id 1")
    (tmp_path / "list_id.jsonl").write_text('{"prompt": "a", "id": [1]}\n')
    cases["bad id"] = ([str(tmp_path / "list_id.jsonl"), *out, *model], "row 0: a row id must be a string")
    without = tmp_path / "no_template"
    tokenizer = tlm.tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(without)
    tlm.model(dtype=torch.float32).save_pretrained(without)
    cases["no chat template"] = ([str(good), *out, "--model", str(without), "--chat"], "--chat needs the tokenizer's")
    return cases


def test_mistakes_in_the_dataset_command_are_one_line_and_exit_code_2(tiny_folder, tmp_path, capsys):
    cases = dataset_errors(tiny_folder, tmp_path)
    capsys.readouterr()  # saving the model folder shows a progress bar
    for name, (arguments, message) in cases.items():
        assert main(["explain-dataset", *arguments]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
    assert not read_rows(tmp_path / "out.jsonl")


def test_explain_takes_one_target_and_contrast_per_prompt(tiny):
    model, tokenizer = tiny
    prompts = ["the capital of", "a river", "ingrid named the lake after her", "the city"]
    targets, contrasts = ["paris", None, 14, "paris"], [None, None, "london", "london"]
    batch = explain(model, tokenizer, prompts, target=targets, contrast=contrasts)
    for prompt, target, contrast, result in zip(prompts, targets, contrasts, batch):
        alone = explain(model, tokenizer, prompt, target=target, contrast=contrast)
        assert result.target == alone.target and result.target_ids == alone.target_ids
        torch.testing.assert_close(result.relevance, alone.relevance, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="target is a list of 2 for 4 prompts"):
        explain(model, tokenizer, prompts, target=["paris", "london"])
    with pytest.raises(TypeError, match="gives each prompt of a batch its own"):
        explain(model, tokenizer, "the city", target=["paris"])
    with pytest.raises(ValueError, match="contrast and target are the same token"):
        explain(model, tokenizer, prompts[:2], target=["paris", "london"], contrast=[None, "london"])
    with pytest.raises(ValueError, match="cannot be combined with a continuation"):
        explain(model, tokenizer, prompts[:2], target=["paris", None], continuation=" the lake")
