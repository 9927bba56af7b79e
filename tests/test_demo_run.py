"""The shipped demo run (cache/demo) loads and is internally consistent.

It is made by ``python -m core run --preset paper --name demo`` and committed without
checkpoints; these checks recompute what they can from the stored scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import store
from core.shapes import curve_fit, end_ratio, flipped_ranks, shape_class

DEMO = Path(
    os.environ.get("ATLAS_DEMO_RUN", Path(__file__).resolve().parents[1] / "cache" / "demo")
)


@pytest.fixture(scope="module")
def demo() -> Path:
    assert (DEMO / store.MANIFEST).exists(), f"the demo run {DEMO} is missing"
    return DEMO


def test_demo_is_a_complete_paper_run(demo: Path) -> None:
    m = store.load_manifest(demo)
    assert m["status"] == "complete"
    assert m["config"]["preset"] == "paper" and m["config"]["dataset"] == "amazon-reviews"
    assert m["command"].startswith("python -m core run --preset paper")
    for stage in ("data", "train", "tracin", "analyze"):
        assert m["stages"][stage]["status"] == "complete"
    assert len(m["epochs"]) == len(m["checkpoints"]) == m["config"]["epochs"]


def test_demo_counts_and_shapes_agree(demo: Path) -> None:
    m = store.load_manifest(demo)
    inst = store.load_instances(demo)
    split = inst["split"].value_counts()
    assert (split["train"], split["val"], split["test"]) == (m["n_train"], m["n_val"], m["n_test"])
    assert (
        int(inst["flipped"].sum())
        == m["n_flipped"]
        == round(m["config"]["flip_rate"] * m["n_train"])
    )
    n_train, n_test = m["n_train"], m["n_test"]
    assert np.load(demo / store.TRACIN, mmap_mode="r").shape == (n_test, n_train)
    per = np.load(demo / store.TRACIN_PER_CHECKPOINT, mmap_mode="r")
    assert per.shape == (len(m["checkpoints"]), n_test, n_train)
    assert np.load(demo / store.SELF_INFLUENCE).shape == (n_train,)
    assert np.load(demo / store.LOGITS, mmap_mode="r").shape == (len(m["epochs"]), len(inst), 2)
    assert np.load(demo / store.DISTANCES, mmap_mode="r").shape == (n_test, n_train)
    assert len(pd.read_parquet(demo / store.COORDS)) == len(inst)


def test_demo_test_accuracy_matches_its_logits(demo: Path) -> None:
    m = store.load_manifest(demo)
    inst = store.load_instances(demo)
    logits = np.load(demo / store.LOGITS)
    test = (inst["split"] == "test").to_numpy()
    acc = float((logits[-1][test].argmax(1) == inst.loc[test, "label"].to_numpy()).mean())
    assert acc == pytest.approx(m["test_accuracy"])


def test_demo_shapes_recomputed_from_the_stored_scores(demo: Path) -> None:
    tracin = np.load(demo / store.TRACIN)
    inst = store.load_instances(demo)
    flipped = inst.loc[inst["split"] == "train", "flipped"].to_numpy()
    shapes = pd.read_parquet(demo / store.SHAPES)
    thresholds = store.read_json(demo / store.ANALYSIS)["thresholds"]
    assert len(shapes) == tracin.shape[0]
    for row, scores in zip(shapes.itertuples(), tracin, strict=True):
        fit = curve_fit(scores)
        assert fit.s == pytest.approx(row.s, rel=1e-4, abs=1e-6)
        assert shape_class(fit.s, thresholds["s_min"], thresholds["z_max"]) == row.shape
        ranks = flipped_ranks(scores, flipped)
        assert end_ratio(ranks, len(scores)) == pytest.approx(row.end_ratio, rel=1e-6)
