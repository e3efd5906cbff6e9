"""The benchmark scripts, end to end in their smoke modes (tiny sizes), and their building blocks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import skip_without_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import attributions  # noqa: E402
import common  # noqa: E402
import evaluation  # noqa: E402
import faithfulness  # noqa: E402
import neurons  # noqa: E402
import overhead  # noqa: E402
import per_token  # noqa: E402
import speed  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    model = common.synthetic_llama("tiny", vocab_size=64)
    model.requires_grad_(False)
    input_ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    return model, input_ids


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ building blocks


def test_every_method_gives_one_finite_score_per_token(tiny):
    model, input_ids = tiny
    settings = attributions.Settings(
        ig_steps=4, ig_batch=2, smoothgrad_samples=2, smoothgrad_batch=2, occlusion_batch=5
    )
    for method in attributions.METHODS:
        scores = attributions.attribute(method, model, input_ids, 3, settings)
        assert scores.shape == (12,) and scores.dtype == torch.float32 and torch.isfinite(scores).all(), method
        assert not scores.requires_grad
    assert model.config._attn_implementation == "sdpa"  # rollout switched to eager and back
    assert not any(p.requires_grad for p in model.parameters())


def test_input_x_gradient_is_gradient_times_input_and_rollout_is_a_distribution(tiny):
    model, input_ids = tiny
    embeddings = attributions.embed(model, input_ids).requires_grad_()
    attributions.logit_function(model, 3)(embeddings).sum().backward()
    expected = (embeddings.grad * embeddings).sum(-1)[0]
    torch.testing.assert_close(attributions.attribute("input_x_gradient", model, input_ids, 3), expected.detach())
    torch.testing.assert_close(attributions.attribute("gradient", model, input_ids, 3), embeddings.grad[0].norm(dim=-1))
    rollout = attributions.attribute("attention_rollout", model, input_ids, 3)
    assert (rollout >= 0).all() and math.isclose(float(rollout.sum()), 1.0, rel_tol=1e-5)


def test_occlusion_is_the_drop_of_the_logit_and_reusing_the_prefix_changes_nothing(tiny):
    model, input_ids = tiny
    embeddings = attributions.embed(model, input_ids)
    forward = attributions.logit_function(model, 3)
    scores = attributions.occlusion(model, input_ids, 3, batch=3, positions=[4, 7])
    for position in (4, 7):
        occluded = embeddings.clone()
        occluded[0, position] = 0
        with torch.no_grad():
            drop = (forward(embeddings) - forward(occluded))[0]
            torch.testing.assert_close(scores[position], drop, atol=1e-5, rtol=0)
    assert scores[[0, 1, 2, 3, 5, 6, 8, 9, 10, 11]].eq(0).all()
    masks = torch.rand(7, 12, generator=torch.Generator().manual_seed(2)) < 0.5
    masks[:, :5] = False
    baseline = torch.randn(embeddings.shape[-1])
    cached = attributions.perturbed_logits(model, embeddings, masks, baseline, 3, batch=3, reuse_prefix=True)
    plain = attributions.perturbed_logits(model, embeddings, masks, baseline, 3, batch=3, reuse_prefix=False)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)


def test_removal_orders_and_areas():
    assert faithfulness.removal_counts(25, 10) == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25]
    scores = torch.tensor([9.0, 0.5, 3.0, -1.0, 2.0, 7.0])
    masks = faithfulness.removal_masks(scores, context=[1, 2, 3, 4], length=6, steps=4)
    assert masks["morf"].nonzero()[:, 1].tolist() == [2, 2, 4, 1, 2, 4, 1, 2, 3, 4]
    assert masks["morf"][1].nonzero().flatten().tolist() == [2]  # most relevant context token first
    assert masks["lerf"][1].nonzero().flatten().tolist() == [3]  # least relevant first
    assert not masks["morf"][0].any() and masks["lerf"][4].sum() == 4
    curve = {"morf": {"logit": [10.0, 5.0, 0.0]}, "lerf": {"logit": [10.0, 10.0, 0.0]}}
    areas = faithfulness.area_between(curve, "logit")
    assert areas == pytest.approx({"auc_morf": 0.5, "auc_lerf": 0.75, "abpc": 0.25})
    mean, low, high = faithfulness.bootstrap_ci([1.0, 2.0, 3.0, 4.0], 500)
    assert mean == 2.5 and 1.0 <= low < mean < high <= 4.0


# ------------------------------------------------------------------------------------ smoke runs


def test_overhead_smoke(tmp_path):
    assert overhead.main(["--smoke", "--no-memory", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "overhead.json").read_text())
    row = results["models"]["small"]["rows"][0]
    assert row["time_ratio_to_gradient"]["gradient"] == 1.0 and all(t > 0 for t in row["time_s"].values())
    memory = overhead.measure_memory("small", "attnlrp", 16)
    assert memory["extra_peak_bytes"] >= 0 and memory["saved_bytes"] > 0


def test_speed_smoke(tmp_path):
    assert speed.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    assert results["environment"]["commit"] and results["command"].startswith("python benchmarks/speed.py")
    rows = results["models"]["tiny"]["rows"]
    assert [r["length"] for r in rows] == [16, 32]
    for row in rows:
        assert set(row["time_s"]) == set(speed.DEFAULT_METHODS)
        assert all(t > 0 and math.isfinite(t) for t in row["time_s"].values())
        assert row["time_ratio_to_gradient"]["gradient"] == 1.0
        assert row["memory"]["gradient"]["extra_peak_bytes"] >= 0 and row["memory"]["gradient"]["saved_bytes"] > 0
        assert row["passes"]["occlusion"] == math.ceil((row["length"] + 1) / 4)
    table = (tmp_path / "speed.md").read_text()
    assert "| AttnLRP |" in table and "Peak extra memory" in table and "No GPU" in table
    assert _png(tmp_path / "speed.png")


@pytest.mark.real_model
def test_faithfulness_smoke(tmp_path):
    skip_without_smollm2()
    assert faithfulness.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "faithfulness.json").read_text())
    assert results["prompts"] == 2 and results["environment"]["commit"]
    # the benchmark's AttnLRP is the library's explain()
    assert results["items"][0]["explain_max_abs_difference"] < 1e-4
    table = results["summary"]["faithfulness"]["zero"]
    for quantity in faithfulness.QUANTITIES:
        for method in attributions.METHODS:
            entry = table[quantity][method]
            assert np.isfinite(entry["abpc"]) and entry["ci"][0] <= entry["abpc"] + 1e-12 <= entry["ci"][1] + 2e-12
    for record in results["items"]:
        for method, curve in record["curves"]["zero"].items():
            assert len(curve["morf"]["logit"]) == results["steps"] + 1
            assert curve["morf"]["logit"][0] == curve["lerf"]["logit"][0]  # nothing removed yet
            assert curve["morf"]["logit"][-1] == pytest.approx(curve["lerf"]["logit"][-1])  # everything removed
        assert record["answer_positions"] and set(record["answer_positions"]) <= set(range(record["length"]))
    for plausibility in results["summary"]["plausibility"].values():
        assert 0 <= plausibility["top1"] <= plausibility["top3"] <= 1
    assert "| AttnLRP |" in (tmp_path / "faithfulness.md").read_text()
    assert _png(tmp_path / "faithfulness_curves.png") and _png(tmp_path / "faithfulness_abpc.png")


def test_speed_smoke_of_explain_and_of_all_logits(tmp_path):
    arguments = ["--smoke", "--methods", "gradient", "attnlrp", "attnlrp_all_logits", "explain", "--output",
                 str(tmp_path), "--name", "large"]
    assert speed.main(arguments) == 0
    results = json.loads((tmp_path / "large.json").read_text())
    for row in results["models"]["tiny"]["rows"]:
        assert set(row["time_s"]) == {"gradient", "attnlrp", "attnlrp_all_logits", "explain"}
        assert all(t > 0 and math.isfinite(t) for t in row["time_s"].values())
        assert row["memory"]["explain"]["saved_bytes"] > 0
        assert row["explain_vs_attnlrp_max_abs_difference"] < 1e-4  # the timed explain() does AttnLRP's work
    table = (tmp_path / "large.md").read_text()
    assert "| explain() |" in table and "| AttnLRP, logits of all positions |" in table
    assert _png(tmp_path / "large.png") and not (tmp_path / "speed.json").exists()


def test_word_tokenizer_gives_back_the_ids():
    tokenizer = common.word_tokenizer(300)
    ids = torch.tensor([[0, 299, 17, 17, 5]])
    assert tokenizer(common.ids_as_text(ids), add_special_tokens=False)["input_ids"] == ids[0].tolist()


@pytest.mark.real_model
def test_evaluation_smoke(tmp_path):
    skip_without_smollm2()  # the tiny random model uses SmolLM2's tokenizer
    assert evaluation.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "evaluation.json").read_text())
    assert results["environment"]["commit"] and results["command"].startswith("python benchmarks/evaluation.py")
    entities = results["entities"]["summary"]
    assert set(entities) == set(evaluation.METHODS) and entities["attnlrp"]["minus_reference"] is None
    for entry in entities.values():
        assert entry["abpc"][1] <= entry["abpc"][0] + 1e-12 <= entry["abpc"][2] + 2e-12
    causal = results["agreement"]["causal"]
    assert causal["items"] == 2 * 5 and 0 <= causal["accuracy"] <= 1
    assert set(results["patching"]["correlations"]["heads"]) == set(evaluation.ESTIMATE_LABELS)
    assert set(results["patching"]["mlp_per_block"]) and set(results["patching"]["slopes"]) == {"heads", "mlp"}
    assert results["reading"]["largest_abpc_difference"] < 1e-9  # the published areas are the module's
    table = (tmp_path / "evaluation.md").read_text()
    assert "| AttnLRP |" in table and "Pearson" in table
    assert set(results["components"]["correlations"]) == set(evaluation.COMPONENTS)
    assert "RelP's components" in table and "| relevance patching, RelP's rules |" in table


@pytest.mark.real_model
def test_neurons_smoke(tmp_path):
    skip_without_smollm2()  # the tiny random model uses SmolLM2's tokenizer
    assert neurons.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "neurons.json").read_text())
    assert results["command"].startswith("python benchmarks/neurons.py --smoke")
    assert [c["spec"] + " " + c["mode"] for c in results["curves"]] == ["mlp:1 zero", "mlp:1 mean"]
    for curves in results["curves"]:
        assert curves["ks"] == [1, 2, 3, 4] and set(curves["drops"]) == {"relevance", "activation", "random"}
        assert all(len(curves["drops"][name]) == 4 and all(map(math.isfinite, curves["drops"][name]))
                   for name in curves["drops"])
    table = (tmp_path / "neurons.md").read_text()
    assert "| relevance |" in table and "Command: `python benchmarks/neurons.py --smoke" in table


def test_committed_neuron_results_match_their_table():
    stored = json.loads((Path(neurons.__file__).parent / "results" / "neurons.json").read_text())
    assert stored["command"].startswith("python benchmarks/neurons.py") and stored["model"] == "SmolLM2-135M-Instruct"
    assert all(c["ks"] == list(range(1, 33)) for c in stored["curves"])
    assert (Path(neurons.__file__).parent / "results" / "neurons.md").read_text() == neurons.markdown(stored)


# ------------------------------------------------------------------------------------ per-token attribution


def test_per_token_smoke(tmp_path):
    assert per_token.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "per_token.json").read_text())
    assert results["environment"]["commit"] and results["command"].startswith("python benchmarks/per_token.py")
    assert results["answer_tokens"] == 4 and results["max_abs_difference_float64"] < 1e-12
    assert results["max_abs_difference_float32"] < 1e-5 and 0 < results["ratio"]
    assert "| ratio |" in (tmp_path / "per_token.md").read_text()


def test_committed_per_token_result_meets_the_targets():
    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "benchmarks" / "results" / "per_token.json").read_text())
    assert results["model"] == "smollm2" and results["answer_tokens"] == 32 and results["repeats"] >= 3
    assert results["ratio"] <= 0.7  # at most 0.7x the time of 32 separate explanations
    assert results["max_abs_difference_float64"] <= 1e-6  # the same numbers as the separate explanations
    assert results["max_abs_difference_float32_unbatched"] <= 1e-6  # batching the backward passes changes nothing
    times = results["times"]
    assert results["ratio"] == pytest.approx(times["per_token"]["median_s"] / times["separate"]["median_s"])
    assert results["environment"]["uncommitted_changes"] == "none"
    readme = " ".join((root / "README.md").read_text().split())
    assert f"{results['ratio']:.2f}x the time of 32 separate explanations" in readme
