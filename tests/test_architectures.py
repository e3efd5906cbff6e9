"""AttnLRP and CP-LRP presets on unmodified transformers models (tiny configs, fixed seed, float64).

Every supported architecture: forward unchanged, zero unhandled ops in the audit, relevance equal to
the independent Gradient x Input formulation in ``gxi_reference.py``, eager == sdpa, and CP-LRP
conservation on bias-free models.  Then padding, training mode with gradient checkpointing,
bfloat16, accelerate offloading and the absence of process-global side effects.
"""

import copy
import traceback
import warnings

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from gxi_reference import gxi_relevance
from torch.overrides import TorchFunctionMode

import lxt_explicit as lxt
from lxt_explicit.diagnostics import audit

METHODS = {"attnlrp": lxt.attnlrp, "cp_lrp": lxt.cp_lrp}


def explain(model, arch, inputs, composite):
    """Explicit relevance of every source (summed over the hidden dimension) and of the pixels."""
    inputs = dict(inputs)
    if arch in tm.VISION:
        inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxt.CoverageWarning)
        with composite.context(model):
            output = model(**inputs)
            goal = tm.target(arch, output)
            goal.backward(goal.detach())
            relevance = {name: r.sum(-1) for name, r in composite.source_relevance().items()}
    if arch in tm.VISION:
        relevance["pixels"] = inputs["pixel_values"].grad
    return relevance, goal.detach()


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cp_lrp_with_relevant_gates_equals_the_uniform_split(arch):
    model = tm.build(arch)
    inputs = tm.inputs(arch)
    ours, _ = explain(model, arch, inputs, lxt.cp_lrp(epsilon=1e-12, gates="relevant"))
    constant, _ = explain(model, arch, inputs, lxt.cp_lrp(epsilon=1e-12))
    reference = gxi_relevance(model, lambda m: tm.target(arch, m(**inputs)), cp=True, constant_gates=False)
    for name, expected in reference.items():
        assert max_relative_error(ours[name], expected.sum(-1)) <= 1e-6, name
        assert max_relative_error(constant[name], expected.sum(-1)) > 1e-4, name  # the two definitions differ


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_several_targets_of_one_forward_pass_fused_attention_equals_eager(arch, method):
    results = {}
    for attn in ("eager", "sdpa"):
        model = tm.build(arch, attn=attn)
        composite = METHODS[method](epsilon=1e-12)
        with composite.context(model):
            logits = model(**tm.inputs(arch)).logits
            source = composite.source_tensors()[next(iter(composite.source_tensors()))]
            position = -1 if arch in tm.CAUSAL else 2
            first, second = logits[0, position, 5], logits[0, position, 7]
            one = torch.autograd.grad(first, source, first.detach(), retain_graph=True)[0]
            two = torch.autograd.grad(second, source, second.detach(), retain_graph=True)[0]
            again = torch.autograd.grad(first, source, first.detach())[0]  # a third pass, the last one
        torch.testing.assert_close(again, one, rtol=0, atol=0)
        results[attn] = (one.sum(-1), two.sum(-1))
    for eager, sdpa in zip(results["eager"], results["sdpa"]):
        assert max_relative_error(sdpa, eager) <= 1e-6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_forward_unchanged_and_no_unhandled_ops(arch, attn):
    model = tm.build(arch, attn=attn)
    inputs = tm.inputs(arch, batch=2)
    reference = model(**inputs).logits
    composite = lxt.attnlrp()
    with composite.context(model):
        assert torch.equal(model(**inputs).logits, reference)
    report = audit(model, lxt.attnlrp(strict=True), **inputs)
    assert report.unhandled == []
    assert report.counts()["rule"] >= 10
    assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_relevance_equals_gradient_times_input_formulation(arch, method):
    model = tm.build(arch)
    inputs = tm.inputs(arch)
    ours, _ = explain(model, arch, inputs, METHODS[method](epsilon=1e-12))
    leaf_inputs, gxi_inputs = (), dict(inputs)
    if arch in tm.VISION:
        gxi_inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
        leaf_inputs = (("pixels", gxi_inputs["pixel_values"]),)
    reference = gxi_relevance(
        model, lambda m: tm.target(arch, m(**gxi_inputs)), cp=method == "cp_lrp", leaf_inputs=leaf_inputs
    )
    compared = 0
    for name, expected in reference.items():
        expected = expected if name == "pixels" else expected.sum(-1)
        a, b = ours[name].flatten(), expected.flatten()
        assert F.cosine_similarity(a, b, dim=0) >= 0.9999, name
        assert max_relative_error(a, b) <= 1e-6, name
        compared += 1
    assert compared >= 1


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bert", "vit"])
def test_default_epsilon_stays_close_to_gradient_times_input(arch):
    model = tm.build(arch)
    inputs = tm.inputs(arch)
    ours, _ = explain(model, arch, inputs, lxt.attnlrp())
    gxi_inputs = dict(inputs)
    leaf_inputs = ()
    if arch in tm.VISION:
        gxi_inputs["pixel_values"] = inputs["pixel_values"].clone().requires_grad_()
        leaf_inputs = (("pixels", gxi_inputs["pixel_values"]),)
    reference = gxi_relevance(model, lambda m: tm.target(arch, m(**gxi_inputs)), leaf_inputs=leaf_inputs)
    for name, expected in reference.items():
        expected = expected if name == "pixels" else expected.sum(-1)
        assert F.cosine_similarity(ours[name].flatten(), expected.flatten(), dim=0) >= 0.9999


@pytest.mark.parametrize("epsilon,tolerance", [(1e-6, 1e-4), (1e-12, 1e-6)])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_eager_and_sdpa_give_the_same_relevance(arch, method, epsilon, tolerance):
    inputs = tm.inputs(arch, batch=2)
    eager, _ = explain(tm.build(arch, attn="eager"), arch, inputs, METHODS[method](epsilon=epsilon))
    sdpa, _ = explain(tm.build(arch, attn="sdpa"), arch, inputs, METHODS[method](epsilon=epsilon))
    assert eager.keys() == sdpa.keys()
    for name in eager:
        # Eager attention stabilizes the q k^T rule with epsilon, sdpa needs no stabilizer there (see
        # functional.scaled_dot_product_attention); eager Llama-family attention also takes the softmax in
        # float32.  Both differences vanish with epsilon.
        assert max_relative_error(eager[name], sdpa[name]) <= tolerance, name


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_cp_lrp_conserves_relevance_on_bias_free_models(arch):
    model = tm.build(arch, bias_free=True)
    relevance, goal = explain(model, arch, tm.inputs(arch), lxt.cp_lrp(epsilon=1e-12))
    total = sum(r.sum() for r in relevance.values())
    assert abs((total - goal).item()) <= 1e-6 * abs(goal.item()), {k: v.sum().item() for k, v in relevance.items()}


def _pad(ids_list, side, pad_id=0):
    length = max(len(ids) for ids in ids_list)
    input_ids = torch.full((len(ids_list), length), pad_id)
    mask = torch.zeros(len(ids_list), length, dtype=torch.long)
    for row, ids in enumerate(ids_list):
        span = slice(length - len(ids), length) if side == "left" else slice(0, len(ids))
        input_ids[row, span], mask[row, span] = torch.tensor(ids), 1
    return input_ids, mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "arch,side", [(a, side) for a in ("llama", "gemma3", "gpt2") for side in ("left", "right")] + [("bert", "right")]
)
def test_padded_batch_equals_prompts_one_by_one(arch, side, attn):
    # float32: in float64, eager Llama-family attention casts the float64 mask minimum to float32 -inf,
    # so the unmodified model's fully masked (padding) rows are NaN already in the forward pass.
    model = tm.build(arch, attn=attn, dtype=torch.float32)
    prompts = [[5, 17, 33, 8, 41], [9, 12, 70], [60, 3, 22, 11]]
    source = {"gpt2": "transformer.wte", "bert": "bert.embeddings.word_embeddings"}.get(arch, "model.embed_tokens")
    extra = {} if arch == "bert" else {"use_cache": False}

    def explained(logits, row, position):
        return logits[row, 1 if arch == "bert" else position].max()

    composite = lxt.attnlrp()
    single = []
    with composite.context(model):
        for ids in prompts:
            goal = explained(model(input_ids=torch.tensor([ids]), **extra).logits, 0, -1)
            goal.backward(goal.detach())
            single.append(composite.source_relevance()[source][0].sum(-1))

        input_ids, mask = _pad(prompts, side)
        kwargs = {"input_ids": input_ids, "attention_mask": mask, **extra}
        if arch != "bert":
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(**kwargs).logits
        last = [mask.shape[1] - 1 if side == "left" else len(ids) - 1 for ids in prompts]
        goals = torch.stack([explained(logits, row, last[row]) for row in range(len(prompts))])
        goals.backward(goals.detach())  # each prompt's logit is explained by its own value
        batch = composite.source_relevance()[source].sum(-1)
    for row, ids in enumerate(prompts):
        span = slice(mask.shape[1] - len(ids), None) if side == "left" else slice(0, len(ids))
        assert max_relative_error(batch[row, span], single[row]) <= 1e-4
        padding = batch[row][mask[row] == 0]
        assert padding.numel() == 0 or padding.abs().max() <= 1e-6 * single[row].abs().max()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "bert"])
def test_training_mode_with_gradient_checkpointing_gives_the_same_relevance(arch, reentrant):
    model = tm.build(arch)
    inputs = tm.inputs(arch)
    expected, _ = explain(model, arch, inputs, lxt.attnlrp())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    try:
        if reentrant:  # reentrant checkpointing needs an input that requires grad to build the graph
            model.enable_input_require_grads()
        actual, _ = explain(model, arch, inputs, lxt.attnlrp())
        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers and all("_gradient_checkpointing_func" in m.__dict__ for m in layers)
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    for name in expected:
        assert max_relative_error(actual[name], expected[name]) <= 1e-10, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2", "bert", "vit"])
def test_bfloat16_relevance_is_finite_and_close_to_float32(arch):
    inputs32 = tm.inputs(arch, dtype=torch.float32, length=12)
    reference, _ = explain(tm.build(arch, dtype=torch.float32), arch, inputs32, lxt.attnlrp())
    inputs16 = dict(inputs32)
    if arch in tm.VISION:
        inputs16["pixel_values"] = inputs32["pixel_values"].to(torch.bfloat16)
    relevance, _ = explain(tm.build(arch, dtype=torch.bfloat16), arch, inputs16, lxt.attnlrp())
    for name in reference:
        r16 = relevance[name].float()
        assert torch.isfinite(r16).all(), name
        assert F.cosine_similarity(r16.flatten(), reference[name].flatten(), dim=0) >= 0.99, name


def test_accelerate_offloaded_model_gives_the_same_relevance(tmp_path):
    accelerate = pytest.importorskip("accelerate", reason="accelerate is needed for device_map offloading")
    model = tm.build("llama")
    inputs = tm.inputs("llama")
    expected, _ = explain(model, "llama", inputs, lxt.attnlrp())
    offloaded = copy.deepcopy(model)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "lm_head": "cpu",
    }
    offloaded = accelerate.dispatch_model(offloaded, device_map=device_map, offload_dir=str(tmp_path))
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    actual, _ = explain(offloaded, "llama", inputs, lxt.attnlrp())
    for name in expected:
        assert max_relative_error(actual[name], expected[name]) <= 1e-12, name


def test_registration_has_no_process_global_side_effects():
    import transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    first, second = tm.build("llama"), tm.build("llama")
    inputs = tm.inputs("llama")
    classes = {type(m): dict(vars(type(m))) for m in list(first.modules())}
    registry = dict(ALL_ATTENTION_FUNCTIONS.items()) if hasattr(ALL_ATTENTION_FUNCTIONS, "items") else None
    functions = {name: getattr(F, name) for name in ("linear", "softmax", "scaled_dot_product_attention")}
    reference = second(**inputs).logits
    composite = lxt.attnlrp().register(first)
    # the other instance runs and differentiates exactly as before
    assert torch.equal(second(**inputs).logits, reference)
    assert all(p.requires_grad for p in second.parameters())
    assert not any("forward" in m.__dict__ for m in second.modules())
    embeds = second.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    second(inputs_embeds=embeds, use_cache=False).logits[0, -1].max().backward()
    plain_grad = embeds.grad.clone()
    composite.remove()
    embeds.grad = None
    second(inputs_embeds=embeds, use_cache=False).logits[0, -1].max().backward()
    assert torch.equal(embeds.grad, plain_grad)
    assert {type(m): dict(vars(type(m))) for m in list(first.modules())} == classes
    if registry is not None:
        assert dict(ALL_ATTENTION_FUNCTIONS.items()) == registry
    assert functions == {name: getattr(F, name) for name in functions}
    assert transformers.__version__.startswith("5.")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_runs_unchanged_while_registered(arch):
    model = tm.build(arch)
    ids = tm.inputs(arch)["input_ids"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    with lxt.attnlrp().context(model):
        assert torch.equal(model.generate(ids, **kwargs), expected)


class HostReads(TorchFunctionMode):
    """Counts the library's calls that read tensor values on the host (a synchronization on an accelerator)."""

    READS = {
        torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
        torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.equal, torch.Tensor.numpy,
    }

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            # the code that asked: the innermost frame outside torch, this mode and the routing of the calls
            callers = [
                f for f in traceback.extract_stack()[:-1]
                if "/torch/" not in f.filename and not f.filename.endswith(("routing.py", "test_architectures.py"))
            ]
            if callers and "/lxt_explicit/" in callers[-1].filename:
                self.reads.append(f"{func.__name__} in {callers[-1].filename.rsplit('/', 1)[-1]}:{callers[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_no_host_reads_per_operation_in_forward_and_backward(method, padded):
    model = tm.build("llama", attn="sdpa", dtype=torch.float32)
    inputs = tm.inputs("llama", batch=2, length=9, dtype=torch.float32)
    if padded:
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, :3] = 0
        inputs["attention_mask"] = mask
    composite = METHODS[method]()
    with composite.context(model), HostReads() as reads:
        logits = model(**inputs).logits
        goal = logits[:, -1].max(-1).values.sum()
        goal.backward(goal.detach())
    # at most one read per distinct attention mask and forward pass (whether it carries a bias), none per layer
    assert len(reads.reads) <= (1 if padded else 0), reads.reads
