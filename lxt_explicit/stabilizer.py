"""The one denominator stabilizer of the library, and the one check of its epsilon.

Every LRP rule divides relevance by a pre-activation ``z``.  The epsilon rule
(AttnLRP, Achtibat et al. 2024, Eq. 8) shifts that denominator away from zero
*along its own sign*, ``z + eps * sign(z)`` with ``sign(0) = +1``, so that a
denominator is never pushed through zero and never changes sign.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["DEFAULT_EPSILON", "check_epsilon", "is_batched", "sign_shift", "stabilize", "stabilized_quotient"]

#: Default epsilon of every rule and operation of the library.
DEFAULT_EPSILON: float = 1e-6


def check_epsilon(epsilon) -> float:
    """Return ``epsilon`` as a float, or raise if it cannot stabilize a denominator.

    Every entry point of the library (functional operations, rules, presets) validates its
    epsilon here, when the object is made, so that a bad value never reaches a backward pass.

    Raises
    ------
    ValueError
        If ``epsilon`` is not a real number, or is negative, NaN or infinite.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise ValueError(f"epsilon must be a finite non-negative number, got {epsilon!r}")
    value = float(epsilon)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"epsilon must be a finite non-negative number, got {epsilon!r}")
    return value


def sign_shift(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Return ``epsilon * sign(z)`` with ``sign(0) = +1`` (the shift :func:`stabilize` adds), as a new tensor."""
    # One fresh buffer and in-place arithmetic: about twice as fast on CPU as torch.where.
    return (z >= 0).to(z.dtype).mul_(2.0 * epsilon).sub_(epsilon)


def stabilize(z: torch.Tensor, epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """Shift ``z`` away from zero along its sign.

    Parameters
    ----------
    z : torch.Tensor
        Denominator to stabilize.
    epsilon : float, optional
        Size of the shift; must be finite and non-negative.

    Returns
    -------
    torch.Tensor
        ``z + epsilon * sign(z)`` with ``sign(0) = +1``; a new tensor, ``z`` is not modified.
        ``|result| >= epsilon`` and ``sign(result) == sign(z)`` wherever ``z != 0``.
    """
    return sign_shift(z, check_epsilon(epsilon)).add_(z)


def stabilized_quotient(numerator: torch.Tensor, z: torch.Tensor, epsilon: float = DEFAULT_EPSILON) -> torch.Tensor:
    """``numerator / stabilize(z, epsilon)``, computed in the stabilizer's buffer (one allocation).

    ``z`` must have the broadcast shape of the result and a floating dtype that holds the result.
    """
    denominator = stabilize(z, epsilon)
    if is_batched(numerator):  # batched backward passes: out= has no batching rule
        return numerator / denominator
    return torch.div(numerator, denominator, out=denominator)


def is_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a batched tensor of ``vmap`` (e.g. relevance of ``autograd.grad(is_grads_batched=True)``).

    Rules use it to avoid what batched tensors cannot do: ``out=`` arguments and data-dependent shapes.
    """
    return "Batched" in str(torch._C._dispatch_keys(tensor))
