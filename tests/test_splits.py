"""Subsample, stratified 80/10/10 split and nested flips (core/inputs/splits.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.inputs.datasets import LoadedData
from core.inputs.splits import INSTANCE_COLUMNS, MIN_PER_CLASS, flip_mask, split_instances
from core.storage.errors import AtlasError


def make_data(n_neg: int, n_pos: int) -> LoadedData:
    """A labeled dataset with distinct texts and source rows offset from positions."""
    n = n_neg + n_pos
    frame = pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(n)],
            "label": np.array([0] * n_neg + [1] * n_pos, dtype=np.int64),
            "source_row": np.arange(n, dtype=np.int64) + 3,
        }
    )
    return LoadedData(frame, ["neg", "pos"], {"neg": 0, "pos": 1}, {"source": "test"})


def test_sizes_order_and_columns():
    out = split_instances(make_data(1200, 1300), n_total=2000, n_flips=40, seed=0)
    assert list(out.columns) == INSTANCE_COLUMNS
    assert out["split"].value_counts().to_dict() == {"train": 1600, "val": 200, "test": 200}
    # Rows ordered train, then val, then test, and id is the row position.
    assert list(out["split"]) == ["train"] * 1600 + ["val"] * 200 + ["test"] * 200
    assert out["id"].tolist() == list(range(2000))
    assert out["id"].dtype == np.int64 and out["label"].dtype == np.int64
    assert out["observed_label"].dtype == np.int64 and out["flipped"].dtype == bool
    assert out["source_row"].dtype == np.int64
    assert out["text"].is_unique


def test_stratified_class_shares():
    data = make_data(300, 700)
    out = split_instances(data, n_total=500, n_flips=0, seed=1)
    # The subsample keeps the 30 / 70 share exactly, and each split within one instance.
    assert out["label"].sum() == 350
    for split, size in (("train", 400), ("val", 50), ("test", 50)):
        part = out[out["split"] == split]
        assert len(part) == size
        assert abs(part["label"].sum() - 0.7 * size) <= 1


def test_text_label_and_source_row_travel_together():
    data = make_data(40, 60)
    out = split_instances(data, n_total=80, n_flips=5, seed=2)
    original = data.frame.set_index("text")
    assert (original.loc[out["text"], "label"].to_numpy() == out["label"].to_numpy()).all()
    assert (original.loc[out["text"], "source_row"].to_numpy() == out["source_row"]).all()


def test_flips_only_in_train_and_inverted():
    out = split_instances(make_data(100, 100), n_total=200, n_flips=12, seed=3)
    assert out["flipped"].sum() == 12
    assert not out.loc[out["split"] != "train", "flipped"].any()
    flipped = out["flipped"]
    assert (out.loc[flipped, "observed_label"] == 1 - out.loc[flipped, "label"]).all()
    assert (out.loc[~flipped, "observed_label"] == out.loc[~flipped, "label"]).all()


def test_flip_mask_nests_across_counts():
    small, large = flip_mask(1600, 40, seed=7), flip_mask(1600, 80, seed=7)
    assert small.sum() == 40 and large.sum() == 80
    assert not (small & ~large).any()
    assert flip_mask(1600, 0, seed=7).sum() == 0
    assert not np.array_equal(flip_mask(1600, 40, seed=8), small)


def test_split_flips_nest_and_split_does_not_depend_on_flip_count():
    data = make_data(150, 150)
    a = split_instances(data, n_total=250, n_flips=10, seed=4)
    b = split_instances(data, n_total=250, n_flips=20, seed=4)
    assert a[["id", "split", "text", "label"]].equals(b[["id", "split", "text", "label"]])
    assert not (a["flipped"] & ~b["flipped"]).any()


def test_deterministic_for_a_seed():
    data = make_data(200, 300)
    a = split_instances(data, n_total=300, n_flips=15, seed=5)
    b = split_instances(data, n_total=300, n_flips=15, seed=5)
    c = split_instances(data, n_total=300, n_flips=15, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not a["text"].equals(c["text"])


def test_uses_all_rows_when_fewer_than_requested():
    out = split_instances(make_data(30, 30), n_total=2000, n_flips=2, seed=0)
    assert len(out) == 60
    assert out.attrs["sample"] == {
        "n_requested": 2000,
        "n_available": 60,
        "n_used": 60,
        "used_all": True,
    }


def test_smallest_classes_reach_val_and_test():
    for seed in range(5):
        out = split_instances(make_data(MIN_PER_CLASS, 400), n_total=410, n_flips=0, seed=seed)
        for split in ("val", "test"):
            assert set(out.loc[out["split"] == split, "label"]) == {0, 1}


def test_too_small_sample_names_class_and_counts():
    with pytest.raises(AtlasError, match=r"holds 5 'neg' instances.*at least 10 per class"):
        split_instances(make_data(20, 380), n_total=100, n_flips=0, seed=0)


def test_too_many_flips():
    with pytest.raises(AtlasError, match="Cannot flip 500 labels"):
        split_instances(make_data(50, 50), n_total=100, n_flips=500, seed=0)
    with pytest.raises(AtlasError, match="zero or more"):
        flip_mask(10, -1, seed=0)
    with pytest.raises(AtlasError, match="seed"):
        flip_mask(10, 1, seed=-3)
