"""The paper's claims as testable statements: a statistic, a 95 % interval, n and a verdict.

The rules (population, index, view, null, minimum n, bootstrap) are those of
``docs/replication.md``, written before the replication grid was run. Pure NumPy/SciPy, no
torch: the app imports the verdict colours and the paragraph builder from here.

A *sample* is one run's misclassified test instances read in one view: a dict of equal-length
arrays ``s_bulk``, ``shape``, ``end_ratio``, ``mean_distance``. A condition with several seeds
is a list of samples; one run is a list of one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from core.analysis import shapes

HOLDS = "holds"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
NOT_TESTABLE = "not testable"
VERDICTS = (HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE)

N_BOOT = 2000
BOOT_SEED = 0
LEVEL = 0.95
# More resamples than this share without a computable statistic: the interval is not trusted.
MAX_FAILED_SHARE = 0.10
MIN_MISCLASSIFIED = 10
MIN_CLASS = 5
# A seed with fewer instances than this gives no per-seed correlation.
MIN_SEED_CORRELATION = 3
# C1 is contradicted only when an unseen class's one-sided 95 % upper bound is below this share.
RARE_SHARE = 0.10
MIN_RATES = 4
MIN_SEEDS = 2
HINGE_GRID = 201

STATEMENTS = {
    "C1": "S, Z and backslash all occur among the misclassified test instances",
    "C2": "on S curves the flipped instances sit near the ends (mean end ratio > 50 %)",
    "C3": "on Z curves the flipped instances sit near the centre (mean end ratio < 50 %)",
    "C4": "backslash is intermediate: flips' end ratio Z < backslash < S",
    "C5": "S-shapedness rises with the flips' end ratio (Spearman > 0, paper Fig. 3)",
    "C6": "S-shapedness rises with the mean [CLS] distance to the training data "
    "(S farther, Z closer, paper Fig. 2)",
    "C7": "a threshold effect: accuracy stays within noise up to some flip rate, then falls",
}
STATISTICS = {
    "C1": "share of the rarest class",
    "C2": "flips' mean end ratio on S curves (%)",
    "C3": "flips' mean end ratio on Z curves (%)",
    "C4": "min(ER backslash − ER Z, ER S − ER backslash) (% points)",
    "C5": "Spearman(bulk S, flips' end ratio), seeds weighted by n",
    "C6": "Spearman(bulk S, mean [CLS] distance), seeds weighted by n",
    "C7": "hinge breakpoint (flip rate)",
}
# The paper's side of each null: +1 the statistic should exceed it, -1 fall below it.
NULLS = {"C1": (0.0, 1), "C2": (50.0, 1), "C3": (50.0, -1), "C4": (0.0, 1), "C5": (0.0, 1)}
NULLS["C6"] = (0.0, 1)

Sample = dict[str, np.ndarray]


def sample_from_arrays(
    scores: np.ndarray,
    flipped: np.ndarray,
    correct: np.ndarray,
    mean_distance: np.ndarray | None,
) -> Sample:
    """One run's misclassified instances read in one view.

    ``scores`` (n_test, n_train) are the view's scores, ``flipped`` the (n_train,) mask of
    flipped training instances, ``correct`` whether each test instance is predicted right
    at the view's last checkpoint and ``mean_distance`` its mean [CLS] distance (or None).
    Classes use the calibrated rule of ``core.analysis.shapes`` (never a run's own thresholds).
    """
    wrong = ~np.asarray(correct, dtype=bool)
    rows = np.asarray(scores, dtype=np.float64)[wrong]
    n = int(wrong.sum())
    if n == 0:
        empty = np.zeros(0)
        return {"s_bulk": empty, "shape": empty.astype(object), "end_ratio": empty,
                "mean_distance": empty, "id": np.zeros(0, np.int64)}  # fmt: skip
    cls = shapes.classify(rows, np.asarray(flipped, dtype=bool))
    dist = (
        np.full(n, np.nan)
        if mean_distance is None
        else np.asarray(mean_distance, dtype=np.float64)[wrong]
    )
    return {
        "s_bulk": np.asarray(cls["s_bulk"], dtype=np.float64),
        "shape": np.asarray(cls["shape"], dtype=object),
        "end_ratio": np.asarray(cls["end_ratio"], dtype=np.float64),
        "mean_distance": dist,
        "id": np.flatnonzero(wrong),
    }


def evaluate(samples: Sequence[Sample], view: str) -> list[dict[str, Any]]:
    """Claims C1–C6 on one condition: one sample per seed, pooled as docs/replication.md says."""
    samples = list(samples)
    if not samples:
        raise ValueError("evaluate needs at least one sample")
    return [
        _claim_c1(samples, view),
        _claim_class_mean("C2", samples, view, shapes.SHAPE_S),
        _claim_class_mean("C3", samples, view, shapes.SHAPE_Z),
        _claim_c4(samples, view),
        _claim_correlation("C5", samples, view, "end_ratio"),
        _claim_correlation("C6", samples, view, "mean_distance"),
    ]


def class_counts(samples: Sequence[Sample]) -> dict[str, int]:
    """Pooled count of each shape class over the samples."""
    shape = _pooled(samples, "shape")
    return {s: int(np.sum(shape == s)) for s in shapes.SHAPE_ORDER}


# --- the statistics (each takes per-seed samples and returns a float or None) ---------------


def rarest_share(samples: Sequence[Sample]) -> float | None:
    """Share of the rarest of the three classes among the pooled instances."""
    shape = _pooled(samples, "shape")
    if shape.size == 0:
        return None
    return float(min(np.mean(shape == s) for s in shapes.SHAPES))


def class_mean_end_ratio(samples: Sequence[Sample], cls: str) -> float | None:
    """Flips' mean end ratio over the pooled curves of one class (None without such curves)."""
    shape = _pooled(samples, "shape")
    er = _pooled(samples, "end_ratio")[shape == cls]
    er = er[np.isfinite(er)]
    return float(er.mean()) if er.size else None


def ordering_margin(samples: Sequence[Sample]) -> float | None:
    """min(ER_backslash − ER_Z, ER_S − ER_backslash): > 0 when Z < backslash < S."""
    means = [class_mean_end_ratio(samples, c) for c in shapes.SHAPE_ORDER]
    if any(m is None for m in means):
        return None
    s, bs, z = means
    return float(min(bs - z, s - bs))


def weighted_spearman(samples: Sequence[Sample], key: str) -> float | None:
    """Per-seed Spearman(bulk S, ``key``), averaged with each seed's n as weight."""
    total, weight = 0.0, 0
    for sample in samples:
        x, y = sample["s_bulk"], sample[key]
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        if x.size < MIN_SEED_CORRELATION or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        rho = _spearman(x, y)
        if rho is None:
            continue
        total += rho * x.size
        weight += x.size
    return total / weight if weight else None


def bootstrap(
    samples: Sequence[Sample],
    statistic: Callable[[Sequence[Sample]], float | None],
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> tuple[float | None, float | None, float | None, float]:
    """Statistic, percentile interval and the share of resamples where it was undefined.

    Two-stage with several samples (seeds resampled, then each drawn seed's instances);
    one stage with one. The generator is seeded, so every interval recomputes exactly.
    """
    point = statistic(samples)
    rng = np.random.default_rng(seed)
    k = len(samples)
    values = []
    for _ in range(n_boot):
        picks = rng.integers(0, k, k) if k > 1 else np.zeros(1, dtype=np.int64)
        drawn = []
        for i in picks:
            sample = samples[int(i)]
            n = _size(sample)
            rows = rng.integers(0, n, n) if n else np.zeros(0, dtype=np.int64)
            drawn.append({key: value[rows] for key, value in sample.items()})
        value = statistic(drawn)
        if value is not None and math.isfinite(value):
            values.append(value)
    failed = 1.0 - len(values) / n_boot
    if not values:
        return point, None, None, failed
    tail = (1.0 - LEVEL) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return point, float(lo), float(hi), failed


def verdict(lo: float | None, hi: float | None, null: float, direction: int) -> str:
    """holds / contradicted / inconclusive from an interval and the paper's side of the null."""
    if lo is None or hi is None:
        return INCONCLUSIVE
    above, below = lo > null, hi < null
    if (direction > 0 and above) or (direction < 0 and below):
        return HOLDS
    if (direction > 0 and below) or (direction < 0 and above):
        return CONTRADICTED
    return INCONCLUSIVE


# --- C7: the threshold effect of a sweep -----------------------------------------------------


def hinge_fit(rate: np.ndarray, accuracy: np.ndarray) -> dict[str, float]:
    """Least-squares hinge (flat up to b, then a line) and line; b on a grid of the rate range.

    Returns ``breakpoint``, ``plateau`` and ``drop_per_rate`` (accuracy = plateau −
    drop_per_rate · max(rate − breakpoint, 0)), ``sse_hinge``, ``sse_line``, ``bic_hinge``, ``bic_line``. At the
    lowest rate the hinge is the line, so ``sse_hinge <= sse_line`` always.
    """
    x = np.asarray(rate, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    n = x.size
    line_design = np.column_stack([np.ones(n), x])
    sse_line = _sse(line_design, y)
    best_b, best_sse, best_coef = float(x.min()), math.inf, (math.nan, math.nan)
    for b in np.linspace(x.min(), x.max(), HINGE_GRID):
        design = np.column_stack([np.ones(n), -np.maximum(x - b, 0.0)])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        resid = y - design @ coef
        sse = float(resid @ resid)
        if sse < best_sse - 1e-15:
            best_b, best_sse, best_coef = float(b), sse, (float(coef[0]), float(coef[1]))
    return {
        "breakpoint": best_b,
        "plateau": best_coef[0],
        "drop_per_rate": best_coef[1],
        "sse_hinge": best_sse,
        "sse_line": sse_line,
        "bic_hinge": _bic(best_sse, n, 3),
        "bic_line": _bic(sse_line, n, 2),
    }


def threshold_claim(rate: np.ndarray, seed: np.ndarray, accuracy: np.ndarray) -> dict[str, Any]:
    """C7 from a sweep's cells: one (rate, seed, accuracy) per cell; seeds are resampled."""
    rate = np.asarray(rate, dtype=np.float64)
    seed = np.asarray(seed)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    ok = np.isfinite(rate) & np.isfinite(accuracy)
    rate, seed, accuracy = rate[ok], seed[ok], accuracy[ok]
    rates, seeds = np.unique(rate), np.unique(seed)
    base = _claim_base("C7", "accuracy against flip rate, every cell of the sweep", int(rate.size))
    if rates.size < MIN_RATES or seeds.size < MIN_SEEDS:
        return {
            **base,
            "verdict": NOT_TESTABLE,
            "why": f"{rates.size} flip rates and {seeds.size} seeds; C7 needs at least "
            f"{MIN_RATES} rates and {MIN_SEEDS} seeds",
        }
    fit = hinge_fit(rate, accuracy)
    rng = np.random.default_rng(BOOT_SEED)
    boots = []
    for _ in range(N_BOOT):
        drawn = rng.choice(seeds, seeds.size, replace=True)
        idx = np.concatenate([np.flatnonzero(seed == s) for s in drawn])
        boots.append(hinge_fit(rate[idx], accuracy[idx])["breakpoint"])
    tail = (1.0 - LEVEL) / 2 * 100
    lo, hi = (float(v) for v in np.percentile(boots, [tail, 100 - tail]))
    lowest = float(rates.min())
    hinge_wins = fit["bic_hinge"] < fit["bic_line"]
    if hinge_wins and lo > lowest:
        result = HOLDS
    elif hi <= lowest:
        result = CONTRADICTED
    else:
        result = INCONCLUSIVE
    why = (
        f"hinge BIC {fit['bic_hinge']:.1f} vs line {fit['bic_line']:.1f} "
        f"({'hinge' if hinge_wins else 'line'} preferred); breakpoint {fit['breakpoint']:.3g} "
        f"with 95 % interval [{lo:.3g}, {hi:.3g}] over seeds; lowest rate {lowest:g}"
    )
    return {
        **base,
        "verdict": result,
        "statistic": fit["breakpoint"],
        "ci": [lo, hi],
        "why": why,
        "fit": fit,
        "seeds": int(seeds.size),
    }


# --- the claims -------------------------------------------------------------------------------


def _claim_c1(samples: list[Sample], view: str) -> dict[str, Any]:
    n = sum(_size(s) for s in samples)
    base = _claim_base("C1", view, n)
    counts = class_counts(samples)
    base["counts"] = counts
    if n < MIN_MISCLASSIFIED:
        return _not_testable(base, f"only {n} misclassified test instances; C1 needs at least "
                             f"{MIN_MISCLASSIFIED}")  # fmt: skip
    point, lo, hi, failed = bootstrap(samples, rarest_share)
    base.update(statistic=point, ci=_ci(lo, hi))
    absent = [c for c, v in counts.items() if v == 0]
    text = ", ".join(f"{v} {c}" for c, v in counts.items())
    if absent:
        bound = 1.0 - 0.05 ** (1.0 / n)
        rare = bound < RARE_SHARE
        base["verdict"] = CONTRADICTED if rare else INCONCLUSIVE
        base["why"] = (
            f"{text} among {n}: no {' or '.join(absent)}; its share is below {bound:.1%} "
            f"(one-sided 95 %), {'under' if rare else 'not under'} the {RARE_SHARE:.0%} "
            "that would make it rare"
        )
        return base
    base["verdict"] = HOLDS if lo is not None and lo > 0 else INCONCLUSIVE
    base["why"] = f"{text} among {n}; rarest share {point:.1%}, interval from resampling"
    return base


def _claim_class_mean(cid: str, samples: list[Sample], view: str, cls: str) -> dict[str, Any]:
    n = class_counts(samples)[cls]
    base = _claim_base(cid, view, n)
    if n < MIN_CLASS:
        total = sum(_size(s) for s in samples)
        return _not_testable(base, f"only {n} {cls} curves among {total} misclassified; "
                             f"{cid} needs at least {MIN_CLASS}")  # fmt: skip
    return _interval_claim(base, samples, lambda s: class_mean_end_ratio(s, cls), "%")


def _claim_c4(samples: list[Sample], view: str) -> dict[str, Any]:
    counts = class_counts(samples)
    base = _claim_base("C4", view, sum(counts.values()))
    base["counts"] = counts
    few = [f"{v} {c}" for c, v in counts.items() if v < MIN_CLASS]
    if few:
        return _not_testable(base, f"{', '.join(few)} curves; C4 needs at least {MIN_CLASS} "
                             "of each class")  # fmt: skip
    out = _interval_claim(base, samples, ordering_margin, " points")
    means = {c: class_mean_end_ratio(samples, c) for c in shapes.SHAPE_ORDER}
    out["means"] = means
    out["why"] += "; mean end ratio " + ", ".join(f"{c} {m:.1f} %" for c, m in means.items())
    return out


def _claim_correlation(cid: str, samples: list[Sample], view: str, key: str) -> dict[str, Any]:
    usable = [np.isfinite(s["s_bulk"]) & np.isfinite(s[key]) for s in samples]
    n = int(sum(u.sum() for u in usable))
    base = _claim_base(cid, view, n)
    if n < MIN_MISCLASSIFIED:
        what = "with a distance" if key == "mean_distance" else "with flips' end ratio"
        return _not_testable(base, f"only {n} misclassified test instances {what}; {cid} "
                             f"needs at least {MIN_MISCLASSIFIED}")  # fmt: skip
    return _interval_claim(base, samples, lambda s: weighted_spearman(s, key), "")


def _interval_claim(
    base: dict[str, Any],
    samples: list[Sample],
    statistic: Callable[[Sequence[Sample]], float | None],
    unit: str,
) -> dict[str, Any]:
    point, lo, hi, failed = bootstrap(samples, statistic)
    null, direction = NULLS[base["id"]]
    base.update(statistic=point, ci=_ci(lo, hi))
    if point is None:
        return _not_testable(base, "the statistic is undefined here (no spread)")
    if failed > MAX_FAILED_SHARE:
        base["verdict"] = INCONCLUSIVE
        base["why"] = (
            f"{failed:.0%} of resamples leave the statistic undefined (more than "
            f"{MAX_FAILED_SHARE:.0%})"
        )
        return base
    base["verdict"] = verdict(lo, hi, null, direction)
    side = ">" if direction > 0 else "<"
    base["why"] = (
        f"{point:.3g}{unit}, 95 % interval [{lo:.3g}, {hi:.3g}]; the paper says {side} {null:g}"
    )
    return base


def _claim_base(cid: str, view: str, n: int) -> dict[str, Any]:
    return {
        "id": cid,
        "statement": STATEMENTS[cid],
        "statistic_name": STATISTICS[cid],
        "verdict": None,
        "statistic": None,
        "ci": None,
        "n": int(n),
        "view": view,
        "why": "",
    }


def _not_testable(base: dict[str, Any], why: str) -> dict[str, Any]:
    base.update(verdict=NOT_TESTABLE, statistic=None, ci=None, why=why)
    return base


def _ci(lo: float | None, hi: float | None) -> list[float] | None:
    return None if lo is None or hi is None else [lo, hi]


def _pooled(samples: Sequence[Sample], key: str) -> np.ndarray:
    parts = [s[key] for s in samples]
    return np.concatenate(parts) if parts else np.zeros(0)


def _size(sample: Sample) -> int:
    return int(len(sample["s_bulk"]))


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    from scipy import stats

    rho = stats.spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else None


def _sse(design: np.ndarray, y: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float(resid @ resid)


def _bic(sse: float, n: int, k: int) -> float:
    # A perfect fit has no finite log-likelihood; a tiny floor keeps the comparison defined.
    return n * math.log(max(sse, 1e-300) / n) + k * math.log(n)


def paragraph(cid: str, rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """What the data show for one claim across conditions, in words computed from the verdicts.

    ``rows`` holds (condition name, claim dict) for every condition that reports ``cid``.
    """
    if not rows:
        return f"{cid} was not evaluated in any condition."
    by_verdict: dict[str, list[str]] = {v: [] for v in VERDICTS}
    for name, claim in rows:
        by_verdict.get(claim.get("verdict"), by_verdict[NOT_TESTABLE]).append(name)
    tested = [(n, c) for n, c in rows if c.get("verdict") != NOT_TESTABLE]
    parts = [f"**{cid}** ({STATEMENTS[cid]}):"]
    summary = []
    for v in (HOLDS, CONTRADICTED, INCONCLUSIVE, NOT_TESTABLE):
        names = by_verdict[v]
        if names:
            summary.append(f"{v} in {len(names)} of {len(rows)} ({', '.join(names)})")
    parts.append("; ".join(summary) + ".")
    values = [c["statistic"] for _, c in tested if c.get("statistic") is not None]
    if values:
        parts.append(
            f"Where testable, the {STATISTICS[cid]} ranges from {min(values):.3g} "
            f"to {max(values):.3g}."
        )
    if by_verdict[NOT_TESTABLE]:
        first = next(c for _, c in rows if c.get("verdict") == NOT_TESTABLE)
        parts.append(f"Not testable because, e.g., {first.get('why')}.")
    if not tested:
        parts.append("The grid cannot say whether the paper's statement holds here.")
    elif by_verdict[HOLDS] and not by_verdict[CONTRADICTED]:
        parts.append("Nowhere contradicted.")
    elif by_verdict[CONTRADICTED] and not by_verdict[HOLDS]:
        parts.append("It holds in no condition of the grid.")
    elif by_verdict[HOLDS] and by_verdict[CONTRADICTED]:
        parts.append("It depends on the condition: a regime, not a universal finding.")
    return " ".join(parts)
