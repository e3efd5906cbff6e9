"""Every functional operation against a literal float64 formula written here (einsum / matrix form of the paper).

Each test checks two things: the forward pass equals the torch operation bit for bit, and
the relevance returned in the gradient slot equals the equation of the AttnLRP paper.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import stab

import lxt_explicit.functional as lf

D = torch.float64
EPS = 1e-6


def relevance_of(fn, inputs, out_relevance):
    """Run ``fn`` and return the relevance of every input that requires grad (its .grad)."""
    out = fn(*inputs)
    out.backward(out_relevance)
    return out, [t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def leaf(*shape, dtype=D):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


# ----------------------------------------------------------------------------------- linear


@pytest.mark.parametrize("x_shape", [(5,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_epsilon_equals_equation_8(x_shape, with_bias):
    x, W = leaf(*x_shape), torch.randn(4, 5, dtype=D)
    b = torch.randn(4, dtype=D) if with_bias else None
    R = torch.randn(*x_shape[:-1], 4, dtype=D)
    out, (rx, _, _) = relevance_of(lambda x, W, b: lf.linear_epsilon(x, W, b, epsilon=EPS), (x, W, b), R)
    assert torch.equal(out, F.linear(x, W, b))
    z = F.linear(x, W, b).detach()
    expected = torch.einsum("...i,ji,...j->...i", x.detach(), W, R / stab(z, EPS))
    torch.testing.assert_close(rx, expected, rtol=1e-10, atol=1e-14)


def test_linear_epsilon_zero_and_slightly_negative_denominators():
    x = torch.tensor([[1.0, -1.0, 2.0]], dtype=D, requires_grad=True)
    # outputs: exactly 0, slightly negative, slightly positive
    W = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, -5e-10], [1.0, 1.0, 5e-10]], dtype=D)
    R = torch.ones(1, 3, dtype=D)
    z = x.detach() @ W.T
    assert z[0, 0] == 0 and z[0, 1] < 0 < z[0, 2]
    lf.linear_epsilon(x, W, epsilon=1e-6).backward(R)
    expected = torch.einsum("...i,ji,...j->...i", x.detach(), W, R / stab(z, 1e-6))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=0)
    # the negative denominator keeps its sign: relevance of the third input through output 1 is negative
    assert (R[0, 1] / stab(z, 1e-6)[0, 1]) < 0


@pytest.mark.parametrize("width", [200, 1200])  # 1200 >= 8 * 32: a head whose output is recomputed, not stored
@pytest.mark.parametrize("rows", [[63], [0, 5], list(range(40)), list(range(64))])
def test_linear_epsilon_with_relevance_in_few_rows_equals_the_formula(rows, width):
    # large enough (>= 2**16 relevance entries at width 1200) for the backward pass to skip rows without relevance
    x, W = leaf(1, 64, 32), torch.randn(width, 32, dtype=D)
    R = torch.zeros(1, 64, width, dtype=D)
    R[0, rows] = torch.randn(len(rows), width, dtype=D)
    lf.linear_epsilon(x, W, epsilon=EPS).backward(R)
    z = F.linear(x, W).detach()
    expected = torch.einsum("...i,ji,...j->...i", x.detach(), W, R / stab(z, EPS))
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-14)


def test_linear_weight_and_bias_receive_no_relevance():
    x, W, b = leaf(2, 3), leaf(4, 3), leaf(4)
    lf.linear_epsilon(x, W, b).sum().backward()
    assert W.grad is None and b.grad is None and x.grad is not None


def test_linear_half_precision_is_finite_and_close():
    x, W = torch.randn(6, 32, dtype=D), torch.randn(16, 32, dtype=D)
    R = torch.randn(6, 16, dtype=D)
    xh = x.to(torch.bfloat16).requires_grad_()
    lf.linear_epsilon(xh, W.to(torch.bfloat16)).backward(R.to(torch.bfloat16))
    z = (xh.detach().double() @ W.to(torch.bfloat16).double().T)
    expected = torch.einsum("...i,ji,...j->...i", xh.detach().double(), W.to(torch.bfloat16).double(), R / stab(z, EPS))
    assert xh.grad.dtype == torch.bfloat16 and torch.isfinite(xh.grad).all()
    assert F.cosine_similarity(xh.grad.double().flatten(), expected.flatten(), dim=0) > 0.99


# ----------------------------------------------------------------------------------- softmax


def softmax_reference(x, R, dim=-1):
    """Proposition 3.1: R_x_i = x_i (R_i - s_i sum_j R_j); masked (-inf) logits get 0."""
    s = torch.softmax(x, dim)
    rel = x * (R - s * R.sum(dim, keepdim=True))
    return torch.where(torch.isinf(x), torch.zeros_like(rel), rel)


@pytest.mark.parametrize("shape,dim", [((7,), -1), ((3, 7), -1), ((2, 3, 7), 1), ((2, 4, 5, 5), -1)])
def test_softmax_equals_proposition_3_1(shape, dim):
    x, R = leaf(*shape), torch.randn(*shape, dtype=D)
    out, (rx,) = relevance_of(lambda x: lf.softmax(x, dim), (x,), R)
    assert torch.equal(out, torch.softmax(x, dim))
    torch.testing.assert_close(rx, softmax_reference(x.detach(), R, dim), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mask_value", [-math.inf, torch.finfo(D).min, -1e4])
def test_softmax_masked_rows(mask_value):
    x = torch.randn(4, 6, dtype=D)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]] * 4, dtype=torch.bool)  # last positions masked
    mask[1] = True  # one row with nothing masked
    x = x.masked_fill(~mask, mask_value).requires_grad_()
    R = torch.softmax(x.detach(), -1) * torch.randn(4, 6, dtype=D)  # relevance is zero where s is zero
    lf.softmax(x, -1).backward(R)
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, softmax_reference(x.detach(), R), rtol=1e-10, atol=1e-12)
    assert (x.grad[~mask] == 0).all()


def test_softmax_dtype_and_temperature_options():
    x = leaf(3, 5)
    R = torch.randn(3, 5, dtype=torch.float32)
    out = lf.softmax(x, -1, dtype=torch.float32, temperature=2.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.softmax(x / 2.0, -1, dtype=torch.float32))
    out.backward(R)
    expected = softmax_reference((x.detach() / 2.0).float().double(), R.double())
    assert x.grad.dtype == D
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        lf.softmax(x, -1, temperature=0.0)


# ----------------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("a_shape,b_shape", [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 2, 3, 4), (4, 5))])
def test_matmul_equals_proposition_3_3(a_shape, b_shape):
    a, b = leaf(*a_shape), leaf(*b_shape)
    z = (a @ b).detach()
    R = torch.randn(z.shape, dtype=D)
    out, (ra, rb) = relevance_of(lambda a, b: lf.matmul(a, b, epsilon=EPS), (a, b), R)
    assert torch.equal(out, torch.matmul(a, b))
    normed = R / stab(z, EPS)
    b_idx = "...kj" if len(b_shape) == len(a_shape) else "kj"
    expected_a = 0.5 * torch.einsum(f"...ik,{b_idx},...ij->...ik", a.detach(), b.detach(), normed)
    expected_b = 0.5 * torch.einsum(f"...ik,{b_idx},...ij->{b_idx}", a.detach(), b.detach(), normed)
    torch.testing.assert_close(ra, expected_a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rb, expected_b, rtol=1e-10, atol=1e-13)


def test_matmul_constant_operand_gets_nothing_and_other_gets_everything():
    a, b = leaf(3, 4), torch.randn(4, 5, dtype=D)
    z = (a @ b).detach()
    R = torch.randn(3, 5, dtype=D)
    lf.matmul(a, b, epsilon=EPS).backward(R)
    expected = torch.einsum("ik,kj,ij->ik", a.detach(), b, R / stab(z, EPS))
    torch.testing.assert_close(a.grad, expected, rtol=1e-10, atol=1e-13)


def test_matmul_vector_operands():
    a, b = leaf(4), leaf(4, 5)
    lf.matmul(a, b, epsilon=EPS).backward(torch.ones(5, dtype=D))
    z = (a @ b).detach()
    expected = 0.5 * torch.einsum("k,kj,j->k", a.detach(), b.detach(), 1 / stab(z, EPS))
    torch.testing.assert_close(a.grad, expected, rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------------- add / mul


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3, 4), (2, 3, 4)), ((2, 3, 4), (4,)), ((2, 1, 4), (3, 1))])
def test_add2_equals_epsilon_rule_with_broadcasting(a_shape, b_shape):
    a, b = leaf(*a_shape), leaf(*b_shape)
    z = (a + b).detach()
    R = torch.randn(z.shape, dtype=D)
    out, (ra, rb) = relevance_of(lambda a, b: lf.add2(a, b, epsilon=EPS), (a, b), R)
    assert torch.equal(out, a + b)
    share = R / stab(z, EPS)
    full_a = (a.detach() * share)
    full_b = (b.detach() * share)
    # relevance of a broadcast operand is summed over the broadcast dimensions (literal loop over its elements)
    expected_a = torch.zeros(a_shape, dtype=D) + 0
    expected_b = torch.zeros(b_shape, dtype=D) + 0
    expected_a = expected_a + full_a.sum_to_size(a_shape)
    expected_b = expected_b + full_b.sum_to_size(b_shape)
    torch.testing.assert_close(ra, expected_a, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rb, expected_b, rtol=1e-10, atol=1e-13)
    # without a stabilizer the sum is conserved exactly
    a2, b2 = leaf(*a_shape), leaf(*b_shape)
    lf.add2(a2, b2, epsilon=0.0).backward(R)
    torch.testing.assert_close(a2.grad.sum() + b2.grad.sum(), R.sum(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("constant", ["tensor", "number", "zero", "mask"])
def test_add2_constant_operand_absorbs_exactly_its_share(constant):
    a = leaf(3, 4)
    c = {
        "tensor": torch.randn(3, 4, dtype=D),
        "number": 0.7,
        "zero": torch.zeros(3, 4, dtype=D),
        "mask": torch.tensor([0.0, 0.0, torch.finfo(D).min, -math.inf], dtype=D),
    }[constant]
    z = (a + c).detach()
    R = torch.randn(3, 4, dtype=D)
    if constant == "mask":
        R[:, 2:] = 0  # masked scores carry no relevance
    lf.add2(a, c, epsilon=EPS).backward(R)
    e = EPS * torch.where(z >= 0, 1.0, -1.0)
    expected = R * (a.detach() + e) / (z + e)
    if constant == "mask":
        expected[:, 2:] = 0
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, expected, rtol=1e-10, atol=1e-13)
    if constant == "zero":
        assert torch.equal(a.grad, R)  # adding zero passes relevance unchanged, bit for bit


@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1), (1, 5))])
def test_mul2_uniform_rule(a_shape, b_shape):
    a, b = leaf(*a_shape), leaf(*b_shape)
    z = (a * b).detach()
    R = torch.randn(z.shape, dtype=D)
    out, (ra, rb) = relevance_of(lf.mul2, (a, b), R)
    assert torch.equal(out, a * b)
    torch.testing.assert_close(ra, (0.5 * R).sum_to_size(a_shape), rtol=1e-10, atol=0)
    torch.testing.assert_close(rb, (0.5 * R).sum_to_size(b_shape), rtol=1e-10, atol=0)


@pytest.mark.parametrize("constant", [torch.randn(2, 3, dtype=D), 3.0])
def test_mul2_constant_passes_all_relevance(constant):
    a, R = leaf(2, 3), torch.randn(2, 3, dtype=D)
    lf.mul2(a, constant).backward(R)
    assert torch.equal(a.grad, R)


# ----------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dim,keepdim", [(-1, False), (1, True), ((0, 2), False), (None, False)])
def test_mean_epsilon_rule(dim, keepdim):
    x = leaf(3, 4, 5)
    out = lf.mean(x, dim, keepdim, epsilon=EPS)
    reference_out = x.mean() if dim is None else x.mean(dim, keepdim=keepdim)
    assert torch.equal(out, reference_out)
    R = torch.randn(out.shape, dtype=D)
    out.backward(R)
    n = x.numel() // out.numel()
    dims = (0, 1, 2) if dim is None else ((dim,) if isinstance(dim, int) else dim)
    normed = R / stab(reference_out.detach(), EPS)
    if not keepdim:
        for d in sorted(d % 3 for d in dims):
            normed = normed.unsqueeze(d)
    expected = (x.detach() / n) * normed
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-14)


def test_sum_epsilon_conserves_without_stabilizer():
    x = leaf(3, 4)
    out = lf.sum_epsilon(x, -1, epsilon=0.0)
    assert torch.equal(out, x.sum(-1))
    R = torch.randn(3, dtype=D)
    out.backward(R)
    torch.testing.assert_close(x.grad, x.detach() / x.detach().sum(-1, keepdim=True) * R[:, None])
    torch.testing.assert_close(x.grad.sum(-1), R)


# ----------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(6,), (2, 6), (2, 3, 6)])
def test_layer_norm_identity_and_centering_rules(shape, with_bias):
    N = shape[-1]
    x = leaf(*shape)
    w = torch.randn(N, dtype=D)
    b = torch.randn(N, dtype=D) if with_bias else None
    out = lf.layer_norm(x, w, b, 1e-5, epsilon=EPS)
    assert torch.equal(out, F.layer_norm(x, (N,), w, b, 1e-5))
    R = torch.randn(shape, dtype=D)
    out.backward(R)
    y = out.detach()
    if with_bias:  # the bias is a constant summand and absorbs exactly its share
        e = EPS * torch.where(y >= 0, 1.0, -1.0)
        R = R * (y - b + e) / (y + e)
    M = torch.eye(N, dtype=D) - torch.full((N, N), 1.0 / N, dtype=D)  # centering c = M x
    c = torch.einsum("ij,...j->...i", M, x.detach())
    expected = torch.einsum("ij,...j,...i->...j", M, x.detach(), R / stab(c, EPS))
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)


def test_layer_norm_without_bias_conserves():
    x = leaf(4, 8)
    out = lf.layer_norm(x, torch.rand(8, dtype=D) + 0.5, None, 1e-5, epsilon=0.0)
    R = torch.randn(4, 8, dtype=D)
    out.backward(R)
    torch.testing.assert_close(x.grad.sum(-1), R.sum(-1), rtol=1e-10, atol=1e-10)


def test_rms_norm_normalize_and_identity_pass_relevance_unchanged():
    x, w, R = leaf(2, 3, 6), torch.randn(6, dtype=D), torch.randn(2, 3, 6, dtype=D)
    out = lf.rms_norm_identity(x, w, 1e-6)
    assert torch.equal(out, F.rms_norm(x, (6,), w, 1e-6))
    out.backward(R)
    assert torch.equal(x.grad, R)

    x2 = leaf(2, 6)
    out = lf.normalize(x2, p=2.0, dim=-1)
    assert torch.equal(out, F.normalize(x2, p=2.0, dim=-1))
    out.backward(R[0, :2])
    assert torch.equal(x2.grad, R[0, :2])

    x3 = leaf(2, 6)
    out = lf.identity(F.silu, x3)
    assert torch.equal(out, F.silu(x3))
    out.backward(R[1, :2])
    assert torch.equal(x3.grad, R[1, :2])


def test_identity_rejects_functions_that_mix_elements():
    with pytest.raises(ValueError, match="element-wise"):
        lf.identity(lambda t: t.sum(-1), leaf(2, 3))


# ----------------------------------------------------------------------------------- attention


def attention_reference(q, k, v, R, *, mask=None, causal=False, scale=None, eps=EPS, cp=False):
    """The AttnLRP rules of eager attention, written step by step in float64.

    A = q k^T, X = scale * A + M (additive mask, constant), S = softmax(X), O = S v.
    The relevance of a score is proportional to it when M is 0 where attended, so the q k^T rule
    then divides by A itself (no stabilizer); a float bias M needs the stabilized denominator.
    """
    biased = mask is not None and mask.dtype != torch.bool
    groups = q.shape[-3] // k.shape[-3]
    kr, vr = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    L, S_len = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    M = torch.zeros(L, S_len, dtype=D)
    keep = torch.ones(L, S_len, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            M = M + mask
    if causal:
        keep = keep & torch.ones(L, S_len, dtype=torch.bool).tril()
    A = torch.einsum("...ik,...jk->...ij", q, kr)
    a = scale * A
    X = (a + M).masked_fill(~keep, -math.inf)
    S = torch.softmax(X, -1)
    out = torch.einsum("...ij,...jd->...id", S, vr)
    G = R / stab(out, eps)
    share = 1.0 if cp else 0.5
    R_v = share * torch.einsum("...ij,...jd,...id->...jd", S, vr, G)  # Proposition 3.3, value side
    if cp:
        R_q = torch.zeros_like(q)
        R_k = torch.zeros_like(kr)
    else:
        R_S = 0.5 * torch.einsum("...ij,...jd,...id->...ij", S, vr, G)  # Proposition 3.3, weight side
        R_X = X * (R_S - S * R_S.sum(-1, keepdim=True))  # Proposition 3.1
        R_X = torch.where(keep, R_X, torch.zeros_like(R_X))  # masked scores receive nothing
        e = eps * torch.where(X >= 0, 1.0, -1.0)
        R_a = torch.where(keep, R_X * (a + e) / (X + e), torch.zeros_like(R_X))  # constant mask absorbs its share
        G_A = R_a / (stab(A, eps) if biased else A)  # the scale passes relevance; Proposition 3.3 on q k^T
        R_q = 0.5 * torch.einsum("...ik,...jk,...ij->...ik", q, kr, G_A)
        R_k = 0.5 * torch.einsum("...ik,...jk,...ij->...jk", q, kr, G_A)
    fold = lambda t: t.unflatten(-3, (k.shape[-3], groups)).sum(-3)  # noqa: E731
    return out, R_q, fold(R_k), fold(R_v)


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "bool_mask", "float_mask", "zero_minus_inf_mask", "gqa_causal", "mqa_broadcast",
     "cross_lengths", "scale"],
)
def test_attention_equals_stepwise_rules(case, cp):
    heads, kv_heads, L, S_len, d = 4, 4, 5, 5, 8
    kwargs, ref_kwargs = {}, {}
    if case == "gqa_causal":
        kv_heads = 2
        kwargs = {"enable_gqa": True, "is_causal": True}
        ref_kwargs = {"causal": True}
    if case == "mqa_broadcast":  # one key/value head broadcast over the query heads, as torch allows
        kv_heads = 1
        kwargs, ref_kwargs = {"is_causal": True}, {"causal": True}
    if case == "cross_lengths":
        S_len = 7
    if case == "causal":
        kwargs, ref_kwargs = {"is_causal": True}, {"causal": True}
    if case == "bool_mask":
        mask = torch.rand(L, S_len) > 0.3
        mask[:, 0] = True
        kwargs, ref_kwargs = {"attn_mask": mask}, {"mask": mask}
    if case == "float_mask":
        mask = -torch.rand(L, S_len, dtype=D) * 3
        kwargs, ref_kwargs = {"attn_mask": mask}, {"mask": mask}
    if case == "zero_minus_inf_mask":  # additive but bias-free: the fused path
        mask = torch.zeros(L, S_len, dtype=D).masked_fill(torch.rand(L, S_len) > 0.7, -math.inf)
        mask[:, 0] = 0
        kwargs, ref_kwargs = {"attn_mask": mask}, {"mask": mask > -math.inf}
    if case == "scale":
        kwargs, ref_kwargs = {"scale": 0.3}, {"scale": 0.3}
    q, k, v = leaf(2, heads, L, d), leaf(2, kv_heads, S_len, d), leaf(2, kv_heads, S_len, d)
    R = torch.randn(2, heads, L, d, dtype=D)
    out = lf.scaled_dot_product_attention(q, k, v, epsilon=EPS, cp=cp, **kwargs)
    torch_kwargs = {k_: v_ for k_, v_ in kwargs.items()}
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **torch_kwargs))
    out.backward(R)
    expected_out, R_q, R_k, R_v = attention_reference(q.detach(), k.detach(), v.detach(), R, cp=cp, **ref_kwargs)
    torch.testing.assert_close(out.detach(), expected_out, rtol=1e-10, atol=1e-12)
    if cp:
        assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    else:
        torch.testing.assert_close(q.grad, R_q, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(k.grad, R_k, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(v.grad, R_v, rtol=1e-8, atol=1e-10)


def test_attention_block_processing_matches_one_block():
    q, k, v = leaf(1, 2, 9, 4), leaf(1, 2, 9, 4), leaf(1, 2, 9, 4)
    bias = -torch.rand(9, 9, dtype=D)  # a float bias takes the blocked path
    R = torch.randn(1, 2, 9, 4, dtype=D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).detach()
    args = (q.detach(), k.detach(), v.detach(), out, R)
    whole = lf.blocked_attention_relevance(*args, attn_mask=bias, block_elements=1 << 30)  # one block
    blocks = lf.blocked_attention_relevance(*args, attn_mask=bias, block_elements=2 * 9 * 2)  # two query rows each
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    lf.scaled_dot_product_attention(q, k, v, attn_mask=bias).backward(R)  # the blocked path of the operation
    for a, b in zip(whole, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_attention_rejects_mismatched_heads():
    q, k = leaf(1, 4, 3, 2), leaf(1, 2, 3, 2)
    with pytest.raises(ValueError, match="enable_gqa"):
        lf.scaled_dot_product_attention(q, k, k)


BAD_EPSILONS = [float("nan"), float("inf"), -1.0, "1e-6", True, None]


@pytest.mark.parametrize("epsilon", BAD_EPSILONS)
def test_invalid_epsilon_is_rejected_by_every_operation(epsilon):
    x, W = leaf(2, 3), torch.randn(4, 3, dtype=D)
    calls = [
        lambda: lf.linear_epsilon(x, W, epsilon=epsilon),
        lambda: lf.matmul(x, W.T, epsilon=epsilon),
        lambda: lf.add2(x, x, epsilon=epsilon),
        lambda: lf.mean(x, -1, epsilon=epsilon),
        lambda: lf.sum_epsilon(x, -1, epsilon=epsilon),
        lambda: lf.layer_norm(x, None, None, 1e-5, epsilon=epsilon),
        lambda: lf.scaled_dot_product_attention(leaf(1, 1, 2, 3), leaf(1, 1, 2, 3), leaf(1, 1, 2, 3), epsilon=epsilon),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="epsilon must be a finite non-negative number"):
            call()


@pytest.mark.parametrize("mask_value", [torch.finfo(D).min, torch.finfo(D).min / 1.5, -math.inf])
def test_softmax_masked_logits_get_zero_relevance_even_when_relevance_arrives_there(mask_value):
    x = torch.randn(3, 6, dtype=D)
    x[:, 4:] = mask_value
    x.requires_grad_()
    R = torch.randn(3, 6, dtype=D)  # relevance at the masked positions too
    lf.softmax(x, -1).backward(R)
    assert torch.isfinite(x.grad).all() and (x.grad[:, 4:] == 0).all()
    kept = x.detach()[:, :4]
    s = torch.softmax(kept, -1)
    expected = kept * (R[:, :4] - s * R.sum(-1, keepdim=True))  # Proposition 3.1 on the attended logits
    torch.testing.assert_close(x.grad[:, :4], expected, rtol=1e-10, atol=1e-12)


def test_softmax_mask_in_half_precision_logits_cast_to_float32():
    x = torch.randn(2, 5).to(torch.bfloat16)
    x[:, -1] = torch.finfo(torch.bfloat16).min  # transformers' eager mask in the model's dtype
    x.requires_grad_()
    lf.softmax(x, -1, dtype=torch.float32).backward(torch.ones(2, 5))
    assert (x.grad[:, -1] == 0).all() and torch.isfinite(x.grad).all()


def test_mean_over_an_empty_dimension_is_a_clear_error():
    with pytest.raises(ValueError, match="empty dimension"):
        lf.mean(leaf(2, 0), -1)
    out = lf.mean(leaf(0, 3), -1)  # nothing reduced over an empty dimension: an empty result
    assert out.shape == (0,)
    out = lf.sum_epsilon(leaf(2, 0), -1)  # an empty sum is zero, and receives no relevance
    out.backward(torch.ones(2, dtype=D))


def test_optimized_backward_passes_equal_their_written_out_equations():
    x, W, b = leaf(1, 64, 32), torch.randn(1200, 32, dtype=D), torch.randn(1200, dtype=D)
    R = torch.zeros(1, 64, 1200, dtype=D)
    R[0, [3, 60]] = torch.randn(2, 1200, dtype=D)  # a vocabulary head: rows without relevance are skipped
    lf.linear_epsilon(x, W, b, epsilon=EPS).backward(R)
    torch.testing.assert_close(x.grad, lf.linear_relevance(x.detach(), W, b, R, EPS), rtol=1e-10, atol=1e-14)
    a, c = leaf(3, 4), leaf(3, 4)
    c2 = (c * 1.0).detach().requires_grad_()  # a residual stream (leaf) and a branch: one is reconstructed
    out = lf.add2(a * 1.0, c2, epsilon=EPS)
    R = torch.randn(3, 4, dtype=D)
    out.backward(R)
    expected = lf.add_relevance(a.detach(), c2.detach(), out.detach(), R, EPS)
    torch.testing.assert_close(a.grad, expected[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(c2.grad, expected[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", ["causal", "float_bias", "gqa"])
def test_attention_paths_equal_the_written_out_rules(case):
    q, k, v = leaf(2, 4, 5, 8), leaf(2, 4, 5, 8), leaf(2, 4, 5, 8)
    kwargs = {"is_causal": True}
    if case == "float_bias":
        kwargs = {"attn_mask": -torch.rand(5, 5, dtype=D) * 3}
    if case == "gqa":
        k, v = leaf(2, 2, 5, 8), leaf(2, 2, 5, 8)
        kwargs = {"is_causal": True, "enable_gqa": True}
    R = torch.randn(2, 4, 5, 8, dtype=D)
    lf.scaled_dot_product_attention(q, k, v, epsilon=EPS, **kwargs).backward(R)
    kwargs.pop("enable_gqa", None)
    expected = lf.attention_relevance(q.detach(), k.detach(), v.detach(), R, epsilon=EPS, **kwargs)
    for got, want in zip((q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("affine", [False, True])
def test_group_norm_applies_the_layer_norm_rules_within_each_group(affine):
    x = leaf(2, 6, 3, 2)
    w = torch.rand(6, dtype=D) + 0.5 if affine else None
    b = torch.randn(6, dtype=D) if affine else None
    out = lf.group_norm(x, 3, w, b, 1e-5, epsilon=EPS)
    assert torch.equal(out, F.group_norm(x, 3, w, b, 1e-5))
    R = torch.randn(out.shape, dtype=D)
    out.backward(R)
    y = out.detach()
    if affine:  # the bias absorbs its share, as in layer norm
        bias = b.view(1, 6, 1, 1)
        e = EPS * torch.where(y >= 0, 1.0, -1.0)
        R = R * (y - bias + e) / (y + e)
    xg, Rg = x.detach().reshape(2, 3, 12), R.reshape(2, 3, 12)  # two channels of 3 x 2 per group
    M = torch.eye(12, dtype=D) - torch.full((12, 12), 1.0 / 12, dtype=D)  # centering within the group
    c = torch.einsum("ij,bgj->bgi", M, xg)
    expected = torch.einsum("ij,bgj,bgi->bgj", M, xg, Rg / stab(c, EPS)).reshape(x.shape)
    torch.testing.assert_close(x.grad, expected, rtol=1e-10, atol=1e-12)
