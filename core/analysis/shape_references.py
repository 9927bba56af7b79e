"""Reference curves of known shape, and the calibration of the shape-class thresholds on them.

The paper names three shapes by eye. Its words are the specification (paper §IV):
S — "most training instances have small absolute scores" (a peaked bulk with long tails);
Z — "many training instances have large absolute scores" (two plateaus, a steep middle);
backslash — in between (scores spread evenly along the ranks). The reference
distributions below stand for those words, each with a documented class; the class
thresholds are placed halfway between the classes' ranges of the bulk index on them.
They are calibrated here and only here, never on a run's data (docs/shapes.md).

Pure NumPy, so tests, the app (which shows the references, labelled as references) and
the calibration all draw the same curves.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.analysis import shapes

# Scores per reference curve: the paper's 1,600 training instances.
N_REFERENCE = 1600
# Share of each curve replaced by far-out points (half at each end) in the "+ extremes" variants.
EXTREME_SHARE = 0.025
# Seeds the thresholds are calibrated on; tests check other seeds.
CALIBRATION_SEEDS = tuple(range(20))


@dataclass(frozen=True)
class Reference:
    """A distribution of scores whose sorted curve has a documented shape class."""

    name: str
    shape: str
    draw: Callable[[np.random.Generator, int], np.ndarray]
    note: str


def _plateaus(high: float) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Two plateaus: a share ``high`` of scores near +1, the rest near −1 (sd 0.15 each)."""

    def draw(rng: np.random.Generator, n: int) -> np.ndarray:
        k = int(round(high * n))
        return np.r_[rng.normal(1.0, 0.15, k), rng.normal(-1.0, 0.15, n - k)]

    return draw


REFERENCES: tuple[Reference, ...] = (
    Reference(
        "uniform",
        shapes.SHAPE_BACKSLASH,
        lambda rng, n: rng.uniform(-1.0, 1.0, n),
        "scores spread evenly: the sorted curve is a straight line",
    ),
    Reference(
        "gaussian",
        shapes.SHAPE_BACKSLASH,
        lambda rng, n: rng.normal(0.0, 1.0, n),
        "an ordinary cloud: light tails, no plateau",
    ),
    Reference(
        "laplace",
        shapes.SHAPE_S,
        lambda rng, n: rng.laplace(0.0, 1.0, n),
        "most scores near zero, exponential tails",
    ),
    Reference(
        "student-t(3)",
        shapes.SHAPE_S,
        lambda rng, n: rng.standard_t(3, n),
        "most scores near zero, heavy tails",
    ),
    Reference(
        "two plateaus 50/50",
        shapes.SHAPE_Z,
        _plateaus(0.5),
        "half the scores high, half low",
    ),
    Reference(
        "two plateaus 60/40",
        shapes.SHAPE_Z,
        _plateaus(0.6),
        "the paper's proportions, roughly",
    ),
    Reference(
        "two plateaus 70/30",
        shapes.SHAPE_Z,
        _plateaus(0.7),
        "the most lopsided split still read as Z",
    ),
)

# Shown beside the references but not used for calibration: where two plateaus stop being Z.
BOUNDARY_CASES: tuple[Reference, ...] = (
    Reference(
        "two plateaus 80/20",
        shapes.SHAPE_BACKSLASH,
        _plateaus(0.8),
        "one plateau holds most instances: no longer 'many large' on both sides",
    ),
    Reference(
        "two plateaus 90/10",
        shapes.SHAPE_S,
        _plateaus(0.9),
        "most instances on one level, a few far away: the paper's S in words",
    ),
)


def with_extremes(
    scores: np.ndarray, rng: np.random.Generator, share: float = EXTREME_SHARE
) -> np.ndarray:
    """A copy of ``scores`` with ``share`` of them moved 2–6 ranges beyond either end (half each)."""
    y = np.array(scores, dtype=np.float64)
    k = int(round(share * y.size))
    if k == 0:
        return y
    where = rng.choice(y.size, k, replace=False)
    span = float(np.ptp(y)) or 1.0
    top, bottom = where[: k // 2], where[k // 2 :]
    y[top] = y.max() + span * rng.uniform(2.0, 6.0, top.size)
    y[bottom] = y.min() - span * rng.uniform(2.0, 6.0, bottom.size)
    return y


def reference_curves(
    seed: int = 0,
    n: int = N_REFERENCE,
    extremes: bool = False,
    references: tuple[Reference, ...] = REFERENCES + BOUNDARY_CASES,
) -> dict[str, tuple[np.ndarray, str]]:
    """``{name: (scores, documented shape)}`` for one seed, optionally with extreme points."""
    out = {}
    for ref in references:
        # Seeded by the reference's name, so a curve is the same alone or among others.
        rng = np.random.default_rng([seed, zlib.crc32(ref.name.encode())])
        y = ref.draw(rng, n)
        if extremes:
            y = with_extremes(y, rng)
        out[ref.name + (" + extremes" if extremes else "")] = (y, ref.shape)
    return out


def reference_indices(
    seeds: tuple[int, ...] = CALIBRATION_SEEDS, n: int = N_REFERENCE, trim: float = shapes.TRIM
) -> dict[str, np.ndarray]:
    """Bulk index of every reference (with and without extremes) for each seed: {name: (n_seeds,)}."""
    out: dict[str, list[float]] = {}
    for seed in seeds:
        for extremes in (False, True):
            for name, (y, _) in reference_curves(seed, n, extremes).items():
                out.setdefault(name, []).append(float(shapes.bulk_index(y, trim)))
    return {k: np.asarray(v) for k, v in out.items()}


def calibrate(
    seeds: tuple[int, ...] = CALIBRATION_SEEDS, n: int = N_REFERENCE, trim: float = shapes.TRIM
) -> dict[str, float]:
    """Thresholds halfway between the classes' ranges of the bulk index on the references.

    ``s_min`` lies between the highest backslash reference and the lowest S reference,
    ``z_max`` between the lowest backslash reference and the highest Z reference (each
    over every calibration seed, with and without extremes). Boundary cases do not vote.
    """
    idx = reference_indices(seeds, n, trim)
    by_class: dict[str, list[np.ndarray]] = {s: [] for s in shapes.SHAPES}
    for ref in REFERENCES:
        for name in (ref.name, ref.name + " + extremes"):
            by_class[ref.shape].append(idx[name])
    s_vals = np.concatenate(by_class[shapes.SHAPE_S])
    z_vals = np.concatenate(by_class[shapes.SHAPE_Z])
    line_vals = np.concatenate(by_class[shapes.SHAPE_BACKSLASH])
    return {
        "s_min": float((line_vals.max() + s_vals.min()) / 2),
        "z_max": float((line_vals.min() + z_vals.max()) / 2),
        "margin_s": float((s_vals.min() - line_vals.max()) / 2),
        "margin_z": float((line_vals.min() - z_vals.max()) / 2),
    }


def reference_table(seeds: tuple[int, ...] = CALIBRATION_SEEDS, n: int = N_REFERENCE) -> list[dict]:
    """One row per reference (and variant): documented class, bulk index range, paper index mean."""
    bulk = reference_indices(seeds, n)
    rows = []
    for ref in REFERENCES + BOUNDARY_CASES:
        for extremes in (False, True):
            name = ref.name + (" + extremes" if extremes else "")
            whole = [
                float(shapes.curve_fit(reference_curves(s, n, extremes, (ref,))[name][0]).s)
                for s in seeds[:5]
            ]
            rows.append(
                {
                    "reference": name,
                    "documented_shape": ref.shape,
                    "calibrates": ref in REFERENCES,
                    "s_bulk_mean": float(bulk[name].mean()),
                    "s_bulk_min": float(bulk[name].min()),
                    "s_bulk_max": float(bulk[name].max()),
                    "s_mean": float(np.mean(whole)),
                    "note": ref.note,
                }
            )
    return rows
