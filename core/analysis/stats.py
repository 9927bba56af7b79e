"""Correlations that say when they mean nothing.

Pure NumPy/SciPy (no torch): the analyze stage stores them and the app shows them for
views it computes itself, through this one function.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Fewer pairs than this: no correlation is reported (a p-value on 5 points teaches nothing).
MIN_POINTS = 8
# Values equal at this many decimals count as one; fewer than MIN_DISTINCT distinct ones is no spread.
SPREAD_DECIMALS = 4
MIN_DISTINCT = 3


def correlation(
    x: np.ndarray,
    y: np.ndarray,
    min_points: int = MIN_POINTS,
    names: tuple[str, str] = ("x", "y"),
) -> dict[str, Any]:
    """Spearman and Pearson correlation with p-values, or None with a ``reason``.

    Pairs with a NaN on either side are dropped. With fewer than ``min_points`` pairs, or
    a side with fewer than 3 distinct values (to 4 decimals: no spread), every statistic
    is None and ``reason`` says why in one sentence; otherwise ``reason`` is None.
    """
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {
        "n": int(x.size),
        "spearman": None,
        "spearman_p": None,
        "pearson": None,
        "pearson_p": None,
        "reason": None,
    }
    if x.size < min_points:
        out["reason"] = f"only {x.size} points; a correlation needs at least {min_points}"
        return out
    for name, v in zip(names, (x, y), strict=True):
        if np.unique(np.round(v, SPREAD_DECIMALS)).size < MIN_DISTINCT:
            out["reason"] = f"no spread: {name} takes fewer than {MIN_DISTINCT} distinct values"
            return out
    sp = stats.spearmanr(x, y)
    pe = stats.pearsonr(x, y)
    out.update(
        spearman=_finite(sp.statistic),
        spearman_p=_finite(sp.pvalue),
        pearson=_finite(pe.statistic),
        pearson_p=_finite(pe.pvalue),
    )
    return out


def _finite(value: Any) -> float | None:
    """A float, or None for NaN/inf (JSON has no NaN)."""
    v = float(value)
    return v if math.isfinite(v) else None


def mean_distances(distances: np.ndarray) -> np.ndarray:
    """Mean distance of each test instance to the training data (paper Fig. 2a), float64.

    ``distances`` is distances.npy (n_test, n_train); the mean is taken in its own dtype
    (float32 as stored), so every reader gets the analyze stage's numbers bit for bit.
    Without training instances every mean is NaN.
    """
    d = np.asarray(distances)
    if d.ndim != 2 or d.shape[1] == 0:
        return np.full(d.shape[0] if d.ndim else 0, np.nan)
    return d.mean(axis=1).astype(np.float64)
