"""Executors: run a list of independent tasks here, in a process pool, or on a Ray cluster.

The units are the public tasks of the engine (:func:`core.influence.plan`), the sweep
(:func:`core.orchestration.sweep.plan_cells`), the cleaning lab (:func:`core.cleaning.interventions.plan_arms`) and
detector 2 (:func:`core.cleaning.detectors.plan_retraining`). Each kind is described once by a
:class:`Work` (how to compute a task, its name, the folder it reads and writes); an
executor only schedules tasks, so the numbers are the same whichever runs them.

- ``local``: one after the other in this process (the default, the behaviour before executors).
- ``processes``: a pool of ``--workers`` spawned processes on this machine.
- ``ray``: Ray tasks, on a local Ray instance or a cluster (``--ray-address auto`` or
  ``ray://host:port``). ``ray`` is imported only here, only when this executor is chosen;
  :func:`check_executor` refuses the choice without Ray in one sentence, before torch loads.

The run store stays the single place of results: every task writes its files atomically
under the run (or sweep) folder and is skipped when they are present, so a run killed on a
cluster resumes on the cluster or on one machine. On Ray the folder is either *shared*
(the same path on every node: a shared filesystem given as ``--cache``) or not: then the
driver ships the task's inputs through Ray's object store, the task computes into a scratch
copy on its node and returns the files it made, and the driver writes them atomically
(``--ray-shared auto`` finds out per node; ``yes``/``no`` force it).

Progress: one bar over all tasks with per-worker throughput on stderr, and the same
figures in ``<folder>/progress.json`` (read by the app's Run-a-study page). A failed task
is retried by Ray (``max_retries``, application errors included); a task that fails
every attempt ends the command with :class:`TaskFailed`, naming the task and its error,
after the tasks already running have finished and written their files. A task's
:class:`~core.storage.errors.AtlasError` (bad input, changed run) is not retried.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.storage import store
from core.storage.errors import AtlasError

EXECUTORS = ("local", "processes", "ray")
SHARED_MODES = ("auto", "yes", "no")
RAY_MISSING = (
    "--executor ray needs Ray, which is not installed here: pip install -r requirements-ray.txt"
)
MAX_RETRIES = 2  # Ray retries of a failed task: three attempts in all
PROGRESS = "progress.json"  # <folder>/progress.json: the last command's tasks, per worker
MAX_WORKERS = 100_000
# Test hooks (environment variables read by the driver and passed to the tasks):
ENV_FAIL = "ATLAS_TEST_FAIL_TASK"  # "<task name>" fails every attempt, "<task name>:N" the first N
ENV_FAIL_DIR = "ATLAS_TEST_FAIL_DIR"  # where the hooked task's attempts are counted (files)
ENV_STOP = "ATLAS_TEST_STOP_AFTER"  # "N": the driver kills itself (SIGKILL) after N finished tasks
ENV_CRASH = "ATLAS_TEST_CRASH_TASK"  # "<task name>": its worker dies of SIGSEGV (a native crash)
_STAGE_ROOT = "atlas-ray-stage"  # scratch copies of unshared run folders, under the node's tmp


# How a TaskFailed sentence ends; the CLI puts the command it ran in place of "the command".
RESUME = "rerun the command to resume"


class TaskFailed(AtlasError):
    """A task failed (on Ray: every attempt); the sentence names the task and its error.

    The CLI reports it in one line with exit status 1 (not 2: the input was fine).
    """


@dataclass(frozen=True)
class ExecutorSpec:
    """The executor chosen on the command line (validated by :func:`check_executor`)."""

    kind: str = "local"
    workers: int = 0  # processes: pool size (0: one per two cores); ray: tasks at once (0: all)
    address: str | None = None  # ray: None starts a local instance; "auto" / "ray://host:port"
    shared: str = "auto"  # ray: does every node see the folder at the same path?
    retries: int = MAX_RETRIES


LOCAL = ExecutorSpec()


def expected_workers(spec: ExecutorSpec) -> int | None:
    """How many tasks ``spec`` runs at once, or None when only the cluster knows.

    ``processes`` without ``--workers`` uses one per two cores, a local Ray instance one per
    core; a cluster joined with ``--ray-address`` and no ``--workers`` is sized by Ray.
    """
    if spec.kind == "local":
        return 1
    if spec.workers:
        return spec.workers
    if spec.kind == "processes":
        return max(1, (os.cpu_count() or 1) // 2)
    if spec.address is None:
        return os.cpu_count() or 1
    return None


def check_executor(
    kind: str | None = "local",
    workers: int | None = 0,
    address: str | None = None,
    shared: str | None = "auto",
) -> ExecutorSpec:
    """Validate the executor options (one sentence each) without importing Ray or torch."""
    kind = kind or "local"
    if kind not in EXECUTORS:
        raise AtlasError(f"--executor must be one of {', '.join(EXECUTORS)} (got '{kind}').")
    workers = 0 if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= MAX_WORKERS:
        raise AtlasError(
            f"--workers must be a whole number from 0 to {MAX_WORKERS} (got {workers})."
        )
    shared = shared or "auto"
    if shared not in SHARED_MODES:
        raise AtlasError(f"--ray-shared must be one of {', '.join(SHARED_MODES)} (got '{shared}').")
    if kind != "ray":
        if address is not None:
            raise AtlasError("--ray-address applies to --executor ray only.")
        if shared != "auto":
            raise AtlasError("--ray-shared applies to --executor ray only.")
        if kind == "local" and workers > 1:
            raise AtlasError(
                f"--workers {workers} needs --executor processes or ray; local runs one task at a time."
            )
    else:
        if address is not None and not (
            address == "auto" or address.startswith("ray://") or ":" in address
        ):
            raise AtlasError(
                f"--ray-address must be auto, ray://host:port or host:port (got '{address}')."
            )
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise AtlasError(RAY_MISSING + ".")
    return ExecutorSpec(kind, workers, address, shared)


@dataclass(frozen=True)
class Resources:
    """What one task asks of a worker (Ray schedules by it; other executors state it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None  # an upper estimate of the task's resident memory


def run_root(task: Any) -> str:
    """The folder of a task that keeps its run folder in a ``run`` field (a TracIn task, an
    arm of the cleaning lab, detector 2's retraining): :attr:`Work.root`'s default."""
    return task.run


def run_retarget(task: Any, run: str) -> Any:
    """The same ``run``-field task on another copy of its run folder: :attr:`Work.retarget`'s
    default."""
    return replace(task, run=run)


def run_inputs(task: Any) -> list[str]:
    """What every task on a run reads of it: the manifest, the instances and the tokenizer."""
    return [store.MANIFEST, store.INSTANCES, store.TOKENIZER_DIR]


@dataclass(frozen=True)
class Work:
    """How an executor runs one kind of task. Every field is a module-level function, so a
    ``Work`` pickles by reference into worker processes.

    ``compute(task, **kwargs)`` runs a task and returns its (small) result; ``root(task)``
    is the folder it reads and writes; ``retarget(task, folder)`` the same task on another
    copy of that folder (by default the task's ``run`` field); ``inputs``/``outputs`` the
    paths under the root it reads/writes (files or folders; used when the folder is not
    shared). ``overwrite``: returned files replace present ones (a whole retrained cell)
    instead of being skipped (shards).
    """

    stage: str
    compute: Callable[..., Any]
    name: Callable[[Any], str]
    inputs: Callable[[Any], Sequence[str]]
    outputs: Callable[[Any], Sequence[str]]
    root: Callable[[Any], str] = run_root
    retarget: Callable[[Any, str], Any] = run_retarget
    overwrite: bool = False


def retraining_work(
    stage: str,
    compute: Callable[..., Any],
    name: Callable[[Any], str],
    outputs: Callable[[Any], Sequence[str]],
) -> Work:
    """How an executor runs a retraining on a run (a cleaning arm, detector 2's nested
    retrainings): a ``run``-field task that reads :func:`run_inputs` and whose returned
    result replaces a present one (a retraining is redone whole, never in part)."""
    return Work(stage, compute, name, run_inputs, outputs, overwrite=True)


@dataclass
class _Worker:
    tasks: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    first: float = 0.0
    last: float = 0.0
    peak_rss_mb: float | None = None


@dataclass
class Report:
    """What a :func:`run_tasks` call did, per worker (also written to ``progress.json``)."""

    stage: str
    executor: str
    total: int
    done: int = 0
    started: float = field(default_factory=time.time)
    workers: dict[str, _Worker] = field(default_factory=dict)
    shared: bool | None = None
    resources: Resources = field(default_factory=Resources)

    def add(
        self,
        worker: str,
        seconds: float,
        peak_rss_mb: float | None = None,
        cpu_seconds: float | None = None,
    ) -> None:
        """Count one finished task of ``worker`` that took ``seconds``.

        ``peak_rss_mb`` is the worker process's peak resident memory after the task;
        ``cpu_seconds`` the CPU time the worker process spent on it (all its threads).
        """
        now = time.time()
        w = self.workers.setdefault(worker, _Worker(first=now - seconds))
        w.tasks += 1
        w.busy_s += seconds
        w.cpu_s += cpu_seconds or 0.0
        w.last = now
        if peak_rss_mb is not None:
            w.peak_rss_mb = max(w.peak_rss_mb or 0.0, float(peak_rss_mb))
        self.done += 1

    def peak_rss_mb(self) -> float | None:
        """The largest peak resident memory of any worker process (MiB), if reported."""
        peaks = [w.peak_rss_mb for w in self.workers.values() if w.peak_rss_mb is not None]
        return max(peaks) if peaks else None

    def rows(self) -> list[dict[str, Any]]:
        """Per worker: tasks, seconds (and CPU seconds) per task, tasks per minute of wall time,
        peak memory."""
        elapsed = max(time.time() - self.started, 1e-9)
        return [
            {
                "worker": name,
                "tasks": w.tasks,
                "seconds_per_task": round(w.busy_s / w.tasks, 3),
                # Below seconds_per_task when the machine's cores are shared with other work.
                "cpu_seconds_per_task": round(w.cpu_s / w.tasks, 3),
                "tasks_per_min": round(60 * w.tasks / elapsed, 2),
                "peak_rss_mb": w.peak_rss_mb,
            }
            for name, w in sorted(self.workers.items())
        ]

    def payload(self, state: str, error: str | None = None) -> dict[str, Any]:
        """The content of ``progress.json``."""
        return {
            "stage": self.stage,
            "executor": self.executor,
            "state": state,
            "done": self.done,
            "total": self.total,
            "elapsed_s": round(time.time() - self.started, 3),
            "shared": self.shared,
            "task_resources": {
                "cpus": self.resources.cpus,
                "gpus": self.resources.gpus,
                "memory_mb": self.resources.memory_mb,
            },
            "workers": self.rows(),
            "worker_peak_rss_mb": self.peak_rss_mb(),
            "error": error,
        }


class _Progress:
    """One bar over all tasks (stderr) plus ``progress.json``, written at most once a second."""

    def __init__(self, report: Report, folder: Path | None, show: bool) -> None:
        from tqdm.auto import tqdm

        self.report, self.folder, self.written = report, folder, 0.0
        self.bar = tqdm(
            total=report.total, desc=report.stage, unit="task", disable=not show, leave=False
        )
        self.write("running", force=True)

    def done(self, rec: dict[str, Any]) -> None:
        self.report.add(
            rec["worker"], rec["seconds"], rec.get("peak_rss_mb"), rec.get("cpu_seconds")
        )
        self.bar.update(1)
        rows = self.report.rows()
        shown = " ".join(f"{r['worker']}={r['tasks_per_min']:g}/min" for r in rows[:4])
        self.bar.set_postfix_str(shown + (f" +{len(rows) - 4} workers" if len(rows) > 4 else ""))
        self.write("running")

    def write(self, state: str, error: str | None = None, force: bool = False) -> None:
        if self.folder is None or (not force and time.time() - self.written < 1.0):
            return
        try:
            store.write_json(self.folder / PROGRESS, self.report.payload(state, error))
            self.written = time.time()
        except OSError:  # progress is a courtesy; never fail a run over it
            pass

    def close(self, state: str, error: str | None = None) -> None:
        self.bar.close()
        self.write(state, error, force=True)


def run_tasks(
    work: Work,
    tasks: Sequence[Any],
    spec: ExecutorSpec = LOCAL,
    *,
    kwargs: dict[str, Any] | None = None,
    resources: Resources = Resources(),  # noqa: B008 (frozen)
    progress: bool = True,
    folder: str | os.PathLike | None = None,
) -> list[Any]:
    """Run ``tasks`` with the chosen executor; their results, in task order.

    ``kwargs`` go to every ``work.compute`` call; ``folder`` receives ``progress.json``.
    Raises :class:`TaskFailed` for a task that failed (every attempt, on Ray) and the
    task's own :class:`AtlasError` as it is; files of finished tasks stay in place.
    """
    tasks = list(tasks)
    kwargs = dict(kwargs or {})
    report = Report(work.stage, spec.kind, len(tasks), resources=resources)
    prog = _Progress(report, Path(folder) if folder is not None else None, progress)
    hook = _fail_hook()
    try:
        if spec.kind == "ray":
            results = _run_ray(work, tasks, spec, kwargs, resources, prog, hook)
        elif spec.kind == "processes" and len(tasks) > 1:
            results = _run_processes(work, tasks, spec, kwargs, resources, prog, hook)
        else:
            results = _run_local(work, tasks, kwargs, resources, prog, hook)
    except BaseException as exc:
        prog.close("failed" if isinstance(exc, Exception) else "interrupted", str(exc) or None)
        raise
    prog.close("complete")
    return results


# --------------------------------------------------------------------------- in any worker


def _worker_name() -> str:
    """``host:pid`` of the process running a task."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_hook() -> tuple[str, int, str] | None:
    """The test hook $ATLAS_TEST_FAIL_TASK as (task name, failures, attempt-counter folder)."""
    value = os.environ.get(ENV_FAIL)
    if not value:
        return None
    name, _, times = value.partition(":")
    counter = os.environ.get(ENV_FAIL_DIR) or tempfile.mkdtemp(prefix="atlas-fail-")
    return name, int(times) if times else 1 << 30, counter


def _maybe_fail(name: str, hook: tuple[str, int, str] | None) -> None:
    """Raise for the hooked task (its first N attempts); attempts are counted in files."""
    if hook is None or hook[0] != name:
        return
    _, times, counter = hook
    attempt = len(list(Path(counter).glob("attempt-*"))) + 1
    (Path(counter) / f"attempt-{attempt}-{os.getpid()}").touch()
    if attempt <= times:
        raise RuntimeError(f"test hook {ENV_FAIL} failed attempt {attempt}")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Linux's VmHWM belongs to the current program image; ``ru_maxrss`` (the fallback) also
    counts a parent's peak inherited across fork+exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _set_threads(resources: Resources) -> None:
    """Give torch the task's CPUs as threads (a worker process runs one task at a time)."""
    import torch

    torch.set_num_threads(max(1, int(resources.cpus)))


def _sync_environ(env: dict[str, str]) -> None:
    """Make this worker's environment the driver's (a forked worker has its server's)."""
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})


def _call(
    work: Work,
    task: Any,
    kwargs: dict[str, Any],
    resources: Resources | None,
    hook: Any,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one task in this process: its result, where and how long (the record the driver counts).

    ``env`` (process pools): the driver's environment, made this worker's first.
    """
    if env is not None:
        _sync_environ(env)
    if resources is not None:
        _set_threads(resources)
    t0, c0 = time.perf_counter(), time.process_time()
    _maybe_fail(work.name(task), hook)
    if os.environ.get(ENV_CRASH) == work.name(task):  # test hook: what MeCab did on issue 24
        os.kill(os.getpid(), signal.SIGSEGV)
    result = work.compute(task, **kwargs)
    return {
        "result": result,
        "worker": _worker_name(),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "peak_rss_mb": peak_rss_mb(),
    }


def _failed(work: Work, task: Any, exc: BaseException, attempts: int | None = None) -> TaskFailed:
    """The one sentence for a failed task."""
    tries = f" after {attempts} attempts" if attempts else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return TaskFailed(
        f"Task {work.name(task)} ({work.stage}) failed{tries}: {type(exc).__name__}"
        + (f": {text}" if text else "")
        + f"; finished tasks are kept, {RESUME}."
    )


def _died(work: Work, processes: Sequence[Any]) -> TaskFailed:
    """The one sentence for a worker process that died without a word (a native crash, the
    kernel's OOM killer): the stage, the pid and the signal, from the pool's exit codes.

    The pool terminates its other workers (SIGTERM) once one has died, so a signal other
    than SIGTERM is the cause when there is one.
    """
    dead = []
    for proc in processes:
        proc.join(timeout=5)  # the dead one already has its code; the others are being ended
        if proc.exitcode not in (None, 0):
            dead.append((proc.exitcode != -signal.SIGTERM, proc.pid, proc.exitcode))
    how = "died without a word"
    if dead:
        _, pid, code = max(dead, key=lambda d: d[0])
        how = f"(pid {pid}) exited with status {code}"
        if code < 0:
            try:
                sig = signal.Signals(-code)
                how = f"(pid {pid}) died of {sig.name} ({signal.strsignal(sig) or sig.name})"
                how += _SIGNAL_CAUSES.get(sig, "")
            except ValueError:
                how = f"(pid {pid}) died of signal {-code}"
    return TaskFailed(
        f"A worker process of the {work.stage} stage {how}; finished tasks are kept, {RESUME}."
    )


# What a signal that ends a worker usually means, for the sentence of :func:`_died`.
_SIGNAL_CAUSES = {
    **dict.fromkeys(
        (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT),
        ", a crash in native code",
    ),
    signal.SIGKILL: ", killed from outside (the kernel's out-of-memory killer does this)",
}


# --------------------------------------------------------------------------- local and processes


def _run_local(work, tasks, kwargs, resources, prog, hook) -> list[Any]:
    """One task after the other in this process (threads as torch has them)."""
    out = []
    for task in tasks:
        try:
            rec = _call(work, task, kwargs, None, hook)
        except AtlasError:
            raise
        except Exception as exc:
            raise _failed(work, task, exc) from exc
        out.append(rec["result"])
        prog.done(rec)
        _maybe_stop(prog.report.done)
    return out


# What the fork server imports once, before it forks any worker: torch, transformers and the
# BERT classes every task loads checkpoints with (a missing one is skipped by multiprocessing).
PRELOAD = (
    "core.execution.executors",
    "core.learning.models",
    "transformers.models.bert.modeling_bert",
)


def _mp_context(*modules: str) -> Any:
    """Where pool workers come from: a fork server where the platform has one, else spawn.

    Never a fork of this process: it has run torch with live OpenMP threads, and a forked
    OpenMP runtime can deadlock. The fork server is a fresh interpreter that imports
    :data:`PRELOAD` and ``modules`` (a work's module) once and runs no arithmetic; every worker
    is a fork of it, so a pool of N workers pays one import instead of N, and a later pool in
    the same process (``core run``'s next stage, a benchmark's next cut) none. The server's
    imports are fixed when it starts: a later kind of work imports its module in each worker.
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        # No effect once the server runs (it started with an earlier pool or warm_pool).
        ctx.set_forkserver_preload([*PRELOAD, *(m for m in modules if m not in PRELOAD)])
        try:
            forkserver.ensure_running()  # returns at once: the server imports on its own
            return ctx
        except OSError:  # no Unix sockets here (a sandbox): spawned workers, as before
            pass
    return mp.get_context("spawn")


def warm_pool(*modules: str) -> None:
    """Start the fork server now (``modules`` among its imports) so that its imports overlap the
    driver's own (a command's torch import, a stage's planning) instead of delaying the first
    task. Returns at once; nothing where there is no fork server."""
    _mp_context(*modules)


def _run_processes(work, tasks, spec, kwargs, resources, prog, hook) -> list[Any]:
    """A pool of worker processes on this machine, forked from a fork server (:func:`_mp_context`)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = spec.workers or max(1, (os.cpu_count() or 1) // 2)
    workers = max(1, min(workers, len(tasks)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    per_task = Resources(threads, resources.gpus, resources.memory_mb)
    out: list[Any] = [None] * len(tasks)
    failure: BaseException | None = None
    env = dict(os.environ)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(work.compute.__module__)
    ) as pool:
        futures = {
            pool.submit(_call, work, t, kwargs, per_task, hook, env): i for i, t in enumerate(tasks)
        }
        pending = set(futures)
        # The workers as started (the pool forgets them once broken): their exit codes name
        # the signal of a worker that crashed in native code.
        processes = list((getattr(pool, "_processes", None) or {}).values())
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = futures[fut]
                    try:
                        rec = fut.result()
                    except AtlasError as exc:
                        failure = failure or exc
                        continue
                    except BrokenProcessPool:
                        failure = failure or _died(work, processes)
                        continue
                    except Exception as exc:
                        failure = failure or _failed(work, tasks[i], exc)
                        continue
                    out[i] = rec["result"]
                    prog.done(rec)
                    _maybe_stop(prog.report.done)
                if failure is not None:
                    for fut in pending:  # not started yet: dropped; running ones finish
                        fut.cancel()
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    if failure is not None:
        raise failure
    return out


def _maybe_stop(done: int) -> None:
    """Test hook: the driver dies (SIGKILL, no cleanup) after $ATLAS_TEST_STOP_AFTER tasks."""
    value = os.environ.get(ENV_STOP)
    if value and done >= int(value):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- Ray


def _import_ray() -> Any:
    """``ray``, or the one-sentence :class:`AtlasError` when it is not installed."""
    try:
        import ray
    except ImportError:
        raise AtlasError(RAY_MISSING + ".") from None
    return ray


def _ray_init(ray: Any, spec: ExecutorSpec, resources: Resources) -> bool:
    """Join or start Ray unless this process already has; True when we started it."""
    if ray.is_initialized():
        return False
    import logging

    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
    }
    if spec.address is None:
        if spec.workers:  # a local instance sized to the workers asked for
            options["num_cpus"] = int(spec.workers * max(resources.cpus, 1))
        ray.init(**options)
    else:
        try:
            ray.init(address=spec.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise AtlasError(
                f"Cannot join the Ray cluster at {spec.address} ({str(exc).splitlines()[0]}); "
                "start it with `ray start --head` (docs/cluster.md)."
            ) from None
    return True


def _probe(path: str, digest: str) -> bool:
    """Whether this node sees ``path`` with content ``digest`` (the shared folder test)."""
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest() == digest
    except OSError:
        return False


def _probe_nodes(ray: Any, path: str, digest: str) -> list[str]:
    """The alive nodes that do not see the folder (one tiny task pinned to each node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    remote = ray.remote(num_cpus=0)(_probe)
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path, digest)
        for n in nodes
    ]
    seen = ray.get(refs)
    return [
        n.get("NodeManagerAddress", n["NodeID"])
        for n, ok in zip(nodes, seen, strict=True)
        if not ok
    ]


def _expand(root: Path, rels: Sequence[str]) -> list[str]:
    """Relative file paths under ``root`` for files and folders in ``rels`` (present ones)."""
    out = []
    for rel in rels:
        p = root / rel
        if p.is_file():
            out.append(Path(rel).as_posix())
        elif p.is_dir():
            out += sorted(
                f.relative_to(root).as_posix()
                for f in p.rglob("*")
                if f.is_file() and not f.name.endswith(".tmp") and f.name != ".lock"
            )
    return out


def _bundle(root: Path, rels: Sequence[str]) -> tuple[str, dict[str, bytes]]:
    """The input files of tasks, as {relative path: bytes}, and a digest of them all."""
    files = {rel: (root / rel).read_bytes() for rel in sorted(set(_expand(root, rels)))}
    h = hashlib.sha1()
    for rel, data in files.items():
        h.update(rel.encode() + b"\0" + hashlib.sha1(data).digest())
    return h.hexdigest(), files


def _stage(digest: str, files: dict[str, bytes]) -> Path:
    """A scratch copy of the inputs on this node (made once per node and digest)."""
    base = Path(tempfile.gettempdir()) / _STAGE_ROOT
    final = base / digest[:20]
    if final.is_dir():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:20]}-", dir=_mkdir(base)))
    for rel, data in files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker of this node made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ray_call(
    work: Work,
    task: Any,
    kwargs: dict[str, Any],
    resources: Resources,
    hook: Any,
    shared: str,
    probe: tuple[str, str],
    box: list[Any],
) -> dict[str, Any]:
    """A Ray task: compute in place (shared folder) or in a scratch copy (returns the files).

    A task's :class:`AtlasError` is returned, not raised, so Ray does not retry bad input.
    """
    try:
        if shared == "yes" or (shared in ("auto", "yes-checked") and _probe(*probe)):
            rec = _call(work, task, kwargs, resources, hook)
            rec["files"] = None
            return rec
        if shared == "yes-checked":
            raise AtlasError(
                f"Ray node {socket.gethostname()} does not see {work.root(task)} (the run folder "
                "must be the same path on every node); rerun with --ray-shared no."
            )
        import ray

        digest, ref = box
        local = _stage(digest, ray.get(ref))
        here = work.retarget(task, str(local))
        rec = _call(work, here, kwargs, resources, hook)
        rels = _expand(local, work.outputs(here))
        rec["files"] = {rel: (local / rel).read_bytes() for rel in rels}
        for rel in work.outputs(here):  # the driver keeps them; the node's copy is scratch
            p = local / rel
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file():
                p.unlink(missing_ok=True)
        return rec  # a result that is a path names the scratch copy: callers do not use it
    except AtlasError as exc:
        return {"error": str(exc)}


def _write_back(root: Path, files: dict[str, bytes], overwrite: bool) -> None:
    """Write a task's returned files under the driver's folder, atomically."""
    for rel, data in files.items():
        target = root / rel
        if target.exists() and not overwrite:
            continue  # present: made by another attempt or another task
        with store.atomic_path(target) as tmp:
            tmp.write_bytes(data)


def _check_cluster_gpus(ray: Any, gpus: float) -> None:
    """Refuse tasks that ask for more GPUs than the whole cluster has (Ray would wait for
    such a node forever)."""
    if not gpus:
        return
    have = float(ray.cluster_resources().get("GPU", 0))
    if have < gpus:
        raise AtlasError(
            f"Each task asks for {gpus:g} GPU{'' if gpus == 1 else 's'} "
            f"(--device cuda) but the Ray cluster has {have:g}; add a node with a GPU or "
            "use --device cpu."
        )


@contextmanager
def session(
    spec: ExecutorSpec,
    resources: Resources = Resources(),  # noqa: B008 (frozen)
    work: Work | None = None,
) -> Iterator[None]:
    """The executor opened before a stage writes anything, closed after its tasks.

    For Ray: the cluster is joined (or a local instance started) and a cluster without the
    GPUs each task asks for is refused here, so a refused command leaves the run as it was;
    :func:`run_tasks` inside the block reuses the connection. For a process pool the fork
    server starts importing (:func:`warm_pool`, ``work``'s module too) while the stage plans.
    """
    if spec.kind != "ray":
        if spec.kind == "processes":
            warm_pool(*([work.compute.__module__] if work is not None else []))
        yield
        return
    ray = _import_ray()
    started = _ray_init(ray, spec, resources)
    try:
        _check_cluster_gpus(ray, resources.gpus)
        yield
    finally:
        if started:
            ray.shutdown()


def _run_ray(work, tasks, spec, kwargs, resources, prog, hook) -> list[Any]:
    """Ray tasks with declared resources and retries, at most ``spec.workers`` at once."""
    ray = _import_ray()
    if not tasks:
        return []
    started = _ray_init(ray, spec, resources)
    try:
        _check_cluster_gpus(ray, resources.gpus)
    except AtlasError:
        if started:
            ray.shutdown()
        raise
    # Absolute paths: Ray workers run in other working directories (and on other machines).
    tasks = [work.retarget(t, str(Path(work.root(t)).resolve())) for t in tasks]
    roots = sorted({work.root(t) for t in tasks})
    probes = {r: _manifest_probe(Path(r)) for r in roots}
    shared = spec.shared
    boxes: dict[str, list[Any]] = {r: [None, None] for r in roots}
    if shared == "auto":
        blind = sorted({n for r in roots for n in _probe_nodes(ray, *probes[r])})
        shared = "auto" if blind else "yes-checked"
    prog.report.shared = shared != "no" and shared != "auto"
    if shared in ("auto", "no"):
        for r in roots:
            rels = sorted({rel for t in tasks if work.root(t) == r for rel in work.inputs(t)})
            digest, files = _bundle(Path(r), rels)
            boxes[r] = [digest, ray.put(files)]
    options: dict[str, Any] = {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "max_retries": spec.retries,
        "retry_exceptions": True,
    }
    if resources.memory_mb:
        options["memory"] = int(resources.memory_mb) << 20
    remote = ray.remote(**options)(_ray_call)
    limit = spec.workers or len(tasks)
    out: list[Any] = [None] * len(tasks)
    todo = list(enumerate(tasks))
    inflight: dict[Any, int] = {}
    failure: BaseException | None = None
    try:
        while (todo and failure is None) or inflight:
            while todo and failure is None and len(inflight) < limit:
                i, t = todo.pop(0)
                r = work.root(t)
                ref = remote.remote(work, t, kwargs, resources, hook, shared, probes[r], boxes[r])
                inflight[ref] = i
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                i = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as exc:  # every attempt failed (or the worker died each time)
                    cause = getattr(exc, "cause", None) or exc
                    failure = failure or _failed(work, tasks[i], cause, spec.retries + 1)
                    continue
                if rec.get("error"):
                    failure = failure or AtlasError(rec["error"])
                    continue
                if rec.get("files"):
                    _write_back(Path(work.root(tasks[i])), rec["files"], work.overwrite)
                out[i] = rec["result"]
                prog.done(rec)
                _maybe_stop(prog.report.done)
    except BaseException:
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    if failure is not None:
        raise failure
    return out


def _manifest_probe(root: Path) -> tuple[str, str]:
    """The file a node must see for the folder to count as shared, and its digest."""
    path = root / store.MANIFEST
    return str(path), hashlib.sha1(path.read_bytes()).hexdigest()
