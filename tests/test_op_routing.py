"""Op rules: torch functions routed by a registered Composite, each against a literal float64 formula."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import stab
from torch import nn

import lxt_explicit as lxt
import lxt_explicit.functional as lf
from lxt_explicit.ops import OP_GROUPS, RELEVANCE_NEUTRAL, op_name

D = torch.float64
EPS = 1e-6


class Call(nn.Module):
    """A module that runs one function; the composite routes the torch ops inside it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def routed(fn, *inputs, relevance=None):
    """Run ``fn`` under the AttnLRP preset; return output and the relevance of every input."""
    module = Call(fn)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with lxt.attnlrp(epsilon=EPS, strict=True).context(module):
        out = module(*leaves)
        out.backward(out.detach() if relevance is None else relevance)
    return out.detach(), [leaf.grad for leaf in leaves]


def test_average_pooling_gets_the_epsilon_rule():
    x = torch.randn(2, 3, 4, 4, dtype=D)
    out, (rx,) = routed(lambda t: F.avg_pool2d(t, 2), x)
    assert torch.equal(out, F.avg_pool2d(x, 2))
    R = out
    # each output is the mean of a 2x2 window: R_i = (x_i / 4) / stab(z) * R
    normed = (R / stab(out, EPS)).repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(rx, x / 4 * normed, rtol=1e-10, atol=1e-14)
    out, (rx,) = routed(lambda t: F.adaptive_avg_pool2d(t, 1), x)
    torch.testing.assert_close(rx, x / 16 * (out / stab(out, EPS)), rtol=1e-10, atol=1e-14)


def test_max_pooling_passes_relevance_to_the_maximum():
    x = torch.randn(1, 1, 4, 4, dtype=D)
    out, (rx,) = routed(lambda t: F.max_pool2d(t, 2), x)
    winners = F.max_unpool2d(out, F.max_pool2d(x, 2, return_indices=True)[1], 2)
    torch.testing.assert_close(rx, winners)


def test_batch_norm_in_eval_mode_gets_the_epsilon_rule():
    bn = nn.BatchNorm2d(3).to(D).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 2, 2, dtype=D, requires_grad=True)
    with lxt.attnlrp(epsilon=EPS, strict=True).context(bn):
        out = bn(x)
        out.backward(out.detach())
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()[None, :, None, None]
    y = out.detach()
    torch.testing.assert_close(x.grad, x.detach() * scale * y / stab(y, EPS), rtol=1e-10, atol=1e-14)


def test_subtraction_and_reflected_subtraction():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    out, (ra, rb) = routed(lambda x, y: x - y, a, b)
    torch.testing.assert_close(ra, a * out / stab(out, EPS))
    torch.testing.assert_close(rb, -b * out / stab(out, EPS))
    out, (ra,) = routed(lambda x: 1 - x, a)
    e = EPS * torch.where(out >= 0, 1.0, -1.0)
    torch.testing.assert_close(ra, out * (-a + e) / (out + e))  # the constant 1 absorbs its share


def test_division_and_negation_by_constants_pass_relevance():
    a = torch.randn(3, 4, dtype=D)
    R = torch.randn(3, 4, dtype=D)
    for fn in (lambda x: x / 3.0, lambda x: -x, lambda x: torch.neg(x), lambda x: x * 2.5):
        out, (ra,) = routed(fn, a, relevance=R)
        assert torch.equal(ra, R)


def test_a_relevance_carrying_divisor_is_a_normalizer():
    a, d = torch.rand(3, dtype=D) + 1, torch.rand(3, dtype=D) + 1
    R = torch.randn(3, dtype=D)
    out, (ra, rd) = routed(lambda x, y: x / y, a, d, relevance=R)
    assert torch.equal(out, a / d)
    assert torch.equal(ra, R) and rd is None  # Proposition 3.4: the divisor is a constant
    out, (ra,) = routed(lambda x: 2.0 / x, a, relevance=R)
    assert torch.equal(ra, R)  # a constant divided by x: an element-wise function of x (identity rule)


def test_in_place_operations_get_the_rules_of_their_out_of_place_forms():
    a, b = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)

    def accumulate(x, y):
        total = torch.zeros(3, 4, dtype=D)
        total += x  # in place on a constant buffer
        total.add_(y)
        total.mul_(2.0)
        total /= 4.0
        return total

    out, (ra, rb) = routed(accumulate, a, b, relevance=torch.ones(3, 4, dtype=D))
    assert torch.equal(out, (a + b) / 2)
    z = (a + b).detach()
    torch.testing.assert_close(ra, a / stab(z, EPS), rtol=1e-10, atol=1e-12)  # epsilon rule of the sum
    torch.testing.assert_close(rb, b / stab(z, EPS), rtol=1e-10, atol=1e-12)


def test_in_place_change_of_a_tensor_a_rule_saved_is_copied_first():
    x, w = torch.randn(4, 3, dtype=D), torch.randn(3, dtype=D)

    def router(t):
        weights = torch.softmax(t, -1)
        total = weights.sum(-1, keepdim=True)  # the sum's epsilon rule saves the weights ...
        weights /= total  # ... which are then divided in place
        return weights * w

    out, (rx,) = routed(router, x, relevance=torch.ones(4, 3, dtype=D))
    s = torch.softmax(x, -1)
    torch.testing.assert_close(out, s / s.sum(-1, keepdim=True) * w)
    R_s = torch.ones(4, 3, dtype=D)  # times a constant and divided by a normalizer: passed unchanged
    torch.testing.assert_close(rx, x * (R_s - s * R_s.sum(-1, keepdim=True)), rtol=1e-10, atol=1e-12)


def test_index_add_is_the_epsilon_rule_of_a_sum():
    src = torch.randn(5, 3, dtype=D)
    index = torch.tensor([0, 2, 0, 1, 2])
    R = torch.randn(3, 3, dtype=D)

    def combine(s):
        out = torch.zeros(3, 3, dtype=D)
        out.index_add_(0, index, s)
        return out

    out, (rs,) = routed(combine, src, relevance=R)
    normed = R / stab(out, EPS)
    torch.testing.assert_close(rs, src * normed[index], rtol=1e-10, atol=1e-12)


def test_addmm_is_the_linear_epsilon_rule():
    x, W, b = torch.randn(5, 4, dtype=D), torch.randn(4, 3, dtype=D), torch.randn(3, dtype=D)
    out, (rx,) = routed(lambda t: torch.addmm(b, t, W), x)
    assert torch.equal(out, torch.addmm(b, x, W))
    torch.testing.assert_close(rx, torch.einsum("ik,kj,ij->ik", x, W, out / stab(out, EPS)), rtol=1e-10, atol=1e-14)


def test_training_dropout_passes_relevance_to_the_kept_units():
    x = torch.randn(200, dtype=D)
    torch.manual_seed(3)
    out, (rx,) = routed(lambda t: F.dropout(t, 0.5, training=True), x)
    kept = out != 0
    torch.testing.assert_close(rx[kept], out[kept])
    assert (rx[~kept] == 0).all()


def test_reductions_and_norm_functions():
    x = torch.randn(3, 5, dtype=D)
    out, (rx,) = routed(lambda t: t.sum(-1), x)
    torch.testing.assert_close(rx, x * (out / stab(out, EPS))[:, None])
    out, (rx,) = routed(lambda t: torch.mean(t, dim=0, keepdim=True), x)
    torch.testing.assert_close(rx, x / 3 * (out / stab(out, EPS)))
    R = torch.randn(3, 5, dtype=D)
    for fn in (lambda t: F.rms_norm(t, (5,), None, 1e-6), lambda t: F.normalize(t, dim=-1), lambda t: F.silu(t)):
        _, (rx,) = routed(fn, x, relevance=R)
        assert torch.equal(rx, R)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_equals_its_decomposition(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).to(D).eval()
    for parameter in mha.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(2, 3, 8, dtype=D)
    same = x.clone().requires_grad_()  # self-attention: one tensor, as in the explained call
    reference = mha(same, same, same, need_weights=False)[0].detach()
    leaf = x.clone().requires_grad_()
    with lxt.attnlrp(epsilon=EPS, strict=True).context(mha):
        out = mha(leaf, leaf, leaf, need_weights=False)[0]
        assert torch.equal(out, reference)
        out.backward(out.detach())
    # the same rules written with the functional operations
    x2 = x.clone().requires_grad_()
    seq = x2 if not batch_first else x2.transpose(0, 1)
    L, B, E = seq.shape
    qkv = lf.linear_epsilon(seq, mha.in_proj_weight, mha.in_proj_bias, epsilon=EPS)
    q, k, v = (t.reshape(L, B * 2, 4).transpose(0, 1).reshape(B, 2, L, 4) for t in qkv.chunk(3, -1))
    attn = lf.scaled_dot_product_attention(q, k, v, epsilon=EPS)
    merged = attn.permute(2, 0, 1, 3).reshape(L * B, E)
    final = lf.linear_epsilon(merged, mha.out_proj.weight, mha.out_proj.bias, epsilon=EPS).view(L, B, E)
    final = final if not batch_first else final.transpose(0, 1)
    final.backward(final.detach())
    torch.testing.assert_close(leaf.grad, x2.grad, rtol=1e-9, atol=1e-12)


def test_op_groups_and_neutral_functions_are_disjoint_and_named():
    grouped = [f for functions in OP_GROUPS.values() for f in functions]
    assert not set(grouped) & RELEVANCE_NEUTRAL
    assert op_name(torch.matmul) == "torch.matmul" and op_name(torch.Tensor.add) == "Tensor.add"
    assert op_name(F.softmax) == "F.softmax" and op_name(torch.Tensor.T.__get__) == "Tensor.T"
    assert math.isfinite(len(grouped))


def test_numpy_style_axis_and_unknown_keywords_keep_the_forward_pass():
    x = torch.randn(3, 5, dtype=D)
    out, (rx,) = routed(lambda t: torch.mean(t, axis=-1, keepdim=True), x)
    assert torch.equal(out, torch.mean(x, axis=-1, keepdim=True))  # axis is dim, not "all dimensions"
    torch.testing.assert_close(rx, x / 5 * (out / stab(out, EPS)), rtol=1e-10, atol=1e-12)
    with pytest.raises(lxt.UnhandledOperationError, match="declined"):  # an unknown keyword: declined, reported
        routed(lambda t: torch.mean(t, -1, out=None), x)


def test_resampling_unfolding_and_erf():
    x = torch.randn(1, 2, 4, 4, dtype=D)
    out, (rx,) = routed(lambda t: F.interpolate(t, scale_factor=2, mode="bilinear"), x)
    R = out  # linear in x: the epsilon rule, x * J^T (R / stab(out)), with J the interpolation
    probe = x.clone().requires_grad_()
    (F.interpolate(probe, scale_factor=2, mode="bilinear") * (R / stab(out, EPS))).sum().backward()
    torch.testing.assert_close(rx, x * probe.grad, rtol=1e-10, atol=1e-12)
    R = torch.randn(1, 8, 9, dtype=D)
    out, (rx,) = routed(lambda t: F.unfold(t, 2), x, relevance=R)  # patches: relevance moves with the values
    torch.testing.assert_close(rx, F.fold(R, (4, 4), 2), rtol=1e-10, atol=1e-12)
    R = torch.randn(1, 2, 4, 4, dtype=D)
    _, (rx,) = routed(torch.erf, x, relevance=R)
    assert torch.equal(rx, R)  # an element-wise activation: identity rule


class SinusoidalPositionalEmbedding(nn.Module):
    def forward(self, positions):
        return torch.sin(positions[..., None].to(D) / torch.arange(1, 5, dtype=D))


class AddingPositionalEmbedding(nn.Module):
    def forward(self, hidden):
        return hidden + torch.ones_like(hidden)


def test_position_embeddings_of_their_own_are_sources_unless_they_take_relevance():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions = nn.Embedding(10, 4), SinusoidalPositionalEmbedding()
            self.adding = AddingPositionalEmbedding()

        def forward(self, ids):
            return self.adding(self.tokens(ids) + self.positions(torch.arange(ids.shape[-1])))

    model = Model().double()
    composite = lxt.cp_lrp(epsilon=1e-12)
    with composite.context(model):
        out = model(torch.tensor([[1, 2, 3]]))
        out.backward(out.detach())
        sources = composite.source_relevance()
    assert set(sources) == {"tokens", "positions"}  # the adding module declined: it takes relevance
    total = sum(float(r.sum()) for r in sources.values())
    added = float((out - torch.ones_like(out)).detach().sum())  # the constant ones absorb their share
    assert abs(total - added) <= 1e-9 * abs(added)
