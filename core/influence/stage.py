"""The tracin stage of a run, and its public task API for any executor.

A run's TracIn work is a list of independent :class:`Task` s (one checkpoint × a range of
training chunks). Any executor (this process, a process pool, a cluster) runs

    tasks = plan(run)            # writes tracin_shards/options.json, lists what is missing
    for task in tasks:           # in any order, anywhere the run folder is reachable
        compute(task)            # writes the task's shards atomically; present ones skipped
    aggregate(run)               # tracin.npy & co. from the shards, in a fixed order

and gets bitwise the same files: a shard depends only on its checkpoint and chunk, and
:func:`aggregate` sums in checkpoint order whatever order the shards were made in.
:func:`run_tracin` (the stage) is exactly that loop, in this process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.execution.executors import (
    LOCAL,
    PROGRESS,
    ExecutorSpec,
    Resources,
    Work,
    expected_workers,
    peak_rss_mb,
    run_inputs,
    run_tasks,
    session,
)
from core.influence.base import CHUNK_SIZE, Engine
from core.influence.engine import BATCH_BYTES, BUFFER_BYTES, MAX_TEST_BYTES, check_dtype
from core.influence.inputs import EncodedData
from core.influence.registry import engine_for
from core.influence.shards import (
    SHARD_OPTIONS,
    ShardSink,
    norm_shard_name,
    shard_name,
    sum_blocks,
    unweighted_norms,
    write_per_checkpoint,
)
from core.inputs.config import config_from_dict
from core.options import commands
from core.options.tracin_options import covers_every_parameter, parse_scope, record_project
from core.storage import provenance, store
from core.storage.errors import AtlasError


def run_checkpoints(run: Path, manifest: dict[str, Any]) -> list[tuple[Path, float]]:
    """The run's (checkpoint folder, lr) list, or :class:`AtlasError` if training is incomplete."""
    entries = manifest.get("checkpoints") or []
    if not store.stage_done(run, "train") or not entries:
        raise AtlasError(
            f"{run} has no complete checkpoints yet; finish training first (python -m core run)."
        )
    commands.require_heavy_tier(run, "TracIn")
    out = []
    for entry in entries:
        path = run / str(entry.get("path", ""))
        if not entry.get("path") or not path.is_dir():
            raise AtlasError(
                f"Checkpoint {path} listed in the manifest is missing; retrain from it with "
                f"`{commands.rebuild_command(run, 'train')}`."
            )
        if entry.get("lr") is None:
            raise AtlasError(f"Checkpoint {path} has no learning rate in the manifest.")
        out.append((path, float(entry["lr"])))
    return out


def resolve_options(
    run: Path, scope: str | None, project: int | str | None, seed: int | None
) -> tuple[dict[str, Any], Any]:
    """Resolve and validate scope/projection against the run's config defaults.

    ``project`` is any spec of :data:`core.options.tracin_options.PROJECTIONS` (a dense dimension D
    or ``factorized:K``); the recorded option is its recorded form (the int D or the string
    ``factorized:K``). A projection that covers every parameter takes scope 'all' unless
    another scope was asked for explicitly (refused).
    """

    manifest = store.load_manifest(run)
    config = config_from_dict(manifest.get("config") or {})
    asked_scope = scope
    scope = scope or config.tracin_params
    project = project if project is not None else config.tracin_project
    seed = seed if seed is not None else config.tracin_seed
    parse_scope(scope)
    if covers_every_parameter(project):
        if asked_scope not in (None, "all"):
            raise AtlasError(
                f"--project {record_project(project)} covers every parameter; drop --params or "
                f"use --params all (got '{asked_scope}')."
            )
        scope = "all"
    options = {
        "params": scope,
        "project": record_project(project),
        "seed": int(seed) if project is not None else None,
    }
    return options, (manifest, config)


def encode_run_data(
    run: Path, max_length: int, test_rows: np.ndarray | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, np.ndarray]:
    """Encode the run's train (observed labels) and test (true labels) instances."""
    from core.learning.models import encode, load_tokenizer  # transformers: on use

    instances = store.load_instances(run)
    train_df = instances[instances["split"] == "train"]
    test_df = instances[instances["split"] == "test"]
    if test_rows is not None:
        test_df = test_df.iloc[test_rows]
    if len(train_df) == 0:
        raise AtlasError(f"{run / store.INSTANCES} has no training instances.")
    tokenizer = load_tokenizer(run)
    train = encode(tokenizer, train_df["text"].tolist(), max_length)
    train["labels"] = torch.as_tensor(
        train_df["observed_label"].to_numpy(copy=True), dtype=torch.long
    )
    test = None
    if len(test_df):
        test = encode(tokenizer, test_df["text"].tolist(), max_length)
        test["labels"] = torch.as_tensor(test_df["label"].to_numpy(copy=True), dtype=torch.long)
    return train, test, test_df["id"].to_numpy()


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Process peak RSS (and CUDA peak allocation) in MiB."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@dataclass(frozen=True)
class TaskOptions:
    """What a shard's numbers depend on besides its checkpoint and chunk."""

    params: str
    project: int | str | None = None  # dense dimension or "factorized:K"
    seed: int | None = None
    dtype: str = "float32"
    chunk_size: int = CHUNK_SIZE


@dataclass(frozen=True)
class Task:
    """One unit of TracIn work: training chunks ``chunks[0] .. chunks[1] - 1`` at one checkpoint.

    The checkpoint is named by its position, epoch, learning rate and content hash
    (``sha1``), never by a path string; ``options_sha1`` is the hash of the shard folder's
    ``options.json`` the task was planned against. Tasks are plain frozen data: they
    pickle, so any executor can ship them to a worker.
    """

    run: str
    checkpoint: int  # 0-based position in the manifest's checkpoint list
    epoch: int | None
    lr: float
    sha1: str
    chunks: tuple[int, int]  # [first, last) training chunk numbers
    options: TaskOptions
    options_sha1: str

    @property
    def name(self) -> str:
        """A readable task name, e.g. ``ckpt-02_chunks-0000-0003``."""
        first, last = self.chunks
        return f"ckpt-{self.checkpoint:02d}_chunks-{first:04d}-{last - 1:04d}"

    def shard_paths(self) -> list[Path]:
        """The files this task writes (its chunks' shards)."""
        folder = Path(self.run) / store.TRACIN_SHARDS_DIR
        return [folder / shard_name(self.checkpoint, c) for c in range(*self.chunks)]


class _Context:
    """A run's encoded data and engine for one set of options, reused by the tasks of a process."""

    def __init__(self, run: Path, options: TaskOptions, device: str | torch.device) -> None:
        """Encode the run's data and build the engine (no checkpoint is loaded yet)."""
        from core.learning.models import resolve_device  # transformers: loaded only here

        manifest = store.load_manifest(run)
        config = config_from_dict(manifest.get("config") or {})
        checkpoints = run_checkpoints(run, manifest)
        self.epochs = [e.get("epoch") for e in manifest.get("checkpoints") or []]
        self.engine: Engine = engine_for(
            checkpoints,
            scope=options.params,
            project=options.project,
            seed=options.seed or 0,
            device=resolve_device(device) if isinstance(device, str) else device,
            dtype=options.dtype,
            chunk_size=options.chunk_size,
            loader=_load_classifier,
        )
        train, test, _ = encode_run_data(run, config.max_length)
        self.tr = EncodedData(train, "training")
        self.te = EncodedData(test, "test") if test is not None else None
        n, size = self.tr.n, options.chunk_size
        self.chunks = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
        self.folder = run / store.TRACIN_SHARDS_DIR

    def shard_options(self) -> dict[str, Any]:
        """The shard folder's options: scope, projection, sizes, data and checkpoint identity."""
        options = self.engine.shard_options(self.tr, self.te, len(self.chunks))
        for ident, epoch in zip(options["checkpoints"], self.epochs, strict=False):
            ident["epoch"] = epoch  # the manifest knows the epoch; the engine only the content
        return options


def _load_classifier(path: Any, device: torch.device) -> Any:
    """core.learning.models.load_classifier, looked up at call time (tests replace it)."""
    from core.learning import models  # transformers: loaded only here

    return models.load_classifier(path, device)


# The last context built in this process: a worker running many tasks of one run encodes once.
_CONTEXT: dict[tuple, _Context] = {}


def _context(run: Path, options: TaskOptions, device: str | torch.device) -> _Context:
    """The (cached) context of ``run`` for ``options`` on ``device``."""
    run = run.resolve()  # checkpoint paths stay valid if the working directory changes
    manifest = store.load_manifest(run)
    inputs = tuple(
        (name, (provenance.fingerprint(run / name) or {}).get("sha1"))
        for name in (store.INSTANCES, store.TOKENIZER_DIR)
    )
    key = (
        str(run.resolve()),
        options,
        str(device),
        inputs,
        json.dumps(manifest.get("checkpoints"), sort_keys=True),
    )
    if key not in _CONTEXT:
        _CONTEXT.clear()
        _CONTEXT[key] = _Context(run, options, device)
    return _CONTEXT[key]


def _options_sha1(options: dict[str, Any]) -> str:
    """Hash of a shard folder's options."""
    return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()


def tasks_use_remote_gpu(device: str | torch.device, executor: ExecutorSpec) -> bool:
    """Whether the tasks are to use a CUDA GPU that only the Ray cluster's nodes have.

    A Ray head (the driver) often has no GPU; the tasks then ask Ray for one each and check
    their node's device themselves.
    """
    return (
        executor.kind == "ray" and str(device).startswith("cuda") and not torch.cuda.is_available()
    )


TASKS_PER_WORKER = 2


def default_chunks_per_task(n_checkpoints: int, n_chunks: int, workers: int | None) -> int:
    """Training chunks per task: the fewest tasks that give each worker ``TASKS_PER_WORKER``.

    Every task computes its checkpoint's test gradients, so a checkpoint is cut into as few
    tasks as keep the workers busy: a whole checkpoint while there are at least two
    checkpoints per worker, finer cuts for more workers. ``workers`` None (a cluster that
    sizes itself) gives one chunk per task, the most tasks to spread.
    """
    if n_chunks <= 1:
        return 1
    if workers is None:
        return 1
    per_checkpoint = min(
        n_chunks, math.ceil(TASKS_PER_WORKER * max(workers, 1) / max(n_checkpoints, 1))
    )
    return math.ceil(n_chunks / per_checkpoint)


def plan(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | str | None = None,
    seed: int | None = None,
    *,
    dtype: str = "float32",
    chunk_size: int = CHUNK_SIZE,
    chunks_per_task: int | None = None,
    pending_only: bool = True,
    workers: int | None = 1,
) -> list[Task]:
    """The tasks of a run's TracIn, checkpoint by checkpoint; the shard folder is prepared.

    Options default to the run's config. ``chunks_per_task`` training chunks make a task
    (default: :func:`default_chunks_per_task` for ``workers`` running at once, which is a
    whole checkpoint for one worker; 1 gives the finest tasks). With ``pending_only`` tasks whose shards all exist
    are left out. Raises :class:`AtlasError` when the run has no checkpoints, an option is
    invalid, or the shard folder holds shards of other options (one sentence naming the
    option; nothing is deleted).
    """
    run = Path(run_dir)
    opts, (manifest, _) = resolve_options(run, scope, project, seed)
    run_checkpoints(run, manifest)
    if chunks_per_task is not None and int(chunks_per_task) <= 0:
        raise AtlasError(f"chunks_per_task must be positive (got {chunks_per_task}).")
    options = TaskOptions(opts["params"], opts["project"], opts["seed"], dtype, int(chunk_size))
    ctx = _context(run, options, "cpu")
    sink = ShardSink(ctx.folder, ctx.shard_options())  # writes options.json, or refuses
    digest = _options_sha1(sink.options)
    step = int(
        chunks_per_task
        or default_chunks_per_task(len(sink.options["checkpoints"]), len(ctx.chunks), workers)
    )
    tasks = []
    for ci, ident in enumerate(sink.options["checkpoints"]):
        for first in range(0, len(ctx.chunks), step):
            last = min(first + step, len(ctx.chunks))
            done = all(sink.has(ci, c) for c in range(first, last)) and (
                ctx.te is None or sink.has_test(ci)
            )
            if pending_only and done:
                continue
            tasks.append(
                Task(
                    run=str(run),
                    checkpoint=ci,
                    epoch=ctx.epochs[ci] if ci < len(ctx.epochs) else None,
                    lr=float(ident["lr"]),
                    sha1=str(ident["sha1"]),
                    chunks=(first, last),
                    options=options,
                    options_sha1=digest,
                )
            )
    return tasks


def compute(task: Task, device: str | torch.device = "auto", on_block: Any = None) -> list[Path]:
    """Run one task: write its missing shards (and its checkpoint's test norms) atomically.

    Present shards are skipped, so a task can be retried or run twice. Raises
    :class:`AtlasError` when the shard folder was re-planned with other options or the
    checkpoint's content changed since :func:`plan`. Returns the task's shard paths.
    ``on_block`` (no arguments) is called once per chunk, for progress bars.
    """
    ctx = _context(Path(task.run), task.options, device)
    check_dtype(task.options.dtype, ctx.engine.device)  # this node's device (cluster tasks)
    options = ctx.shard_options()
    if _options_sha1(json.loads(json.dumps(options))) != task.options_sha1:
        raise AtlasError(
            f"Task {task.name} was planned with other options or checkpoints than "
            f"{task.run} now has; plan the run's TracIn again."
        )
    sink = ShardSink(ctx.folder, options)
    ctx.engine.compute_checkpoint(
        task.checkpoint, ctx.tr, ctx.te, ctx.chunks, range(*task.chunks), sink, on_block
    )
    return task.shard_paths()


def _compute_task(task: Task, device: str = "auto") -> None:
    """:func:`compute` as an executor runs it (the paths it returns stay in the worker)."""
    compute(task, device=device)


def _task_inputs(task: Task) -> list[str]:
    """What a task reads under its run folder: manifest, instances, tokenizer, checkpoints
    (all: a task checks every checkpoint's identity) and the shard folder's options."""
    entries = store.load_manifest(task.run).get("checkpoints") or []
    return [
        *run_inputs(task),
        *(str(e["path"]) for e in entries if isinstance(e, dict) and e.get("path")),
        f"{store.TRACIN_SHARDS_DIR}/{SHARD_OPTIONS}",
    ]


def _task_outputs(task: Task) -> list[str]:
    """What a task writes under its run folder: its shards and its checkpoint's test norms."""
    folder = store.TRACIN_SHARDS_DIR
    return [f"{folder}/{p.name}" for p in task.shard_paths()] + [
        f"{folder}/{norm_shard_name(task.checkpoint)}"
    ]


def _task_name(task: Task) -> str:
    return task.name


# The TracIn task as every executor (core.execution.executors) runs it.
WORK = Work(
    stage="tracin",
    compute=_compute_task,
    name=_task_name,
    inputs=_task_inputs,
    outputs=_task_outputs,
)


def task_resources(
    run_dir: str | os.PathLike, n_params: int, n_test: int, project: Any, device: str
) -> Resources:
    """What one TracIn task needs: 1 CPU (1 GPU with ``--device cuda``) and a memory bound.

    The bound adds what the engine holds at once: the checkpoint three times (model,
    per-example gradient batch bookkeeping, parameters of the scope), the test gradients
    (capped by ``MAX_TEST_BYTES``; a projection stores ``dim`` numbers per instance),
    the training-gradient buffer and batch (``BUFFER_BYTES``, ``BATCH_BYTES``) and 600 MiB
    for Python, torch and the tokenizer.
    """
    entries = store.load_manifest(run_dir).get("checkpoints") or []
    first = Path(run_dir) / str(entries[0]["path"]) if entries else None
    model_bytes = (
        sum(f.stat().st_size for f in first.rglob("*") if f.is_file())
        if first is not None and first.is_dir()
        else 4 * n_params
    )
    per_test = 4 * (int(project) if isinstance(project, int) else n_params)
    test_bytes = min(MAX_TEST_BYTES, per_test * max(n_test, 1))
    total = 3 * model_bytes + test_bytes + BUFFER_BYTES + BATCH_BYTES + (600 << 20)
    return Resources(cpus=1.0, gpus=1.0 if device == "cuda" else 0.0, memory_mb=int(total >> 20))


def aggregate(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Write tracin.npy, tracin_per_checkpoint.npy, self_influence.npy and the gradient norms.

    Reads the shards of ``tracin_shards/`` (all must exist: the first missing one is named
    in the :class:`AtlasError`) and sums them in checkpoint order, so the files are the same
    bits whatever order, process or machine made the shards. Returns sizes for the manifest.
    """
    run = Path(run_dir)
    folder = run / store.TRACIN_SHARDS_DIR
    options = store.read_json(folder / SHARD_OPTIONS)
    sink = ShardSink(folder, options)
    k, n_train, n_test = len(options["checkpoints"]), options["n_train"], options["n_test"]
    size = options["chunk_size"]
    chunks = [(lo, min(lo + size, n_train)) for lo in range(0, n_train, size)]
    for ci in range(k):
        names = [shard_name(ci, c) for c in range(len(chunks)) if not sink.has(ci, c)]
        if n_test and not sink.has_test(ci):
            names.append(norm_shard_name(ci))
        if names:
            raise AtlasError(
                f"{folder} lacks {names[0]} (and {len(names) - 1} more of checkpoint {ci + 1}); "
                "compute the remaining tasks first."
            )
    matrix, _, self_inf, train_sq = sum_blocks(sink, k, chunks, n_test, n_train, False)
    lrs = np.array([c["lr"] for c in options["checkpoints"]], dtype=np.float64)
    store.write_npy(run / store.TRACIN, matrix.astype(np.float32))
    write_per_checkpoint(folder, k, n_train, n_test, size, run / store.TRACIN_PER_CHECKPOINT)
    store.write_npy(run / store.SELF_INFLUENCE, self_inf.astype(np.float32))
    store.write_npy(run / store.GRAD_NORMS_TRAIN, unweighted_norms(train_sq, lrs))
    if n_test:
        test_sq = np.stack([sink.get_test(ci) for ci in range(k)])
        store.write_npy(
            run / store.GRAD_NORMS_TEST, np.sqrt(np.maximum(test_sq, 0.0)).astype(np.float32)
        )
    return {"n_checkpoints": k, "n_train": n_train, "n_test": n_test, "chunk_size": size}


def run_tracin(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | str | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
    dtype: str = "float32",
    chunk_size: int = CHUNK_SIZE,
    executor: ExecutorSpec = LOCAL,
    chunks_per_task: int | None = None,
) -> dict[str, Any]:
    """The tracin stage: write tracin.npy, tracin_per_checkpoint.npy and self_influence.npy.

    Options default to the run's config (``tracin_params``, ``tracin_project``,
    ``tracin_seed``). Skipped when already complete with the same options and inputs
    (checkpoints and instances unchanged, ``core.storage.provenance``); resumes from the shards of
    an interrupted run. The work is :func:`plan`, :func:`compute` per task (run by
    ``executor``, :mod:`core.execution.executors`), :func:`aggregate`. ``chunks_per_task`` defaults
    to :func:`default_chunks_per_task` for the executor's workers (a whole checkpoint in
    this process). Returns the manifest's ``tracin`` entry.
    """
    from core.learning.models import resolve_device  # transformers: loaded only here

    run = Path(run_dir)
    options, (manifest, config) = resolve_options(run, scope, project, seed)
    checkpoints = run_checkpoints(run, manifest)
    provenance.check_upstream(run, "tracin")  # checkpoints of other data: never a mix
    previous = manifest.get("tracin") or {}
    outputs = [
        run / store.TRACIN,
        run / store.TRACIN_PER_CHECKPOINT,
        run / store.SELF_INFLUENCE,
        run / store.GRAD_NORMS_TRAIN,
    ]
    damage = store.stage_problem(run, "tracin")
    if (
        store.stage_done(run, "tracin")
        and {k: previous.get(k) for k in options} == options
        and previous.get("dtype", "float32") == dtype
        and all(p.exists() for p in outputs)
        and damage is None  # a truncated file is never reported done: remade below
        and provenance.stale_reason(run, "tracin") is None
    ):
        return previous
    if damage is not None and progress:
        print(f"tracin: {damage.split(';')[0]}; computing the stage again.", file=sys.stderr)
    remote_gpu = tasks_use_remote_gpu(device, executor)
    # A driver without the cluster's GPU checks the options and the first checkpoint on its CPU.
    dev = torch.device("cpu") if remote_gpu else resolve_device(device)
    task_device = str(device) if remote_gpu else str(dev)
    engine = engine_for(
        checkpoints,
        scope=options["params"],
        project=options["project"],
        seed=options["seed"] or 0,
        device=dev,
        dtype=dtype,
        chunk_size=chunk_size,
        loader=_load_classifier,
    )
    # Loads the first checkpoint: a scope that selects nothing fails here, before any write.
    n_params = engine.check()

    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    wants_gpu = remote_gpu or dev.type == "cuda"
    # Ray is joined and its GPUs checked before anything is written: a refusal leaves the run
    # (its shards' options, the stage's status) as it was.
    with session(executor, Resources(gpus=1.0 if wants_gpu else 0.0), WORK):
        # Before the stage is marked: shards of other options are refused here, untouched.
        tasks = plan(
            run,
            options["params"],
            options["project"],
            options["seed"],
            dtype=dtype,
            chunk_size=engine.chunk_size,
            chunks_per_task=chunks_per_task,
            workers=expected_workers(executor),
        )
        store.mark_stage(run, "tracin", store.STATUS_RUNNING, **options)
        n_test = int(store.read_json(run / store.TRACIN_SHARDS_DIR / SHARD_OPTIONS)["n_test"])
        resources = task_resources(
            run, n_params, n_test, options["project"], "cuda" if remote_gpu else dev.type
        )
        # In this process the engine's device object is reused; elsewhere its name travels.
        run_tasks(
            WORK,
            tasks,
            executor,
            kwargs={"device": dev if executor.kind == "local" else task_device},
            resources=resources,
            progress=progress,
            folder=run,
        )
    sizes = aggregate(run)
    seconds = time.perf_counter() - start
    info = {
        **options,
        "n_params": n_params,
        "n_checkpoints": len(checkpoints),
        "n_train": sizes["n_train"],
        "n_test": sizes["n_test"],
        "device": task_device,
        "dtype": dtype,
        "chunk_size": engine.chunk_size,
        "executor": executor.kind,
        "n_tasks": len(tasks),
        "task_memory_mb": resources.memory_mb,
        "seconds": round(seconds, 2),
        **peak_memory_mb(dev),
    }
    if executor.kind != "local":
        # The driver's own peak says little when tasks ran elsewhere: the largest worker's.
        report = store.read_json(run / PROGRESS) if (run / PROGRESS).exists() else {}
        if report.get("worker_peak_rss_mb") is not None:
            info["worker_peak_rss_mb"] = report["worker_peak_rss_mb"]
    store.update_manifest(run, tracin=info)
    stage_info = {k: v for k, v in info.items() if k != "seconds"}
    store.mark_stage(run, "tracin", store.STATUS_COMPLETE, seconds, **stage_info)
    # The final files hold everything the shards did; they are only resumption state.
    shutil.rmtree(run / store.TRACIN_SHARDS_DIR, ignore_errors=True)
    return info
