"""Composite: registration round trip, key matching, error paths, and conservation of whole networks."""

import re
import warnings

import pytest
import torch
from torch import nn

import lxt_explicit as lxt
from lxt_explicit import Composite, CoverageWarning, RelevanceSource, UnhandledOperationError
from lxt_explicit.rules import EpsilonRule, IdentityRule, UniformRule

D = torch.float64


class GatedNet(nn.Module):
    """Linear layers, an element-wise activation and a gated product: linear + identity + uniform rules."""

    def __init__(self, bias=False):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.up = nn.Linear(6, 8, bias=bias)
        self.gate = nn.Linear(6, 8, bias=bias)
        self.act = nn.SiLU()
        self.down = nn.Linear(8, 6, bias=bias)
        self.head = nn.Linear(6, 3, bias=bias)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(self.act(self.gate(h)) * self.up(h))
        return self.head(h)


def gated_composite(epsilon=0.0):
    return Composite(
        {nn.Embedding: RelevanceSource, nn.Linear: EpsilonRule(epsilon=epsilon), nn.SiLU: IdentityRule},
        ops={"mul": UniformRule(), "add": EpsilonRule(epsilon=epsilon)},
    )


def test_network_without_biases_conserves_relevance_exactly():
    net = GatedNet().double().eval()
    ids = torch.randint(0, 10, (2, 5))
    composite = gated_composite().register(net)
    out = net(ids)
    R = torch.randn(out.shape, dtype=D)
    out.backward(R)
    relevance = composite.source_relevance()["embed"]
    assert abs(relevance.sum().item() - R.sum().item()) < 1e-10 * max(1.0, abs(R.sum().item()))
    # per position too: no relevance moves between positions in this network
    torch.testing.assert_close(relevance.sum(-1), R.sum(-1), rtol=1e-10, atol=1e-10)


def test_linear_bias_absorbs_what_the_formula_predicts():
    layer = nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    with Composite({nn.Linear: EpsilonRule(epsilon=0.0)}).context(layer):
        out = layer(x)
        R = torch.randn(3, 4, dtype=D)
        out.backward(R)
    z = out.detach()
    predicted = (R * (z - layer.bias.detach()) / z).sum()
    torch.testing.assert_close(x.grad.sum(), predicted, rtol=1e-10, atol=1e-12)
    assert abs((R.sum() - x.grad.sum()).item()) > 1e-3  # the bias did absorb something


def snapshot(model):
    return {
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "ids": [(name, id(m)) for name, m in model.named_modules()],
        "params": [(name, id(p), p.requires_grad) for name, p in model.named_parameters()],
        "state_keys": list(model.state_dict().keys()),
        "dicts": [(name, sorted(m.__dict__.keys())) for name, m in model.named_modules()],
        "hooks": [(name, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in model.named_modules()],
        "class_forward": {type(m): type(m).forward for _, m in model.named_modules()},
    }


def test_register_remove_leaves_no_trace():
    net = GatedNet(bias=True).double().eval()
    net.head.weight.requires_grad_(False)  # a mix of requires_grad states must be restored as it was
    calls = []
    net.down.register_forward_hook(lambda m, i, o: calls.append(1))
    ids = torch.randint(0, 10, (2, 5))
    before, reference = snapshot(net), net(ids)
    composite = gated_composite(epsilon=1e-6).register(net)
    registered = net(ids)
    assert torch.equal(registered, reference)  # forward unchanged while registered
    assert all(not p.requires_grad for p in net.parameters())  # parameters are constants while registered
    composite.remove()
    after = snapshot(net)
    for key in before:
        assert before[key] == after[key], key
    assert torch.equal(net(ids), reference)
    assert len(calls) == 3  # the user's hook ran every time and is still there


def test_context_manager_and_another_model_is_unaffected():
    a, b = GatedNet().double().eval(), GatedNet().double().eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 10, (1, 4))
    with gated_composite().context(a) as model:
        assert model is a
        assert "forward" in a.__dict__ and "forward" not in b.__dict__
        assert all(p.requires_grad for p in b.parameters())
        out_b = b(ids)
        out_b.sum().backward()  # b still computes plain gradients
        assert b.head.weight.grad is not None
    assert "forward" not in a.__dict__


def test_registering_twice_replaces_cleanly_and_another_composite_is_refused():
    net = GatedNet().double()
    composite = gated_composite()
    composite.register(net)
    composite.register(net)  # replaces the earlier registration
    assert net.forward.__wrapped__.__self__ is net  # one wrapper, not nested
    other = gated_composite()
    with pytest.raises(RuntimeError, match="already registered"):
        other.register(net)
    with pytest.raises(RuntimeError, match="already registered"):
        other.register(net.down)
    composite.remove()
    other.register(net)
    other.remove()
    assert "forward" not in net.__dict__


def test_same_composite_moves_to_a_second_model():
    a, b = GatedNet().double(), GatedNet().double()
    composite = gated_composite().register(a)
    composite.register(b)
    assert "forward" not in a.__dict__ and composite.model is b
    composite.remove()


def test_key_types_first_match_wins_and_none_excludes():
    net = GatedNet().double()
    composite = Composite(
        {
            "head": None,
            re.compile(r"(up|gate)"): EpsilonRule(epsilon=0.5),
            "dow*": UniformRule,
            lambda name, module: isinstance(module, nn.Linear): EpsilonRule,
        }
    )
    assert composite.rule_for("head", net.head) is None
    assert composite.rule_for("up", net.up) == EpsilonRule(epsilon=0.5)
    assert isinstance(composite.rule_for("down", net.down), UniformRule)
    assert composite.rule_for("other", nn.Linear(1, 1)) == EpsilonRule()


def test_each_module_gets_its_own_rule_copy():
    net = GatedNet().double()
    template = EpsilonRule(epsilon=0.1)
    composite = Composite({nn.Linear: template}).register(net)
    rules = composite.assignments()
    assert set(rules) == {"up", "gate", "down", "head"}
    assert len({id(rule) for rule in rules.values()} | {id(template)}) == 5
    assert all(rule == template for rule in rules.values())
    composite.remove()
    assert composite.assignments() == {}


def test_submodules_of_a_ruled_module_get_no_rule_of_their_own():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.SiLU()), nn.Linear(3, 2)).double()
    with pytest.warns(UserWarning, match="SiLU.* matches no module"):  # the SiLU is run by the rule of "0"
        composite = Composite({"0": EpsilonRule, nn.Linear: EpsilonRule, nn.SiLU: IdentityRule}).register(model)
    assert set(composite.assignments()) == {"0", "1"}
    composite.remove()


def test_bad_keys_and_values_are_explained():
    with pytest.raises(TypeError, match="unsupported layer-map key"):
        Composite({42: EpsilonRule})
    with pytest.raises(TypeError, match="must be a Rule"):
        Composite({nn.Linear: "epsilon"})
    with pytest.raises(KeyError, match="unknown op name"):
        Composite(ops={"addition": EpsilonRule()})
    with pytest.warns(UserWarning, match="matches no module"):
        Composite({nn.Conv2d: EpsilonRule}).register(GatedNet())


def test_a_module_rule_that_does_not_cover_its_module_declines_and_the_ops_are_routed():
    from lxt_explicit.diagnostics import audit

    net = GatedNet().double()
    composite = Composite({nn.Embedding: RelevanceSource, "down": IdentityRule}, ops={"linear": EpsilonRule()})
    report = audit(net, composite, torch.randint(0, 10, (1, 3)))
    declined = [row for row in report.rows if row.status == "declined"]
    assert [(row.module, row.op) for row in declined] == [("down", "IdentityRule()")]
    assert any(row.module == "down" and row.op == "F.linear" and row.status == "rule" for row in report.rows)
    with pytest.raises(ValueError, match="element-wise"):  # called directly, the rule says why it does not apply
        IdentityRule()(net.down, torch.randn(2, 8, dtype=D, requires_grad=True))


class Exotic(nn.Module):
    def forward(self, x):
        return torch.exp(x) * 2


def test_unhandled_operation_warns_once_and_strict_mode_raises():
    model = nn.Sequential(nn.Linear(3, 3), Exotic()).double()
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    composite = Composite({nn.Linear: EpsilonRule}, ops={"mul": UniformRule()}).register(model)
    with pytest.warns(CoverageWarning, match=r"torch\.exp.*module '1' \(Exotic\)"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # warned once per op and module
    composite.remove()
    strict = Composite({nn.Linear: EpsilonRule}, strict=True).register(model)
    with pytest.raises(UnhandledOperationError, match=r"torch\.exp"):
        model(x)
    strict.remove()


class Product(nn.Module):
    def forward(self, a, b):
        return a * b


def test_submodule_called_directly_is_still_routed():
    model = nn.Sequential(nn.Linear(8, 8), Product()).double()
    composite = Composite(ops={"mul": UniformRule()}).register(model)
    a = torch.randn(2, 8, dtype=D, requires_grad=True)
    b = torch.randn(2, 8, dtype=D, requires_grad=True)
    out = model[1](a, b)  # called directly, not through the model's forward
    R = torch.randn(2, 8, dtype=D)
    out.backward(R)
    assert torch.equal(a.grad, 0.5 * R) and torch.equal(b.grad, 0.5 * R)  # uniform rule, not the gradient
    composite.remove()


class ScaleNorm(torch.nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class CenterNorm(torch.nn.Module):
    def forward(self, x):
        centered = x - x.mean(-1, keepdim=True)
        return centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5) * 1.5


def test_normalizations_written_out_get_the_rules_of_named_ones():
    x = torch.randn(3, 6, dtype=D)
    R = torch.randn(3, 6, dtype=D)
    for module, reference in ((ScaleNorm(), lambda t: R), (CenterNorm(), None)):
        leaf = x.clone().requires_grad_()
        with lxt.attnlrp(epsilon=1e-12, strict=True).context(module):
            module(leaf).backward(R)
        if reference is not None:  # the identity rule of an RMS norm
            torch.testing.assert_close(leaf.grad, R, rtol=0, atol=0)
        else:  # the layer-norm rule: epsilon rule on the centering, identity on the division (AttnLRP)
            c = x - x.mean(-1, keepdim=True)
            normed = R / (c + 1e-12 * torch.where(c >= 0, 1.0, -1.0))
            expected = x * (normed - normed.mean(-1, keepdim=True))
            torch.testing.assert_close(leaf.grad, expected, rtol=1e-10, atol=1e-12)


class ExpGate(torch.nn.Module):
    def forward(self, x):
        return x * torch.exp(-x.abs())


def test_presets_take_extra_layer_map_entries_and_ops():
    from lxt_explicit.diagnostics import audit
    from lxt_explicit.rules import UniformEpsilonRule

    model = nn.Sequential(nn.Linear(4, 4), ExpGate(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=D)
    with pytest.warns(CoverageWarning, match="ExpGate"):
        assert audit(model, lxt.attnlrp(), x).unhandled
    report = audit(model, lxt.attnlrp(layer_map={ExpGate: IdentityRule}), x)
    assert report.unhandled == [] and any(r.op == "IdentityRule" for r in report.rows)
    composite = lxt.attnlrp(layer_map={nn.Embedding: None}, ops={torch.einsum: UniformEpsilonRule()})
    assert composite.rule_for("e", nn.Embedding(2, 2)) is None  # the user's entry wins over the preset's
    assert torch.einsum in composite.op_table and "linear" in composite.ops


def test_presets_are_fresh_each_call():
    first, second = lxt.attnlrp(), lxt.attnlrp()
    assert first is not second and first.ops["add"] is not second.ops["add"]
    assert lxt.attnlrp(epsilon=1e-3).ops["linear"].epsilon == 1e-3
    assert lxt.cp_lrp().ops["attention"].cp and not lxt.attnlrp().ops["attention"].cp
