"""Jobs: ``python -m core run|sweep`` started detached, queued, watched and cancelled.

A job runs as a detached subprocess (its own session, so it outlives the process that
started it: a page reload, a closed tab). Its state lives on disk in ``<cache>/.jobs/``: a
JSON pid file, the log, and the exit code written by a tiny shell wrapper; a job that waits
for a free slot ($ATLAS_MAX_JOBS) has a queue record instead, and :func:`dispatch` starts it.
The app's Run-a-study and Noise-sweep pages drive this module once their forms have become
checked command lines; it imports no torch and no Streamlit: it only starts the CLI and
reads files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.execution.executors import PROGRESS
from core.options import commands, validation
from core.orchestration.sweep import CELLS_DIR, cell_name
from core.storage import locks, store
from core.storage.errors import AtlasError

ENV_STUDY_CMD = "ATLAS_STUDY_CMD"  # replaces "python -m core" (tests use a stand-in CLI)
ENV_READONLY = "ATLAS_READONLY"  # 1: a viewer-only host (no uploads, no jobs)
ENV_MAX_JOBS = "ATLAS_MAX_JOBS"  # jobs running at once; more wait in a queue
DEFAULT_MAX_JOBS = 1
JOBS_DIR = ".jobs"  # dot-folders are skipped by commands.list_runs
REPO = Path(__file__).resolve().parents[2]  # the checkout: a job's command runs here
# The wrapper records the exit status, which a detached process cannot report otherwise.
# The command arrives as "$@", never through the shell's parser.
_WRAPPER = 'rcfile="$1"; shift; "$@"; echo $? > "$rcfile"'


def readonly() -> bool:
    """Whether this host only shows runs ($ATLAS_READONLY set to 1/true/yes)."""
    return os.environ.get(ENV_READONLY, "").strip().lower() in ("1", "true", "yes", "on")


def max_jobs() -> int:
    """How many jobs may run at once ($ATLAS_MAX_JOBS, default 1); later ones are queued."""
    try:
        return max(1, int(os.environ.get(ENV_MAX_JOBS, DEFAULT_MAX_JOBS)))
    except ValueError:
        return DEFAULT_MAX_JOBS


def core_command() -> list[str]:
    """The CLI prefix: ``python -m core`` with this interpreter, or $ATLAS_STUDY_CMD."""
    env = os.environ.get(ENV_STUDY_CMD)
    return shlex.split(env) if env else [sys.executable, "-m", "core"]


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
    return Job(validation.check_name(name, flag="the run name"), Path(cache) / JOBS_DIR)


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


def check_free(cache: Path, name: str, kind: str) -> Job:
    """The job of a run or sweep ``name`` about to start, or :class:`AtlasError` saying why it
    cannot: a read-only host, a job of that name running or queued, a complete run or sweep of
    that name, or a process (a CLI in a terminal) that holds its folder."""
    if readonly():
        raise AtlasError("This is a read-only demo: studies cannot be started here.")
    cache = Path(cache)
    j = job(cache, name)
    if j.alive() or j.queue_file.exists():
        raise AtlasError(
            f"'{name}' is already running or queued; cancel it first or choose another name."
        )
    manifest = cache / name / store.MANIFEST
    if manifest.exists():
        try:
            status = store.read_json(manifest).get("status")
        except (AtlasError, AttributeError):
            status = None
        if status == store.STATUS_COMPLETE:
            raise AtlasError(
                f"A complete {kind} named '{name}' already exists; choose another name."
            )
    owner = locks.lock_owner(cache / name)
    if owner is not None:
        raise AtlasError(f"'{name}' is already running (pid {owner}); choose another name.")
    return j


def submit(j: Job, kind: str, command: list[str], run_dir: Path) -> Job:
    """Start ``command`` (a checked ``core run`` / ``core sweep`` argv) as job ``j``, detached,
    or queue it when $ATLAS_MAX_JOBS jobs already run or others wait; :func:`check_free` first."""
    cache = j.folder.parent
    j.folder.mkdir(parents=True, exist_ok=True)
    for stale in (j.rc_file, j.cancel_file):
        stale.unlink(missing_ok=True)
    record = {"command": command, "kind": kind, "run_dir": str(run_dir)}
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
    """The task progress the CLI writes (core.execution.executors: ``<folder>/progress.json``): stage,
    executor, tasks done of total and per-worker throughput; empty before any."""
    try:
        m = store.read_json(Path(folder) / PROGRESS)
    except AtlasError:
        return {}
    if not isinstance(m, dict) or not isinstance(m.get("total"), int):
        return {}
    workers = [w for w in m.get("workers") or [] if isinstance(w, dict)]
    return {**m, "workers": workers}


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
