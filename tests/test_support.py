"""The measured support matrix: the checker on a fast subset, its rendering, and the committed results.

The full sweep is a command (``python -m lxt_explicit.support``, minutes); here a few families are
checked for real, a missing rule and an unbuildable family must show up as such, and the committed
page must be the rendering of the committed records of every family the installed transformers has.
"""

import functools
import json
from pathlib import Path

import pytest
import transformers

import lxt_explicit as lxt
from lxt_explicit.presets import is_rms_norm
from lxt_explicit.rules import Rule, RuleDeclined
from lxt_explicit.support import FamilyRecord, Sweep, check_family, families, render_markdown, summary, tiny_config
from lxt_explicit.support.command import main
from lxt_explicit.support.configs import config_kwargs
from lxt_explicit.support.report import gaps_by_op, unhandled_ops
from lxt_explicit.support.tasks import task

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "support.md"
RESULTS = ROOT / "benchmarks" / "results" / "support.json"


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt", "vit"])
def test_fast_subset_is_verified(family):
    record = check_family(family, families()[family])
    assert record.status == "verified", record.gaps or record.reason
    assert record.unhandled == {"attnlrp": [], "cp_lrp": []}
    assert record.logits_equal == {"attnlrp": True, "cp_lrp": True}
    assert record.conservation_dtype == "float64" and record.conservation <= 1e-6
    assert record.bf16_finite is True
    assert record.attention == "sdpa" and "attention" in record.kinds
    assert record.parameters > 0 and record.errors == {}


class _Declines(Rule):
    """A rule that covers nothing: the op it is given for is unhandled."""

    def explain_call(self, fn, args, kwargs):
        raise RuleDeclined("declined on purpose")


def test_a_missing_rule_is_named_with_its_op_and_module_class():
    # RMS norms without their rule, and the root without a rule: the norm's own torch ops are on the
    # relevance path without one
    no_norm_rule, no_root_rule = {is_rms_norm: None}, {"root": _Declines()}
    methods = {
        "attnlrp": functools.partial(lxt.attnlrp, layer_map=no_norm_rule, ops=no_root_rule),
        "cp_lrp": functools.partial(lxt.cp_lrp, layer_map=no_norm_rule, ops=no_root_rule),
    }
    record = check_family("llama", task("causal-lm"), methods=methods)
    assert record.status == "gaps"
    assert "torch.rsqrt (LlamaRMSNorm)" in record.unhandled["attnlrp"]
    assert any("no rule for" in gap and "(LlamaRMSNorm)" in gap for gap in record.gaps)
    assert record.conservation > 1e-6  # the plain gradient through the norm does not conserve
    assert any(gap.startswith("CP-LRP conservation error") for gap in record.gaps)


def test_a_family_that_does_not_build_is_recorded_with_stage_and_reason():
    record = check_family("no_such_family", task("causal-lm"))
    assert (record.status, record.stage) == ("not buildable", "model class")
    assert record.reason.startswith("KeyError") and "no_such_family" in record.reason
    assert record.gaps == []


def test_the_time_limit_ends_a_family():
    record = check_family("llama", task("causal-lm"), timeout=1e-4)
    assert record.status == "not buildable"
    assert "FamilyTimeout: over the time limit" in record.reason


def test_tiny_configs_take_the_sizes_the_class_has_in_the_type_it_declares():
    config = tiny_config("llama")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 2, 128)
    gpt2 = config_kwargs(transformers.GPT2Config, "gpt2")
    assert gpt2["n_embd"] == 32 and "hidden_size" not in gpt2 and "num_experts" not in gpt2  # attribute_map
    assert tiny_config("bamba").attn_layer_indices == [1]  # a list field gets a list from the (immutable) table
    assert tiny_config("swin").depths == (1, 1)  # a tuple field keeps its tuple
    assert tiny_config("mixtral").num_local_experts == 4
    assert tiny_config("gemma3").text_config.hidden_size == 32  # sub-configs are tiny too


def _records():
    verified = FamilyRecord("llama", "causal-lm", "verified", attention="sdpa", kinds=["attention"],
                            unhandled={"attnlrp": [], "cp_lrp": []}, conservation=2.5e-10,
                            conservation_dtype="float64", bf16_finite=True)
    gaps = FamilyRecord("mixtral", "causal-lm", "gaps", attention="sdpa", kinds=["attention", "moe"],
                        unhandled={"attnlrp": ["torch.topk (MixtralTopKRouter)", "Tensor.div_ (MixtralTopKRouter)"],
                                   "cp_lrp": ["Tensor.div_ (MixtralTopKRouter)"]},
                        logits_equal={"attnlrp": True, "cp_lrp": True}, conservation=4.5e-2,
                        conservation_dtype="float64", bf16_finite=None,
                        errors={"bfloat16": "RuntimeError: a | b", "audit cp_lrp": "RuntimeError: a | b"})
    other = FamilyRecord("qwen2_moe", "causal-lm", "gaps", unhandled={"attnlrp": ["Tensor.div_ (Qwen2MoeRouter)"]},
                         conservation=1e-9, conservation_dtype="float64", bf16_finite=True)
    unbuilt = FamilyRecord("dinat", "image-classification", "not buildable", stage="build",
                           reason="ImportError: needs the natten library")
    return Sweep([verified, gaps, other, unbuilt], "5.24.0", "2.14.1")


def test_markdown_has_the_summary_one_row_per_family_the_ops_and_the_unbuildable():
    sweep = _records()
    page = render_markdown(sweep)
    assert summary(sweep) == "1 of 3 families verified"
    assert "**1 of 3 families verified**; 2 built with gaps, 1 not buildable here." in page
    assert "transformers 5.24.0, torch 2.14.1" in page
    assert "| llama | causal-lm | verified | sdpa; attention; conservation 2.5e-10 (float64) |" in page
    row = next(line for line in page.splitlines() if line.startswith("| mixtral |"))
    assert "attnlrp: no rule for torch.topk (MixtralTopKRouter), Tensor.div_ (MixtralTopKRouter)" in row
    assert "CP-LRP conservation error 4.5e-02 (float64)" in row
    assert "audit cp_lrp, bfloat16 failed: RuntimeError: a \\| b" in row and row.count("a \\| b") == 1
    assert "| `Tensor.div_` | 2 | mixtral, qwen2_moe |" in page  # the most common op first
    assert page.index("`Tensor.div_`") < page.index("`torch.topk`")
    assert "| dinat | image-classification | build | ImportError: needs the natten library |" in page
    assert page.index("## Not buildable here") > page.index("| mixtral |")
    assert unhandled_ops(sweep) == {"Tensor.div_": 2, "torch.topk": 1}
    assert gaps_by_op(sweep) == {"Tensor.div_": ["mixtral", "qwen2_moe"], "torch.topk": ["mixtral"]}


def test_records_survive_json():
    sweep = _records()
    again = Sweep.from_dict(json.loads(json.dumps(sweep.to_dict())))
    assert again.records == sweep.records and render_markdown(again) == render_markdown(sweep)


def test_command_writes_the_page_and_updates_one_family(tmp_path, capsys):
    page, results = tmp_path / "support.md", tmp_path / "support.json"
    assert main(["--families", "gpt2", "--json", str(results), "--output", str(page)]) == 0
    assert "1 of 1 families verified" in page.read_text() and "1 of 1 families verified" in capsys.readouterr().out
    _records().save(results)  # a matrix with other families: --update replaces gpt2's record only
    assert main(["--families", "gpt2", "--update", "--json", str(results), "--output", str(page)]) == 0
    updated = Sweep.load(results)
    assert [r.family for r in updated.records] == ["dinat", "gpt2", "llama", "mixtral", "qwen2_moe"]
    assert render_markdown(updated) == page.read_text()
    with pytest.raises(SystemExit):
        main(["--families", "no_such_family"])
    assert "no_such_family" in capsys.readouterr().err


def test_committed_page_is_the_rendering_of_the_committed_results():
    assert PAGE.read_text() == render_markdown(Sweep.load(RESULTS)), (
        "re-render: python -m lxt_explicit.support --from-json --json benchmarks/results/support.json "
        "--output docs/support.md"
    )


def test_committed_results_cover_every_family_of_the_installed_transformers():
    sweep = Sweep.load(RESULTS)
    assert sweep.transformers == transformers.__version__, "re-run the sweep with the installed transformers"
    assert [r.family for r in sweep.records] == list(families())
    assert all(r.status in ("verified", "gaps", "not buildable") for r in sweep.records)
    assert all(r.reason for r in sweep.records if r.status == "not buildable")
    assert all(r.gaps for r in sweep.records if r.status == "gaps")
