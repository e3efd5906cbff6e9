"""Rules of single operations: the softmax (Proposition 3.1) and layer normalization."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from ..ops import OP_GROUPS, argument
from ..stabilizer import DEFAULT_EPSILON, check_epsilon
from .base import Rule, RuleDeclined, describe

__all__ = ["SoftmaxRule", "LayerNormRule"]

_SOFTMAX = frozenset(OP_GROUPS["softmax"])


class SoftmaxRule(Rule):
    r"""Deep-Taylor rule with bias for the softmax, ``R_{x_i} = x_i (R_i - s_i \sum_j R_j)`` (Proposition 3.1).

    Covers ``F.softmax``, ``torch.softmax``, ``Tensor.softmax`` and ``nn.Softmax`` modules
    (see :func:`~lxt_explicit.functional.softmax`).
    """

    def explain_call(self, fn, args, kwargs):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Softmax):
            return lf.softmax(args[0], owner.dim)
        if fn not in _SOFTMAX:
            raise RuleDeclined(f"SoftmaxRule covers softmax functions and nn.Softmax, not {describe(fn)}")
        x = argument(args, kwargs, 0, "input")
        dim = argument(args, kwargs, 1, "dim")
        dtype = argument(args, kwargs, 3 if fn is F.softmax else 2, "dtype")
        if dim is None:
            raise ValueError("softmax was called without `dim`; pass the dimension explicitly")
        return lf.softmax(x, dim, dtype=dtype)


class LayerNormRule(Rule):
    """Identity rule on the division by the standard deviation, epsilon rule on the centering.

    Covers ``F.layer_norm``, ``F.group_norm`` (within every group of channels) and ``nn.LayerNorm``
    modules (see :func:`~lxt_explicit.functional.layer_norm` and :func:`~lxt_explicit.functional.group_norm`).

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the relevance denominators.
    """

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON):
        self.epsilon = check_epsilon(epsilon)

    def options(self):
        return {"epsilon": self.epsilon}

    def explain_call(self, fn, args, kwargs):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.LayerNorm):
            return lf.layer_norm(
                args[0], owner.weight, owner.bias, owner.eps, normalized_shape=owner.normalized_shape,
                epsilon=self.epsilon,
            )
        if fn is F.group_norm:
            return self._group_norm(args, kwargs)
        if fn is not F.layer_norm:
            raise RuleDeclined(f"LayerNormRule covers F.layer_norm, F.group_norm and nn.LayerNorm, not {describe(fn)}")
        x = argument(args, kwargs, 0, "input")
        shape = argument(args, kwargs, 1, "normalized_shape")
        weight, bias = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "bias")
        eps = argument(args, kwargs, 4, "eps", 1e-5)
        return lf.layer_norm(x, weight, bias, eps, normalized_shape=tuple(shape), epsilon=self.epsilon)

    def _group_norm(self, args, kwargs):
        x, groups = argument(args, kwargs, 0, "input"), argument(args, kwargs, 1, "num_groups")
        weight, bias = argument(args, kwargs, 2, "weight"), argument(args, kwargs, 3, "bias")
        eps = argument(args, kwargs, 4, "eps", 1e-5)
        return lf.group_norm(x, groups, weight, bias, eps, epsilon=self.epsilon)
