"""The shape-aware detector: suspects from where each misclassified test curve's shape says flips sit.

The study's own idea (paper §III, §V.D): flipped instances sit at the ends of S-shaped sorted
TracIn curves and near the centre of Z-shaped ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.analysis.shapes import DEFAULT_RULE, ShapeRule
from core.storage.errors import AtlasError


def rank_positions(rows: np.ndarray) -> np.ndarray:
    """Distance of every entry from the centre of its row's descending order: 0 centre, 1 either end.

    The same measure as the end ratio (docs/shapes.md), per entry and in [0, 1].
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    n = rows.shape[1]
    order = np.argsort(-rows, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[None, :].repeat(len(rows), 0), axis=1)
    centre = (n - 1) / 2.0
    return np.abs(ranks - centre) / centre if centre > 0 else np.zeros_like(rows)


def shape_preference(s: np.ndarray, rule: ShapeRule = DEFAULT_RULE) -> np.ndarray:
    """Where to look for flips in each curve: +1 at the ends (S), −1 at the centre (Z), linear between.

    ``s`` is the bulk S-shapedness (core.analysis.shapes.bulk_index); the ramp runs from the rule's
    ``z_max`` to its ``s_min``, so a clear S or Z gets full weight and an ambiguous
    backslash little.
    """
    s = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=rule.middle)
    half = (rule.s_min - rule.z_max) / 2.0
    return np.clip((s - rule.middle) / half, -1.0, 1.0)


def centre_distances(rows: np.ndarray) -> np.ndarray:
    """Distance of every score from its curve's centre value (the median), in units of the row's mean.

    Each row of the result averages 1, so rows of different scales count alike. This
    reads the paper's "ends" and "centre" in score terms (large vs small deviation),
    which keeps how far out an instance lies; :func:`rank_positions` is the rank form.
    """
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    dev = np.abs(rows - np.median(rows, axis=1, keepdims=True))
    scale = dev.mean(axis=1, keepdims=True)
    return dev / np.where(scale > 0, scale, 1.0)


def shape_aware_scores(
    tracin: np.ndarray,
    s: np.ndarray,
    correct: np.ndarray,
    rule: ShapeRule = DEFAULT_RULE,
    preference: np.ndarray | float | None = None,
    position: str = "value",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Suspicion from where each misclassified test instance's curve shape says flips sit.

    Rows of ``tracin`` are test instances; only misclassified ones are used (all of
    them if the model got every one right). For row j and training instance i,
    u_ij is i's distance from the centre of j's curve: with ``position='value'``
    (default) ``|T_ij − median_j|`` over its row mean (:func:`centre_distances`,
    mean 1), with ``'rank'`` the rank distance of the end ratio mapped to [0, 1]
    and centred at ½. With preference w_j (+1 ends, −1 centre, from
    :func:`shape_preference`) the contribution is w_j·(u_ij − mean): positive far out
    on an S, near the middle of a Z; the score is Σ_j w_j·(u_ij − mean) / Σ_j |w_j|.
    ``preference`` overrides w (the benchmark's shape-blind ablations use ±1).
    """
    if position not in ("value", "rank"):
        raise AtlasError(f"Unknown position measure '{position}'; choose value or rank.")
    tracin = np.asarray(tracin)
    correct = np.asarray(correct, dtype=bool)
    use = ~correct if (~correct).any() else np.ones_like(correct)
    w = shape_preference(s, rule) if preference is None else np.asarray(preference, float)
    w = np.broadcast_to(w, correct.shape)[use]
    rows = np.flatnonzero(use)
    total = np.zeros(tracin.shape[1])
    for start in range(0, len(rows), 64):  # blocks keep the work arrays small for big runs
        block = np.asarray(tracin[rows[start : start + 64]], dtype=np.float64)
        # Centred so that a row adds nothing on average: only where in the curve counts.
        centred = centre_distances(block) - 1.0 if position == "value" else None
        u = centred if centred is not None else rank_positions(block) - 0.5
        total += w[start : start + 64] @ u
    weight = np.abs(w).sum()
    info = {
        "n_test_used": int(len(rows)),
        "misclassified_only": bool((~correct).any()),
        "n_prefer_ends": int((w > 0).sum()),
        "n_prefer_centre": int((w < 0).sum()),
        "position": position,
    }
    return (total / weight if weight > 0 else total), info
