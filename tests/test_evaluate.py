"""lxt_explicit.evaluate: every metric against hand-computed values on tiny cases, and the methods on tiny models."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_language_model as tlm
import torch
import torch.nn.functional as F
from torch import nn

import lxt_explicit as lxt
from lxt_explicit import evaluate
from lxt_explicit.evaluate import Target, baselines, patching, perturbation, statistics
from lxt_explicit.evaluate.agreement import AgreementItem, agreement_items, subject_metrics
from lxt_explicit.explain import explain


class SumModel(nn.Module):
    """logit of token 0 at every position = sum of the (1-dim) embeddings seen so far; logit of token 1 = 0."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 1)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64))
        self.requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        first = x[..., 0].cumsum(-1)
        return SimpleNamespace(logits=torch.stack([first, torch.zeros_like(first)], -1))


# ------------------------------------------------------------------------------------ perturbation curves


def test_a_curve_on_four_tokens_by_hand():
    model, ids = SumModel().double(), torch.tensor([[0, 1, 2, 3]])  # embeddings 1, 2, 3, 4: logit 10
    relevance = torch.tensor([0.1, 0.4, 0.3, 0.2])  # MoRF removes positions 1, 2, 3, 0; LeRF 0, 3, 2, 1
    curves = evaluate.perturbation_curves(model, ids, 0, relevance, steps=4)
    assert curves.morf.tolist() == [10.0, 8.0, 5.0, 1.0, 0.0]
    assert curves.lerf.tolist() == [10.0, 9.0, 5.0, 2.0, 0.0]
    np.testing.assert_allclose(curves.morf_probability, 1 / (1 + np.exp(-np.array([10.0, 8, 5, 1, 0]))), rtol=1e-12)
    # trapezoid over fractions 0, 1/4, ..., 1 of the curves divided by 10
    assert curves.areas()["auc_morf"] == pytest.approx(0.25 * (0.9 + 0.65 + 0.3 + 0.05), rel=1e-12)
    assert curves.areas()["auc_lerf"] == pytest.approx(0.25 * (0.95 + 0.7 + 0.35 + 0.1), rel=1e-12)
    assert curves.abpc == pytest.approx(0.05, rel=1e-10)
    mean = evaluate.perturbation_curves(model, ids, 0, relevance, steps=4, removal="mean")  # mean embedding 2.5
    assert mean.morf.tolist() == [10.0, 10.5, 10.0, 8.5, 10.0]
    token = evaluate.perturbation_curves(model, ids, 0, relevance, steps=2, removal=3)  # 'mask' token: embedding 4
    assert token.morf.tolist() == [10.0, 10 - 2 - 3 + 8, 16.0] and token.fractions.tolist() == [0.0, 0.5, 1.0]
    only = evaluate.perturbation_curves(model, ids, 0, relevance, steps=2, positions=[0, 3])
    assert only.morf.tolist() == [10.0, 6.0, 5.0] and only.lerf.tolist() == [10.0, 9.0, 5.0]


def test_several_rankings_share_one_batched_run_and_areas_are_literal():
    model, ids = SumModel().double(), torch.tensor([[0, 1, 2, 3]])
    rankings = {"a": torch.tensor([0.1, 0.4, 0.3, 0.2]), "b": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    both = evaluate.perturbation_curves(model, ids, 0, rankings, steps=4, batch=3)
    assert both["b"].morf.tolist() == [10.0, 9.0, 7.0, 4.0, 0.0]
    assert both["a"].morf.tolist() == evaluate.perturbation_curves(model, ids, 0, rankings["a"], steps=4).morf.tolist()
    assert perturbation.removal_counts(5, 2) == [0, 3, 5] and perturbation.removal_counts(25, 10)[1:3] == [3, 5]
    areas = evaluate.area_between([10.0, 5.0, 0.0], [10.0, 10.0, 0.0])
    assert areas == pytest.approx({"auc_morf": 0.5, "auc_lerf": 0.75, "abpc": 0.25})
    assert evaluate.area_between([-4.0, -2.0], [-4.0, -4.0])["abpc"] == pytest.approx(-0.25)  # |v0| keeps the sign
    with pytest.raises(ValueError, match="normalize=False"):
        evaluate.area_between([0.0, 1.0], [0.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        evaluate.removal_masks(torch.tensor([1.0, float("nan")]), [0, 1], 2, 2)
    with pytest.raises(ValueError, match="2 scores for 4 tokens"):
        evaluate.perturbation_curves(model, ids, 0, torch.ones(2))


def test_reusing_the_prefix_of_a_causal_model_changes_nothing():
    model = tlm.model(dtype=torch.float64).requires_grad_(False)
    ids = torch.tensor([[6, 7, 8, 9, 10, 11, 12, 13]])
    embeddings = evaluate.target.embed(model, ids)
    masks = torch.zeros(5, 8, dtype=torch.bool)
    masks[1:, 3] = True
    masks[2:, 5:7] = True
    replacement = torch.randn(32, dtype=torch.float64)
    cached = perturbation.perturbed_values(model, embeddings, masks, replacement, Target(4, -1, 5), batch=2)
    plain = perturbation.perturbed_values(model, embeddings, masks, replacement, Target(4, -1, 5), reuse_prefix=False)
    with torch.no_grad():
        copies = torch.where(masks[..., None], replacement, embeddings)
        logits = model(inputs_embeds=copies).logits[:, -1]
    torch.testing.assert_close(plain[0], logits[:, 4] - logits[:, 5], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cached[0], plain[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cached[1], plain[1], rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ statistics


def test_bootstrap_paired_difference_and_pearson_by_hand():
    interval = statistics.bootstrap([2.0, 2.0, 2.0], resamples=50)
    assert tuple(interval) == (2.0, 2.0, 2.0)
    interval = statistics.bootstrap([1.0, 2.0, 3.0, 4.0], resamples=2000, seed=3)
    assert interval.mean == 2.5 and 1.0 <= interval.low < 2.5 < interval.high <= 4.0
    assert interval == statistics.bootstrap([1.0, 2.0, 3.0, 4.0], resamples=2000, seed=3)  # reproducible
    difference = statistics.paired_difference([3.0, 5.0, 4.0], [1.0, 3.0, 2.0], resamples=100)
    assert tuple(difference) == (2.0, 2.0, 2.0)  # the same shift on every prompt: no spread at all
    assert statistics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9), rel=1e-12)
    assert statistics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert interval.format() == f"2.500 [{interval.low:.3f}, {interval.high:.3f}]"
    with pytest.raises(ValueError, match="constant"):
        statistics.pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="same prompts"):
        statistics.paired_difference([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------ agreement


def test_agreement_metrics_on_three_items_by_hand():
    first = subject_metrics(torch.tensor([0.1, 0.5, 0.2, 0.3]), [1], [0, 1, 2, 3])
    second = subject_metrics(torch.tensor([0.4, 0.1, 0.3, -0.2]), [2, 3], [0, 1, 2, 3])
    third = subject_metrics(torch.tensor([-1.0, 2.0, 1.0, 0.5]), [0], [0, 1, 2, 3])
    assert first == pytest.approx({"reciprocal_rank": 1.0, "pointing": 1.0, "mass": 0.5 / 1.1})
    assert second == pytest.approx({"reciprocal_rank": 0.5, "pointing": 0.0, "mass": 0.3 / 0.8})
    assert third == pytest.approx({"reciprocal_rank": 0.25, "pointing": 0.0, "mass": 0.0})
    mrr = np.mean([m["reciprocal_rank"] for m in (first, second, third)])
    assert mrr == pytest.approx((1 + 0.5 + 0.25) / 3)
    restricted = subject_metrics(torch.tensor([9.0, 0.5, 0.2, 0.3]), [1], [1, 2, 3])  # position 0 not a candidate
    assert restricted["reciprocal_rank"] == 1.0
    with pytest.raises(ValueError, match="among the candidates"):
        subject_metrics(torch.zeros(4), [0], [1, 2])


def test_generated_agreement_items_have_attractors_of_the_other_number():
    items = agreement_items(4, seed=1)
    assert len(items) == 4 * len(evaluate.agreement.templates())
    assert items == agreement_items(4, seed=1)
    for item in items:
        start, end = item.subject
        noun = item.prefix[start:end]
        assert item.prefix.startswith("The ") and noun.endswith("s") == item.plural or noun == "children"
        assert {item.correct, item.wrong} in ({"is", "are"}, {"was", "were"}, {"has", "have"})
        assert (item.correct in ("are", "were", "have")) == item.plural
        if item.template != "simple":
            after_the = item.prefix.split()[item.prefix.split().index("the") + 1:]
            attractor = after_the[1] if after_the[0] == "old" else after_the[0]
            assert attractor.endswith("s") != item.plural, item
    assert AgreementItem("The key", "is", "are", " here.", (4, 7)).masked_text("[MASK]") == "The key [MASK] here."


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "[MASK]", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   mask_token="[MASK]")


def test_evaluate_agreement_scores_only_correct_predictions_with_any_callable():
    items = agreement_items(2, seed=0)
    words = " ".join(i.prefix + " " + i.correct + " " + i.wrong for i in items).split()
    tokenizer = _word_tokenizer(words)
    model = tlm.model(dtype=torch.float64, vocab_size=len(tokenizer)).requires_grad_(False)
    on_subject = lambda model, ids, target: torch.nn.functional.one_hot(torch.tensor(1), ids.shape[1]).double()
    result = evaluate.evaluate_agreement(model, tokenizer, items, {"subject": on_subject, "random": "random"})
    expected = []
    for item in items:
        ids = torch.tensor([tokenizer(item.prefix)["input_ids"]])
        logits = model(input_ids=ids).logits[0, -1]
        vocab = tokenizer.get_vocab()
        expected.append(float(logits[vocab[item.correct]] - logits[vocab[item.wrong]]) > 0)
    assert result.items == [i for i, ok in zip(items, expected) if ok] and result.accuracy == np.mean(expected)
    assert result.values("subject").tolist() == [1.0] * len(result.items)  # "The NOUN ...": the noun is position 1
    assert result.summary(resamples=50)["subject"]["pointing_accuracy"].mean == 1.0
    masked = evaluate.evaluate_agreement(model, tokenizer, items, ["random"], masked=True)
    assert masked.masked and masked.total == len(items)


# ------------------------------------------------------------------------------------ baselines


@pytest.fixture(scope="module")
def tiny():
    model = tlm.model(dtype=torch.float64).requires_grad_(False)
    return model, torch.tensor([[6, 7, 8, 9, 10, 11]])


def test_every_method_has_the_shared_signature(tiny):
    model, ids = tiny
    for name in evaluate.METHODS:
        method = evaluate.get_method(name, **({"steps": 4, "batch": 2} if name == "integrated_gradients" else {}))
        scores = method(model, ids, Target(4, -1, 5))
        assert scores.shape == (6,) and torch.isfinite(scores).all() and not scores.requires_grad, name
    assert model.config._attn_implementation == "sdpa" and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="your own callable"):
        evaluate.get_method("lime")
    with pytest.raises(ValueError, match=r"\[1, tokens\]"):
        baselines.gradient(model, ids[0], 4)


def test_lrp_equals_explain_and_input_x_gradient_is_literal(tiny):
    model, ids = tiny
    tokenizer = tlm.tokenizer()
    text = "the capital of france is"
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    reference = explain(model, tokenizer, text, target=" paris", contrast=" london")
    target = Target(tokenizer.convert_tokens_to_ids("paris"), -1, tokenizer.convert_tokens_to_ids("london"))
    torch.testing.assert_close(evaluate.lrp(model, ids, target), reference.relevance, rtol=1e-6, atol=1e-9)
    with pytest.warns(UserWarning, match="no beginning-of-sequence token id"):  # the tiny model has none
        sinks = explain(model, tokenizer, text, target=" paris", contrast=" london", method="attnlrp_sinks")
        torch.testing.assert_close(baselines.attnlrp_sinks(model, ids, target), sinks.relevance, rtol=1e-6, atol=1e-9)
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeddings).logits[0, -1]
    (logits[target.token] - logits[target.contrast]).backward()
    literal = (embeddings * embeddings.grad).sum(-1)[0].float()
    torch.testing.assert_close(baselines.input_x_gradient(model, ids, target), literal)
    torch.testing.assert_close(baselines.gradient(model, ids, target), embeddings.grad[0].norm(dim=-1).float())
    occluded = embeddings.detach().clone()
    occluded[0, 2] = 0
    after = model(inputs_embeds=occluded).logits[0, -1]
    drop = (logits[target.token] - logits[target.contrast]) - (after[target.token] - after[target.contrast])
    assert float(baselines.occlusion(model, ids, target)[2]) == pytest.approx(float(drop.detach()), rel=1e-5)
    assert float(baselines.attention_rollout(model, ids, target).sum()) == pytest.approx(1.0, rel=1e-6)


def test_target_checks_its_fields():
    with pytest.raises(ValueError, match="contrast equals token"):
        Target(3, -1, 3)
    with pytest.raises(TypeError, match="integer"):
        Target("Paris")
    assert evaluate.target.as_target(7) == Target(7, -1, None)


# ------------------------------------------------------------------------------------ faithfulness over prompts


def test_evaluate_faithfulness_with_names_callables_and_precomputed_relevance():
    model = SumModel().double()
    prompts = [evaluate.EvaluationPrompt(torch.tensor([[0, 1, 2, 3]]), Target(0)),
               evaluate.EvaluationPrompt(torch.tensor([[3, 2, 1, 0]]), Target(0), positions=(0, 1))]
    given = [torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([1.0, 2.0, 0.0, 0.0])]
    own = lambda model, ids, target: ids[0].double()  # "relevance" = token id
    result = evaluate.evaluate_faithfulness(model, prompts, {"given": given, "own": own, "random": "random"}, steps=4,
                                            removals=("zero", "mean"))
    assert result.methods == ["given", "own", "random"] and result.removals == ["zero", "mean"]
    # second prompt: embeddings 4, 3, 2, 1, only positions 0 and 1 ranked; 1, 1, 2, 2 of them removed after steps 1-4
    # MoRF (position 1 first): 10, 7, 7, 3, 3; LeRF (position 0 first): 10, 6, 6, 3, 3
    second = 0.25 * (1.6 / 2 + 1.2 / 2 + 0.9 / 2 + 0.6 / 2) - 0.25 * (1.7 / 2 + 1.4 / 2 + 1.0 / 2 + 0.6 / 2)
    assert result.scores("given").tolist() == pytest.approx([0.05, second], rel=1e-10)
    summary = result.summary(reference="given", resamples=100)
    assert summary["given"]["minus_reference"] is None and summary["given"]["abpc"].mean == pytest.approx(
        np.mean(result.scores("given")))
    paired = summary["own"]["minus_reference"].mean
    assert paired == pytest.approx(np.mean(result.scores("own") - result.scores("given")))
    assert result.relevance["own"][1].tolist() == [3.0, 2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="1 entries for 2 prompts"):
        evaluate.evaluate_faithfulness(model, prompts, {"given": given[:1]})


class SpecialTokenizer:
    """Characters ``a``-``d`` are tokens 0-3, ``<`` is token 3 marked special (a BOS token)."""

    all_special_ids = [3]

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids = [3 if c == "<" else "abcd".index(c) for c in text]
        return {"input_ids": ids, "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_make_prompt_can_keep_the_special_tokens_in_place():
    model, tokenizer = SumModel().double(), SpecialTokenizer()
    assert evaluate.make_prompt(model, tokenizer, "<abc", target=0).positions is None  # every token ranked
    kept = evaluate.make_prompt(model, tokenizer, "<abc", target=0, keep_special_tokens=True)
    assert kept.input_ids.tolist() == [[3, 0, 1, 2]] and kept.positions == (1, 2, 3)
    both = evaluate.make_prompt(model, tokenizer, "<ab<c", target=0, span="b<c", keep_special_tokens=True)
    assert both.positions == (2, 4)
    with pytest.raises(ValueError, match="every token of the prompt is a special token"):
        evaluate.make_prompt(model, tokenizer, "<<", target=0, keep_special_tokens=True)
    # the BOS token's removal order decides this ABPC: ranked first by one method, last by the other
    first, last = torch.tensor([9.0, 1.0, 2.0, 3.0]), torch.tensor([-9.0, 1.0, 2.0, 3.0])
    every = evaluate.evaluate_faithfulness(model, [evaluate.make_prompt(model, tokenizer, "<abc", target=0)],
                                           {"first": [first], "last": [last]}, steps=4)
    text = evaluate.evaluate_faithfulness(model, [kept], {"first": [first], "last": [last]}, steps=4)
    assert every.scores("first")[0] != every.scores("last")[0]
    assert text.scores("first")[0] == text.scores("last")[0]


# ------------------------------------------------------------------------------------ patching


class LinearBlocks(nn.Module):
    """Embedding -> per block: x += down_proj(up_proj(x)) -> head.  The logits are linear in every MLP unit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(6, 4)
        self.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for layer in self.layers:
            layer.mlp = nn.Module()
            layer.mlp.up_proj = nn.Linear(4, 5, bias=False)
            layer.mlp.down_proj = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 3, bias=False)
        self.double().requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = x + layer.mlp.down_proj(layer.mlp.up_proj(x))
        return SimpleNamespace(logits=self.head(x))


def test_on_a_linear_model_patching_attribution_and_relevance_patching_agree_exactly():
    model = LinearBlocks()
    prompt = patching.PatchingPrompt(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 4, 5]]), Target(0, -1, 1))
    effects = patching.activation_patching(model, "mlp:0", prompt, batch=2)
    # by hand: patch neuron n of block 0 and run the model again
    clean = model(input_ids=prompt.clean_ids).logits
    up = model.layers[0].mlp.up_proj
    a_clean, a_corrupt = up(model.embed(prompt.clean_ids)), up(model.embed(prompt.corrupt_ids))
    for n in range(5):
        handle = model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda m, args, n=n: (torch.cat([args[0][..., :n], a_corrupt[..., n : n + 1], args[0][..., n + 1 :]], -1),))
        patched = model(input_ids=prompt.clean_ids).logits
        handle.remove()
        expected = (patched[0, -1, 0] - patched[0, -1, 1]) - (clean[0, -1, 0] - clean[0, -1, 1])
        assert float(effects[n]) == pytest.approx(float(expected), rel=1e-10, abs=1e-12)
    assert float((a_corrupt - a_clean).abs().sum()) > 0
    atp = patching.attribution_patching(model, "mlp:0", prompt)
    relp = patching.relevance_patching(model, ["mlp:0", "mlp:1"], prompt, composite=lxt.attnlrp(epsilon=1e-12))
    torch.testing.assert_close(atp, effects, rtol=1e-9, atol=1e-12)  # linear: first order is exact
    torch.testing.assert_close(relp["mlp:0"], effects, rtol=1e-7, atol=1e-10)  # epsilon rule, no biases: = gradient
    result = patching.patching_scores(model, [prompt], ["mlp:0", "mlp:1"])  # the presets' default epsilon
    assert result.effects["mlp:0"].shape == (1, 5) and result.units["mlp:1"] == list(range(5))
    for estimate in ("attnlrp", "cp_lrp", "attribution_patching"):
        assert result.correlation(estimate, "mlp") == pytest.approx(1.0, abs=1e-4)


class TinyRMSNorm(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class GatedBlock(nn.Module):
    """Pre-norm block: causal attention with 2 heads (scaled_dot_product_attention), then a gated SiLU MLP."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = TinyRMSNorm(4), TinyRMSNorm(4)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(4, 4, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj = nn.Linear(4, 5, bias=False), nn.Linear(4, 5, bias=False)
        self.mlp.down_proj = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        h, attn = self.norm1(x), self.self_attn
        q, k, v = (p(h).unflatten(-1, (2, 2)).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
        x = x + attn.o_proj(out)
        h = self.norm2(x)
        return x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))


class GatedBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(8, 4)
        self.layers = nn.ModuleList(GatedBlock() for _ in range(2))
        self.norm, self.head = TinyRMSNorm(4), nn.Linear(4, 3, bias=False)
        self.double().requires_grad_(False)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            x = layer(x)
        return SimpleNamespace(logits=self.head(self.norm(x)))


def _coefficient_by_hand(model, ids, rules):
    """d m / d a at the input of block 0's down_proj under the rules, written as modified forward functions.

    'gradient': plain; 'relp': RMS norms with a constant scale, SiLU by the identity rule (x * (silu(x) / x)
    as a constant), gated products halved (p / 2 + (p / 2) as a constant); 'attnlrp': also q k^T and A v
    halved (uniform rule), the softmax by its gradient.
    """
    def half(p):
        return p if rules == "gradient" else p / 2 + (p / 2).detach()

    def norm(module, x):
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (scale if rules == "gradient" else scale.detach()) * module.weight

    def silu(x):
        return F.silu(x) if rules == "gradient" else x * (F.silu(x) / x).detach()

    def attention(q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
        weights = torch.softmax(scores if rules != "attnlrp" else half(scores), -1)
        return weights @ v if rules != "attnlrp" else half(weights @ v)

    x = model.embed(ids)
    neurons = None
    for index, layer in enumerate(model.layers):
        h, attn = norm(layer.norm1, x), layer.self_attn
        q, k, v = (p(h).unflatten(-1, (2, 2)).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        x = x + attn.o_proj(attention(q, k, v).transpose(1, 2).flatten(-2))
        h = norm(layer.norm2, x)
        a = half(silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
        if index == 0:
            neurons = a.detach().requires_grad_()
            a = neurons
        x = x + layer.mlp.down_proj(a)
    logits = model.head(norm(model.norm, x))
    (logits[0, -1, 0] - logits[0, -1, 1]).backward()
    return neurons.grad


def test_relevance_patching_on_a_gated_attention_model_uses_the_hand_written_rule_coefficients():
    model = GatedBlocks()
    prompt = patching.PatchingPrompt(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]]), Target(0, -1, 1))
    stored = []
    handle = model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, args: stored.append(args[0]))
    model(input_ids=prompt.clean_ids), model(input_ids=prompt.corrupt_ids)
    handle.remove()
    difference = stored[1] - stored[0]
    assert difference[0, 0].abs().max() == 0 and difference[0, 1:].abs().min() > 0  # position 0 is shared
    for rules, estimate in (("gradient", lambda: patching.attribution_patching(model, "mlp:0", prompt)),
                            ("relp", lambda: patching.relevance_patching(
                                model, "mlp:0", prompt, composite=patching.relp_rules(epsilon=1e-12))),
                            ("attnlrp", lambda: patching.relevance_patching(
                                model, "mlp:0", prompt, composite=lxt.attnlrp(epsilon=1e-12)))):
        expected = (_coefficient_by_hand(model, prompt.clean_ids, rules) * difference)[0].sum(0)
        torch.testing.assert_close(estimate(), expected, rtol=1e-6, atol=1e-10)
    # the three differ on this model: the rules are not the gradient
    coefficients = [_coefficient_by_hand(model, prompt.clean_ids, r) for r in ("gradient", "relp", "attnlrp")]
    assert min(float((c - d).abs().max()) for c, d in itertools.combinations(coefficients, 2)) > 1e-3


def test_slope_and_correlation_by_hand():
    effects = {"mlp:0": np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]), "mlp:1": np.array([[0.0, 4.0, 2.0]])}
    guesses = {"half": {"mlp:0": np.array([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]]), "mlp:1": np.array([[0.0, 2.0, 1.0]])},
               "odd": {"mlp:0": np.array([[1.0, 0.0, 2.0], [1.0, 0.0, 2.0]]), "mlp:1": np.array([[3.0, 3.0, 3.0]])}}
    result = patching.PatchingResult(effects, guesses)
    assert result.slope("half") == pytest.approx(0.5, rel=1e-12)
    # odd on mlp:0: effects 1, 2, 3 (mean 2), guesses 1, 0, 2 (mean 1): sum of products (-1)(0) + 0(-1) + 1(1) = 1,
    # sum of squares 2 -> slope 0.5, r = 1 / sqrt(2 * 2) = 0.5
    assert result.slope("odd", ["mlp:0"]) == pytest.approx(0.5, rel=1e-12)
    assert result.correlation("odd", ["mlp:0"]) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="all equal"):
        patching.PatchingResult({"mlp:0": np.ones((1, 3))}, {"x": {"mlp:0": np.arange(3.0)[None]}}).slope("x")


def test_head_patching_on_a_causal_model_equals_a_hand_patched_forward():
    model = tlm.model(dtype=torch.float64).requires_grad_(False)
    prompt = patching.PatchingPrompt(torch.tensor([[6, 7, 8, 9, 10, 11]]), torch.tensor([[6, 7, 8, 12, 10, 11]]),
                                     Target(4, -1, 5))
    effects = patching.activation_patching(model, "heads:1", prompt, batch=3)  # reuses positions 0-2
    o_proj = model.model.layers[1].self_attn.o_proj
    stored = {}
    handle = o_proj.register_forward_pre_hook(lambda m, args: stored.setdefault("a", args[0].detach()))
    model(input_ids=prompt.corrupt_ids)
    handle.remove()
    width = stored["a"].shape[-1] // model.config.num_attention_heads
    clean = model(input_ids=prompt.clean_ids).logits[0, -1]
    for head in range(model.config.num_attention_heads):
        columns = slice(head * width, (head + 1) * width)

        def put(module, args, columns=columns):
            patched = args[0].clone()
            patched[..., columns] = stored["a"][..., columns]
            return (patched,)

        handle = o_proj.register_forward_pre_hook(put)
        logits = model(input_ids=prompt.clean_ids).logits[0, -1]
        handle.remove()
        expected = (logits[4] - logits[5]) - (clean[4] - clean[5])
        assert float(effects[head]) == pytest.approx(float(expected), rel=1e-8, abs=1e-12)
    assert patching.unit_count(model, "heads:1") == model.config.num_attention_heads


def test_position_units_patch_the_whole_activation_at_one_position_by_hand():
    model = tlm.model(dtype=torch.float64).requires_grad_(False)
    prompt = patching.PatchingPrompt(torch.tensor([[6, 7, 8, 9, 10, 11]]), torch.tensor([[6, 7, 8, 12, 10, 11]]),
                                     Target(4, -1, 5))
    spec = "model.layers.0.mlp.down_proj@4"  # the MLP's output at positions 2-5 (2 is before the change)
    effects = patching.activation_patching(model, spec, prompt, batch=3)
    assert patching.unit_count(model, spec) == 4 and effects.shape == (4,)
    down = model.model.layers[0].mlp.down_proj
    stored = []
    handle = down.register_forward_hook(lambda m, args, out: stored.append(out))
    model(input_ids=prompt.clean_ids), model(input_ids=prompt.corrupt_ids)
    handle.remove()
    clean = model(input_ids=prompt.clean_ids).logits[0, -1]
    for unit, position in enumerate(range(2, 6)):
        def put(module, args, out, position=position):
            patched = out.clone()
            patched[:, position] = stored[1][:, position]
            return patched

        handle = down.register_forward_hook(put)
        logits = model(input_ids=prompt.clean_ids).logits[0, -1]
        handle.remove()
        expected = (logits[4] - logits[5]) - (clean[4] - clean[5])
        assert float(effects[unit]) == pytest.approx(float(expected), rel=1e-8, abs=1e-12)
    assert effects[0] == 0 and effects[1:].abs().min() > 0
    # the estimates: coefficient times difference summed over the features of each position
    atp = patching.attribution_patching(model, [spec, "mlp:1"], prompt)
    embeddings = model.get_input_embeddings()(prompt.clean_ids).requires_grad_()
    handle = down.register_forward_hook(lambda m, args, out: stored.append(out) or out.retain_grad())
    logits = model(inputs_embeds=embeddings).logits[0, -1]
    handle.remove()
    (logits[4] - logits[5]).backward()
    expected = (stored[-1].grad * (stored[1] - stored[0]))[0, 2:].sum(-1)
    torch.testing.assert_close(atp[spec], expected, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="number of positions"):
        patching.unit_count(model, "mlp:1@x")
    with pytest.raises(ValueError, match="last 7 positions"):
        patching.activation_patching(model, "mlp:1@7", prompt)


def test_ioi_prompts_differ_in_the_second_subject_only():
    tokenizer = _word_tokenizer("When and went to the , gave a to".split() + [
        "Mary", "John", "Anna", "Peter", "store", "drink"])
    data_names = set(evaluate.patching.json.loads(
        evaluate.patching.resources.files("lxt_explicit.data").joinpath("ioi.json").read_text())["names"])
    assert {"Mary", "John", "Anna", "Peter"} <= data_names
    prompts = evaluate.ioi_prompts(tokenizer, 4)
    for prompt in prompts:
        differ = (prompt.clean_ids != prompt.corrupt_ids)[0].nonzero().flatten().tolist()
        assert len(differ) <= 1 and prompt.target.contrast is not None
