"""Find the latent units relevance points to, over one explanation or a dataset run.

Each explanation's latent relevance (``explain(..., latent=["mlp:K", "heads:K", ...])``) is summed
over the positions: a unit's total contribution to the explained quantity.  Over the
explanations, :func:`find_units` keeps per unit the mean relevance, the mean absolute relevance,
how often the unit is among the ``k`` most relevant of its spec (by absolute relevance) and how
often its relevance is positive.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["UnitStats", "UnitTable", "find_units", "unit_relevance"]


@dataclass(frozen=True)
class UnitStats:
    """Relevance statistics of one unit over a run.

    Attributes
    ----------
    spec : str
        Where the unit lives (``'mlp:3'``).
    layer : int or None
        The block index of ``'mlp:K'`` / ``'heads:K'`` specs.
    unit : int
        Its index.
    mean_relevance, mean_abs_relevance : float
        Mean over the explanations of its relevance (summed over positions), and of its absolute value.
    top_k_rate : float
        Fraction of the explanations in which it is among the ``k`` most relevant units of its spec.
    positive_rate : float
        Fraction of the explanations in which its relevance is positive.
    """

    spec: str
    layer: int | None
    unit: int
    mean_relevance: float
    mean_abs_relevance: float
    top_k_rate: float
    positive_rate: float

    @property
    def sign(self) -> str:
        """``'+'`` or ``'-'``: the sign of the mean relevance."""
        return "+" if self.mean_relevance >= 0 else "-"


class UnitTable:
    """The units of a run with their statistics, most relevant first within each spec."""

    def __init__(self, rows: list[UnitStats], k: int, explanations: int):
        self.rows = rows
        self.k = k
        self.explanations = explanations

    def top(self, spec: str | None = None, n: int = 10) -> list[UnitStats]:
        """The ``n`` units with the largest mean absolute relevance (of one spec, or of all)."""
        rows = [row for row in self.rows if spec is None or row.spec == spec]
        if spec is not None and not rows:
            raise KeyError(f"no units of {spec!r}; the table has {sorted({r.spec for r in self.rows})}")
        return sorted(rows, key=lambda row: -row.mean_abs_relevance)[:n]

    def units(self, spec: str, n: int = 10) -> list[int]:
        """The indices of :meth:`top` ``(spec, n)``."""
        return [row.unit for row in self.top(spec, n)]

    def to_pandas(self):
        """A ``pandas.DataFrame``, one row per unit (needs pandas: ``pip install lxt_explicit[tables]``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("UnitTable.to_pandas needs pandas: pip install 'pandas>=2.0'") from None
        columns = ["spec", "layer", "unit", "mean_relevance", "mean_abs_relevance", "top_k_rate", "positive_rate"]
        return pd.DataFrame([[getattr(row, c) for c in columns] for row in self.rows], columns=columns)

    def report(self, n: int = 5) -> str:
        """A short text report: the ``n`` most relevant units of each spec."""
        lines = [f"most relevant units over {self.explanations} explanation(s) (top-k rate with k={self.k}):"]
        for spec in dict.fromkeys(row.spec for row in self.rows):
            parts = [f"{row.unit} ({row.mean_relevance:+.3g}, {row.top_k_rate:.0%})" for row in self.top(spec, n)]
            lines.append(f"  {spec}: " + ", ".join(parts))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.report()


def unit_relevance(explanation, spec: str, positions: slice | None = None) -> torch.Tensor:
    """The relevance of each unit of ``spec`` in ``explanation``, summed over positions (``[units]``)."""
    latent = getattr(explanation, "latent", None)
    if latent is None or spec not in latent:
        have = sorted(latent) if latent else []
        raise KeyError(f"the explanation has no relevance for {spec!r} (it has {have}); run "
                       f"explain(..., latent=[{spec!r}]) first")
    relevance = latent[spec]
    if positions is not None:
        relevance = relevance[positions]
    return relevance.double().sum(0) if relevance.dim() > 1 else relevance.double()


def _layer(spec: str) -> int | None:
    match = re.fullmatch(r"(?:mlp|heads):(-?\d+)", spec)
    return int(match.group(1)) if match else None


def find_units(explanations, specs: Sequence[str] | None = None, *, k: int = 10) -> UnitTable:
    """Aggregate the latent relevance of one explanation or a list of them per unit.

    Parameters
    ----------
    explanations : lxt_explicit.explanation.Explanation or list
        From ``explain(..., latent=[...])``.
    specs : sequence of str, optional
        The specs to aggregate (default: every spec of the first explanation).
    k : int
        How many units per spec and explanation count as "top".

    Returns
    -------
    UnitTable
    """
    if not isinstance(explanations, (list, tuple)):
        explanations = [explanations]
    if not explanations:
        raise ValueError("find_units needs at least one explanation")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    specs = list(specs) if specs is not None else list(getattr(explanations[0], "latent", {}) or {})
    if not specs:
        raise ValueError("the explanations hold no latent relevance; run explain(..., latent=['mlp:K', 'heads:K'])")
    rows = []
    for spec in specs:
        relevance = torch.stack([unit_relevance(e, spec) for e in explanations])  # [explanations, units]
        top = torch.zeros_like(relevance, dtype=torch.bool)
        top.scatter_(1, relevance.abs().topk(min(k, relevance.shape[1]), dim=1).indices, True)
        stats = zip(relevance.mean(0), relevance.abs().mean(0), top.double().mean(0), (relevance > 0).double().mean(0))
        unit_rows = [
            UnitStats(spec, _layer(spec), unit, float(m), float(a), float(t), float(p))
            for unit, (m, a, t, p) in enumerate(stats)
        ]
        rows.extend(sorted(unit_rows, key=lambda row: -row.mean_abs_relevance))
    return UnitTable(rows, k, len(explanations))
