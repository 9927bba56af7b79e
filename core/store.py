"""The run store: file names, atomic writes and manifest access for ``cache/<run>/``.

The run store is the only contract between ``core`` (which writes it) and the app
(which reads it). This module imports no torch, so the app can use it to read.
Every write goes to a temporary file in the same folder and is renamed into
place, so a reader never sees half a file and a killed process leaves only
``*.tmp`` litter, never a truncated artifact.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import AtlasError

# File names inside a run folder (public interface: users' scripts read these).
MANIFEST = "manifest.json"
INSTANCES = "instances.parquet"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
LOGITS = "logits.npy"  # (n_epochs, n_instances, 2) float32, instances.parquet order
TRACIN = "tracin.npy"  # (n_test, n_train) float32
TRACIN_PER_CHECKPOINT = "tracin_per_checkpoint.npy"  # (k, n_test, n_train) float32
SELF_INFLUENCE = "self_influence.npy"  # (n_train,) float32
# Per-checkpoint ‖∇ℓ(w_i, z)‖ in the TracIn scope, unweighted: relative / cosine views divide by it.
GRAD_NORMS_TRAIN = "grad_norms_train.npy"  # (k, n_train) float32
GRAD_NORMS_TEST = "grad_norms_test.npy"  # (k, n_test) float32
TRACIN_SHARDS_DIR = "tracin_shards"
SHAPES = "shapes.parquet"  # one row per test instance
CURVES = "curves.parquet"  # downsampled sorted curves, long format
SHAPES_BY_VIEW = "shapes_by_view.parquet"  # shapes of every single/cumulative checkpoint view
FLIP_RANKS = "flip_ranks.npy"  # (n_views, n_test, n_flipped) ranks of the flips per view
ANALYSIS = "analysis.json"  # correlations, thresholds, per-class summaries
EMBEDDINGS = "embeddings.npy"  # (n_instances, hidden) float32
DISTANCES = "distances.npy"  # (n_test, n_train) float32
COORDS = "coords.parquet"  # id, umap_x, umap_y, pca_x, pca_y
DETECTORS = "detectors.parquet"  # one row per training instance, a column per detector
DETECTION = "detection.json"  # metrics per detector
CLEANING_DIR = "cleaning"

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), "utf-8"
        )


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`AtlasError` if it is missing or corrupt."""
    p = Path(path)
    try:
        return json.loads(p.read_text("utf-8"))
    except FileNotFoundError:
        raise AtlasError(f"{p} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtlasError(f"{p} is not valid JSON ({exc}).") from None


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a NumPy array as ``.npy``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def read_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Read a ``.npy`` file (memory-mapped by default), raising :class:`AtlasError` if absent."""
    p = Path(path)
    if not p.exists():
        raise AtlasError(f"{p} does not exist.")
    try:
        return np.load(p, mmap_mode="r" if mmap else None)
    except ValueError as exc:
        raise AtlasError(f"{p} is not a readable .npy file ({exc}).") from None


def load_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return a run's manifest, or raise :class:`AtlasError` naming what is wrong."""
    run = Path(run_dir)
    if not run.is_dir():
        raise AtlasError(f"{run} is not a run folder (it does not exist).")
    manifest = read_json(run / MANIFEST)
    if not isinstance(manifest, dict) or "status" not in manifest:
        raise AtlasError(f"{run / MANIFEST} is not a run manifest (no 'status' key).")
    return manifest


def update_manifest(run_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the manifest (top-level keys replaced) and write it atomically."""
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path) if path.exists() else {}
    manifest.update(changes)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(path, manifest)
    return manifest


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` (e.g. 'train', 'tracin', 'analyze') is recorded complete in the manifest."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return False
    stages = read_json(path).get("stages", {})
    return stages.get(stage, {}).get("status") == STATUS_COMPLETE


def mark_stage(
    run_dir: str | os.PathLike, stage: str, status: str, seconds: float | None = None, **info: Any
) -> dict[str, Any]:
    """Record a stage's status (and its wall time in ``timings_s``) in the manifest."""
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path) if path.exists() else {}
    stages = manifest.setdefault("stages", {})
    stages[stage] = {"status": status, **info}
    if seconds is not None:
        manifest.setdefault("timings_s", {})[stage] = round(float(seconds), 3)
    return update_manifest(run_dir, **manifest)


def load_instances(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Return ``instances.parquet`` (id, split, text, label, observed_label, flipped)."""
    path = Path(run_dir) / INSTANCES
    if not path.exists():
        raise AtlasError(f"{path} does not exist; the run has no data yet.")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AtlasError(f"{path} is not a readable Parquet file ({exc}).") from None


def list_runs(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return one summary dict per run or sweep under ``cache_dir``, newest first.

    Folders without a readable manifest are reported with status 'unreadable'
    rather than skipped, so a user sees that something is there.
    """
    cache = Path(cache_dir)
    if not cache.is_dir():
        return []
    rows = []
    for child in cache.iterdir():
        if not child.is_dir() or child.name.startswith("."):
            continue
        path = child / MANIFEST
        if not path.exists():
            continue
        try:
            manifest = read_json(path)
            rows.append(
                {
                    "name": child.name,
                    "path": str(child),
                    "kind": manifest.get("kind", "run"),
                    "status": manifest.get("status", "unknown"),
                    "created": manifest.get("created", ""),
                    "dataset": manifest.get("config", {}).get("dataset", ""),
                    "model": manifest.get("config", {}).get("model", ""),
                    "test_accuracy": manifest.get("test_accuracy"),
                }
            )
        except AtlasError:
            rows.append(
                {"name": child.name, "path": str(child), "kind": "?", "status": "unreadable"}
            )
    return sorted(rows, key=lambda r: r.get("created", ""), reverse=True)


def _json_default(obj: Any) -> Any:
    """Make NumPy scalars and arrays, and paths, JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
