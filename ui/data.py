"""Run-store loading for the app: each file read once per process, arrays memory-mapped.

Loaders are keyed by (path, modification time), so a run recomputed on disk is
re-read while an unchanged one is served from memory. Every read failure becomes
an :class:`AtlasError` (or :class:`MissingData` for a stage not yet run), which
the pages show as a sentence instead of a traceback.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from core.analysis.shapes import ShapeRule
from core.options import commands
from core.storage import store
from core.storage.errors import AtlasError

# File names and column sets are the run store's (core.storage.store), never copies.
from core.storage.store import (
    CLEANING_RESULTS,
    COORDS_COLUMNS,
    CURVES_COLUMNS,
    INSTANCE_COLUMNS,
    SHAPES_COLUMNS,
    SWEEP_COLUMNS,
    SWEEP_EPOCHS,
    SWEEP_TABLE,
)

ENV_CACHE = "ATLAS_CACHE"  # points the app at another run store (tests, hosted demos)
DEMO_RUN = "demo"
REPO = Path(__file__).resolve().parents[1]


class MissingData(AtlasError):
    """A run lacks a stage's output; ``command`` is what the user can run to make it."""

    def __init__(self, message: str, command: str):
        super().__init__(message)
        self.command = command


def cache_dir() -> Path:
    """The run store the app reads: $ATLAS_CACHE, else ``cache/`` beside app.py."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else REPO / "cache"


def display_path(path: Path) -> str:
    """A path as the user would type it in the CLI (relative to the repository when inside)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@st.cache_data(ttl=3, show_spinner=False)
def list_runs(cache: str) -> list[dict[str, Any]]:
    """``store.list_runs`` with a short cache, so new runs appear within seconds."""
    return commands.list_runs(cache)


def default_run(runs: list[dict[str, Any]]) -> str | None:
    """The shipped demo run when present, else the newest complete run, else the newest."""
    names = [r["name"] for r in runs]
    if DEMO_RUN in names:
        return DEMO_RUN
    for r in runs:  # list_runs sorts newest first
        if r.get("status") == store.STATUS_COMPLETE:
            return r["name"]
    return names[0] if names else None


def stamp(path: Path) -> int:
    """Modification time in ns (part of every cache key), -1 when absent."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@st.cache_resource(show_spinner=False, max_entries=64)
def _npy(path: str, mtime: int) -> np.ndarray:
    """A memory-mapped .npy (shared by all sessions; never written to)."""
    try:
        return store.read_npy(path, mmap=True)
    except AtlasError:
        raise
    except Exception as exc:  # truncated header, pickled object, permissions...
        raise AtlasError(f"{path} is not a readable .npy file ({exc}).") from None


@st.cache_resource(show_spinner=False, max_entries=64)
def _parquet(path: str, mtime: int) -> pd.DataFrame:
    """A Parquet table read once per process (callers must not mutate it)."""
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AtlasError(f"{path} is not a readable Parquet file ({exc}).") from None


@st.cache_data(show_spinner=False, max_entries=128)
def _json(path: str, mtime: int) -> Any:
    """A JSON file, re-read when it changes."""
    return store.read_json(path)


def _need_columns(df: pd.DataFrame, columns: tuple[str, ...], path: Path) -> pd.DataFrame:
    """Raise a clear error when a table lacks a documented column."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise AtlasError(
            f"{path} lacks the column(s) {', '.join(missing)}; it is not a run-store file."
        )
    return df


class StoreFolder:
    """A folder of the run store (a run, a sweep, a replication grid), named by its last part."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name


class Run(StoreFolder):
    """A lazily loaded view of one run folder; every file goes through the process-wide caches."""

    # -- plumbing ------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """Path of a run-store file."""
        return self.path / name

    def has(self, name: str) -> bool:
        """Whether a run-store file exists."""
        return self.file(name).exists()

    def command(self, stage: str) -> str:
        """The CLI line that (re)makes a stage's output for this run (core.options.commands.rebuild_command)."""
        return commands.rebuild_command(display_path(self.path), stage)

    def require(self, name: str, stage: str) -> Path:
        """Path of ``name`` or :class:`MissingData` naming the stage that writes it."""
        path = self.file(name)
        if not path.exists():
            status = store.run_status(self.path, self.manifest)
            why = {
                store.STATUS_RUNNING: " (the run is still running)",
                store.STATUS_INTERRUPTED: " (the run was interrupted)",
            }.get(status, "")
            raise MissingData(
                f"Run '{self.name}' has no {name} yet{why}: its {stage} stage has not been run.",
                self.command(stage),
            )
        return path

    def _npy(self, name: str, stage: str) -> np.ndarray:
        path = self.require(name, stage)
        return _npy(str(path), stamp(path))

    def _parquet(self, name: str, stage: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
        path = self.require(name, stage)
        return _need_columns(_parquet(str(path), stamp(path)), columns, path)

    # -- manifest and instances ----------------------------------------------------------------

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """manifest.json (validated by ``store.load_manifest``'s rules)."""
        path = self.file(store.MANIFEST)
        if not self.path.is_dir():
            raise AtlasError(f"{self.path} is not a run folder (it does not exist).")
        manifest = _json(str(path), stamp(path))
        if not isinstance(manifest, dict) or "status" not in manifest:
            raise AtlasError(f"{path} is not a run manifest (no 'status' key).")
        return manifest

    @property
    def status(self) -> str:
        """running | complete | failed."""
        return str(self.manifest.get("status", "unknown"))

    @cached_property
    def instances(self) -> pd.DataFrame:
        """instances.parquet, checked for the documented columns and row order."""
        path = self.require(store.INSTANCES, "run")
        df = _need_columns(_parquet(str(path), stamp(path)), INSTANCE_COLUMNS, path)
        if not np.array_equal(df["id"].to_numpy(), np.arange(len(df))):
            raise AtlasError(f"{path}: column 'id' must equal the row position.")
        return df

    @cached_property
    def train(self) -> pd.DataFrame:
        """Training rows, in training (column) order."""
        return self.instances[self.instances["split"] == "train"]

    @cached_property
    def test(self) -> pd.DataFrame:
        """Test rows, in test (row) order."""
        return self.instances[self.instances["split"] == "test"]

    @cached_property
    def test_ids(self) -> np.ndarray:
        """Instance ids of the test rows (row i of tracin.npy is test_ids[i])."""
        return self.test["id"].to_numpy()

    def test_row(self, test_id: int) -> int:
        """Row of a test instance in the test × train matrices."""
        hits = np.flatnonzero(self.test_ids == int(test_id))
        if not len(hits):
            raise AtlasError(f"Instance {test_id} is not a test instance of run '{self.name}'.")
        return int(hits[0])

    @property
    def label_names(self) -> list[str]:
        """Human names of labels 0 and 1."""
        names = (self.manifest.get("data") or {}).get("label_names") or []
        return [str(n) for n in names] if len(names) == 2 else ["0", "1"]

    # -- stage outputs -------------------------------------------------------------------------

    def logits(self) -> np.ndarray:
        """(n_epochs, n_instances, 2) logits."""
        n = len(self.instances)
        return self._shaped(store.LOGITS, "run", (None, n, None), f"(epochs, {n}, 2)")

    def tracin(self) -> np.ndarray:
        """(n_test, n_train) summed TracIn."""
        return self._matrix(store.TRACIN, "tracin")

    def per_checkpoint(self) -> np.ndarray:
        """(k, n_test, n_train) per-checkpoint contributions (float32)."""
        n_test, n_train = len(self.test), len(self.train)
        want = (None, n_test, n_train)
        return self._shaped(
            store.TRACIN_PER_CHECKPOINT, "tracin", want, f"(k, {n_test}, {n_train})"
        )

    def self_influence(self) -> np.ndarray:
        """(n_train,) self-influence."""
        return self._npy(store.SELF_INFLUENCE, "tracin")

    def distances(self) -> np.ndarray:
        """(n_test, n_train) [CLS] distances."""
        return self._matrix(store.DISTANCES, "analyze")

    def _matrix(self, name: str, stage: str) -> np.ndarray:
        want = (len(self.test), len(self.train))
        return self._shaped(name, stage, want, f"{want} (test × train)")

    def _shaped(
        self, name: str, stage: str, want: tuple[int | None, ...], expected: str
    ) -> np.ndarray:
        """The array ``name``, refused in one sentence unless its shape is ``want`` (None:
        any length on that axis); ``expected`` says the shape in the words of the error."""
        arr = self._npy(name, stage)
        if arr.ndim != len(want) or any(
            w not in (None, n) for n, w in zip(arr.shape, want, strict=True)
        ):
            raise AtlasError(f"{self.file(name)} has shape {arr.shape}, expected {expected}.")
        return arr

    def shapes(self) -> pd.DataFrame:
        """shapes.parquet: one row per test instance (MissingData when analysed by an older
        version without the bulk index the class rule uses)."""
        df = self._parquet(store.SHAPES, "analyze", SHAPES_COLUMNS)
        if "s_bulk" not in df.columns:
            raise MissingData(
                f"Run '{self.name}' was analysed before shape classes read the bulk of the curve "
                "(its shapes.parquet has no s_bulk).",
                self.command("analyze"),
            )
        return df

    def curves(self) -> pd.DataFrame | None:
        """curves.parquet (downsampled sorted curves), or None when the run has none."""
        if not self.has(store.CURVES):
            return None
        return self._parquet(store.CURVES, "analyze", CURVES_COLUMNS)

    def coords(self) -> pd.DataFrame:
        """coords.parquet: 2-D UMAP and PCA coordinates of every instance."""
        return self._parquet(store.COORDS, "analyze", COORDS_COLUMNS)

    def analysis(self) -> dict[str, Any]:
        """analysis.json ({} when absent)."""
        path = self.file(store.ANALYSIS)
        return _json(str(path), stamp(path)) if path.exists() else {}

    def error_study(self) -> tuple[dict[str, Any], pd.DataFrame] | None:
        """error_study.json and error_study.parquet (core.analysis.error_study), or None when absent."""
        path = self.file(store.ERROR_STUDY_SUMMARY)
        if not path.exists() or not self.has(store.ERROR_STUDY):
            return None
        summary = _json(str(path), stamp(path))
        if not isinstance(summary, dict) or not isinstance(summary.get("methods"), dict):
            raise AtlasError(f"{path} is not an error-study summary (no 'methods').")
        table = self._parquet(
            store.ERROR_STUDY, "error-study", ("method", "test_id", "spearman", "shape_agree")
        )
        return summary, table

    def rule(self) -> ShapeRule:
        """The class rule the analyze stage used, else core's calibrated defaults."""
        return ShapeRule.of_analysis(self.analysis())

    def shapes_by_view(self) -> pd.DataFrame | None:
        """shapes_by_view.parquet (every single / cumulative checkpoint view), or None."""
        if not self.has(store.SHAPES_BY_VIEW):
            return None
        return self._parquet(store.SHAPES_BY_VIEW, "analyze", ("view", "kind", "id", "shape"))

    def flip_ranks(self) -> np.ndarray | None:
        """flip_ranks.npy (n_views, n_test, n_flipped), in analysis.json's views.rank_order."""
        if not self.has(store.FLIP_RANKS):
            return None
        return self._npy(store.FLIP_RANKS, "analyze")

    def grad_norms(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """Per-checkpoint gradient norms (train (k, n_train), test (k, n_test) or None), or None."""
        if not self.has(store.GRAD_NORMS_TRAIN):
            return None
        train = self._npy(store.GRAD_NORMS_TRAIN, "tracin")
        test = (
            self._npy(store.GRAD_NORMS_TEST, "tracin") if self.has(store.GRAD_NORMS_TEST) else None
        )
        return train, test

    def detectors(self) -> pd.DataFrame:
        """detectors.parquet: suspicion per training instance and detector."""
        return self._parquet(store.DETECTORS, "detect", ("id",))

    def detection(self) -> dict[str, Any]:
        """detection.json: metrics per detector."""
        path = self.require(store.DETECTION, "detect")
        return _json(str(path), stamp(path))

    def cleaning_results(self) -> list[dict[str, Any]]:
        """Rows of cleaning/results.json ([] when no intervention was run)."""
        path = self.file(store.CLEANING_DIR) / CLEANING_RESULTS
        if not path.exists():
            return []
        data = _json(str(path), stamp(path))
        rows = data.get("rows", []) if isinstance(data, dict) else []
        return [r for r in rows if isinstance(r, dict)]

    def cleaning_files(self) -> list[Path]:
        """CSV exports in cleaning/ (review queues and cleaned datasets)."""
        folder = self.file(store.CLEANING_DIR)
        return sorted(folder.glob("*.csv")) if folder.is_dir() else []


class Sweep(StoreFolder):
    """A noise sweep folder (manifest kind 'sweep')."""

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The sweep's manifest.json."""
        path = self.path / store.MANIFEST
        manifest = _json(str(path), stamp(path))
        if not isinstance(manifest, dict):
            raise AtlasError(f"{path} is not a sweep manifest.")
        return manifest

    def table(self) -> pd.DataFrame:
        """sweep.parquet: one row per (flip rate, seed) cell."""
        path = self.path / SWEEP_TABLE
        if not path.exists():
            # Rerunning the recorded command resumes the sweep where it stopped.
            command = self.manifest.get("command") or f"python -m core sweep --name {self.name}"
            raise MissingData(f"Sweep '{self.name}' has no finished cells yet.", command)
        return _need_columns(_parquet(str(path), stamp(path)), SWEEP_COLUMNS, path)

    def epochs(self) -> pd.DataFrame | None:
        """sweep_epochs.parquet, or None."""
        path = self.path / SWEEP_EPOCHS
        return _parquet(str(path), stamp(path)) if path.exists() else None


class Replication(StoreFolder):
    """A replication-grid summary folder (manifest kind 'replication', core.analysis.replication)."""

    @cached_property
    def summary(self) -> dict[str, Any]:
        """replication.json: conditions with pooled claims, the sweep's C7, the teaching run."""
        from core.analysis.replication import REPLICATION

        path = self.path / REPLICATION
        if not path.exists():
            raise AtlasError(f"{path} does not exist; the grid summary was not written.")
        out = _json(str(path), stamp(path))
        if not isinstance(out, dict) or not isinstance(out.get("conditions"), list):
            raise AtlasError(f"{path} is not a replication summary.")
        return out

    def _table(self, name: str) -> pd.DataFrame | None:
        path = self.path / name
        return _parquet(str(path), stamp(path)) if path.exists() else None

    def instances(self) -> pd.DataFrame | None:
        """Every test instance of every run, read in its condition's view."""
        from core.analysis.replication import REPLICATION_INSTANCES

        return self._table(REPLICATION_INSTANCES)

    def curves(self) -> pd.DataFrame | None:
        """Downsampled sorted curves of the misclassified instances (flips always kept)."""
        from core.analysis.replication import REPLICATION_CURVES

        return self._table(REPLICATION_CURVES)

    def sweep_cells(self) -> pd.DataFrame | None:
        """The sweep's cells (flip_rate, seed, final_test_accuracy) behind claim C7."""
        from core.analysis.replication import REPLICATION_SWEEP

        return self._table(REPLICATION_SWEEP)
