"""Every rule against a literal float64 formula written here, on modules and plain callables."""

import pytest
import torch
import torch.nn.functional as F
from conftest import stab
from torch import nn

from lxt_explicit.rules import (
    EpsilonRule,
    IdentityRule,
    StopRelevanceRule,
    TaylorDecompositionRule,
    UniformEpsilonRule,
    UniformRule,
)

D = torch.float64
EPS = 1e-6


def leaf(*shape):
    return torch.randn(*shape, dtype=D).requires_grad_()


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_epsilon_rule_on_linear_module(shape, bias):
    layer = nn.Linear(4, 5, bias=bias).double()
    x = leaf(*shape)
    out = EpsilonRule(epsilon=EPS)(layer, x)
    assert torch.equal(out, layer(x))
    R = torch.randn(out.shape, dtype=D)
    out.backward(R)
    z = layer(x).detach()
    expected = torch.einsum("...i,ji,...j->...i", x.detach(), layer.weight.detach(), R / stab(z, EPS))
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-14)


def test_epsilon_rule_on_linear_equals_zennit_epsilon():
    zennit_core = pytest.importorskip("zennit.core")
    from zennit.rules import Epsilon

    layer = nn.Linear(6, 5).double()
    x = leaf(3, 6)
    R = torch.randn(3, 5, dtype=D)
    EpsilonRule(epsilon=1e-6)(layer, x).backward(R)
    ours = x.grad.clone()

    x2 = x.detach().clone().requires_grad_()
    composite = zennit_core.Composite(
        module_map=lambda ctx, name, module: Epsilon(epsilon=1e-6) if module is layer else None
    )
    with composite.context(layer) as modified:
        modified(x2).backward(R)
    torch.testing.assert_close(ours, x2.grad, rtol=1e-10, atol=1e-14)


def test_epsilon_rule_on_any_function_is_input_times_vjp():
    fn = lambda a, b: torch.tanh(a) * b + a**2  # noqa: E731
    a, b = leaf(3, 4), leaf(3, 4)
    out = EpsilonRule(epsilon=EPS)(fn, a, b)
    R = torch.randn(3, 4, dtype=D)
    out.backward(R)
    y = fn(a.detach(), b.detach())
    normed = R / stab(y, EPS)
    # element-wise: dy/da = (1 - tanh^2(a)) b + 2a, dy/db = tanh(a)
    ja = (1 - torch.tanh(a.detach()) ** 2) * b.detach() + 2 * a.detach()
    jb = torch.tanh(a.detach())
    torch.testing.assert_close(a.grad, a.detach() * ja * normed, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(b.grad, b.detach() * jb * normed, rtol=1e-10, atol=1e-14)


def test_uniform_epsilon_rule_on_matmul_equals_proposition_3_3():
    a, b = leaf(3, 4), leaf(4, 5)
    out = UniformEpsilonRule(epsilon=EPS)(torch.matmul, a, b)
    R = torch.randn(3, 5, dtype=D)
    out.backward(R)
    normed = R / stab((a @ b).detach(), EPS)
    torch.testing.assert_close(a.grad, 0.5 * torch.einsum("ik,kj,ij->ik", a.detach(), b.detach(), normed))
    torch.testing.assert_close(b.grad, 0.5 * torch.einsum("ik,kj,ij->kj", a.detach(), b.detach(), normed))


def test_identity_rule_passes_relevance_and_rejects_mixing():
    x, R = leaf(2, 5), torch.randn(2, 5, dtype=D)
    out = IdentityRule()(nn.GELU(), x)
    assert torch.equal(out, F.gelu(x))
    out.backward(R)
    assert torch.equal(x.grad, R)
    with pytest.raises(ValueError, match="element-wise"):
        IdentityRule()(nn.Linear(5, 3).double(), leaf(2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        IdentityRule()(torch.add, leaf(2), leaf(2))


def test_uniform_rule_splits_evenly_and_sums_broadcast_dims():
    a, b, c = leaf(2, 3), leaf(3), leaf(2, 3)
    fn = lambda a, b, c: a * b * c  # noqa: E731
    out = UniformRule()(fn, a, b, c)
    R = torch.randn(2, 3, dtype=D)
    out.backward(R)
    torch.testing.assert_close(a.grad, R / 3)
    torch.testing.assert_close(b.grad, (R / 3).sum(0))
    torch.testing.assert_close(c.grad, R / 3)


def test_stop_relevance_rule_returns_a_constant():
    x = leaf(3)
    out = StopRelevanceRule()(torch.softmax, x, 0)
    assert not out.requires_grad
    assert torch.equal(out, torch.softmax(x, 0))


def test_taylor_at_input_with_bias_is_the_softmax_rule():
    x = leaf(2, 6)
    out = TaylorDecompositionRule(reference=None, bias=True, epsilon=0.0)(torch.softmax, x, -1)
    R = torch.randn(2, 6, dtype=D)
    out.backward(R)
    s = torch.softmax(x.detach(), -1)
    expected = x.detach() * (R - s * R.sum(-1, keepdim=True))  # Proposition 3.1
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-13)


def test_taylor_with_reference_point_literal_jacobian():
    fn = lambda t: torch.stack([t[0] * t[1], torch.sin(t[2]) + t[0]])  # noqa: E731
    x = leaf(3)
    ref = torch.tensor([0.3, -0.2, 0.1], dtype=D)
    out = TaylorDecompositionRule(reference=ref, bias=True, epsilon=EPS)(fn, x)
    assert torch.equal(out, fn(x))
    R = torch.randn(2, dtype=D)
    out.backward(R)
    J = torch.autograd.functional.jacobian(fn, ref)  # J[j, i] at the reference point
    expected = torch.einsum("i,ji,j->i", x.detach() - ref, J, R / stab(fn(x.detach()), EPS))
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-13)


def test_taylor_without_bias_conserves_exactly():
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = leaf(4, 5)
    out = TaylorDecompositionRule(reference=0.0, bias=False, epsilon=0.0)(net, x)
    R = torch.randn(4, 3, dtype=D)
    out.backward(R)
    torch.testing.assert_close(x.grad.sum(-1), R.sum(-1), rtol=1e-10, atol=1e-10)
    # and equals the literal formula with the Jacobian at the reference point 0
    J = torch.autograd.functional.jacobian(lambda t: net(t), torch.zeros(5, dtype=D))
    first_order = torch.einsum("ji,bi->bj", J, x.detach())
    expected = torch.einsum("bi,ji,bj->bi", x.detach(), J, R / first_order)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_rules_pass_keyword_arguments_and_skip_inputs_without_grad():
    a = leaf(3, 4)
    b = torch.randn(3, 4, dtype=D)  # a constant: receives nothing
    out = EpsilonRule(epsilon=EPS)(lambda x, y, *, scale: x * scale + y, a, b, scale=2.0)
    R = torch.randn(3, 4, dtype=D)
    out.backward(R)
    z = 2.0 * a.detach() + b
    torch.testing.assert_close(a.grad, a.detach() * 2.0 * R / stab(z, EPS))
    assert b.grad is None


def test_rule_without_relevance_inputs_is_the_plain_function():
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=D)
    out = EpsilonRule()(layer, x)
    assert torch.equal(out, layer(x))
    with torch.no_grad():
        assert EpsilonRule()(layer, x.requires_grad_()).grad_fn is None


def test_rule_on_tuple_outputs_and_unsupported_outputs():
    a = leaf(3, 4)
    first, second = EpsilonRule(epsilon=EPS)(lambda t: (t * 2, t.sum(-1)), a)
    R1, R2 = torch.randn(3, 4, dtype=D), torch.randn(3, dtype=D)
    torch.autograd.backward((first, second), (R1, R2))
    expected = a.detach() * (2 * R1 / stab(2 * a.detach(), EPS) + (R2 / stab(a.detach().sum(-1), EPS))[:, None])
    torch.testing.assert_close(a.grad, expected)
    with pytest.raises(TypeError, match="tensor or a tuple"):
        EpsilonRule()(lambda t: {"out": t}, leaf(2))


def test_rule_copies_are_independent_and_configured():
    rule = EpsilonRule(epsilon=1e-3)
    copy = rule.copy()
    assert copy is not rule and copy == rule and copy.epsilon == 1e-3
    assert repr(rule) == "EpsilonRule(epsilon=0.001)"
    with pytest.raises(ValueError, match="non-negative"):
        EpsilonRule(epsilon=-1.0)


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), -1e-6, "0.1"])
def test_every_rule_and_preset_rejects_a_bad_epsilon_when_it_is_made(epsilon):
    import lxt_explicit as lxt
    from lxt_explicit.rules import AttentionRule, LayerNormRule, MultiheadAttentionRule
    from lxt_explicit.zennit_interop import convolutional, vision_transformer

    makers = [
        lambda: EpsilonRule(epsilon=epsilon), lambda: UniformEpsilonRule(epsilon=epsilon),
        lambda: TaylorDecompositionRule(epsilon=epsilon), lambda: LayerNormRule(epsilon=epsilon),
        lambda: AttentionRule(epsilon=epsilon), lambda: MultiheadAttentionRule(epsilon=epsilon),
        lambda: lxt.attnlrp(epsilon=epsilon), lambda: lxt.cp_lrp(epsilon=epsilon),
        lambda: vision_transformer(epsilon=epsilon), lambda: convolutional(epsilon=epsilon),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="epsilon must be a finite non-negative number"):
            make()


@pytest.mark.parametrize("gates", ["relevant", "constant"])
def test_uniform_rule_on_a_gated_product(gates):
    from lxt_explicit import functional as lf
    from lxt_explicit.functional import is_gate

    a, b = leaf(3, 4), leaf(3, 4)
    gate = lf.activation(F.silu, a)
    assert is_gate(gate) and is_gate(gate.transpose(0, 1)) and not is_gate(b) and not is_gate(F.silu(a))
    out = UniformRule(gates=gates)(torch.mul, gate, b)
    assert torch.equal(out, F.silu(a) * b)
    R = torch.randn(3, 4, dtype=D)
    out.backward(R)
    if gates == "relevant":  # Proposition 3.2: half each; the identity rule passes the gate's half to a
        torch.testing.assert_close(a.grad, 0.5 * R, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, 0.5 * R, rtol=0, atol=0)
    else:  # CP-LRP (the reference definition): the gate is a constant, the up branch gets everything
        assert a.grad is None
        torch.testing.assert_close(b.grad, R, rtol=0, atol=0)
    with pytest.raises(ValueError, match="gates"):
        UniformRule(gates="sometimes")


def test_constant_gates_only_when_another_factor_carries_relevance():
    from lxt_explicit import functional as lf

    a, b = leaf(2, 3), leaf(2, 3)
    both = UniformRule(gates="constant")(torch.mul, lf.activation(torch.tanh, a), lf.activation(torch.sigmoid, b))
    R = torch.randn(2, 3, dtype=D)
    both.backward(R)  # two gates: no other factor to take the relevance, so the uniform rule
    torch.testing.assert_close(a.grad, 0.5 * R, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, 0.5 * R, rtol=0, atol=0)


def test_a_rule_that_does_not_cover_a_call_declines_with_a_value_error():
    from lxt_explicit.rules import RuleDeclined, SoftmaxRule

    with pytest.raises(RuleDeclined, match="exactly one"):
        IdentityRule()(torch.add, leaf(2), leaf(2))
    with pytest.raises(RuleDeclined, match="softmax"):
        SoftmaxRule()(torch.exp, leaf(3))
    assert issubclass(RuleDeclined, ValueError)
