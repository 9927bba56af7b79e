"""The app's side of starting studies: forms become command lines, and uploads are checked.

The Run-a-study and Noise-sweep forms become ``python -m core run`` / ``sweep`` argument
lists, checked exactly as the CLI checks them, and :mod:`core.orchestration.jobs` starts, queues, watches
and cancels them as detached subprocesses. The app never imports torch: it only starts the
CLI and reads files. Uploaded files are parsed with pandas as data only (CSV/TSV/JSONL),
never executed or unpickled.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.cli import check_study_argv
from core.inputs import datasets
from core.options import validation
from core.orchestration import jobs
from core.storage import store
from core.storage.errors import AtlasError

ENV_MAX_UPLOAD_MB = "ATLAS_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 50  # keep equal to server.maxUploadSize in .streamlit/config.toml
DEFAULT_FLIP_RATES = "0,0.025,0.05,0.1,0.2,0.3,0.4"
UPLOADS_DIR = ".uploads"
NAME_RE = validation.NAME_RE  # one rule for the CLI's --name and this form
UPLOAD_TYPES = ("csv", "tsv", "jsonl")


@dataclass
class StudyRequest:
    """What the Run a study form collects; becomes a ``core run`` command line."""

    name: str
    preset: str = "quick"
    flip_rate: float = 0.025
    seed: int = 0
    model: str = "tiny"
    dataset: str | None = "amazon-reviews"
    data_file: str | None = None
    text_col: str | None = None
    label_col: str | None = None
    rating_col: str | None = None
    pos_min: float | None = None
    neg_max: float | None = None
    # More CLI options, e.g. {"epochs": 3, "n-train": 400, "detect": True}; None/False are left out.
    extra: dict[str, Any] = field(default_factory=dict)


def max_upload_mb() -> int:
    """Upload size limit in MB ($ATLAS_MAX_UPLOAD_MB, default 50)."""
    try:
        return max(1, int(os.environ.get(ENV_MAX_UPLOAD_MB, DEFAULT_MAX_UPLOAD_MB)))
    except ValueError:
        return DEFAULT_MAX_UPLOAD_MB


def compute_stack() -> str | None:
    """None when this host can compute runs (torch importable), else why not, in one sentence.

    Only asks the import system whether the module exists; nothing is imported here (the
    app never imports torch). $ATLAS_STUDY_CMD (a stand-in CLI) counts as a compute stack.
    """
    if os.environ.get(jobs.ENV_STUDY_CMD):
        return None
    import importlib.util

    missing = []
    for module in ("torch", "transformers"):
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except (ImportError, ValueError):
            missing.append(module)
    if not missing:
        return None
    return (
        f"This host has no compute stack ({' and '.join(missing)} not installed): it serves the "
        "stored runs only. To run studies, install requirements.txt (see the README)."
    )


def check_name(name: str) -> str:
    """A run name usable as a folder name, or :class:`AtlasError` (core.options.validation's rule)."""
    validation.check_name(name, flag="the run name")
    return name


def build_command(req: StudyRequest, cache: Path) -> list[str]:
    """The ``core run`` argument list for a request (an argv list: nothing is shell-parsed)."""
    check_name(req.name)
    cmd = [
        *jobs.core_command(),
        "run",
        "--preset",
        req.preset,
        "--name",
        req.name,
        "--cache",
        str(cache),
    ]
    cmd += [
        "--flip-rate",
        f"{float(req.flip_rate):g}",
        "--seed",
        str(int(req.seed)),
        "--model",
        req.model,
    ]
    if req.data_file:  # the CLI takes a file path where it takes a built-in dataset's name
        cmd += ["--dataset", req.data_file, "--text-col", str(req.text_col)]
        if req.label_col:
            cmd += ["--label-col", req.label_col]
        else:
            cmd += [
                "--rating-col",
                str(req.rating_col),
                "--pos-min",
                f"{req.pos_min:g}",
                "--neg-max",
                f"{req.neg_max:g}",
            ]
    elif req.dataset:
        cmd += ["--dataset", req.dataset]
    for key, value in req.extra.items():
        if value is True:  # a switch such as --detect
            cmd.append(f"--{key}")
        elif value is not None and value is not False:
            cmd += [f"--{key}", str(value)]
    return cmd


@dataclass
class SweepRequest:
    """What the Noise sweep form collects; becomes a ``core sweep`` command line."""

    name: str
    preset: str = "quick"
    flip_rates: str = DEFAULT_FLIP_RATES
    seeds: int = 3
    dataset: str = "amazon-reviews"
    model: str | None = None
    jobs: int = 1  # parallel cells inside the sweep (1: gentle on a shared host)
    extra: dict[str, Any] = field(default_factory=dict)


def build_sweep_command(req: SweepRequest, cache: Path) -> list[str]:
    """The ``core sweep`` argument list for a request (an argv list: nothing is shell-parsed)."""
    check_name(req.name)
    cmd = [*jobs.core_command(), "sweep", "--preset", req.preset, "--name", req.name]
    cmd += ["--cache", str(cache), "--flip-rates", req.flip_rates, "--seeds", str(int(req.seeds))]
    cmd += ["--dataset", req.dataset, "--jobs", str(int(req.jobs))]
    if req.model:
        cmd += ["--model", req.model]
    for key, value in req.extra.items():
        if value is True:
            cmd.append(f"--{key}")
        elif value is not None and value is not False:
            cmd += [f"--{key}", str(value)]
    return cmd


def start(cache: Path, req: StudyRequest | SweepRequest) -> jobs.Job:
    """Check a run or sweep request as the CLI would, then start it detached, or queue it when
    $ATLAS_MAX_JOBS jobs already run (:mod:`core.orchestration.jobs`); refused on a read-only host, for a name
    that is running or queued, and for a complete run or sweep of that name."""
    kind = "sweep" if isinstance(req, SweepRequest) else "run"
    j = jobs.check_free(Path(cache), req.name, kind)
    cmd = build_sweep_command(req, cache) if kind == "sweep" else build_command(req, cache)
    # The CLI's own checks, so the form refuses what `core run` would, with the same sentence.
    if kind == "run":
        for flag, column in (
            ("--text-col", req.text_col),
            ("--label-col", req.label_col),
            ("--rating-col", req.rating_col),
        ):
            validation.check_column(flag, column)  # before argparse would misread '--x'
    check_study_argv(cmd[len(jobs.core_command()) :])
    return jobs.submit(j, kind, cmd, Path(cache) / req.name)


def executor_choices() -> list[str]:
    """Executors a job started here may use: ray only where Ray is installed (never imported)."""
    import importlib.util

    out = ["local", "processes"]
    try:
        if importlib.util.find_spec("ray") is not None:
            out.append("ray")
    except (ImportError, ValueError):
        pass
    return out


# -- uploads -------------------------------------------------------------------------------------


def parse_upload(raw: bytes, filename: str) -> pd.DataFrame:
    """Parse an uploaded CSV / TSV / JSONL exactly as ``core run`` will (core.inputs.datasets.read_table),
    or raise :class:`AtlasError`; the upload limit is checked first."""
    limit = max_upload_mb() * 1024 * 1024
    if len(raw) > limit:
        raise AtlasError(f"The file is {len(raw) / 1e6:.1f} MB; the limit is {max_upload_mb()} MB.")
    ext = Path(filename).suffix.lower().lstrip(".")
    if ext not in UPLOAD_TYPES:
        raise AtlasError(f"Upload a .csv, .tsv or .jsonl file, not '.{ext}'.")
    df, _, _ = datasets.read_table(raw, Path(filename).name)
    if len(df.columns) < 2:
        raise AtlasError(
            "The file needs at least two columns (a text and a label or rating) and one row."
        )
    return df


def guess_text_column(df: pd.DataFrame) -> str:
    """The column with the longest strings on average (usually the text)."""
    best, best_len = str(df.columns[0]), -1.0
    for c in df.columns:
        # pandas 3 reads text as its "str" dtype, older pandas as object
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c]):
            mean = df[c].astype(str).str.len().mean()
            if mean > best_len:
                best, best_len = str(c), mean
    return best


def validate_table(
    df: pd.DataFrame,
    text_col: str,
    *,
    label_col: str | None = None,
    rating_col: str | None = None,
    pos_min: float | None = None,
    neg_max: float | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """What ``core run`` would say about this table (empty list when it would run) and what it
    keeps: the labelling and checks of core.inputs.datasets.label_table, never a second copy."""
    summary: dict[str, Any] = {"rows": len(df)}
    try:
        loaded = datasets.label_table(
            df, text_col, label_col, rating_col, pos_min, neg_max, source="the uploaded file"
        )
    except AtlasError as exc:
        return [str(exc)], summary
    dropped = loaded.info.get("dropped", {})
    summary.update(
        kept=int(loaded.info["n_kept"]),
        classes=dict(loaded.info["class_counts"]),
        duplicate_texts=int(dropped.get("duplicate_text", 0)),
        dropped=dict(dropped),
    )
    if rating_col:
        summary["dropped_between"] = int(dropped.get("neutral_rating", 0))
    return [], summary


def save_upload(cache: Path, raw: bytes, filename: str) -> Path:
    """Store an upload under ``<cache>/.uploads/`` by content hash (the original is never touched)."""
    digest = hashlib.sha256(raw).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(filename).stem)[:40] or "upload"
    ext = Path(filename).suffix.lower()
    path = Path(cache) / UPLOADS_DIR / f"{digest}_{stem}{ext}"
    if not path.exists():
        with store.atomic_path(path) as tmp:
            tmp.write_bytes(raw)
    return path
