"""Pure NumPy / pandas helpers behind the pages that are about presentation only.

Nothing here imports streamlit, so tests call these directly. No definition lives here:
curve fits, shape classes, end ratios, downsampling, correlations and detection metrics
come from ``core`` (``core.analysis.shapes``, ``core.analysis.views``, ``core.analysis.stats``, ``core.analysis.metrics``);
these helpers only slice, label and lay out what core computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.analysis.shapes import downsample_curve


def line_rows(lines: dict[str, float], n: int) -> pd.DataFrame:
    """The regression and endpoint lines as two segments over ranks 0..n-1 (for rule marks)."""
    last = max(n - 1, 0)
    return pd.DataFrame(
        {
            "line": ["regression", "endpoints"],
            "x": [0, 0],
            "x2": [last, last],
            "y": [lines["a_reg"], lines["a_end"]],
            "y2": [lines["a_reg"] + lines["b_reg"] * last, lines["a_end"] + lines["b_end"] * last],
        }
    )


def panel_title(test_id: int, shape: str, s: float, correct: bool | None = None) -> str:
    """Small-multiple title like the paper's labels: '239 (Z) · S = -0.41'."""
    mark = "" if correct is None else ("" if correct else " · misclassified")
    return f"{test_id} ({shape}) · S = {s:+.2f}{mark}"


def accuracy_per_epoch(manifest: dict[str, Any]) -> pd.DataFrame:
    """Long frame (epoch, split, accuracy) of the accuracies the train stage recorded."""
    rows = []
    for e in manifest.get("epochs") or []:
        for split in ("val", "test"):
            if e.get(f"{split}_accuracy") is not None:
                rows.append(
                    {"epoch": e["epoch"], "split": split, "accuracy": e[f"{split}_accuracy"]}
                )
    return pd.DataFrame(rows, columns=["epoch", "split", "accuracy"])


def top_influencers(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Training positions of the k most positive (proponents) and most negative (opponents) scores."""
    row = np.asarray(row, dtype=np.float64)
    k = min(k, len(row))
    order = np.argsort(-row, kind="stable")
    return order[:k], order[::-1][:k]


def nearest_training(
    distances: np.ndarray, scores: np.ndarray | None, train: pd.DataFrame, k: int = 10
) -> pd.DataFrame:
    """The k training instances nearest a test instance, with text, labels and TracIn score."""
    d = np.asarray(distances, dtype=np.float64)
    pos = np.argsort(d, kind="stable")[:k]
    rows = train.iloc[pos]
    out = pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "distance": d[pos],
            "text": rows["text"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "observed_label": rows["observed_label"].to_numpy(),
            "flipped": rows["flipped"].to_numpy(),
        }
    )
    if scores is not None:
        out["tracin"] = np.asarray(scores, dtype=np.float64)[pos]
    return out


def sorted_distance_curves(distances: np.ndarray, test_ids: np.ndarray, max_points: int = 200):
    """Long frame (test_id, rank, distance) of each test instance's ascending distances (Fig. 2b)."""
    frames = []
    for row, tid in zip(distances, test_ids, strict=True):
        d = np.sort(np.asarray(row, dtype=np.float64))
        idx = downsample_curve(-d, np.zeros(len(d), bool), max_points)
        frames.append(pd.DataFrame({"test_id": tid, "rank": idx, "distance": d[idx]}))
    if not frames:
        return pd.DataFrame(columns=["test_id", "rank", "distance"])
    return pd.concat(frames, ignore_index=True)


def sweep_summary(sweep: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean, min, max and std of one sweep column per flip rate."""
    g = sweep.groupby("flip_rate")[value]
    out = g.agg(["mean", "min", "max", "std", "count"]).reset_index()
    out["flip_count"] = sweep.groupby("flip_rate")["flip_count"].mean().round().to_numpy()
    return out


def synthetic_curve(kind: str, n: int = 200, n_flips: int = 8, seed: int = 0) -> pd.DataFrame:
    """A teaching example: an ideal S, Z or backslash curve with flips placed as the paper finds."""
    rng = np.random.default_rng(seed)
    u = np.linspace(1.0, -1.0, n)
    y = {"S": u**5, "Z": np.tanh(6 * u)}.get(kind, u)
    if kind == "S":
        ranks = np.r_[
            rng.choice(n // 12, n_flips // 2, replace=False),
            n - 1 - rng.choice(n // 12, n_flips - n_flips // 2, replace=False),
        ]
    elif kind == "Z":
        ranks = rng.choice(np.arange(int(n * 0.44), int(n * 0.56)), n_flips, replace=False)
    else:
        ranks = rng.choice(np.arange(int(n * 0.25), int(n * 0.75)), n_flips, replace=False)
    flipped = np.zeros(n, dtype=bool)
    flipped[ranks] = True
    return pd.DataFrame({"rank": np.arange(n), "score": y, "flipped": flipped})


# -- the guess-the-shape exercise -------------------------------------------------------------


def exercise_pool(
    default_table: pd.DataFrame, default_key: str, by_view: pd.DataFrame | None
) -> pd.DataFrame:
    """Every (view, id, shape) the exercise may draw: the default view's classes (shapes.parquet)
    and every stored per-checkpoint view's (shapes_by_view.parquet), one row per view and id.

    The classes are core's, as stored; nothing is reclassified here.
    """
    frames = [default_table[["id", "shape"]].assign(view=default_key)]
    if by_view is not None and len(by_view):
        frames.append(by_view[["view", "id", "shape"]])
    pool = pd.concat(frames, ignore_index=True)[["view", "id", "shape"]]
    pool["id"] = pool["id"].astype(int)
    return pool.drop_duplicates(["view", "id"], keep="first").reset_index(drop=True)


def draw_exercise(
    pool: pd.DataFrame, rng: np.random.Generator, avoid: tuple[str, int] | None = None
) -> tuple[str, int]:
    """One curve to guess, as (view key, test id).

    A class is drawn uniformly among the classes the pool holds, then a view where that class
    occurs, then an instance of that class in that view: every class comes up about equally
    often, however rare it is in the default view (where a run may have no Z at all). ``avoid``
    (the curve just shown) is never drawn again unless it is the only one.
    """
    if pool.empty:
        raise ValueError("nothing to draw: the pool is empty")
    candidates = pool
    if avoid is not None:
        rest = pool[~((pool["view"] == avoid[0]) & (pool["id"] == int(avoid[1])))]
        candidates = rest if len(rest) else pool
    classes = sorted(candidates["shape"].unique())
    cls = classes[int(rng.integers(len(classes)))]
    of_cls = candidates[candidates["shape"] == cls]
    view_keys = sorted(of_cls["view"].unique())
    key = view_keys[int(rng.integers(len(view_keys)))]
    ids = of_cls.loc[of_cls["view"] == key, "id"].to_numpy()
    return str(key), int(ids[int(rng.integers(len(ids)))])


# -- robust axes ----------------------------------------------------------------------------------

CLIP_QUANTILES = (1.0, 99.0)  # the bulk the axis must show
CLIP_WIDEN = 0.25  # margin each side, as a fraction of the bulk's width
CLIP_TRIGGER = 5.0  # clip only when the full range exceeds the bulk's width this many times


@dataclass(frozen=True)
class AxisClip:
    """A y axis clipped to ``lo``..``hi``; ``n_below`` / ``n_above`` points lie beyond it."""

    lo: float
    hi: float
    n_below: int
    n_above: int

    @property
    def n_clipped(self) -> int:
        return self.n_below + self.n_above


def robust_axis(
    values: np.ndarray,
    quantiles: tuple[float, float] = CLIP_QUANTILES,
    widen: float = CLIP_WIDEN,
    trigger: float = CLIP_TRIGGER,
) -> AxisClip | None:
    """The y range a sorted curve is drawn in when a few scores dwarf the rest, or None.

    The range is the ``quantiles`` percentiles of the scores widened by ``widen`` times their
    distance each way; it is used only when the scores' full range is more than ``trigger``
    times that distance, so an ordinary S curve (whose ends are its point: Student-t(3) tails
    span about 3 times the 1st–99th percentile) keeps its full axis, while a curve whose scale
    is set by a handful of outliers (the Japanese demo: down to −800 against a bulk of a few
    units) is drawn readable. Presentation only: no score changes.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 3:
        return None
    q_lo, q_hi = np.percentile(v, quantiles)
    width = float(q_hi - q_lo)
    if width <= 0 or float(v.max() - v.min()) <= trigger * width:
        return None
    lo, hi = float(q_lo) - widen * width, float(q_hi) + widen * width
    return AxisClip(lo, hi, int((v < lo).sum()), int((v > hi).sum()))


def clip_note(clip: AxisClip) -> str:
    """One sentence saying how an axis was clipped, for the caption under the chart."""
    lo_q, hi_q = CLIP_QUANTILES
    return (
        f"A few scores dwarf the rest, so the y axis is clipped to {clip.lo:.3g} … {clip.hi:.3g} "
        f"(the {lo_q:g}st–{hi_q:g}th percentile of this curve's scores, widened by "
        f"{CLIP_WIDEN:.0%} each way): {clip.n_below} point(s) below and {clip.n_above} above are "
        "drawn on its edge as black triangles; hover one for its real score."
    )


def panels_clip_note(n_clipped: int, n_panels: int) -> str:
    """One sentence under a grid of panels of which ``n_clipped`` have a clipped axis."""
    lo_q, hi_q = CLIP_QUANTILES
    which = (
        "this panel, so its"
        if n_panels == 1
        else f"{n_clipped} of these {n_panels} panels, so each one's"
    )
    return (
        f"A few scores dwarf the rest in {which} y axis is clipped to the "
        f"{lo_q:g}st–{hi_q:g}th percentile of its scores, widened by {CLIP_WIDEN:.0%} each way; "
        "the points beyond are drawn on the edge as black triangles (hover one for its real "
        "score; the classes and indices are computed on every score)."
    )
