"""Knowledge neurons (lxt_explicit.neurons): steer, sparse autoencoders, find, label and verify on tiny models.

References are literal: steering against edited weights, SAE relevance against a run without the
autoencoder and the epsilon rule written out, ablation ordering on a model built so that the answer
is known.
"""

import copy

import pytest
import tiny_language_model as tlm
import torch

from lxt_explicit import attnlrp
from lxt_explicit.explain import explain
from lxt_explicit.latent import LatentRecorder
from lxt_explicit.neurons import (
    ActivationRecorder,
    SparseAutoencoder,
    ablation_curves,
    find_units,
    insert_sae,
    label_units,
    sae_relevance,
    site_activations,
    steer,
    train_sae,
)

PROMPT = "the capital of france is"
CORPUS = [
    "the capital of france is paris",
    "a city named after her mother",
    "ingrid and tomas found blue ice",
    "what did the expedition find ?",
    "the river led by the lake",
]


@pytest.fixture(scope="module")
def tiny():
    return tlm.model(), tlm.tokenizer()


def snapshot(model):
    """Everything a reversible edit must leave as it was."""
    modules = [(n, type(m), dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
                dict(m._forward_hooks_with_kwargs), dict(m.__dict__).get("forward")) for n, m in model.named_modules()]
    parameters = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
    return modules, parameters, list(model.state_dict())


def logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------- steer
def test_steer_equals_edited_weights_and_leaves_no_trace(tiny):
    model, tokenizer = tiny
    before, plain = snapshot(model), logits(model, tokenizer)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight[:, 3] = 0  # neuron 3 of block 1 set to 0
        head_dim = reference.config.hidden_size // reference.config.num_attention_heads
        reference.model.layers[0].self_attn.o_proj.weight[:, head_dim : 2 * head_dim] = 0  # head 1 of block 0
    with steer(model, {"mlp:1": {3: 0.0}, "heads:0": {1: 0.0}}):
        steered = logits(model, tokenizer)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(steered, logits(reference, tokenizer), rtol=0, atol=1e-12)
    assert (steered - plain).abs().max() > 1e-4
    torch.testing.assert_close(generated, reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert snapshot(model) == before
    torch.testing.assert_close(logits(model, tokenizer), plain, rtol=0, atol=0)
    torch.testing.assert_close(logits(reference, tokenizer), logits(reference, tokenizer))


def test_steer_scale_and_add_set_the_activation_and_only_on_this_instance(tiny):
    model, tokenizer = tiny
    other = copy.deepcopy(model)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad(), ActivationRecorder(model, ["mlp:1"]) as plain:
        model(input_ids=ids)
    for mode, value, expected in (("scale", 3.0, plain.activations["mlp:1"][..., 5] * 3),
                                  ("add", 0.5, plain.activations["mlp:1"][..., 5] + 0.5),
                                  ("set", 2.0, torch.full_like(plain.activations["mlp:1"][..., 5], 2.0))):
        with steer(model, {"mlp:1": {5: value}}, mode=mode), torch.no_grad(), ActivationRecorder(model, ["mlp:1"]) as r:
            model(input_ids=ids)
            torch.testing.assert_close(logits(other, tokenizer), logits(copy.deepcopy(other), tokenizer))
        torch.testing.assert_close(r.activations["mlp:1"][..., 5], expected)
        torch.testing.assert_close(r.activations["mlp:1"][..., :5], plain.activations["mlp:1"][..., :5])


def test_steered_unit_relevance_is_read_in_the_same_run(tiny):
    model, tokenizer = tiny
    composite = attnlrp()
    with composite.context(model):
        before = explain(model, tokenizer, PROMPT, latent=["mlp:1"], composite=composite)
        with steer(model, {"mlp:1": {4: 0.0, 7: 2.0}}):
            after = explain(model, tokenizer, PROMPT, latent=["mlp:1"], composite=composite)
    assert before.latent["mlp:1"][:, 4].abs().sum() > 0
    assert torch.all(after.latent["mlp:1"][:, 4] == 0)  # epsilon rule: a unit at zero gets no relevance
    assert not torch.allclose(after.latent["mlp:1"][:, 7], before.latent["mlp:1"][:, 7])
    assert composite.model is None


def test_steer_errors(tiny):
    from lxt_explicit.latent import steer as latent_steer

    assert latent_steer is steer  # also lxt_explicit.latent.steer
    model, _ = tiny
    with pytest.raises(ValueError, match="unknown unit spec"):
        steer(model, {"model.nothing": {0: 1.0}})
    with pytest.raises(ValueError, match="out of range; it has 48 units"):
        steer(model, {"mlp:1": {48: 1.0}})
    with pytest.raises(ValueError, match="out of range; it has 4 units"):
        steer(model, {"heads:0": {4: 1.0}})
    with pytest.raises(ValueError, match="blocks"):
        steer(model, {"mlp:9": {0: 1.0}})
    with pytest.raises(ValueError, match="finite"):
        steer(model, {"mlp:1": {0: float("nan")}})
    with pytest.raises(ValueError, match="mode"):
        steer(model, {"mlp:1": {0: 1.0}}, mode="multiply")
    with pytest.raises(TypeError, match="integer"):
        steer(model, {"mlp:1": {"0": 1.0}})


# ---------------------------------------------------------------------------------- autoencoders
def _relevance(model, tokenizer, specs, epsilon=1e-10):
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    composite = attnlrp(epsilon=epsilon, strict=True)
    with composite.context(model), torch.enable_grad(), LatentRecorder(model, specs) as recorder:
        out = model(input_ids=ids, use_cache=False).logits[0, -1, 7]
        out.backward(out)
    return {k: v[0].double() for k, v in recorder.relevance.items()}


def _random_sae(bias=True, seed=1):
    torch.manual_seed(seed)
    return SparseAutoencoder(32, 64, decoder_bias=bias).double()


@pytest.mark.parametrize("site", ["model.layers.0", "model.layers.1.mlp"])
def test_sae_keeps_logits_conserves_relevance_and_leaves_no_trace(tiny, site):
    model, tokenizer = tiny
    before, plain = snapshot(model), logits(model, tokenizer)
    without = _relevance(model, tokenizer, [site])[site]  # the site's relevance, no autoencoder
    sae = _random_sae()
    captured = {}
    with insert_sae(model, site, sae) as inserted:
        hook = model.get_submodule(site).register_forward_hook(lambda m, a, out: captured.setdefault("x", out))
        torch.testing.assert_close(logits(model, tokenizer), plain, rtol=0, atol=1e-12)
        hook.remove()
        spec = inserted.spec
        with_sae = _relevance(model, tokenizer, [spec, f"{spec}:error", f"{spec}:reconstruction"])
    assert snapshot(model) == before
    torch.testing.assert_close(logits(model, tokenizer), plain, rtol=0, atol=0)
    terms = sae_relevance(with_sae, site)
    # the recorder keeps relevance in float32: agreement to float32 precision
    torch.testing.assert_close(terms["total"], without.sum(-1), rtol=1e-5, atol=1e-8)
    # literal epsilon rules: the sum recon + error, then the decoder W_d f + b_d (element-wise ratios
    # amplify the float32 rounding of the recorded relevance where x is small)
    x = captured["x"][0].double()
    f = sae.encode(x).detach()
    recon = sae.decode(f).detach()
    torch.testing.assert_close(with_sae[f"{spec}:error"], (x - recon) / x * without, rtol=1e-4, atol=2e-6)
    r_recon = recon / x * without
    torch.testing.assert_close(with_sae[spec], f * ((r_recon / recon) @ sae.decoder.weight), rtol=1e-4, atol=2e-6)
    torch.testing.assert_close(terms["bias"], (sae.decoder.bias * r_recon / recon).sum(-1), rtol=1e-4, atol=2e-6)


def test_bias_free_sae_features_plus_error_equal_the_site(tiny):
    model, tokenizer = tiny
    site = "model.layers.0"
    without = _relevance(model, tokenizer, [site])[site].sum(-1)
    with insert_sae(model, site, _random_sae(bias=False)) as inserted:
        with_sae = _relevance(model, tokenizer, [inserted.spec, f"{inserted.spec}:error"])
    total = with_sae[inserted.spec].sum(-1) + with_sae[f"{inserted.spec}:error"].sum(-1)
    torch.testing.assert_close(total, without, rtol=1e-5, atol=1e-8)


def test_sae_features_are_steered_found_and_explained_like_neurons(tiny):
    model, tokenizer = tiny
    site, sae = "model.layers.0", _random_sae()
    captured = []
    hook = model.get_submodule(site).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    logits(model, tokenizer)
    hook.remove()
    with insert_sae(model, site, sae) as inserted:
        explanation = explain(model, tokenizer, PROMPT, latent=[inserted.spec])
        unit = find_units(explanation).units(inserted.spec, 1)[0]
        hook = model.get_submodule(site).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
        with steer(model, {inserted.spec: {unit: 0.0}}):
            logits(model, tokenizer)
        hook.remove()
        label = label_units(model, tokenizer, CORPUS[:2], inserted.spec, unit, top=2, progress=False)
        curves = ablation_curves(model, tokenizer, [PROMPT], inserted.spec, ks=[1, 2], random_draws=1)
    x, steered = captured[0], captured[-1]
    f = sae.encode(x)[..., unit : unit + 1]
    torch.testing.assert_close(steered, x - f * sae.decoder.weight[:, unit], rtol=1e-9, atol=1e-12)
    assert explanation.latent[inserted.spec].shape == (5, 64)
    codes = [sae.encode(captured_site(model, tokenizer, t, site)).detach() for t in CORPUS[:2]]
    assert label.by_activation[0].value == pytest.approx(max(float(c[0, :, unit].max()) for c in codes))
    assert curves.drops["relevance"][0] >= curves.drops["random"][0] - 1e-12 and curves.spec == inserted.spec


def captured_site(model, tokenizer, text, site):
    kept = []
    hook = model.get_submodule(site).register_forward_hook(lambda m, a, out: kept.append(out.detach()))
    logits(model, tokenizer, text)
    hook.remove()
    return kept[0]


def test_train_sae_reconstructs_better_than_the_mean(tiny):
    model, tokenizer = tiny
    activations = site_activations(model, tokenizer, CORPUS * 4, "model.layers.0").float()
    sae = train_sae(activations, 64, steps=150, lr=3e-3)
    error = (sae(activations) - activations).pow(2).mean()
    baseline = (activations - activations.mean(0)).pow(2).mean()
    assert error < 0.5 * baseline
    assert (sae.encode(activations) == 0).float().mean() > 0.2  # sparse codes


def test_sae_errors(tiny):
    model, _ = tiny
    with pytest.raises(TypeError, match="encode"):
        insert_sae(model, "model.layers.0", torch.nn.ReLU())
    with pytest.raises(ValueError, match="no module named"):
        insert_sae(model, "model.nothing", _random_sae())
    with pytest.raises(ValueError, match="insert_sae"):
        steer(model, {"sae:model.layers.0": {0: 1.0}})
    with attnlrp().context(model), pytest.raises(RuntimeError, match="insert the autoencoder first"):
        insert_sae(model, "model.layers.0", _random_sae())
    with pytest.raises(ValueError, match="convert it first"):
        insert_sae(model, "model.layers.0", SparseAutoencoder(32, 8))  # float32 on a float64 model
    pair = insert_sae(model, "model.layers.0", (torch.nn.Linear(32, 8).double(), torch.nn.Linear(8, 32).double()))
    assert pair.block.features.units == 8


# ------------------------------------------------------------------------------------------------ find
class _Fake:
    def __init__(self, latent):
        self.latent = latent


def test_find_units_aggregates_literally():
    a = torch.tensor([[1.0, -2.0, 0.5], [1.0, 0.0, 0.5]])  # positions x units: sums 2, -2, 1
    b = torch.tensor([[0.0, 1.0, -3.0]])  # sums 0, 1, -3
    table = find_units([_Fake({"mlp:4": a}), _Fake({"mlp:4": b})], k=1)
    rows = {row.unit: row for row in table.rows}
    assert rows[0].mean_relevance == pytest.approx(1.0) and rows[0].mean_abs_relevance == pytest.approx(1.0)
    assert rows[1].mean_relevance == pytest.approx(-0.5) and rows[1].mean_abs_relevance == pytest.approx(1.5)
    assert rows[2].mean_abs_relevance == pytest.approx(2.0) and rows[2].sign == "-"
    # top-1 by |relevance|: explanation a ties units 0 and 1 (|2|), b picks unit 2 (|-3|)
    assert rows[2].top_k_rate == pytest.approx(0.5) and rows[0].positive_rate == pytest.approx(0.5)
    assert table.units("mlp:4", 2) == [2, 1] and rows[1].layer == 4
    frame = table.to_pandas()
    assert list(frame["unit"]) == [2, 1, 0] and frame.shape == (3, 7)
    assert "mlp:4: 2 (-1, 50%)" in table.report()
    with pytest.raises(KeyError, match="explain"):
        find_units([_Fake({"mlp:4": a})], ["heads:1"])
    with pytest.raises(ValueError, match="latent"):
        find_units(_Fake({}))


def test_find_units_over_a_dataset_run(tiny):
    model, tokenizer = tiny
    explanations = explain(model, tokenizer, [PROMPT, "a city named after her"], latent=["mlp:1", "heads:0"])
    table = find_units(explanations, k=3)
    assert len(table.top("mlp:1", 100)) == 48 and len(table.top("heads:0", 100)) == 4
    top = table.top("mlp:1", 1)[0]
    literal = torch.stack([e.latent["mlp:1"].double().sum(0)[top.unit] for e in explanations]).mean()
    assert top.mean_relevance == pytest.approx(float(literal))


# ---------------------------------------------------------------------------------------------- label
def _literal_activation_and_relevance(model, tokenizer, text, unit):
    """Neuron ``unit`` of block 1: its activation and its relevance for the max-logit predictions, hooks only."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    kept = {}

    def keep(module, args):
        args[0].retain_grad()
        kept["x"] = args[0]

    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(keep)
    with attnlrp().context(model), torch.enable_grad():
        out = model(input_ids=ids, use_cache=False).logits.max(-1).values
        out.backward(out.detach())
    handle.remove()
    return kept["x"][0, :, unit].detach(), kept["x"].grad[0, :, unit]


def test_label_units_finds_the_literal_maxima(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n\n", encoding="utf-8")
    labels = label_units(model, tokenizer, path, "mlp:1", [2, 9], top=3, window=2, progress=False)
    for label in labels:
        acts, rels = zip(*(_literal_activation_and_relevance(model, tokenizer, t, label.unit) for t in CORPUS))
        best = max((float(a[p]), i, p) for i, a in enumerate(acts) for p in range(len(a)))
        first = label.by_activation[0]
        assert (first.value, first.text_index, first.position) == pytest.approx(best)
        best = max((float(r[p]), i, p) for i, r in enumerate(rels) for p in range(len(r)))
        first = label.by_relevance[0]
        assert (first.value, first.text_index, first.position) == pytest.approx(best, rel=1e-5)
        assert len(label.by_activation) == 3 and label.texts == len(CORPUS)
        assert label.by_activation[0].value >= label.by_activation[-1].value
        assert "[[" in first.highlighted() and label.summary().startswith(f"mlp:1 #{label.unit}: activation")


def test_label_units_reads_lists_and_datasets(tiny):
    model, tokenizer = tiny

    class Dataset:  # the part of datasets.Dataset that label_units uses
        column_names = ["text"]

        def __iter__(self):
            return iter({"text": t} for t in CORPUS[:2])

    one = label_units(model, tokenizer, CORPUS[:2], "heads:0", 1, top=2, progress=True)
    two = label_units(model, tokenizer, Dataset(), "heads:0", 1, top=2, progress=False)
    assert [w.value for w in one.by_activation] == [w.value for w in two.by_activation]
    with pytest.raises(ValueError, match="not a file"):
        label_units(model, tokenizer, "no/such/file.txt", "mlp:1", 0)
    with pytest.raises(ValueError, match="unit index"):
        label_units(model, tokenizer, CORPUS, "mlp:1", 48)


# --------------------------------------------------------------------------------------------- verify
def _known_answer_model():
    """Block 1's MLP: units 0-3 write the target's unembedding (their ablation is what matters), units 4-9 are
    the loudest (up-projection x 50) but write nothing, every other unit writes nothing."""
    model, tokenizer = tlm.model(seed=3), tlm.tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    target = tokenizer.convert_tokens_to_ids("paris")
    with torch.no_grad(), ActivationRecorder(model, ["mlp:1"]) as recorder:
        model(input_ids=ids)
    last = recorder.activations["mlp:1"][0, -1].double()
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        direction = model.lm_head.weight[target] / model.lm_head.weight[target].norm()
        mlp.down_proj.weight.zero_()
        for unit, scale in zip(range(4), (0.04, 0.03, 0.02, 0.01)):
            size = last[unit].abs().clamp(min=1e-3)
            mlp.down_proj.weight[:, unit] = scale * torch.sign(last[unit]) * direction / size
        mlp.up_proj.weight[4:10] *= 50
    return model, tokenizer, target


def test_ablation_ordering_on_a_model_where_the_answer_is_known():
    model, tokenizer, target = _known_answer_model()
    ks = list(range(1, 11))
    curves = ablation_curves(model, tokenizer, [PROMPT], "mlp:1", ks=ks, targets=[target], random_draws=4)
    relevance, activation, random = (curves.drops[name] for name in ("relevance", "activation", "random"))
    # the most relevant units are 0-3, in the order of their contributions; removing them removes everything
    explanation = explain(model, tokenizer, PROMPT, target=target, latent=["mlp:1"])
    assert explanation.latent["mlp:1"].sum(0).argsort(descending=True)[:4].tolist() == [0, 1, 2, 3]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight[:, :4] = 0
    full = curves.base_logits[0] - float(logits(reference, tokenizer)[0, -1, target])
    assert relevance[3] == pytest.approx(full, rel=1e-9) and full > 0.1, full
    assert all(a < b for a, b in zip(relevance[:4], relevance[1:4]))
    assert activation[:6] == pytest.approx([0.0] * 6, abs=1e-12)  # the loud units write nothing
    assert all(r >= a - 1e-12 and r >= m - 1e-12 for r, a, m in zip(relevance, activation, random))
    assert relevance[0] > random[0] + 0.1 * full, (relevance, random)
    mean = ablation_curves(model, tokenizer, [PROMPT], "mlp:1", ks=[1, 2], targets=[target], mode="mean")
    assert mean.mode == "mean" and len(mean.drops["relevance"]) == 2
    with pytest.raises(ValueError, match="ks must lie in 1..48"):
        ablation_curves(model, tokenizer, [PROMPT], "mlp:1", ks=[49])
