"""The bottom of the storage layer: run-store file names, column sets and statuses, atomic
JSON writes and manifest reads.

Everything here is what both :mod:`core.storage.provenance` and :mod:`core.storage.store` need, so the two
sit above it (store above provenance: a stage marked complete records its provenance)
instead of importing each other. :mod:`core.storage.store` re-exports every name, so callers keep
writing ``store.INSTANCES``; the names are declared here and nowhere else. This module
imports no torch and no pandas.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.storage.errors import AtlasError

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
ERROR_STUDY = "error_study.parquet"  # one row per test row × method (core.analysis.error_study)
ERROR_STUDY_SUMMARY = "error_study.json"  # per-method summary, subset, timings, command
ERROR_STUDY_WORK = "error_study_work"  # resumable shards and results of the error study
CLEANING_DIR = "cleaning"
CLEANING_RESULTS = (
    "results.json"  # inside CLEANING_DIR: one row per retraining (core.cleaning.interventions)
)
# Files of a sweep folder (core.orchestration.sweep).
SWEEP_TABLE = "sweep.parquet"  # one row per (flip rate, seed) cell
SWEEP_EPOCHS = "sweep_epochs.parquet"  # one row per cell and epoch
SWEEP_CELLS_DIR = "cells"  # one run folder per cell

# Columns each table is guaranteed to hold: what readers (the app, the checks below) rely on.
INSTANCE_COLUMNS = ("id", "split", "text", "label", "observed_label", "flipped")
SHAPES_COLUMNS = ("id", "s", "shape", "end_ratio")
CURVES_COLUMNS = ("test_id", "rank", "train_id", "score", "flipped")
COORDS_COLUMNS = ("id", "umap_x", "umap_y", "pca_x", "pca_y")
SWEEP_COLUMNS = ("flip_rate", "seed", "final_test_accuracy")

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
# Reported, never stored: a manifest saying 'running' whose lock no live process holds.
STATUS_INTERRUPTED = "interrupted"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # a read-only or full folder: name the file asked for, not our temp
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            os.replace(tmp, target)
        except OSError as exc:
            # A full disk while writing, an immutable or read-only target while renaming:
            # the sentence names the file asked for, not our temporary (removed below).
            if exc.errno is not None and exc.filename in (None, str(tmp)):
                raise OSError(exc.errno, exc.strerror, str(target)) from exc
            raise
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
    except OSError as exc:  # a folder in its place, no permission, an I/O error
        raise AtlasError(f"{p} cannot be read ({exc.strerror or exc}).") from None


def load_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return a run's manifest, or raise :class:`AtlasError` naming what is wrong."""
    run = Path(run_dir)
    if not run.is_dir():
        raise AtlasError(f"{run} is not a run folder (it does not exist).")
    manifest = read_json(run / MANIFEST)
    if not isinstance(manifest, dict) or "status" not in manifest:
        raise AtlasError(f"{run / MANIFEST} is not a run manifest (no 'status' key).")
    return manifest


# The storage layer knows which stage writes each file, not the command line: the command
# layer above (core.options.commands) registers how to phrase the command that remakes a stage, so
# a damaged file's message names it without this module importing the CLI.
RebuildPhrasing = Callable[[Path, str], str]
_rebuild_phrasing: list[RebuildPhrasing] = []


def set_rebuild_phrasing(phrase: RebuildPhrasing) -> None:
    """Use ``phrase(run_dir, stage)`` for the command in "rebuild it with `…`" hints."""
    _rebuild_phrasing[:] = [phrase]


def rebuild_phrase(run_dir: Path, stage: str) -> str:
    """The command that remakes ``stage`` of a run, as the command layer phrases it."""
    if _rebuild_phrasing:
        return _rebuild_phrasing[0](run_dir, stage)
    return f"python -m core {stage} {shlex.quote(str(run_dir))}"


def _json_default(obj: Any) -> Any:
    """Make NumPy scalars and arrays, and paths, JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
