"""State-space and linear-attention families: the MambaLRP rules (Jafari et al., NeurIPS 2024) in both presets.

The scans' input-dependent parameters (Mamba's step size, A, B and C; the queries, keys, decay and
write strength of gated delta rules) are constants, so every scan is linear in its input; SiLU and
normalizations get the identity rule, gates the presets' rule.  Checked against the independent
Gradient x Input formulation (tests/gxi_reference.py: the scan functions called with their
parameters detached), by conservation on bias-free copies, and by what the scan functions receive.
"""

import copy
import functools
import inspect
import sys
import types
import warnings

import pytest
import tiny_models as tm
import torch
from gxi_reference import SCAN_PARAMETERS, gxi_relevance
from torch import nn
from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

import lxt_explicit as lxt
from lxt_explicit.composite import UnhandledOperationError
from lxt_explicit.diagnostics import audit
from lxt_explicit.rules import EinsumRule, LinearSolveRule, RuleDeclined, ScanParametersRule

METHODS = {"attnlrp": lxt.attnlrp, "cp_lrp": lxt.cp_lrp}
PARAMETERS = {name for names in SCAN_PARAMETERS.values() for name in names}
IDS = torch.randint(3, tm.VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def explain(model, composite):
    """Relevance at every source (summed over the hidden dimension) of the top logit at the last position."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxt.CoverageWarning)
        with composite.context(model):
            logits = model(input_ids=IDS, use_cache=False).logits
            goal = logits[0, -1].max()
            goal.backward(goal.detach())
            sources = {name: r.sum(-1)[0] for name, r in composite.source_relevance().items()}
    return sources, goal.item()


def max_relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def record_scan_arguments(model, monkeypatch):
    """Replace the scan functions of ``model``'s modeling files by recorders of which arguments need a gradient."""
    calls = []
    for modeling in {sys.modules[type(m).__module__] for m in model.modules()}:
        for name in SCAN_PARAMETERS:
            function = getattr(modeling, name, None)
            if function is None:
                continue
            signature = inspect.signature(function)

            def recorder(*args, function=function, signature=signature, **kwargs):
                bound = signature.bind(*args, **kwargs)
                calls.append({k: v.requires_grad for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)})
                return function(*args, **kwargs)

            monkeypatch.setattr(modeling, name, recorder)
    return calls


@pytest.mark.parametrize("family", tm.SSM_FAMILIES)
def test_rules_cover_every_operation_the_scan_parameters_are_constants_and_logits_are_unchanged(family, monkeypatch):
    model = tm.build_ssm(family)
    reference = model(input_ids=IDS, use_cache=False).logits
    calls = record_scan_arguments(model, monkeypatch)
    for method in METHODS.values():
        calls.clear()
        with method(strict=True).context(model):  # strict: an operation without a rule raises
            assert torch.equal(model(input_ids=IDS, use_cache=False).logits, reference)
        assert calls, "no scan function ran"
        for call in calls:
            assert not any(needs for name, needs in call.items() if name in PARAMETERS), call
            assert call.get("hidden_states", call.get("value")), call  # the scan's input carries relevance
    assert torch.equal(model(input_ids=IDS, use_cache=False).logits, reference)


@pytest.mark.parametrize("family", tm.SSM_FAMILIES)
def test_relevance_equals_gradient_times_input_with_constant_scan_parameters(family):
    model = tm.build_ssm(family)
    for method, preset in METHODS.items():
        ours, _ = explain(model, preset(epsilon=1e-12))
        expected = gxi_relevance(
            model, lambda m: m(input_ids=IDS, use_cache=False).logits[0, -1].max(), cp=method == "cp_lrp"
        )
        assert expected.keys() == ours.keys()
        for name, relevance in expected.items():
            assert max_relative_error(ours[name], relevance.sum(-1)[0]) <= 1e-6, (method, name)


@pytest.mark.parametrize("family", tm.SSM_FAMILIES)
def test_cp_lrp_conserves_relevance_on_bias_free_models(family):
    sources, goal = explain(tm.build_ssm(family, bias_free=True), lxt.cp_lrp(epsilon=1e-12))
    assert abs(sum(float(r.sum()) for r in sources.values()) - goal) <= 1e-6 * abs(goal)


# with softmax attention, AttnLRP's softmax rule (a Taylor decomposition with bias) absorbs some relevance
@pytest.mark.parametrize("family", tm.PURE_SSM_FAMILIES)
def test_mambalrp_conserves_relevance_on_bias_free_models(family):
    sources, goal = explain(tm.build_ssm(family, bias_free=True), lxt.attnlrp(epsilon=1e-12))
    assert abs(sum(float(r.sum()) for r in sources.values()) - goal) <= 1e-6 * abs(goal)


# the scan is a linear map of its input once its parameters are constants: its relevance does not depend on the
# algorithm that computes it (Mamba2's chunk length; a gated delta rule's chunked or token-by-token form)
def test_relevance_does_not_depend_on_how_the_scan_is_computed(monkeypatch):
    model = tm.build_ssm("mamba2")
    chunked, _ = explain(model, lxt.attnlrp(epsilon=1e-12))
    for layer in model.backbone.layers:
        monkeypatch.setattr(layer.mixer, "chunk_size", 16)  # one chunk instead of three
    whole, _ = explain(model, lxt.attnlrp(epsilon=1e-12))
    assert max_relative_error(whole["backbone.embeddings"], chunked["backbone.embeddings"]) <= 1e-6

    from transformers.models.qwen3_5 import modeling_qwen3_5

    model = tm.build_ssm("qwen3_5")
    chunked, _ = explain(model, lxt.cp_lrp(epsilon=1e-12))
    monkeypatch.setattr(modeling_qwen3_5, "torch_chunk_gated_delta_rule",
                        modeling_qwen3_5.torch_recurrent_gated_delta_rule)
    recurrent, _ = explain(model, lxt.cp_lrp(epsilon=1e-12))
    assert max_relative_error(recurrent["model.embed_tokens"], chunked["model.embed_tokens"]) <= 1e-6


# ----------------------------------------------------------------------------- refusals and reports


def test_registration_refuses_a_mixer_that_would_run_a_fused_kernel(monkeypatch):
    from transformers.models.mamba2 import modeling_mamba2

    package = types.ModuleType("lxt_test_fused_scan")
    package.mamba_chunk_scan_combined = lambda *args, **kwargs: None  # stands for mamba-ssm's kernel
    monkeypatch.setitem(sys.modules, "lxt_test_fused_scan", package)
    fused = use_kernel_func_from_hub_with_fallback("mamba_chunk_scan_combined", "lxt_test_fused_scan")(
        modeling_mamba2.mamba2_chunk_scan.__wrapped__
    )
    monkeypatch.setattr(modeling_mamba2, "mamba2_chunk_scan", fused)
    model = tm.build_ssm("mamba2")
    composite = lxt.attnlrp()
    with pytest.raises(RuntimeError, match="fused kernels mamba2_chunk_scan"):
        composite.register(model)
    assert composite.model is None and "forward" not in model.backbone.layers[0].mixer.__dict__


def test_a_copy_of_a_model_with_split_parameters_is_the_unregistered_model():
    model = tm.build_ssm("mamba2")
    ids = torch.randint(3, 60, (1, 6))
    reference = model(input_ids=ids, use_cache=False).logits
    with lxt.attnlrp().context(model):
        clone = copy.deepcopy(model)  # the mixers' forward was overridden twice: the copy gets the class's back
    assert not any("forward" in module.__dict__ for module in clone.modules())
    assert torch.equal(clone(input_ids=ids, use_cache=False).logits, reference)


class Mamba2Mixer(nn.Module):
    """A mixer of the name of transformers' Mamba2 mixer that computes its parameters without the expected splits."""

    intermediate_size, conv_dim, num_heads, n_groups, ssm_state_size = 8, 12, 2, 1, 2

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.in_proj(x)


def test_a_mixer_whose_parameter_splits_do_not_run_is_reported():
    model = nn.Sequential(Mamba2Mixer())
    with pytest.raises(UnhandledOperationError, match="Mamba2Mixer scan parameters"):
        audit(model, lxt.attnlrp(strict=True), torch.randn(2, 4))


# ----------------------------------------------------------------------------- the rules, against literal formulas


def test_scan_parameters_rule_detaches_the_given_outputs_only():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    parts = ScanParametersRule(parts=(1, 2))(torch.split, x, [2, 2, 2], dim=-1)
    assert [p.requires_grad for p in parts] == [True, False, False]
    assert all(torch.equal(p, q) for p, q in zip(parts, torch.split(x, [2, 2, 2], dim=-1)))
    assert not ScanParametersRule()(torch.nn.functional.linear, x, torch.randn(2, 6, dtype=x.dtype)).requires_grad
    with pytest.raises(RuleDeclined, match="needs a tuple"):
        ScanParametersRule(parts=(3,))(torch.split, x, [3, 3], dim=-1)


def test_einsum_rule_is_the_epsilon_rule_of_a_contraction_with_a_constant():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    m = torch.randn(2, 4, 5, dtype=torch.float64, generator=generator)
    out = EinsumRule(epsilon=1e-12)(torch.einsum, "bls,bsp->blp", [m, x])
    out.backward(out)
    y = torch.einsum("bls,bsp->blp", m, x.detach())
    literal = torch.einsum("bls,bsp,blp->bsp", m, x.detach(), out.detach() / y)  # x_j sum_i m_ij R_i / y_i
    assert torch.allclose(x.grad, literal, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuleDeclined, match="sublist"):
        EinsumRule()(torch.einsum, m, [0, 1, 2], x, [0, 2, 3])


def test_einsum_rule_shares_a_bilinear_contraction_uniformly():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    relevance = torch.randn(4, 5, dtype=torch.float64, generator=generator)
    out = EinsumRule(epsilon=1e-12)(torch.einsum, "ij,jk->ik", a, b)
    out.backward(relevance)
    normed = relevance / (a @ b).detach()  # Proposition 3.3: half of the epsilon rule for each operand
    assert torch.allclose(a.grad, 0.5 * a.detach() * (normed @ b.detach().T), rtol=1e-10, atol=1e-12)
    assert torch.allclose(b.grad, 0.5 * b.detach() * (a.detach().T @ normed), rtol=1e-10, atol=1e-12)


def test_linear_solve_rule_is_the_epsilon_rule_of_the_right_hand_side():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.eye(4, dtype=torch.float64) + torch.randn(4, 4, dtype=torch.float64, generator=generator).tril(-1)
    rhs = torch.randn(4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    solve = functools.partial(torch.linalg.solve_triangular, upper=False, unitriangular=True)
    out = LinearSolveRule(epsilon=1e-12)(torch.linalg.solve_triangular, matrix, rhs, upper=False, unitriangular=True)
    relevance = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    out.backward(relevance)
    literal = rhs.detach() * (torch.linalg.inv(matrix).T @ (relevance / solve(matrix, rhs.detach())))
    assert torch.allclose(rhs.grad, literal, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuleDeclined, match="constant matrix"):
        LinearSolveRule()(torch.linalg.solve_triangular, matrix.requires_grad_(), rhs, upper=False)
