"""The fake run store the app tests use has the same files, columns, dtypes and keys as a real
run made by the pipeline (tests/conftest.py's tiny study), so a page that works on the fake
works on what the pipeline writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import runstore_factory as factory

from core.storage import store

# What only one side has, on purpose: the real run keeps its model files and the stages'
# provenance records (the app does not read them); the fake adds the detect stage and
# cleaning results (the tiny study stops at analyze). progress.json is the last command's task
# progress (core.execution.executors), read only by the Run-a-study page's job view, whose test writes one.
REAL_ONLY = {store.TOKENIZER_DIR, store.CHECKPOINTS_DIR, "provenance", "progress.json"}
FAKE_ONLY = {store.DETECTORS, store.DETECTION, store.CLEANING_DIR}


def _files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir() if not p.name.startswith(".")}


def _keys(obj, prefix: str = "") -> set[str]:
    """Dotted key paths of nested dicts (lists are leaves)."""
    if not isinstance(obj, dict):
        return set()
    out = set()
    for k, v in obj.items():
        out.add(prefix + k)
        # Per-view and per-group maps hold data keys, not layout: one level is enough there.
        if k not in ("counts", "examples"):
            out |= _keys(v, f"{prefix}{k}.")
    return out


def test_fake_store_matches_a_real_pipeline_run(study_run, tmp_path):
    fake = factory.make_run(tmp_path, "fake")
    real = study_run
    assert _files(fake) - FAKE_ONLY == _files(real) - REAL_ONLY
    for name in sorted((_files(fake) - FAKE_ONLY) & _files(real)):
        a, b = fake / name, real / name
        if name.endswith(".parquet"):
            da, db = pd.read_parquet(a), pd.read_parquet(b)
            assert list(da.columns) == list(db.columns), name
            assert list(da.dtypes.astype(str)) == list(db.dtypes.astype(str)), name
        elif name.endswith(".npy"):
            x, y = np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r")
            assert (x.dtype, x.ndim) == (y.dtype, y.ndim), name
        elif name == store.ANALYSIS:
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            assert _keys(x) == _keys(y)
        elif name == store.MANIFEST:
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            # The fake's manifest holds every key an app page reads from a real one.
            read_by_app = {"kind", "name", "status", "command", "config", "data", "epochs"}
            read_by_app |= {"checkpoints", "n_train", "n_test", "n_flipped", "stages"}
            assert read_by_app <= set(x) and read_by_app <= set(y)
