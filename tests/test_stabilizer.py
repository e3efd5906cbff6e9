import pytest
import torch

from lxt_explicit import DEFAULT_EPSILON, stabilize


def test_shift_follows_sign_and_zero_counts_as_positive():
    z = torch.tensor([-2.0, -1e-9, -0.0, 0.0, 1e-9, 3.0], dtype=torch.float64)
    out = stabilize(z, 1e-6)
    expected = torch.tensor([-2.000001, -1e-9 - 1e-6, 1e-6, 1e-6, 1e-9 + 1e-6, 3.000001], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_never_pushed_through_zero():
    z = torch.linspace(-1e-5, 1e-5, 2001, dtype=torch.float64)
    out = stabilize(z, 1e-6)
    assert (out.abs() >= 1e-6 - 1e-18).all()
    nonzero = z != 0
    assert (torch.sign(out[nonzero]) == torch.sign(z[nonzero])).all()


def test_does_not_modify_input_and_rejects_negative_epsilon():
    z = torch.zeros(3)
    stabilize(z, 1.0)
    assert torch.equal(z, torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        stabilize(z, -1.0)


def test_one_default_epsilon():
    assert DEFAULT_EPSILON == 1e-6


def test_stabilized_quotient_divides_by_the_stabilized_denominator():
    from lxt_explicit.stabilizer import stabilized_quotient

    z = torch.tensor([-2.0, -0.0, 0.0, 3.0], dtype=torch.float64)
    r = torch.tensor([1.0, 1.0, -1.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(stabilized_quotient(r, z, 1e-6), r / stabilize(z, 1e-6), rtol=0, atol=0)
    assert torch.equal(z, torch.tensor([-2.0, -0.0, 0.0, 3.0], dtype=torch.float64))
