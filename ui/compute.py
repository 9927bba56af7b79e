"""Pure NumPy / pandas helpers behind the pages that are about presentation only.

Nothing here imports streamlit, so tests call these directly. No definition lives here:
curve fits, shape classes, end ratios, downsampling, correlations and detection metrics
come from ``core`` (``core.shapes``, ``core.views``, ``core.stats``, ``core.metrics``);
these helpers only slice, label and lay out what core computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.shapes import downsample_curve


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


def accuracy_per_epoch(manifest: dict[str, Any], logits: np.ndarray | None, inst: pd.DataFrame):
    """Long frame (epoch, split, accuracy) from the manifest, else recomputed from logits."""
    rows = []
    for e in manifest.get("epochs") or []:
        for split in ("val", "test"):
            if e.get(f"{split}_accuracy") is not None:
                rows.append(
                    {"epoch": e["epoch"], "split": split, "accuracy": e[f"{split}_accuracy"]}
                )
    if rows or logits is None:
        return pd.DataFrame(rows, columns=["epoch", "split", "accuracy"])
    label = inst["label"].to_numpy()
    for e in range(logits.shape[0]):
        pred = np.asarray(logits[e]).argmax(1)
        for split in ("train", "val", "test"):
            mask = (inst["split"] == split).to_numpy()
            rows.append(
                {"epoch": e + 1, "split": split, "accuracy": float((pred == label)[mask].mean())}
            )
    return pd.DataFrame(rows)


def misclassified_mask(logits: np.ndarray, inst: pd.DataFrame) -> np.ndarray:
    """Test instances wrong at the final checkpoint (test order)."""
    test = (inst["split"] == "test").to_numpy()
    pred = np.asarray(logits[-1])[test].argmax(1)
    return pred != inst["label"].to_numpy()[test]


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


def recall_curve(scores: np.ndarray, flipped: np.ndarray, points: int = 101) -> pd.DataFrame:
    """Recall of the flips against the fraction of the training set inspected (top first)."""
    scores = np.asarray(scores, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    n, k = len(scores), int(flipped.sum())
    hits = np.concatenate([[0], np.cumsum(flipped[np.argsort(-scores, kind="stable")])])
    fractions = np.linspace(0, 1, points)
    counts = np.round(fractions * n).astype(int)
    recall = hits[counts] / k if k else np.zeros(points)
    return pd.DataFrame({"fraction": fractions, "recall": recall})


def review_queue(
    detectors: pd.DataFrame, detector: str, train: pd.DataFrame, top: int, label_names: list[str]
) -> pd.DataFrame:
    """The top suspects of one detector: text, observed and suggested label, score, flipped."""
    scored = detectors[["id", detector]].sort_values(detector, ascending=False, kind="stable")
    scored = scored.head(top)
    rows = train.set_index("id").loc[scored["id"].to_numpy()]
    observed = rows["observed_label"].to_numpy()

    def name(v: int) -> str:
        return label_names[v] if 0 <= v < len(label_names) else str(v)

    return pd.DataFrame(
        {
            "rank": np.arange(1, len(scored) + 1),
            "id": scored["id"].to_numpy(),
            "text": rows["text"].to_numpy(),
            "observed_label": [name(v) for v in observed],
            "suggested_label": [name(1 - v) for v in observed],
            "score": scored[detector].to_numpy(np.float64),
            "reason": f"high {detector.replace('_', ' ')} score",
            "flipped": rows["flipped"].to_numpy(bool),
        }
    )


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
