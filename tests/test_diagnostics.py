"""Conservation report, strict non-finite relevance mode, and the coverage audit."""

import pytest
import torch
from test_composite import GatedNet, gated_composite
from torch import nn

from lxt_explicit import Composite, CoverageWarning, RelevanceSource, UnhandledOperationError
from lxt_explicit.diagnostics import NonFiniteRelevanceError, RelevanceTrace, audit
from lxt_explicit.rules import EpsilonRule, IdentityRule

D = torch.float64


def test_report_records_every_rule_and_the_totals():
    net = GatedNet(bias=True).double().eval()
    composite = gated_composite(epsilon=0.0).register(net)
    ids = torch.randint(0, 10, (1, 4))
    with RelevanceTrace(composite) as trace:
        out = net(ids)
        out.backward(out.detach())
    report = trace.report()
    labels = [r.label for r in report.records]
    assert labels[0] == "head"  # backward order: the last rule first
    assert {"head", "down", "up", "gate", "act", "<root>:add", "<root>:mul"} <= set(labels)
    torch.testing.assert_close(torch.tensor(report.output_total, dtype=D), out.detach().sum(), rtol=1e-10, atol=1e-12)
    assert set(report.input_totals) == {"embed"}
    torch.testing.assert_close(
        torch.tensor(report.input_total, dtype=D), composite.source_relevance()["embed"].sum(), rtol=1e-10, atol=1e-12
    )
    for record in report.records:
        if record.rule.startswith(("IdentityRule", "UniformRule")):
            assert abs(record.absorbed) < 1e-12  # identity and uniform rules conserve
    head = next(r for r in report.records if r.label == "head")
    z = out.detach()
    predicted = (z * (z - net.head.bias.detach()) / z).sum()  # R = z: absorbed share is the bias's
    torch.testing.assert_close(torch.tensor(head.relevance_out, dtype=D), predicted, rtol=1e-10, atol=1e-12)
    assert "inputs / output" in str(report) and report.to_dict()["records"]
    composite.remove()


def test_bias_free_network_report_shows_conservation_one():
    net = GatedNet().double().eval()
    composite = gated_composite(epsilon=0.0).register(net)
    with RelevanceTrace(composite) as trace:
        out = net(torch.randint(0, 10, (2, 3)))
        out.backward(torch.randn(out.shape, dtype=D))
    assert abs(trace.report().conservation - 1.0) < 1e-10
    composite.remove()


def test_strict_mode_names_the_first_rule_with_non_finite_relevance():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    composite = Composite({nn.Linear: EpsilonRule(epsilon=0.0)}).register(model)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()  # output exactly 0: relevance / 0 with epsilon 0
    x = torch.randn(2, 3, dtype=D, requires_grad=True)
    with pytest.raises(NonFiniteRelevanceError, match=r"in 1 \(EpsilonRule"):
        with RelevanceTrace(composite, strict=True):
            out = model(x)
            out.backward(torch.ones_like(out))
    composite.remove()


def test_strict_mode_names_an_input_that_is_not_finite_before_any_rule_ran():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    composite = Composite({nn.Linear: EpsilonRule()}).register(model)
    x = torch.randn(2, 3, dtype=D)
    x[0, 1] = float("nan")
    with pytest.raises(NonFiniteRelevanceError, match=r"input 'args\[0\]'.*before any rule ran"):
        with RelevanceTrace(composite, strict=True):
            model(x.requires_grad_())
    composite.remove()


def test_trace_needs_a_registered_composite():
    with pytest.raises(RuntimeError, match="registered"):
        RelevanceTrace(Composite())


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, ids):
        h = self.embed(ids)
        return self.proj(h).pow(2).transpose(0, 1) + h.transpose(0, 1)


def test_audit_lists_rules_neutral_and_unhandled_ops():
    model = Custom().double()
    composite = Composite({nn.Embedding: RelevanceSource, nn.Linear: EpsilonRule}, ops={"add": EpsilonRule()})
    with pytest.warns(CoverageWarning, match=r"Tensor\.pow"):
        report = audit(model, composite, torch.randint(0, 5, (2, 3)))
    assert [(r.module, r.op) for r in report.unhandled] == [("", "Tensor.pow")]
    statuses = {(r.op, r.status) for r in report.rows}
    assert ("Tensor.transpose", "neutral") in statuses and ("Tensor.add", "rule") in statuses
    assert ("EpsilonRule", "rule") in statuses and ("RelevanceSource", "rule") in statuses
    assert report.counts() == {"rule": 3, "neutral": 2, "unhandled": 1}
    assert "unhandled: 1" in str(report)
    assert composite.model is None  # audit registered and removed it again
    with pytest.raises(UnhandledOperationError, match=r"Tensor\.pow.*'<root>'"):
        audit(model, composite, torch.randint(0, 5, (2, 3)), strict=True)


def test_audit_makes_float_inputs_carry_relevance():
    model = nn.Sequential(nn.Linear(3, 3), nn.SiLU()).double()
    report = audit(model, Composite({nn.Linear: EpsilonRule, nn.SiLU: IdentityRule}), torch.randn(2, 3, dtype=D))
    assert report.counts() == {"rule": 2} and not report.unhandled


def test_audit_can_report_the_operations_seen_before_an_error():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            self.linear(x) + x  # an op on the relevance path, then the error
            raise RuntimeError("broken model")

    model = Failing().double()
    x = torch.randn(2, 3, dtype=D)
    with pytest.raises(RuntimeError, match="broken model"):
        audit(model, Composite({nn.Linear: EpsilonRule()}, ops={"add": EpsilonRule()}), x)
    report = audit(model, Composite({nn.Linear: EpsilonRule()}, ops={"add": EpsilonRule()}), x, on_error="report")
    assert report.error == "RuntimeError: broken model"
    assert {row.op for row in report.rows} >= {"EpsilonRule", "Tensor.add"}
    assert "forward" not in model.__dict__
