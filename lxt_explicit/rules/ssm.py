r"""Rules of state-space models and linear attention: the scan's parameters are constants (MambaLRP).

A selective state-space layer (Mamba, Mamba2 and the hybrids built on them) computes

.. math::

    h_t = \bar A_t h_{t-1} + \bar B_t x_t, \qquad y_t = C_t h_t + D x_t,

with :math:`\bar A_t = \exp(\Delta_t A)`, :math:`\bar B_t = \Delta_t B_t` and :math:`C_t` computed
from the input.  MambaLRP (Jafari et al., NeurIPS 2024, Section 4) treats these input-dependent
parameters as constants, so that :math:`y` is *linear* in :math:`x` and the epsilon rule conserves
relevance through the scan, whichever way it is computed (recurrence, chunks, parallel scan).  Gated
delta networks (Qwen3-Next, Qwen3.5) are the same kind of scan with the keys and queries in the places
of :math:`B` and :math:`C`, the values in the place of :math:`x`, and the decay and the write strength
(:math:`g`, :math:`\beta`) in the place of :math:`\Delta`.

:class:`ScanParametersRule` makes the outputs of a call that computes such parameters constants;
:class:`EinsumRule` and :class:`LinearSolveRule` give the contractions and triangular solves of the chunked
scans the epsilon rule.
Which calls compute parameters is decided per mixer class by :mod:`lxt_explicit.state_space`.
"""

from __future__ import annotations

import torch

from .base import RuleDeclined, carries_relevance, describe
from .epsilon import EpsilonRule, UniformEpsilonRule
from .graph import same_kind
from .special import StopRelevanceRule

__all__ = ["ScanParametersRule", "EinsumRule", "LinearSolveRule"]


class ScanParametersRule(StopRelevanceRule):
    r"""Outputs that are parameters of a selective scan are constants (MambaLRP, Jafari et al., NeurIPS 2024).

    With ``parts=None`` every output is returned detached, as :class:`StopRelevanceRule` does: for a
    projection whose output is all parameters (Mamba's ``x_proj``, which computes
    :math:`\Delta, B, C`; the :math:`\beta` and decay projections of gated delta networks).  With
    ``parts=(1, 2)`` only the outputs at those positions of a returned tuple are detached: for a split
    of one tensor into the scan's input and its parameters (Mamba2's ``x, B, C = split(conv(...))``),
    where the input keeps its relevance.

    Parameters
    ----------
    parts : tuple of int, optional
        Positions of the parameter outputs in a returned tuple; ``None`` for all outputs.
    """

    def __init__(self, *, parts: tuple[int, ...] | None = None):
        self.parts = None if parts is None else tuple(int(p) for p in parts)

    def options(self):
        return {"parts": self.parts}

    def explain_call(self, fn, args, kwargs):
        if self.parts is None:
            return super().explain_call(fn, args, kwargs)
        output = fn(*args, **kwargs)
        if not isinstance(output, tuple) or max(self.parts) >= len(output):
            count = len(output) if isinstance(output, tuple) else 1
            raise RuleDeclined(
                f"ScanParametersRule(parts={self.parts}) needs a tuple of more than {max(self.parts)} outputs; "
                f"{describe(fn)} returned {count}"
            )
        return same_kind(output, (
            o.detach() if i in self.parts and isinstance(o, torch.Tensor) else o for i, o in enumerate(output)
        ))


class EinsumRule(UniformEpsilonRule):
    r"""Epsilon rule for ``torch.einsum``; several relevance-carrying operands share it uniformly.

    A contraction with one relevance-carrying operand is linear in it: the epsilon rule,
    ``R_x = x \odot J^T (R_y / (y + eps sign y))`` (AttnLRP Eq. 8).  With :math:`N` relevance-carrying
    operands (a multilinear map) each receives :math:`1/N` of that (Proposition 3.3).  The operands
    may be passed one by one or as one list; the sublist form (``einsum(a, [0, 1], b, [1, 2])``) is
    declined.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    def apply(self, fn, args, kwargs):
        if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], (list, tuple)):
            args = (args[0], *args[1])  # einsum(equation, [a, b]) is einsum(equation, a, b)
        return super().apply(fn, args, kwargs)

    def explain_call(self, fn, args, kwargs):
        if not isinstance(args[0], str):
            raise RuleDeclined(f"{describe(fn)} is covered with an equation string first, not in the sublist form")
        return self.node(fn, args, kwargs)


class LinearSolveRule(EpsilonRule):
    r"""Epsilon rule for ``X = A^{-1} B`` (``torch.linalg.solve``, ``solve_triangular``) with a constant matrix ``A``.

    The solution is linear in the right-hand side :math:`B`, so
    ``R_B = B \odot J^T (R_X / (X + eps sign X))`` (AttnLRP Eq. 8).  Chunked gated delta rules solve
    a triangular system whose matrix is built from the keys and the decay (constants, MambaLRP) to
    obtain the values written to the state.  A matrix that carries relevance makes the solution
    non-linear in it; such calls are declined (reported as unhandled).

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominator.
    """

    def explain_call(self, fn, args, kwargs):
        matrix = args[0] if args else kwargs.get("A")
        if carries_relevance(matrix):
            raise RuleDeclined(
                f"LinearSolveRule covers {describe(fn)} with a constant matrix only; here the matrix carries relevance"
            )
        return self.node(fn, args, kwargs)
