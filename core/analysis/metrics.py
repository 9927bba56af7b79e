"""Detection metrics: how well a suspicion ranking of training instances finds the known flips.

A detector gives every training instance a score (higher = more suspicious); the
metrics here score that ranking against the flipped mask the study planted.
Ties in the scores are resolved *in expectation* (as if tied instances were
inspected in random order), so a detector that gives everyone the same score
gets exactly the random baseline instead of whatever order the ids happen to
have. This module is pure NumPy/scikit-learn and never imports torch: the app
imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from core.storage.errors import AtlasError

# Fractions of the training set inspected, as documented in docs/run-store.md.
FRACTIONS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.2)

METRIC_NAMES: tuple[str, ...] = (
    "recall_at_1pct",
    "recall_at_2_5pct",
    "recall_at_5pct",
    "recall_at_10pct",
    "recall_at_20pct",
    "precision_at_k",
    "average_precision",
    "auroc",
)


def recall_key(fraction: float) -> str:
    """The metric key for recall after inspecting ``fraction`` of the set (0.025 → 'recall_at_2_5pct')."""
    pct = round(fraction * 100, 6)
    text = f"{pct:g}".replace(".", "_")
    return f"recall_at_{text}pct"


def n_inspected(fraction: float, n: int) -> int:
    """How many instances 'inspecting ``fraction`` of ``n``' means: round(fraction·n), at least 1."""
    if not 0.0 < fraction <= 1.0:
        raise AtlasError(f"The fraction inspected must lie in (0, 1], got {fraction}.")
    return max(1, min(n, int(math.floor(fraction * n + 0.5))))


def validate(
    scores: Sequence[float] | np.ndarray, flipped: Sequence[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scores, flipped)`` as 1-D float and bool arrays, or raise :class:`AtlasError`.

    The scores must be finite and as many as the flags, and the flags must hold
    at least one flipped and one clean instance, or no metric is defined.
    """
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flipped)
    if s.ndim != 1 or f.ndim != 1:
        raise AtlasError("Scores and flipped flags must be one-dimensional.")
    if len(s) != len(f):
        raise AtlasError(f"There are {len(s)} scores but {len(f)} flipped flags; they must match.")
    if f.dtype != bool:
        if not np.isin(f, (0, 1)).all():
            raise AtlasError("Flipped flags must be booleans or 0/1.")
        f = f.astype(bool)
    if not np.isfinite(s).all():
        raise AtlasError(f"{int((~np.isfinite(s)).sum())} suspicion scores are not finite.")
    n_flip = int(f.sum())
    if n_flip == 0:
        raise AtlasError("No instance is flipped, so detection metrics are undefined.")
    if n_flip == len(f):
        raise AtlasError("Every instance is flipped, so detection metrics are undefined.")
    return s, f


def expected_hits(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Expected number of flips among the top m, for m = 0..n (length n + 1), ties in random order.

    Inside a block of tied scores the expected count grows linearly, because a
    random order of the block spreads its flips evenly over its positions.
    """
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    s_sorted = scores[order]
    f_sorted = flipped[order].astype(np.float64)
    # Block boundaries: positions where the sorted score changes.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], n]
    hits_at_block_end = np.cumsum(np.add.reduceat(f_sorted, starts))
    hits_before = np.r_[0.0, hits_at_block_end[:-1]]
    out = np.empty(n + 1)
    out[0] = 0.0
    for start, end, before, after in zip(starts, ends, hits_before, hits_at_block_end, strict=True):
        m = np.arange(start + 1, end + 1)
        out[start + 1 : end + 1] = before + (after - before) * (m - start) / (end - start)
    return out


def recall_at_fraction(scores, flipped, fraction: float) -> float:
    """Share of the flips found after inspecting the top ``fraction`` of the ranking."""
    s, f = validate(scores, flipped)
    return float(expected_hits(s, f)[n_inspected(fraction, len(s))] / f.sum())


def precision_at_k(scores, flipped, k: int | None = None) -> float:
    """Share of flips among the top ``k`` (default: k = the number of flips, where it equals recall)."""
    s, f = validate(scores, flipped)
    k = int(f.sum()) if k is None else int(k)
    if not 1 <= k <= len(s):
        raise AtlasError(f"k must lie between 1 and {len(s)}, got {k}.")
    return float(expected_hits(s, f)[k] / k)


def average_precision(scores, flipped) -> float:
    """Average precision (area under the precision-recall curve, scikit-learn's step form)."""
    s, f = validate(scores, flipped)
    return float(average_precision_score(f, s))


def auroc(scores, flipped) -> float:
    """Area under the ROC curve: the chance a random flip outranks a random clean instance."""
    s, f = validate(scores, flipped)
    return float(roc_auc_score(f, s))


def recall_curve(scores, flipped, n_points: int | None = 201) -> tuple[np.ndarray, np.ndarray]:
    """Recall against the fraction inspected: ``(fractions, recalls)``, both starting at 0.

    ``n_points`` evenly spaced inspection depths (None: every depth 0..n).
    """
    s, f = validate(scores, flipped)
    n = len(s)
    hits = expected_hits(s, f)
    depths = (
        np.arange(n + 1) if n_points is None else np.unique(np.linspace(0, n, n_points).round())
    )
    depths = depths.astype(int)
    return depths / n, hits[depths] / f.sum()


def detection_metrics(scores, flipped, fractions: Sequence[float] = FRACTIONS) -> dict[str, float]:
    """All detection metrics of one ranking: recall at each fraction, precision@k, AP and AUROC."""
    s, f = validate(scores, flipped)
    n, k = len(s), int(f.sum())
    hits = expected_hits(s, f)
    out = {recall_key(q): float(hits[n_inspected(q, n)] / k) for q in fractions}
    out["precision_at_k"] = float(hits[k] / k)
    out["average_precision"] = float(average_precision_score(f, s))
    out["auroc"] = float(roc_auc_score(f, s))
    return out


def random_baseline(
    n: int, n_flipped: int, fractions: Sequence[float] = FRACTIONS
) -> dict[str, float]:
    """Expected metrics of a random ranking: recall@q = m/n (≈ q), precision = AP ≈ flip rate, AUROC = 0.5.

    The AP of a random ranking is the flip rate only in the limit; for small sets it is
    a little higher, and the flip rate is the figure the literature quotes.
    """
    if not 0 < n_flipped < n:
        raise AtlasError(f"A random baseline needs 0 < flips < n, got {n_flipped} of {n}.")
    rate = n_flipped / n
    out = {recall_key(q): n_inspected(q, n) / n for q in fractions}
    out["precision_at_k"] = rate
    out["average_precision"] = rate
    out["auroc"] = 0.5
    return out
