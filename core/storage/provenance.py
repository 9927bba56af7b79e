"""Provenance: what each stage of a run was computed from, and which results are stale.

Every stage writes ``provenance/<stage>.json`` beside its outputs (in the spirit of
kronfluence's saved arguments): the arguments it ran with and a content fingerprint of
every input file or folder it read. A later change to an input (``tracin --params head``
rewrites ``tracin.npy``, a checkpoint retrained) makes the stages that read it *stale*:
their own command recomputes them, and ``show`` / ``list`` report them until then.

Fingerprints identify content, not path strings: inputs inside the run are recorded
relative to the run folder, so a run moved, or reached through an absolute instead of a
relative ``--cache``, keeps its provenance. A fingerprint is the SHA-1 of the content
(files up to :data:`FULL_HASH_BYTES`; past that the size, the first and last MiB and
:data:`SAMPLED_BLOCKS` evenly spaced 64 KiB blocks, which any rewrite of a float array
changes), plus the size and modification time so that an unchanged file is recognised
without reading it again. A folder's fingerprint hashes its files' names and
fingerprints. This module imports no torch: the app and ``list`` use it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.storage import run_files
from core.storage.errors import AtlasError

PROVENANCE_DIR = "provenance"
# Files up to this size are hashed whole (SHA-1 runs at about 1 GB/s).
FULL_HASH_BYTES = 256 << 20
SAMPLED_BLOCKS = 64
_BLOCK = 64 << 10
_EDGE = 1 << 20
# core.learning.training.EPOCH_STATE (that module imports torch; this one must not).
_EPOCH_STATE = "epoch_state.json"

# Inputs of each stage, as paths relative to the run folder. The tracin stage also reads
# every checkpoint folder listed in the manifest (added by :func:`stage_inputs`).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "data": (),
    "train": (run_files.INSTANCES, run_files.TOKENIZER_DIR),
    "tracin": (run_files.INSTANCES, run_files.TOKENIZER_DIR),
    "analyze": (
        run_files.INSTANCES,
        run_files.LOGITS,
        run_files.TRACIN,
        run_files.TRACIN_PER_CHECKPOINT,
        run_files.GRAD_NORMS_TRAIN,
        run_files.GRAD_NORMS_TEST,
    ),
    "detect": (
        run_files.INSTANCES,
        run_files.LOGITS,
        run_files.TRACIN,
        run_files.SELF_INFLUENCE,
        run_files.SHAPES,
    ),
    "clean": (run_files.INSTANCES, run_files.DETECTORS),
}
# Outputs a stage's record fingerprints too, beyond the files ``store.stage_problem`` reads:
# the tokenizer (training and TracIn read it), the gradient norms (analyze reads them) and
# analyze's per-view tables (the app and claims read them).
# One changed or lost since makes its stage due again (:func:`output_problem`).
STAGE_OUTPUTS_KEPT: dict[str, tuple[str, ...]] = {
    "data": (run_files.TOKENIZER_DIR,),
    "tracin": (run_files.GRAD_NORMS_TRAIN, run_files.GRAD_NORMS_TEST),
    "analyze": (run_files.SHAPES_BY_VIEW, run_files.FLIP_RANKS),
}
# The stages whose outputs each stage reads beyond the data (checked by check_upstream).
UPSTREAM: dict[str, tuple[str, ...]] = {"tracin": ("train",), "analyze": ("train", "tracin")}
# Keys of a stage's recorded info that describe the machine, not the result.
_VOLATILE = {
    "seconds",
    "timings_s",
    "peak_rss_mb",
    "worker_peak_rss_mb",
    "peak_cuda_mb",
    "device",
    "status",
    "error",
}

# (path, size, mtime_ns) -> sha1: a file already hashed in this process is not read again.
_MEMO: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path, size: int) -> str:
    """SHA-1 of a file's content (sampled past :data:`FULL_HASH_BYTES`)."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"sampled:{size}:".encode())
            h.update(fh.read(_EDGE))
            step = (size - 2 * _EDGE) // (SAMPLED_BLOCKS + 1)
            for i in range(1, SAMPLED_BLOCKS + 1):
                fh.seek(_EDGE + i * step)
                h.update(fh.read(_BLOCK))
            fh.seek(size - _EDGE)
            h.update(fh.read(_EDGE))
    return h.hexdigest()


def _stat_digest(path: Path, stat: os.stat_result) -> str:
    """A file's digest, memoised by (path, size, mtime)."""
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MEMO:
        _MEMO[key] = _file_digest(path, stat.st_size)
    return _MEMO[key]


def fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """Content fingerprint of a file or folder: ``{sha1, size, mtime_ns}``; None if absent.

    A folder's ``sha1`` covers its files' relative names and digests (hidden and ``*.tmp``
    files excluded), ``size`` their total and ``mtime_ns`` the newest.
    """
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"sha1": _stat_digest(p, st), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not p.is_dir():
        return None
    h = hashlib.sha1()
    size = newest = 0
    for f in _files(p):
        rel = f.relative_to(p).as_posix()
        st = f.stat()
        h.update(f"{rel}\0{_stat_digest(f, st)}\0".encode())
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
    return {"sha1": h.hexdigest(), "size": size, "mtime_ns": newest}


def _files(p: Path) -> list[Path]:
    """The files a folder's fingerprint covers (hidden and ``*.tmp`` files excluded)."""
    out = []
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p)
        if not any(part.startswith(".") for part in rel.parts) and f.suffix != ".tmp":
            out.append(f)
    return out


def _stat(path: Path) -> tuple[int, int] | None:
    """(total size, newest mtime_ns) of a file or folder, without reading content."""
    if path.is_file():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    if not path.is_dir():
        return None
    stats = [f.stat() for f in _files(path)]
    return sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)


def same_content(recorded: Mapping[str, Any] | None, path: str | os.PathLike) -> bool | None:
    """Whether ``path`` still holds the content of the ``recorded`` fingerprint.

    None when the path is absent (a run shipped without its heavy tier is not stale). An
    unchanged size and modification time count as unchanged without reading the content
    (``list`` over many runs stays cheap); otherwise the content hash decides.
    """
    quick = _stat(Path(path))
    if quick is None:
        return None
    if recorded is not None and quick == (recorded.get("size"), recorded.get("mtime_ns")):
        return True
    now = fingerprint(path)
    if now is None:
        return None
    return recorded is not None and now["sha1"] == recorded.get("sha1")


def checkpoint_identity(path: str | os.PathLike, lr: float, epoch: int | None = None) -> dict:
    """A checkpoint identified by its content, not its path: ``{epoch, lr, sha1}``."""
    fp = fingerprint(path)
    if fp is None:
        raise AtlasError(f"The checkpoint {path} does not exist.")
    return {"epoch": epoch, "lr": float(lr), "sha1": fp["sha1"]}


def stage_inputs(run_dir: str | os.PathLike, stage: str) -> list[str]:
    """The inputs of ``stage`` as paths relative to the run folder (checkpoints included).

    The data stage's input is the user's data file, if any, by its absolute path.
    """
    run = Path(run_dir)
    names = list(STAGE_INPUTS.get(stage, ()))
    try:
        manifest = run_files.load_manifest(run)
    except AtlasError:
        manifest = {}
    if stage == "tracin":
        entries = manifest.get("checkpoints") or []
        names += [str(e["path"]) for e in entries if isinstance(e, dict) and e.get("path")]
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    if stage == "data" and config.get("data_file"):
        # The user's file lives outside the run: recorded by its absolute path.
        names.append(str(Path(str(config["data_file"])).resolve()))
    return names


def _record_path(run: Path, stage: str) -> Path:
    """Where the provenance of ``stage`` is written."""
    return run / PROVENANCE_DIR / f"{stage}.json"


def record_stage_inputs(
    run_dir: str | os.PathLike,
    stage: str,
    args: Mapping[str, Any],
    inputs: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write ``provenance/<stage>.json``: ``args`` and the fingerprint of every input.

    ``inputs`` are paths relative to the run folder (default: :func:`stage_inputs`); an
    absolute path (a user's data file) is kept as given. Absent inputs are recorded as
    null. Returns the record.
    """
    run = Path(run_dir)
    names = list(stage_inputs(run, stage) if inputs is None else inputs)
    record = {
        "stage": stage,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in dict(args).items() if k not in _VOLATILE},
        "inputs": {name: fingerprint(run / name) for name in names},
    }
    if STAGE_OUTPUTS_KEPT.get(stage):
        record["outputs"] = {name: fingerprint(run / name) for name in STAGE_OUTPUTS_KEPT[stage]}
    run_files.write_json(_record_path(run, stage), record)
    return record


def output_problem(run_dir: str | os.PathLike, stage: str) -> str | None:
    """Which output of ``stage`` (:data:`STAGE_OUTPUTS_KEPT`) changed or went missing since
    the stage made it, or None.

    A missing tokenizer counts only while the run keeps its checkpoints: a shipped run has
    neither (``store.missing_heavy_tier``), and nothing needs them there.
    """
    run = Path(run_dir)
    record = read_record(run, stage)
    outputs = record.get("outputs") if record is not None else None
    for name, recorded in outputs.items() if isinstance(outputs, dict) else ():
        if recorded is None:
            continue
        same = same_content(recorded, run / name)
        if same is False:
            return f"{run / name} changed after the {stage} stage made it"
        heavy = name == run_files.TOKENIZER_DIR
        if same is None and (not heavy or (run / run_files.CHECKPOINTS_DIR).is_dir()):
            return f"{run / name} is missing"
    return None


def read_record(run_dir: str | os.PathLike, stage: str) -> dict[str, Any] | None:
    """The provenance record of ``stage``, or None (never recorded, or unreadable)."""
    try:
        record = run_files.read_json(_record_path(Path(run_dir), stage))
    except AtlasError:
        return None
    return record if isinstance(record, dict) else None


def training_data(run_dir: str | os.PathLike) -> dict[str, str | None]:
    """``{name: sha1}`` of the files training reads (instances, tokenizer), as they are now.

    Every checkpoint stores this as ``trained_on`` (``core.learning.training``), so a checkpoint
    names the data it was trained on even if ``provenance/`` is lost or rewritten.
    """
    run = Path(run_dir)
    return {
        name: (fingerprint(run / name) or {}).get("sha1")
        for name in (run_files.INSTANCES, run_files.TOKENIZER_DIR)
    }


def foreign_checkpoint(run_dir: str | os.PathLike) -> str | None:
    """Which checkpoint of the manifest was trained on other data than the run holds, or None.

    Checkpoints from before ``trained_on`` existed (and shipped runs without checkpoints)
    name no data, so nothing says they are foreign.
    """
    run = Path(run_dir)
    try:
        entries = run_files.load_manifest(run).get("checkpoints") or []
    except AtlasError:
        return None
    now: dict[str, str | None] | None = None
    for entry in entries if isinstance(entries, list) else ():
        path = run / str(entry.get("path", "")) if isinstance(entry, dict) else None
        if path is None or not (path / _EPOCH_STATE).is_file():
            continue
        try:
            trained_on = run_files.read_json(path / _EPOCH_STATE).get("trained_on")
        except (AtlasError, AttributeError):
            continue
        now = training_data(run) if now is None else now
        if isinstance(trained_on, dict) and trained_on != now:
            changed = [k for k in now if trained_on.get(k) != now[k]]
            return (
                f"{entry['path']} was trained on another {' and '.join(changed)} than the run holds"
            )
    return None


def stale_reason(run_dir: str | os.PathLike, stage: str) -> str | None:
    """One sentence saying which input of ``stage`` changed since it ran, or None.

    A stage without a record (made before provenance existed) or whose inputs are absent
    (a shipped run without checkpoints) is not reported stale: nothing says it is. The
    train stage is also stale when a checkpoint names other data than the run's
    (:func:`foreign_checkpoint`): its record cannot vouch for checkpoints it did not make.
    """
    run = Path(run_dir)
    if stage == "train" and (foreign := foreign_checkpoint(run)):
        return foreign
    record = read_record(run, stage)
    if record is None or not isinstance(record.get("inputs"), dict):
        return None
    for name, recorded in record["inputs"].items():
        if recorded is None:
            if (run / name).exists():
                return f"{name} appeared after {stage} ran"
            continue
        if same_content(recorded, run / name) is False:
            return f"{name} changed after {stage} ran"
    return None


def check_upstream(run_dir: str | os.PathLike, stage: str) -> None:
    """Refuse to compute ``stage`` from a stage that is stale (:data:`UPSTREAM`).

    TracIn over checkpoints trained on other instances, or an analysis of a matrix made
    before the instances changed, would be a mix that no later check could see: the
    stage's own record would name the inputs as they are now.
    """
    run = Path(run_dir)
    for up in UPSTREAM.get(stage, ()):
        if reason := stale_reason(run, up):
            raise AtlasError(
                f"The {up} stage of {run} is stale ({reason}), so its {stage} stage would "
                f"mix old and new inputs; remake it first with: {run_files.rebuild_phrase(run, up)}"
            )


def stale_stages(run_dir: str | os.PathLike) -> dict[str, str]:
    """``{stage: reason}`` for every stage recorded complete whose inputs changed since."""
    run = Path(run_dir)
    try:
        stages = run_files.load_manifest(run).get("stages") or {}
    except AtlasError:
        return {}
    out = {}
    for stage, entry in stages.items() if isinstance(stages, dict) else ():
        if isinstance(entry, dict) and entry.get("status") == run_files.STATUS_COMPLETE:
            reason = stale_reason(run, stage)
            if reason:
                out[stage] = reason
    if (run / run_files.CLEANING_DIR).is_dir() and (reason := stale_reason(run, "clean")):
        out["clean"] = reason
    return out
