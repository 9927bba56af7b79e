"""Starting, watching and cancelling ``python -m core run`` from the app, plus upload validation.

A study runs as a detached subprocess (its own session, so it outlives a page
reload or a closed tab). Its state lives on disk in ``<cache>/.jobs/``: a JSON
pid file, the log, and the exit code written by a tiny shell wrapper. The app
never imports torch: it only starts the CLI and reads files. Uploaded files are
parsed with pandas as data only (CSV/TSV/JSONL), never executed or unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core import commands, datasets, locks, store, validation
from core.cli import check_study_argv
from core.errors import AtlasError
from core.executors import PROGRESS
from core.sweep import CELLS_DIR, cell_name

ENV_STUDY_CMD = "ATLAS_STUDY_CMD"  # replaces "python -m core" (tests use a stand-in CLI)
ENV_MAX_UPLOAD_MB = "ATLAS_MAX_UPLOAD_MB"
ENV_READONLY = "ATLAS_READONLY"  # 1: a viewer-only host (no uploads, no jobs)
ENV_MAX_JOBS = "ATLAS_MAX_JOBS"  # jobs running at once; more wait in a queue
DEFAULT_MAX_UPLOAD_MB = 50  # keep equal to server.maxUploadSize in .streamlit/config.toml
DEFAULT_MAX_JOBS = 1
DEFAULT_FLIP_RATES = "0,0.025,0.05,0.1,0.2,0.3,0.4"
JOBS_DIR = ".jobs"  # dot-folders are skipped by store.list_runs
UPLOADS_DIR = ".uploads"
NAME_RE = validation.NAME_RE  # one rule for the CLI's --name and this form
UPLOAD_TYPES = ("csv", "tsv", "jsonl")
REPO = Path(__file__).resolve().parents[1]

# The wrapper records the exit status, which a detached process cannot report otherwise.
# The command arrives as "$@", never through the shell's parser.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_WRAPPER = 'rcfile="$1"; shift; "$@"; echo $? > "$rcfile"'


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


def readonly() -> bool:
    """Whether this host only shows runs ($ATLAS_READONLY set to 1/true/yes)."""
    return os.environ.get(ENV_READONLY, "").strip().lower() in ("1", "true", "yes", "on")


def max_jobs() -> int:
    """How many jobs may run at once ($ATLAS_MAX_JOBS, default 1); later ones are queued."""
    try:
        return max(1, int(os.environ.get(ENV_MAX_JOBS, DEFAULT_MAX_JOBS)))
    except ValueError:
        return DEFAULT_MAX_JOBS


def compute_stack() -> str | None:
    """None when this host can compute runs (torch importable), else why not, in one sentence.

    Only asks the import system whether the module exists; nothing is imported here (the
    app never imports torch). $ATLAS_STUDY_CMD (a stand-in CLI) counts as a compute stack.
    """
    if os.environ.get(ENV_STUDY_CMD):
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
    """A run name usable as a folder name, or :class:`AtlasError` (core.validation's rule)."""
    validation.check_name(name, flag="the run name")
    return name


def core_command() -> list[str]:
    """The CLI prefix: ``python -m core`` with this interpreter, or $ATLAS_STUDY_CMD."""
    env = os.environ.get(ENV_STUDY_CMD)
    return shlex.split(env) if env else [sys.executable, "-m", "core"]


def build_command(req: StudyRequest, cache: Path) -> list[str]:
    """The ``core run`` argument list for a request (an argv list: nothing is shell-parsed)."""
    check_name(req.name)
    cmd = [
        *core_command(),
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
    cmd = [*core_command(), "sweep", "--preset", req.preset, "--name", req.name]
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


@dataclass
class Job:
    """A study subprocess as recorded on disk."""

    name: str
    folder: Path

    @property
    def pid_file(self) -> Path:
        return self.folder / f"{self.name}.pid.json"

    @property
    def log_file(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def rc_file(self) -> Path:
        return self.folder / f"{self.name}.rc"

    @property
    def cancel_file(self) -> Path:
        return self.folder / f"{self.name}.cancelled"

    @property
    def queue_file(self) -> Path:
        return self.folder / f"{self.name}.queued.json"

    def info(self) -> dict[str, Any]:
        """The pid file's content ({} when absent or unreadable)."""
        try:
            return json.loads(self.pid_file.read_text("utf-8"))
        except (OSError, ValueError):
            return {}

    def kind(self) -> str:
        """'run' or 'sweep', from the pid file or the queue record."""
        kind = self.info().get("kind")
        if kind is None:
            try:
                kind = json.loads(self.queue_file.read_text("utf-8")).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
        return str(kind or "run")

    def returncode(self) -> int | None:
        """Exit status written by the wrapper, or None."""
        try:
            return int(self.rc_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        """Whether the recorded process is still running (pid reuse guarded by start time)."""
        info = self.info()
        pid = info.get("pid")
        if not pid:
            return False
        _reap(int(pid))
        start = _proc_start(int(pid))
        if start is None:
            return False
        return info.get("proc_start") in (None, start)

    def state(self) -> str:
        """running | queued | finished | failed | cancelled | stopped (killed, no exit status)."""
        if self.alive():
            return "running"
        if self.queue_file.exists():
            return "queued"
        rc = self.returncode()
        if self.cancel_file.exists():
            return "cancelled"
        if rc is None:
            return "stopped"
        return "finished" if rc == 0 else "failed"


def job(cache: Path, name: str) -> Job:
    """The job record of a run name (it may not exist yet)."""
    return Job(check_name(name), Path(cache) / JOBS_DIR)


def list_jobs(cache: Path) -> list[Job]:
    """All recorded jobs, newest first."""
    folder = Path(cache) / JOBS_DIR
    if not folder.is_dir():
        return []
    found: dict[str, float] = {}
    for suffix in (".pid.json", ".queued.json"):
        for p in folder.glob(f"*{suffix}"):
            with contextlib.suppress(OSError):
                name = p.name[: -len(suffix)]
                found[name] = max(found.get(name, 0.0), p.stat().st_mtime)
    return [Job(n, folder) for n in sorted(found, key=found.get, reverse=True)]


def running_jobs(cache: Path) -> list[Job]:
    """Jobs whose process is alive."""
    return [j for j in list_jobs(cache) if j.alive()]


def queued_jobs(cache: Path) -> list[Job]:
    """Jobs waiting for a free slot, oldest first (the order they will start in)."""
    folder = Path(cache) / JOBS_DIR
    if not folder.is_dir():
        return []
    files = []
    for p in folder.glob("*.queued.json"):
        with contextlib.suppress(OSError):
            files.append((p.stat().st_mtime, p.name[: -len(".queued.json")]))
    return [Job(n, folder) for _, n in sorted(files)]


@contextlib.contextmanager
def _slots_lock(cache: Path):
    """One session at a time counts the running jobs and starts one (no cap overrun)."""
    import fcntl

    folder = Path(cache) / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".slots.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start(cache: Path, req: StudyRequest | SweepRequest) -> Job:
    """Check a run or sweep request as the CLI would, then start it detached, or queue it when
    $ATLAS_MAX_JOBS jobs already run; refused on a read-only host, for a name that is running
    or queued, and for a complete run or sweep of that name."""
    if readonly():
        raise AtlasError("This is a read-only demo: studies cannot be started here.")
    cache = Path(cache)
    j = job(cache, req.name)
    if j.alive() or j.queue_file.exists():
        raise AtlasError(
            f"'{req.name}' is already running or queued; cancel it first or choose another name."
        )
    kind = "sweep" if isinstance(req, SweepRequest) else "run"
    manifest = cache / req.name / store.MANIFEST
    if manifest.exists():
        try:
            status = store.read_json(manifest).get("status")
        except (AtlasError, AttributeError):
            status = None
        if status == store.STATUS_COMPLETE:
            raise AtlasError(
                f"A complete {kind} named '{req.name}' already exists; choose another name."
            )
    cmd = build_sweep_command(req, cache) if kind == "sweep" else build_command(req, cache)
    # -- hardening hook (issue 15): the CLI's own checks and its run lock, before starting --
    owner = locks.lock_owner(cache / req.name)
    if owner is not None:
        raise AtlasError(f"'{req.name}' is already running (pid {owner}); choose another name.")
    if kind == "run":
        for flag, column in (
            ("--text-col", req.text_col),
            ("--label-col", req.label_col),
            ("--rating-col", req.rating_col),
        ):
            validation.check_column(flag, column)  # before argparse would misread '--x'
    check_study_argv(cmd[len(core_command()) :])
    # -- end of hook --
    j.folder.mkdir(parents=True, exist_ok=True)
    for stale in (j.rc_file, j.cancel_file):
        stale.unlink(missing_ok=True)
    record = {"command": cmd, "kind": kind, "run_dir": str(cache / req.name)}
    with _slots_lock(cache):
        if len(running_jobs(cache)) < max_jobs() and not queued_jobs(cache):
            _launch(j, record)
        else:
            record["queued"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            store.write_json(j.queue_file, record)
    return j


def dispatch(cache: Path) -> list[str]:
    """Start queued jobs, oldest first, while fewer than $ATLAS_MAX_JOBS run; their names.

    The pages call this on every redraw (and every two seconds while a job runs or waits),
    so a queue moves on as long as someone has the Run-a-study or Noise-sweep page open.
    """
    cache = Path(cache)
    started: list[str] = []
    if readonly() or not queued_jobs(cache):
        return started
    with _slots_lock(cache):
        for j in queued_jobs(cache):
            if len(running_jobs(cache)) >= max_jobs():
                break
            try:
                record = json.loads(j.queue_file.read_text("utf-8"))
            except (OSError, ValueError):
                j.queue_file.unlink(missing_ok=True)
                continue
            j.queue_file.unlink(missing_ok=True)
            _launch(j, record)
            started.append(j.name)
    return started


def _launch(j: Job, record: dict[str, Any]) -> None:
    """Start the recorded command detached and write its pid file."""
    cmd = [str(c) for c in record["command"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(j.log_file, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            ["sh", "-c", _WRAPPER, "sh", str(j.rc_file), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
            start_new_session=True,  # its own process group: survives reloads, cancellable as a whole
        )
    store.write_json(
        j.pid_file,
        {
            "pid": proc.pid,
            "proc_start": _proc_start(proc.pid),
            "command": cmd,
            "kind": record.get("kind", "run"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": record.get("run_dir"),
        },
    )


def cancel(j: Job) -> bool:
    """Stop a running job's whole process group, or take a queued one off the queue; True when
    something was stopped."""
    if j.queue_file.exists() and not j.alive():
        j.queue_file.unlink(missing_ok=True)
        j.cancel_file.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return True
    if not j.alive():
        return False
    pid = int(j.info()["pid"])
    j.cancel_file.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last lines of a log, with progress-bar redraws (carriage returns) collapsed."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            raw = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    out = [
        ln.split("\r")[-1] if "\r" in ln.rstrip("\r") else ln.rstrip("\r") for ln in raw.split("\n")
    ]
    return "\n".join(out[-lines:])


def progress(run_dir: Path) -> dict[str, Any]:
    """Stage statuses and epochs done, read from the run's manifest (empty before it exists)."""
    path = Path(run_dir) / store.MANIFEST
    if not path.exists():
        return {}
    try:
        m = store.read_json(path)
    except AtlasError:
        return {}
    epochs_total = (m.get("config") or {}).get("epochs") or 0
    status = store.run_status(run_dir, m) if isinstance(m, dict) else None
    return {
        "status": status,
        "note": commands.status_note(run_dir, m, status) if status else None,
        "stages": {k: (v or {}).get("status") for k, v in (m.get("stages") or {}).items()},
        "epochs_done": len(m.get("epochs") or []),
        "epochs_total": int(epochs_total),
        "error": m.get("error"),
    }


def sweep_progress(sweep_dir: Path) -> dict[str, Any]:
    """Cells trained so far of a sweep, read from its manifest and cell folders."""
    path = Path(sweep_dir) / store.MANIFEST
    if not path.exists():
        return {}
    try:
        m = store.read_json(path)
    except AtlasError:
        return {}
    if not isinstance(m, dict):
        return {}
    rates, seeds = m.get("flip_rates") or [], m.get("seeds") or []
    cells = Path(sweep_dir) / CELLS_DIR
    done = 0
    for r in rates:
        for sd in seeds:
            with contextlib.suppress(Exception):
                done += bool(store.stage_complete(cells / cell_name(float(r), int(sd)), "train"))
    status = store.run_status(sweep_dir, m)
    return {
        "status": status,
        "note": commands.status_note(sweep_dir, m, status),
        "cells_done": done,
        "cells_total": len(rates) * len(seeds),
        "error": m.get("error"),
    }


def task_progress(folder: Path) -> dict[str, Any]:
    """The task progress the CLI writes (core.executors: ``<folder>/progress.json``): stage,
    executor, tasks done of total and per-worker throughput; empty before any."""
    try:
        m = store.read_json(Path(folder) / PROGRESS)
    except AtlasError:
        return {}
    if not isinstance(m, dict) or not isinstance(m.get("total"), int):
        return {}
    workers = [w for w in m.get("workers") or [] if isinstance(w, dict)]
    return {**m, "workers": workers}


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
    """Parse an uploaded CSV / TSV / JSONL exactly as ``core run`` will (core.datasets.read_table),
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
    keeps: the labelling and checks of core.datasets.label_table, never a second copy."""
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


# -- process helpers -----------------------------------------------------------------------------


def _proc_start(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks, None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform.startswith("linux"):
            return None
        try:  # no /proc (macOS): fall back to a signal-0 probe
            os.kill(pid, 0)
            return 0
        except OSError:
            return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # zombie: finished, not yet reaped
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    """Collect the exit of a child this process started, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
