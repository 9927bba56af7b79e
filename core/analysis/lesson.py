"""The numbers behind the lesson on the three shapes: examples chosen by a written rule, words
for where the flips sit, and how one test instance's curve changes with the view.

Pure NumPy/pandas (no torch): the app's lesson page imports these, so every number and every
sentence about the data it shows is computed here from the run's arrays. The rules are written
in docs/lesson.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from core.analysis import shapes, views
from core.storage.errors import AtlasError

EXAMPLE_RULE = (
    "for each class, the misclassified test instance whose bulk S is closest to the median bulk "
    "S of that class's misclassified instances (the most typical one; ties: the lower id); "
    "a class with no misclassified instance takes its example from the correctly classified ones, "
    "and says so"
)
# Zones of the flips' end ratio (%), fixed with the lesson: random placement gives 50.
CENTRE_BELOW = 40.0
RANDOM_BELOW = 60.0
BETWEEN_BELOW = 80.0
PAPER_PLACEMENT = {
    shapes.SHAPE_S: "near both ends",
    shapes.SHAPE_Z: "mainly near the centre",
    shapes.SHAPE_BACKSLASH: "between the centre and the ends",
}
# The zones that agree with the paper's statement for each class.
AGREEING_ZONES = {
    shapes.SHAPE_S: ("near the ends", "between the centre and the ends"),
    shapes.SHAPE_Z: ("near the centre",),
    shapes.SHAPE_BACKSLASH: (
        "about where random placement puts them",
        "between the centre and the ends",
    ),
}


def placement_zone(end_ratio: float) -> str:
    """Where flips with this mean end ratio sit, in words (zones of docs/lesson.md)."""
    if not np.isfinite(end_ratio):
        return "nowhere (no flipped instances)"
    if end_ratio < CENTRE_BELOW:
        return "near the centre"
    if end_ratio < RANDOM_BELOW:
        return "about where random placement puts them"
    if end_ratio < BETWEEN_BELOW:
        return "between the centre and the ends"
    return "near the ends"


def placement_sentence(shape: str, end_ratio: float) -> str:
    """The measured placement beside the paper's statement, and whether they agree."""
    zone = placement_zone(end_ratio)
    agrees = zone in AGREEING_ZONES.get(shape, ())
    verdict = "as the paper says" if agrees else "not where the paper says"
    return (
        f"The paper: on {shape} curves the flipped instances sit {PAPER_PLACEMENT[shape]}. "
        f"Here their end ratio is {end_ratio:.0f} % (random placement: 50 %): {zone}, {verdict}."
    )


def class_examples(table: pd.DataFrame) -> dict[str, dict[str, Any] | None]:
    """One example per class by :data:`EXAMPLE_RULE`.

    ``table`` has id, correct, shape, s_bulk, end_ratio (one row per test instance). Returns
    ``{shape: {"id", "s_bulk", "end_ratio", "misclassified": bool} or None}``.
    """
    out: dict[str, dict[str, Any] | None] = {}
    for cls in shapes.SHAPE_ORDER:
        of_class = table[table["shape"] == cls]
        wrong = of_class[~of_class["correct"].astype(bool)]
        pool = wrong if len(wrong) else of_class
        if pool.empty:
            out[cls] = None
            continue
        median = float(pool["s_bulk"].median())
        gap = (pool["s_bulk"] - median).abs()
        pick = pool.assign(_gap=gap).sort_values(["_gap", "id"]).iloc[0]
        out[cls] = {
            "id": int(pick["id"]),
            "s_bulk": float(pick["s_bulk"]),
            "end_ratio": float(pick["end_ratio"]),
            "misclassified": bool(len(wrong)),
        }
    return out


def view_trace(
    stack: np.ndarray,
    flipped: np.ndarray,
    row: int,
    train_norms: np.ndarray | None = None,
    test_norms: np.ndarray | None = None,
    train_loss: list[float | None] | None = None,
) -> pd.DataFrame:
    """How one test instance's curve changes as checkpoints are summed, raw and cosine.

    One row per (checkpoint c, normalisation): the sum of checkpoints 1..c, its bulk S, class
    and flips' end ratio, and the mean training loss after epoch c (what is still unfitted).
    Cosine rows need both norms.
    """
    k = stack.shape[0]
    norms = [views.RAW]
    if train_norms is not None and test_norms is not None:
        norms.append(views.COSINE)
    rows = []
    for norm in norms:
        for c in range(1, k + 1):
            scores = views.view_scores(
                stack, views.View(1, c, norm), train_norms, test_norms, rows=np.array([row])
            )
            cls = shapes.classify(scores, flipped)
            rows.append(
                {
                    "checkpoint": c,
                    "normalisation": norm,
                    "s_bulk": float(cls["s_bulk"][0]),
                    "shape": str(cls["shape"][0]),
                    "end_ratio": float(cls["end_ratio"][0]),
                    "train_loss": None
                    if not train_loss or c > len(train_loss)
                    else train_loss[c - 1],
                }
            )
    return pd.DataFrame(rows)


def trace_sentence(trace: pd.DataFrame) -> str:
    """What the trace shows, in words computed from it (raw sums, first to last checkpoint)."""
    raw = trace[trace["normalisation"] == views.RAW].sort_values("checkpoint")
    if raw.empty:
        return "No per-checkpoint scores: the curve can only be read with all checkpoints."
    first, last = raw.iloc[0], raw.iloc[-1]
    classes = list(dict.fromkeys(raw["shape"]))
    path = " → ".join(classes)
    loss = ""
    if first["train_loss"] is not None and last["train_loss"] is not None:
        loss = (
            f" Meanwhile the mean training loss falls from {first['train_loss']:.2f} after "
            f"epoch 1 to {last['train_loss']:.2f} after epoch {int(last['checkpoint'])}."
        )
    out = (
        f"Summing checkpoints 1…c, this curve goes {path} (bulk S {first['s_bulk']:+.2f} at c = 1, "
        f"{last['s_bulk']:+.2f} at c = {int(last['checkpoint'])}); the flips' end ratio moves from "
        f"{first['end_ratio']:.0f} % to {last['end_ratio']:.0f} %.{loss}"
    )
    cos = trace[
        (trace["normalisation"] == views.COSINE) & (trace["checkpoint"] == last["checkpoint"])
    ]
    if len(cos):
        c = cos.iloc[0]
        same = "the same class" if c["shape"] == last["shape"] else f"{c['shape']} instead"
        out += (
            f" Dividing every term by both gradient norms (cosine) gives {same} (bulk S "
            f"{c['s_bulk']:+.2f}): the raw sum is dominated by the few training instances with "
            "large gradients, the ones still unfitted."
        )
    return out


def other_view_classes(
    stored: pd.DataFrame, test_id: int, view: views.View, shape: str
) -> list[tuple[views.View, str]]:
    """The stored views nearest to ``view`` in which ``test_id`` has another class than ``shape``
    (its class under ``view``), read from ``shapes_by_view.parquet``; nothing is reclassified.

    Nearest first: the same checkpoints under each other normalisation; if every normalisation
    agrees there, the same normalisation summed over checkpoints 1..c, the latest c that gives
    another class (the view closest to the end of training). Empty when every stored view
    agrees or none is stored.
    """
    mine: dict[views.View, str] = {}
    for key, cls in stored.loc[stored["id"] == int(test_id), ["view", "shape"]].itertuples(
        index=False
    ):
        try:
            mine.setdefault(views.View.parse(str(key)), str(cls))
        except AtlasError:  # a key no view has: nothing to compare with
            continue
    same_range = [
        (other, mine[other])
        for other in (views.View(view.first, view.last, n) for n in views.NORMALISATIONS)
        if other != view and other in mine and mine[other] != shape
    ]
    if same_range:
        return same_range
    sums = [v for v in mine if v.first == 1 and v.normalisation == view.normalisation]
    for other in sorted(sums, key=lambda v: -v.last):
        if other != view and mine[other] != shape:
            return [(other, mine[other])]
    return []


def other_view_sentence(
    shape: str,
    view: views.View,
    others: list[tuple[views.View, str]],
    n_checkpoints: int | None = None,
) -> str:
    """One sentence: this instance's class under ``view`` and under the ``others``
    (:func:`other_view_classes`); ``""`` if there are none. Views over the same checkpoints
    are named by their normalisation alone, views of one class together."""
    if not others:
        return ""
    parts = []
    for cls in dict.fromkeys(c for _, c in others):
        of_cls = [v for v, c in others if c == cls]
        if all((v.first, v.last) == (view.first, view.last) for v in of_cls):
            where = " and ".join(v.normalisation for v in of_cls) + " scores"
        else:
            where = " and ".join(v.label(n_checkpoints) for v in of_cls)
        parts.append(f"{cls} under {where}")
    return (
        f"This test instance is {shape} under {view.label(n_checkpoints)} but "
        f"{' and '.join(parts)}: its shape depends on the view, not only on the data."
    )
