"""The run store: file names, atomic writes and manifest access for ``cache/<run>/``.

The run store is the only contract between ``core`` (which writes it) and the app
(which reads it). This module imports no torch, so the app can use it to read.
Every write goes to a temporary file in the same folder and is renamed into
place, so a reader never sees half a file and a killed process leaves only
``*.tmp`` litter, never a truncated artifact.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.storage import locks, provenance
from core.storage.errors import AtlasError

# Every run-store file name, column set and status, and the JSON and manifest helpers, are
# declared in core.storage.run_files (below core.storage.provenance, which this module calls); they are
# re-exported here because callers read them as store.NAME.
from core.storage.run_files import (  # noqa: F401
    ANALYSIS,
    CHECKPOINTS_DIR,
    CLEANING_DIR,
    CLEANING_RESULTS,
    COORDS,
    COORDS_COLUMNS,
    CURVES,
    CURVES_COLUMNS,
    DETECTION,
    DETECTORS,
    DISTANCES,
    EMBEDDINGS,
    ERROR_STUDY,
    ERROR_STUDY_SUMMARY,
    ERROR_STUDY_WORK,
    FLIP_RANKS,
    GRAD_NORMS_TEST,
    GRAD_NORMS_TRAIN,
    INSTANCE_COLUMNS,
    INSTANCES,
    LOGITS,
    MANIFEST,
    SELF_INFLUENCE,
    SHAPES,
    SHAPES_BY_VIEW,
    SHAPES_COLUMNS,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    SWEEP_CELLS_DIR,
    SWEEP_COLUMNS,
    SWEEP_EPOCHS,
    SWEEP_TABLE,
    TOKENIZER_DIR,
    TRACIN,
    TRACIN_PER_CHECKPOINT,
    TRACIN_SHARDS_DIR,
    RebuildPhrasing,
    _json_default,
    atomic_path,
    load_manifest,
    read_json,
    rebuild_phrase,
    set_rebuild_phrasing,
    write_json,
)


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    """Write a DataFrame as Parquet (no index), atomically."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a NumPy array as ``.npy``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def read_npy(
    path: str | os.PathLike,
    mmap: bool = True,
    shape: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Read a ``.npy`` file (memory-mapped by default) after checking it is whole.

    ``shape`` (None entries match any size) is checked too. Any problem, a missing,
    truncated, pickled or wrongly shaped file, raises :class:`AtlasError` naming the file
    and, inside a run folder, the command that rebuilds it.
    """
    p = Path(path)
    if not p.exists():
        raise AtlasError(f"{p} does not exist{_rebuild_hint(p)}.")
    found, _ = npy_header(p)
    if shape is not None and not _shape_matches(found, shape):
        raise AtlasError(
            f"{p} has shape {found}, expected {_shape_text(shape)}{_rebuild_hint(p, damaged=True)}."
        )
    try:
        return np.load(p, mmap_mode="r" if mmap else None)
    except (ValueError, OSError, EOFError) as exc:
        raise AtlasError(
            f"{p} is not a readable .npy file ({_first_line(exc)}){_rebuild_hint(p, damaged=True)}."
        ) from None


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, checked against its size without reading the data."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            found, _, dtype = read(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise AtlasError(
            f"{p} is not a readable .npy file ({_first_line(exc)}){_rebuild_hint(p, damaged=True)}."
        ) from None
    if dtype.hasobject:
        raise AtlasError(f"{p} holds Python objects, not numbers{_rebuild_hint(p, damaged=True)}.")
    expected = offset + int(np.prod(found, dtype=np.int64)) * dtype.itemsize
    size = p.stat().st_size
    if size != expected:
        raise AtlasError(
            f"{p} is {'truncated' if size < expected else 'longer than its header says'} "
            f"({size} of {expected} bytes){_rebuild_hint(p, damaged=True)}."
        )
    return tuple(int(n) for n in found), dtype


def read_parquet(
    path: str | os.PathLike, columns: Sequence[str] | None = None, n_rows: int | None = None
) -> pd.DataFrame:
    """Read a Parquet file, checking that ``columns`` (all of them are read) and ``n_rows`` fit.

    Any problem raises :class:`AtlasError` naming the file and, inside a run folder, the
    command that rebuilds it.
    """
    p = Path(path)
    if not p.exists():
        raise AtlasError(f"{p} does not exist{_rebuild_hint(p)}.")
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AtlasError(
            f"{p} is not a readable Parquet file ({_first_line(exc)}){_rebuild_hint(p, damaged=True)}."
        ) from None
    missing = [c for c in columns or () if c not in df.columns]
    if missing:
        raise AtlasError(
            f"{p} has no column {', '.join(map(repr, missing))}{_rebuild_hint(p, damaged=True)}."
        )
    if n_rows is not None and len(df) != n_rows:
        raise AtlasError(
            f"{p} has {len(df)} rows, expected {n_rows}{_rebuild_hint(p, damaged=True)}."
        )
    return df


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file that must hold an object, or raise :class:`AtlasError`."""
    p = Path(path)
    if not p.exists():
        raise AtlasError(f"{p} does not exist{_rebuild_hint(p)}.")
    data = read_json(p)
    if not isinstance(data, dict):
        raise AtlasError(
            f"{p} holds a JSON {type(data).__name__}, not an object{_rebuild_hint(p, damaged=True)}."
        )
    return data


def update_manifest(run_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Merge ``changes`` into the manifest (top-level keys replaced) and write it atomically."""
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path) if path.exists() else {}
    manifest.update(changes)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(path, manifest)
    return manifest


def stage_done(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` (e.g. 'train', 'tracin', 'analyze') is recorded complete in the manifest.

    This reads the record only; :func:`stage_complete` also requires the stage's files.
    """
    try:
        manifest = read_json(Path(run_dir) / MANIFEST)
    except AtlasError:
        return False
    stages = manifest.get("stages") if isinstance(manifest, dict) else None
    entry = stages.get(stage) if isinstance(stages, dict) else None
    return isinstance(entry, dict) and entry.get("status") == STATUS_COMPLETE


def stage_complete(run_dir: str | os.PathLike, stage: str) -> bool:
    """Whether ``stage`` is recorded complete and its output files (``STAGE_OUTPUTS``) exist.

    A complete stage whose file was deleted is not complete: ``run`` makes it again and
    ``show``/``list`` do not report it complete.
    """
    run = Path(run_dir)
    return stage_done(run, stage) and all(
        (run / name).exists() for name in STAGE_OUTPUTS.get(stage, ())
    )


def mark_stage(
    run_dir: str | os.PathLike, stage: str, status: str, seconds: float | None = None, **info: Any
) -> dict[str, Any]:
    """Record a stage's status (and its wall time in ``timings_s``) in the manifest.

    A stage marked running in a failed run clears the run's failure (a retry); a stage
    marked complete also writes its provenance (``core.storage.provenance``): ``info`` as its
    arguments and the fingerprints of its inputs.
    """
    path = Path(run_dir) / MANIFEST
    manifest = read_json(path) if path.exists() else {}
    stages = manifest.setdefault("stages", {})
    stages[stage] = {"status": status, **info}
    if seconds is not None:
        manifest.setdefault("timings_s", {})[stage] = round(float(seconds), 3)
    if status == STATUS_RUNNING and manifest.get("status") == STATUS_FAILED:
        # A retried stage: the run is no longer failed, and the old error no longer applies.
        manifest.update(status=STATUS_RUNNING, error=None, retrying=stage)
    elif status == STATUS_COMPLETE and manifest.get("retrying") == stage:
        done = all(
            isinstance(e, dict) and e.get("status") == STATUS_COMPLETE for e in stages.values()
        )
        manifest.update(status=STATUS_COMPLETE if done else STATUS_RUNNING, retrying=None)
    manifest = update_manifest(run_dir, **manifest)
    if status == STATUS_COMPLETE:
        provenance.record_stage_inputs(run_dir, stage, info)
    return manifest


def load_instances(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Return ``instances.parquet`` (id, split, text, label, observed_label, flipped), checked."""
    path = Path(run_dir) / INSTANCES
    if not path.exists():
        raise AtlasError(f"{path} does not exist; the run has no data yet.")
    return read_parquet(path, INSTANCE_COLUMNS)


def run_status(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """What is true of a run or sweep now, from its manifest and its lock.

    'running' only while a live process holds the folder's lock: a writer killed with
    ``kill -9`` (or one that crashed in native code) cannot update its manifest, so a
    'running' manifest without a holder is reported 'interrupted'; so is a complete one whose
    stage is marked running (a stage command that died), and one whose stage is marked failed
    is 'failed'. A complete run whose stage lost a file is 'incomplete'; anything else is the
    manifest's status.
    """
    status = _text(manifest.get("status", "unknown"))
    if status == STATUS_RUNNING:
        return STATUS_RUNNING if locks.is_locked(run_dir) else STATUS_INTERRUPTED
    if status != STATUS_COMPLETE:
        return status
    run = Path(run_dir)
    stages = manifest.get("stages")
    stages = stages if isinstance(stages, dict) else {}
    halted = {e.get("status") for e in stages.values() if isinstance(e, dict)}
    if STATUS_RUNNING in halted:
        # A stage command (`tracin`, `analyze --force`) on a complete run that died part-way:
        # its files are half remade, so the run is not complete.
        return STATUS_RUNNING if locks.is_locked(run_dir) else STATUS_INTERRUPTED
    if STATUS_FAILED in halted:  # one that failed (its stage entry holds the error)
        return STATUS_FAILED
    for stage, entry in stages.items():
        complete = isinstance(entry, dict) and entry.get("status") == STATUS_COMPLETE
        if complete and not all((run / n).exists() for n in STAGE_OUTPUTS.get(stage, ())):
            return "incomplete"
    return status


# -- checking a run's files ----------------------------------------------------------------------

# The files each stage leaves (heavy tiers such as checkpoints/ excepted: a shipped run has
# none). A stage recorded complete is done only while these exist; show checks their content.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "data": (INSTANCES,),
    "train": (LOGITS,),
    "tracin": (TRACIN, TRACIN_PER_CHECKPOINT, SELF_INFLUENCE),
    "analyze": (SHAPES, CURVES, ANALYSIS, EMBEDDINGS, DISTANCES, COORDS),
    "detect": (DETECTORS, DETECTION),
}
# The stage that writes each file, for "rebuild it with ..." (files of other stages included).
FILE_STAGE: dict[str, str] = {
    **{name: stage for stage, names in STAGE_OUTPUTS.items() for name in names},
    GRAD_NORMS_TRAIN: "tracin",
    GRAD_NORMS_TEST: "tracin",
    SHAPES_BY_VIEW: "analyze",
    FLIP_RANKS: "analyze",
}


def missing_heavy_tier(run_dir: str | os.PathLike) -> list[str]:
    """Which of a trained run's large folders (checkpoints, tokenizer) are absent.

    A run shipped in the repository (``cache/demo``) keeps its small files only; commands
    that retrain or recompute gradients need these folders. Empty for an untrained run
    (nothing is missing yet) and for a complete local run.
    """
    run = Path(run_dir)
    try:
        manifest = read_json(run / MANIFEST)
    except AtlasError:
        return []
    if not stage_done(run, "train"):
        return []
    missing = []
    entries = manifest.get("checkpoints") or []
    # A checkpoints/ folder that lost one entry is a damaged local run, not a shipped one:
    # verify_run names the lost checkpoint and the command that retrains it.
    if not entries or not (run / CHECKPOINTS_DIR).is_dir():
        missing.append(CHECKPOINTS_DIR)
    if not (run / TOKENIZER_DIR).is_dir():
        missing.append(TOKENIZER_DIR)
    return missing


def full_copy_name(run_dir: str | os.PathLike) -> str:
    """The run name :func:`core.options.commands.recreate_command` gives a full copy of a shipped run."""
    return f"{Path(run_dir).name}-full"


def verify_run(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, str]:
    """Check the files of every stage the manifest calls complete; return {stage: problem}.

    Arrays are checked by their headers and sizes (nothing large is read), tables by
    their columns and row counts, JSON files by type. An empty result means every
    complete stage's files are whole and fit the run's sizes.
    """
    stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
    problems = {}
    for stage, entry in stages.items():
        if not isinstance(entry, dict) or entry.get("status") != STATUS_COMPLETE:
            continue
        problem = _check_stage(Path(run_dir), manifest, stage)
        if problem:
            problems[stage] = problem
    return problems


def stage_problem(run_dir: str | os.PathLike, stage: str) -> str | None:
    """Why a stage recorded complete cannot be trusted (a missing, truncated or wrongly
    shaped file), as :func:`verify_run` says it; None when its files are whole or the
    stage is not recorded complete. A stage's own command and ``run`` remake such a stage
    instead of reporting it done."""
    run = Path(run_dir)
    if not stage_done(run, stage):
        return None
    try:
        manifest = load_manifest(run)
    except AtlasError as exc:
        return str(exc)
    missing = [n for n in STAGE_OUTPUTS.get(stage, ()) if not (run / n).exists()]
    if missing:
        return f"{run / missing[0]} does not exist{_rebuild_hint(run / missing[0])}."
    return _check_stage(run, manifest, stage)


def _check_stage(run: Path, manifest: dict[str, Any], stage: str) -> str | None:
    """The first problem with one stage's files (see :func:`verify_run`), or None."""
    sizes = {k: manifest.get(k) for k in ("n_train", "n_val", "n_test")}
    n_train, n_test = (
        v if isinstance(v, int) else None for v in (sizes["n_train"], sizes["n_test"])
    )
    n_all = sum(sizes.values()) if all(isinstance(v, int) for v in sizes.values()) else None
    epochs = manifest.get("epochs")
    n_epochs = len(epochs) if isinstance(epochs, list) and epochs else None
    checks: dict[str, list] = {
        "data": [
            lambda: read_parquet(run / INSTANCES, INSTANCE_COLUMNS, n_all),
            lambda: _check_outputs(run, "data"),
        ],
        "train": [
            lambda: read_npy(run / LOGITS, shape=(n_epochs, n_all, 2)),
            lambda: _check_checkpoints(run, manifest),
        ],
        "tracin": [
            lambda: read_npy(run / TRACIN, shape=(n_test, n_train)),
            lambda: read_npy(run / TRACIN_PER_CHECKPOINT, shape=(None, n_test, n_train)),
            lambda: read_npy(run / SELF_INFLUENCE, shape=(n_train,)),
            lambda: _check_outputs(run, "tracin"),
        ],
        "analyze": [
            lambda: read_parquet(run / SHAPES, ("id", "s", "shape"), n_test),
            lambda: read_json_object(run / ANALYSIS),
            lambda: read_npy(run / DISTANCES, shape=(n_test, n_train)),
            lambda: read_npy(run / EMBEDDINGS, shape=(n_all, None)),
            lambda: _parquet_footer(run / CURVES),
            lambda: _parquet_footer(run / COORDS),
            lambda: _check_outputs(run, "analyze"),
        ],
        "detect": [
            lambda: read_parquet(run / DETECTORS, ("id",), n_train),
            lambda: read_json_object(run / DETECTION),
        ],
    }
    for check in checks.get(stage, []):
        try:
            check()
        except AtlasError as exc:
            return str(exc)
    return None


def _check_checkpoints(run: Path, manifest: dict[str, Any]) -> None:
    """Raise when a checkpoint the manifest lists is gone from a run that keeps its checkpoints.

    A run without a ``checkpoints/`` folder is a shipped one (small files only, see
    :func:`missing_heavy_tier`); one with the folder but without a listed checkpoint lost it.
    """
    if not (run / CHECKPOINTS_DIR).is_dir():
        return
    for entry in manifest.get("checkpoints") or []:
        path = run / str(entry.get("path", "")) if isinstance(entry, dict) else None
        if path is None or not path.is_dir():
            where = path if path is not None else f"{run / CHECKPOINTS_DIR} (an entry)"
            raise AtlasError(
                f"{where}, a checkpoint listed in the manifest, is missing; TracIn needs every "
                f"checkpoint: retrain from it with `{rebuild_phrase(run, 'train')}`."
            )
        if manifest.get("epochs") and not (path / _EPOCH_STATE).is_file():
            # Training wrote it (metrics, the data trained on); without it no resume trusts it.
            problem = f"{path / _EPOCH_STATE} is missing"
        else:
            problem = checkpoint_problem(path)
        if problem:
            raise AtlasError(
                f"{problem}; training makes it again from the last whole checkpoint before "
                f"it: `{rebuild_phrase(run, 'train')}`."
            )


def _check_outputs(run: Path, stage: str) -> None:
    """Raise when a file the stage's provenance fingerprints as its output (the tokenizer, the
    gradient norms) changed or went missing since the stage made it."""
    if problem := provenance.output_problem(run, stage):
        raise AtlasError(
            f"{problem}; the {stage} stage makes it again: `{rebuild_phrase(run, stage)}`."
        )


# core.learning.training's file names (that module imports torch; this one must not).
_EPOCH_STATE, _EPOCH_LOGITS = "epoch_state.json", "eval_logits.npz"


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a checkpoint folder's files are not whole (cut short, unreadable), or None.

    Cheap and torch-free, nothing large is read: a safetensors file's size must be the
    one its header declares, a zip (``.npz``, torch's ``optimizer.pt``) must have its
    central directory (at its end), a JSON file must parse. Files that are absent are not
    this check's business (:func:`core.learning.training.completed_epochs` requires the state file).
    """
    import zipfile

    folder = Path(folder)
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    weights = any(n.endswith(".safetensors") or n.startswith("pytorch_model") for n in names)
    if "config.json" not in names:
        return f"{folder / 'config.json'} is missing"
    if not weights:
        return f"{folder} has no weights file"
    if _EPOCH_STATE in names and _EPOCH_LOGITS not in names:  # a training epoch's own files
        return f"{folder / _EPOCH_LOGITS} is missing"
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            elif path.suffix in (".npz", ".pt"):
                with zipfile.ZipFile(path):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text("utf-8"))
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            return f"{path} is damaged ({_first_line(exc)})"
    return None


def _check_safetensors(path: Path) -> None:
    """Raise ValueError unless a safetensors file is as long as its header says."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{size} bytes, shorter than its header")
        header = json.loads(fh.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if size != 8 + n + max(ends, default=0):
        raise ValueError(f"{size} of {8 + n + max(ends, default=0)} bytes")


def _parquet_footer(path: Path) -> None:
    """Check that a Parquet file exists and its footer (schema, row groups) reads."""
    import pyarrow.parquet as pq

    if not path.exists():
        raise AtlasError(f"{path} does not exist{_rebuild_hint(path)}.")
    try:
        pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AtlasError(
            f"{path} is not a readable Parquet file ({_first_line(exc)}){_rebuild_hint(path, damaged=True)}."
        ) from None


def _rebuild_hint(path: Path, damaged: bool = False) -> str:
    """'; rebuild it with `...`' for a file of a run folder, '' elsewhere."""
    stage = FILE_STAGE.get(path.name)
    if stage is None or not (path.parent / MANIFEST).is_file():
        return ""
    return f"; {'delete it and ' if damaged else ''}rebuild it with `{rebuild_phrase(path.parent, stage)}`"


def _shape_matches(found: tuple[int, ...], wanted: tuple[int | None, ...]) -> bool:
    """Whether an array shape fits a pattern whose None entries match any size."""
    return len(found) == len(wanted) and all(
        w is None or f == w for f, w in zip(found, wanted, strict=True)
    )


def _shape_text(shape: tuple[int | None, ...]) -> str:
    """A shape pattern as text, '?' for any size."""
    return (
        "("
        + ", ".join("?" if n is None else str(n) for n in shape)
        + ("," if len(shape) == 1 else "")
        + ")"
    )


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, shortened, for one-sentence errors."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text[:160].rstrip(".")


def _text(value: Any) -> str:
    """A manifest value shown as text (a hand-edited manifest may hold anything)."""
    return value if isinstance(value, str) else ("" if value is None else str(value))
