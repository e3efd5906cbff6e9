"""The op rules of the dense families against their equations, element by element (float64).

``beta * c + alpha * (a @ b)`` (torch.baddbmm, addbmm, addmm: BLOOM's ALiBi scores), ``torch.einsum``
(LongT5's local attention) and ``F.interpolate`` (position embeddings resized to an image).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import lxt_explicit as lxt
import lxt_explicit.functional as lf
from lxt_explicit import Composite
from lxt_explicit.rules import UniformEpsilonRule

D = torch.float64
EPS = 1e-9


def literal(c, a, b, R, beta, alpha, needs, batch_sum=False):
    """The rules as scalar sums over the elements: sum rule (Eq. 8), identity on alpha, uniform-epsilon product."""
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    b3 = b if b.dim() == 3 else b.unsqueeze(0)
    n, rows, inner = a3.shape
    cols = b3.shape[-1]
    out_shape = (rows, cols) if (batch_sum or a.dim() == 2) else (n, rows, cols)
    c_full = torch.broadcast_to(torch.as_tensor(c, dtype=D), out_shape)
    R_a, R_b, R_c = torch.zeros_like(a3), torch.zeros_like(b3), torch.zeros(out_shape, dtype=D)
    share = 0.5 if (needs[1] and needs[2]) else 1.0
    for m, i, j in itertools.product(range(1 if batch_sum or a.dim() == 2 else n), range(rows), range(cols)):
        index = (i, j) if len(out_shape) == 2 else (m, i, j)
        batches = range(n) if batch_sum else [m]
        P = sum(float(a3[t, i, k] * b3[t, k, j]) for t in batches for k in range(inner))
        z = beta * float(c_full[index]) + alpha * P
        r = float(R[index])
        if needs[0]:
            R_c[index] = beta * float(c_full[index]) * r / (z + EPS * (1 if z >= 0 else -1))
            R_P = alpha * P * r / (z + EPS * (1 if z >= 0 else -1))
        else:
            e = EPS * (1 if z >= 0 else -1)
            R_P = r * (alpha * P + e) / (z + e)
        G = share * R_P / (P + EPS * (1 if P >= 0 else -1))
        for t in batches:
            for k in range(inner):
                R_a[t, i, k] += a3[t, i, k] * b3[t, k, j] * G
                R_b[t, k, j] += a3[t, i, k] * b3[t, k, j] * G
    return R_c, R_a.reshape(a.shape), R_b.reshape(b.shape)


def operands(shape_c, n, needs, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(shape_c, generator=g, dtype=D)
    a = torch.randn(n, 3, 4, generator=g, dtype=D) if n else torch.randn(3, 4, generator=g, dtype=D)
    b = torch.randn(n, 4, 5, generator=g, dtype=D) if n else torch.randn(4, 5, generator=g, dtype=D)
    return tuple(t.requires_grad_(need) for t, need in zip((c, a, b), needs))


CASES = [  # (function, shape of c, batches, beta, alpha)
    ("baddbmm", (2, 1, 5), 2, 1.0, 0.35),  # BLOOM: an ALiBi bias broadcast over the query rows
    ("baddbmm", (2, 3, 5), 2, 0.5, 2.0),
    ("addbmm", (3, 5), 2, 1.5, 0.5),
    ("addmm", (5,), 0, 2.0, -0.5),
]


@pytest.mark.parametrize("needs", [(False, True, True), (True, True, True), (False, True, False), (True, False, True)])
@pytest.mark.parametrize("name,shape_c,n,beta,alpha", CASES)
def test_matmul_add_equals_the_rules_element_by_element(name, shape_c, n, beta, alpha, needs):
    c, a, b = operands(shape_c, n, needs)
    out = lf.matmul_add(c, a, b, beta=beta, alpha=alpha, batch_sum=name == "addbmm", epsilon=EPS)
    torch.testing.assert_close(out, getattr(torch, name)(c, a, b, beta=beta, alpha=alpha), rtol=0, atol=0)
    R = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    out.backward(R)
    R_c, R_a, R_b = literal(c.detach(), a.detach(), b.detach(), R, beta, alpha, needs, batch_sum=name == "addbmm")
    for tensor, expected, need in zip((c, a, b), (R_c, R_a, R_b), needs):
        if need:
            expected = expected if tensor is not c else expected.sum_to_size(c.shape)
            torch.testing.assert_close(tensor.grad, expected, rtol=1e-10, atol=1e-12)
        else:
            assert tensor.grad is None


def test_constant_bias_absorbs_its_share_and_the_product_keeps_the_rest():
    c, a, b = operands((2, 1, 5), 2, (False, True, True))
    out = lf.matmul_add(c, a, b, alpha=0.25, epsilon=0.0)
    out.backward(out.detach())
    product_share = 0.25 * (a.detach() @ b.detach())  # R_P = alpha P for R = z: the rest of z is the bias
    torch.testing.assert_close(a.grad.sum() + b.grad.sum(), product_share.sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad.sum(), b.grad.sum(), rtol=1e-10, atol=1e-12)  # the uniform split


@pytest.mark.parametrize("call", [
    lambda c, a, b: c.baddbmm(batch1=a, batch2=b, beta=1.0, alpha=0.5),  # as BLOOM calls it
    lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5),
    lambda c, a, b: c.expand(2, 3, 5).clone().baddbmm_(a, b, alpha=0.5),
])
def test_the_rule_routes_every_spelling_of_baddbmm(call):
    class Scores(torch.nn.Module):
        def forward(self, c, a, b):
            return call(c, a, b)

    c, a, b = operands((2, 1, 5), 2, (False, True, True))
    composite = Composite(ops={"matmul_add": UniformEpsilonRule(epsilon=EPS)})
    with composite.context(Scores()) as model:
        out = model(c, a, b)
    out.backward(out.detach())
    _, R_a, R_b = literal(c.detach(), a.detach(), b.detach(), out.detach(), 1.0, 0.5, (False, True, True))
    torch.testing.assert_close(a.grad, R_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, R_b, rtol=1e-10, atol=1e-12)


def test_addmm_with_a_relevance_carrying_bias_gives_the_bias_its_epsilon_share():
    c, a, b = operands((5,), 0, (True, True, False))
    composite = Composite(ops={"linear": UniformEpsilonRule(epsilon=EPS)})

    class Affine(torch.nn.Module):
        def forward(self, c, a, b):
            return torch.addmm(c, a, b)

    with composite.context(Affine()) as model:
        out = model(c, a, b)
    out.backward(out.detach())
    R_c, R_a, _ = literal(c.detach(), a.detach(), b.detach(), out.detach(), 1.0, 1.0, (True, True, False))
    torch.testing.assert_close(c.grad, R_c.sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.grad, R_a, rtol=1e-10, atol=1e-12)


def test_factors_of_the_wrong_rank_are_a_clear_error():
    with pytest.raises(ValueError, match="3-D batches"):
        lf.matmul_add(torch.zeros(3), torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5, 4))


class Call(torch.nn.Module):
    """A module that runs ``function`` on its inputs (so that a Composite routes the call)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *inputs):
        return self.function(*inputs)


def routed(function, *inputs):
    """``function(*inputs)`` routed through the AttnLRP preset's op rules; the output and the inputs' relevance."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with lxt.attnlrp(epsilon=EPS, strict=True).context(Call(function)) as model:
        out = model(*leaves)
    out.backward(out.detach())
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("as_list", [False, True])
def test_einsum_of_two_relevance_carrying_operands_is_the_uniform_epsilon_rule(as_list):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, generator=g, dtype=D), torch.randn(2, 4, 5, generator=g, dtype=D)
    equation = "nik,nkj->nij"
    out, (R_a, R_b) = routed(lambda x, y: torch.einsum(equation, [x, y] if as_list else x, *([] if as_list else [y])),
                             a, b)
    torch.testing.assert_close(out, a @ b, rtol=1e-12, atol=0)
    normed = out / (out + EPS * torch.where(out >= 0, 1.0, -1.0))  # R = z: R / stab(z)
    torch.testing.assert_close(R_a, 0.5 * torch.einsum("nik,nkj,nij->nik", a, b, normed), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(R_b, 0.5 * torch.einsum("nik,nkj,nij->nkj", a, b, normed), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_interpolate_is_the_epsilon_rule_of_its_matrix(mode):
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=D)

    def resize(t):
        return F.interpolate(t, size=(5, 4), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))

    out, (R_x,) = routed(resize, x)
    # the interpolation matrix, column by column from the unit images
    basis = torch.eye(9, dtype=D).reshape(9, 1, 3, 3)
    M = F.interpolate(basis, size=(5, 4), mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    M = M.reshape(9, 20).T  # (outputs, inputs) per channel
    for c in range(2):
        flat, z = x[0, c].reshape(9), out[0, c].reshape(20)
        expected = flat * (M.T @ (z / (z + EPS * torch.where(z >= 0, 1.0, -1.0))))  # Eq. 8 with R = z
        torch.testing.assert_close(R_x[0, c].reshape(9), expected, rtol=1e-10, atol=1e-12)
