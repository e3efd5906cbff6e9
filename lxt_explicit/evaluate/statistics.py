"""Statistics over prompts: percentile-bootstrap confidence intervals, paired differences, Pearson correlation.

An evaluation gives one score per prompt and method.  :func:`bootstrap` resamples the prompts with
replacement and takes the quantiles of the resampled means (the percentile bootstrap, Efron &
Tibshirani 1993); :func:`paired_difference` does the same for the per-prompt differences of two
methods on the same prompts, which cancels the variation between prompts that both methods share.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap", "paired_difference", "pearson"]


class Interval(NamedTuple):
    """A mean with its confidence interval.

    Attributes
    ----------
    mean : float
        The mean over the values.
    low, high : float
        The interval's bounds.
    """

    mean: float
    low: float
    high: float

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """``'0.181 [0.160, 0.202]'`` (with ``signed``: ``'+0.019 [+0.008, +0.031]'``)."""
        spec = f"{'+' if signed else ''}.{digits}f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _values(values, name: str = "values") -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return array


def bootstrap(values: Sequence[float], *, resamples: int = 10000, level: float = 0.95, seed: int = 0) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap confidence interval.

    Parameters
    ----------
    values : sequence of float
        One value per prompt.
    resamples : int
        Bootstrap resamples (each draws ``len(values)`` values with replacement).
    level : float
        Coverage of the interval (0.95: the 2.5 % and 97.5 % quantiles of the resampled means).
    seed : int
        Seed of the resampling (the result is reproducible).

    Returns
    -------
    Interval
    """
    array = _values(values)
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    means = array[rng.integers(0, len(array), size=(resamples, len(array)))].mean(1)
    tail = (1.0 - level) / 2.0
    return Interval(float(array.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail)))


def paired_difference(values: Sequence[float], reference: Sequence[float], **options) -> Interval:
    """Mean of ``values - reference`` (paired by prompt) with its bootstrap interval.

    ``options`` are those of :func:`bootstrap`.
    """
    a, b = _values(values), _values(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same prompts: {len(a)} values against {len(b)} reference values")
    return bootstrap(a - b, **options)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation coefficient ``cov(x, y) / (std(x) std(y))``.

    Raises
    ------
    ValueError
        If the sequences differ in length, have fewer than two values, or one of them is constant.
    """
    a, b = _values(x, "x"), _values(y, "y")
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"pearson needs two sequences of the same length >= 2, got {len(a)} and {len(b)}")
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if norm == 0.0:
        raise ValueError("pearson is undefined when one of the sequences is constant")
    return float((a * b).sum() / norm)
