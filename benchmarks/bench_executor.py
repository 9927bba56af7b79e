"""Executors side by side: local vs processes vs Ray with 2 workers, the same bits, the times.

    python benchmarks/bench_executor.py                 # quick preset run: the three, side by side
    python benchmarks/bench_executor.py --run RUN       # the same on a run trained up to 'train'
    python benchmarks/bench_executor.py --ray-cuts      # also Ray 1 vs 2 workers, per-task overhead, 8-worker plans
    python benchmarks/bench_executor.py --paper-task    # with --ray-cuts: also time one paper-preset task
    python benchmarks/bench_executor.py --paper-only --overhead 0.1   # only that task and its plan

Part 1 trains one quick-preset run (1,600 × 200, 10 checkpoints) up to ``train`` (or takes
``--run``) and computes its TracIn from scratch three times, each as the command a user types,
in its own process: ``python -m core tracin RUN --params all --device cpu`` with ``--executor
local``, then ``processes --workers 2``, then ``ray --workers 2`` (a local Ray instance started by
the command). It prints whether the five output files are bit for bit those of local
(``np.array_equal``), the wall times side by side with their ratios to local, and the process
pool's overhead: its wall minus the stage's own work outside tasks (the local wall minus the
local task seconds) minus the task seconds spread over the 2 workers. Every TracIn block runs
on one torch thread (core.influence.THREADS) whatever the executor, so local uses one core and
a pool of 2 workers two.

``--ray-cuts`` (Part 2, the former default) runs TracIn in this process: local, then Ray with
one and two workers at the default chunk size (``default_chunks_per_task``) and at one chunk of
512 per task, on a local Ray instance of 2 CPUs started once beforehand, with two workers started
and importing the engine first (worker start-up printed apart). Scheduling overhead per task =
(Ray wall with one worker − Σ task seconds measured inside the workers − the stage's work
outside tasks) / tasks, beside the mean task time: the target is ≤ 5 % at the default chunk
size. Then arithmetic on the measured per-task times: task count, bytes per shard and the
expected speed-up on 8 workers (list scheduling of the measured task times, plus the measured
overhead per task) for the quick preset at 16,000 training instances and, with
``--paper-task``, for the paper preset (MiniLM) with all parameters, whose per-task time is
measured on one task of a run whose checkpoints are the pretrained MiniLM with a fresh head
(the cost of a task does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 512
REPO = Path(__file__).resolve().parents[1]
OUTPUTS = (
    "tracin.npy",
    "tracin_per_checkpoint.npy",
    "self_influence.npy",
    "grad_norms_train.npy",
    "grad_norms_test.npy",
)
SIDE_BY_SIDE = (  # (label, executor options of `core tracin`)
    ("local", ["--executor", "local"]),
    ("processes, 2 workers", ["--executor", "processes", "--workers", "2"]),
    ("ray, 2 workers", ["--executor", "ray", "--workers", "2"]),
)


def _quiet() -> None:
    from core.cli import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")


def train_quick(cache: Path) -> Path:
    """A quick-preset run trained up to 'train' (the checkpoints TracIn reads)."""
    from core.cli import main

    assert main(["run", "--preset", "quick", "--until", "train", "--cache", str(cache)]) == 0
    (run,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    return run


def fresh_copy(run: Path, dest: Path) -> Path:
    """The run without its TracIn outputs (each measurement starts from scratch)."""
    from core.storage import store

    skip = ("tracin_shards", ".lock", "progress.json", *OUTPUTS)
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(*skip))
    manifest = store.load_manifest(dest)
    if "tracin" in (manifest.get("stages") or {}):  # a run given with --run may have one
        manifest["stages"].pop("tracin")
        manifest.pop("tracin", None)
        store.write_json(dest / store.MANIFEST, manifest)
    return dest


def timed_tracin(run: Path, spec, chunks_per_task: int | None = None) -> tuple[float, dict]:
    from core.influence import run_tracin

    t0 = time.perf_counter()
    run_tracin(run, device="cpu", progress=False, executor=spec, chunks_per_task=chunks_per_task)
    wall = time.perf_counter() - t0
    report = json.loads((run / "progress.json").read_text())
    return wall, report


def task_seconds(report: dict) -> float:
    """Σ task seconds measured inside the workers."""
    return sum(w["tasks"] * w["seconds_per_task"] for w in report["workers"])


def task_cpu(report: dict) -> float:
    """Σ task CPU seconds measured inside the workers."""
    return sum(w["tasks"] * w.get("cpu_seconds_per_task", 0.0) for w in report["workers"])


def _import_engine() -> float:
    """What a fresh worker does before its first task: import torch and the engine."""
    t0 = time.perf_counter()
    import core.influence.stage  # noqa: F401

    return time.perf_counter() - t0


def warm_workers(ray, n: int) -> float:
    """Start ``n`` Ray workers (1 CPU each, like the tasks) and import the engine in each.

    Workers are reused by the later tasks, so the per-task overhead measured afterwards is
    Ray's scheduling alone; the returned wall seconds are the one-time start-up.
    """
    t0 = time.perf_counter()
    ray.get([ray.remote(num_cpus=1)(_import_engine).remote() for _ in range(n)])
    return time.perf_counter() - t0


def list_schedule(times: list[float], workers: int) -> float:
    """Makespan of the tasks (longest first) on ``workers`` identical workers."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        i = loads.index(min(loads))
        loads[i] += t
    return max(loads)


def plan_row(name: str, n_train: int, n_test: int, k: int, per_task: float, overhead: float):
    """Tasks, bytes per shard and the expected 8-worker speed-up for one setting."""
    chunks = math.ceil(n_train / CHUNK)
    tasks = chunks * k
    shard_bytes = (n_test + 1) * CHUNK * 4 + 128  # float32 block + .npy header
    serial = tasks * per_task
    eight = list_schedule([per_task + overhead] * tasks, 8)
    print(
        f"{name}: {tasks} tasks ({k} checkpoints × {chunks} chunks of {CHUNK}), "
        f"{shard_bytes / 1e6:.2f} MB per shard ({tasks * shard_bytes / 1e6:.0f} MB in all), "
        f"per task {per_task:.2f} s measured → one worker {serial / 60:.1f} min, "
        f"8 workers {eight / 60:.1f} min, expected speed-up {serial / eight:.2f}×"
    )


def paper_task_seconds(cache: Path) -> tuple[float, int, int]:
    """Seconds of one paper-preset task (MiniLM, scope all, one chunk of 512 × all test)."""
    import torch

    from core.cli import main
    from core.influence import compute, plan
    from core.learning.models import build_model, load_tokenizer
    from core.storage import store

    assert main(["run", "--preset", "paper", "--until", "data", "--cache", str(cache)]) == 0
    (run,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    manifest = store.load_manifest(run)
    cfg = manifest["config"]
    tok = load_tokenizer(run)
    model = build_model(cfg["model"], tok, cfg["max_length"], 0)
    entries = []
    for e in range(1, 11):
        path = run / store.CHECKPOINTS_DIR / f"epoch-{e:02d}"
        model.save_pretrained(path)
        entries.append({"epoch": e, "path": f"{store.CHECKPOINTS_DIR}/epoch-{e:02d}", "lr": 1e-5})
    store.update_manifest(run, checkpoints=entries)
    store.mark_stage(run, "train", store.STATUS_COMPLETE)
    tasks = plan(run, scope="all", chunks_per_task=1)
    torch.set_num_threads(1)  # one CPU per task, as the executors give it
    t0 = time.perf_counter()
    compute(tasks[0], device="cpu")
    secs = time.perf_counter() - t0
    options = store.read_json(run / store.TRACIN_SHARDS_DIR / "options.json")
    return secs, options["n_train"], options["n_test"]


def cli_tracin(run: Path, options: list[str]) -> tuple[float, dict]:
    """``python -m core tracin RUN --params all`` with ``options`` in a fresh process: wall s,
    and the command's progress report (tasks, per-worker seconds)."""
    cmd = [sys.executable, "-m", "core", "tracin", str(run), "--params", "all", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd + options, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd + options)} failed:\n{out.stderr[-3000:]}")
    return wall, json.loads((run / "progress.json").read_text())


def import_cost() -> tuple[float, float]:
    """Wall and CPU seconds of what a pool's fork server imports (once per command)."""
    import resource

    from core.execution.executors import PRELOAD

    modules = ", ".join([*PRELOAD, "core.influence.stage"])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def side_by_side(base: Path, tmp: Path) -> None:
    """Part 1: the three executors as commands, bits compared to local, times as ratios."""
    import numpy as np

    walls, reports, runs = {}, {}, {}
    for label, options in SIDE_BY_SIDE:
        runs[label] = fresh_copy(base, tmp / label.replace(" ", "").replace(",", "-"))
        walls[label], reports[label] = cli_tracin(runs[label], options)
        print(f"  {label}: {walls[label]:.1f} s", flush=True)
    ref = runs["local"]
    print("\nidentical bits to local (np.array_equal, " + ", ".join(OUTPUTS) + "):")
    for label, _ in SIDE_BY_SIDE[1:]:
        same = {
            name: bool(np.array_equal(np.load(ref / name), np.load(runs[label] / name)))
            for name in OUTPUTS
        }
        print(f"  {label}: {all(same.values())}" + ("" if all(same.values()) else f" {same}"))
    local = walls["local"]
    print("\n" + " | ".join(f"{label} {walls[label]:.1f} s" for label, _ in SIDE_BY_SIDE))
    print(
        "ratio to local (wall / local wall; < 1 is faster): "
        + " | ".join(f"{label} {walls[label] / local:.2f}×" for label, _ in SIDE_BY_SIDE)
    )
    print("tasks per worker × wall s per task (CPU s per task: wall above CPU = shared cores):")
    for label, _ in SIDE_BY_SIDE:
        r = reports[label]
        print(
            f"  {label}: {r['total']} tasks; "
            + ", ".join(
                f"{w['tasks']} × {w['seconds_per_task']:.2f} s ({w['cpu_seconds_per_task']:.2f})"
                for w in r["workers"]
            )
        )
    outside = local - task_seconds(reports["local"])  # driver: imports, plan, check, aggregate
    for label, _ in SIDE_BY_SIDE[1:]:
        inside = task_seconds(reports[label])
        n = max(1, len(reports[label]["workers"]))
        overhead = walls[label] - outside - inside / n
        print(
            f"{label} overhead: {overhead:.1f} s = wall {walls[label]:.1f} − the stage's work "
            f"outside tasks {outside:.1f} (local) − Σ task seconds {inside:.1f} / {n} workers "
            f"(the same tasks took {task_seconds(reports['local']):.1f} s in the local process; "
            f"CPU {task_cpu(reports[label]):.1f} s in the workers, "
            f"{task_cpu(reports['local']):.1f} s in the local process)"
        )
    wall, cpu = import_cost()
    print(
        f"the fork server's imports (torch, transformers, the engine; once per command, "
        f"while the driver imports the same): {wall:.1f} s wall, {cpu:.1f} s CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paper-task", action="store_true", help="time one paper-preset task")
    parser.add_argument(
        "--paper-only", action="store_true", help="only the paper-preset task and its plan"
    )
    parser.add_argument(
        "--overhead", type=float, default=0.0, help="with --paper-only: measured s per task"
    )
    parser.add_argument("--run", type=Path, help="a run trained up to 'train' (default: train one)")
    parser.add_argument(
        "--ray-cuts", action="store_true", help="also Ray 1 vs 2 workers in this process (Part 2)"
    )
    args = parser.parse_args()
    if args.paper_only:
        _quiet()
        with tempfile.TemporaryDirectory() as tmp:
            paper_plan(Path(tmp), args.overhead)
        return
    _quiet()
    print(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.run is not None:
            base = args.run.resolve()
        else:
            t0 = time.perf_counter()
            base = train_quick(tmp / "cache")
            print(f"quick preset trained in {time.perf_counter() - t0:.0f} s", flush=True)
        print("TracIn from scratch, each a `python -m core tracin RUN --params all` command:")
        side_by_side(base, tmp)
        print(f"load after: {os.getloadavg()[0]:.1f}")
        if args.ray_cuts:
            ray_cuts(base, tmp, args.paper_task)


def ray_cuts(base: Path, tmp: Path, paper_task: bool) -> None:
    """Part 2: Ray with 1 and 2 workers at two cuts, scheduling overhead, 8-worker plans."""
    import logging

    import ray
    import torch

    from core.execution.executors import check_executor

    torch.set_num_threads(1)  # local with one thread: the same CPU as one Ray worker
    local_wall, local = timed_tracin(fresh_copy(base, tmp / "cuts-local"), check_executor("local"))
    t0 = time.perf_counter()
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    print(f"ray.init (local instance, 2 CPUs): {time.perf_counter() - t0:.1f} s (not counted)")
    startup = warm_workers(ray, 2)
    print(
        f"worker start-up (a fresh worker process importing torch and core, once per worker "
        f"per command; counted apart from the per-task overhead): {startup:.1f} s"
    )
    walls, reports = {}, {}
    for cut in ("default", "one chunk"):
        for workers in (1, 2):
            run = fresh_copy(base, tmp / f"ray{workers}-{cut.replace(' ', '')}")
            walls[cut, workers], reports[cut, workers] = timed_tracin(
                run, check_executor("ray", workers), 1 if cut == "one chunk" else None
            )
    ray.shutdown()
    local_outside = local_wall - task_seconds(local)
    print(f"local (1 thread, {local['total']} tasks of a checkpoint): {local_wall:.1f} s")
    overheads = {}
    for cut in ("default", "one chunk"):
        for w in (1, 2):
            r = reports[cut, w]
            print(
                f"ray, {w} worker(s), {cut} cut ({r['total']} tasks): {walls[cut, w]:.1f} s "
                f"= {walls[cut, w] / local_wall:.2f}× local; per worker: "
                + ", ".join(
                    f"{x['tasks']} tasks × {x['seconds_per_task']:.2f} s" for x in r["workers"]
                )
            )
        n = reports[cut, 1]["total"]
        inside = task_seconds(reports[cut, 1])
        per_task = inside / n
        # The stage's own work outside tasks (plan, aggregate, engine check) is in both
        # walls; what Ray adds per task is the rest.
        overhead = (walls[cut, 1] - inside - local_outside) / n
        overheads[cut] = (overhead, per_task)
        print(
            f"{cut} cut: ray 2 vs 1 worker {walls[cut, 1] / walls[cut, 2]:.2f}× faster, "
            f"2 workers vs local {local_wall / walls[cut, 2]:.2f}× faster; scheduling "
            f"overhead per task (1 worker, started beforehand): "
            f"{overhead:.3f} s = {100 * overhead / per_task:.1f} % of the mean task time "
            f"{per_task:.2f} s" + (" (target ≤ 5 %)" if cut == "default" else "")
        )
    print(f"stage work outside tasks (plan, check, aggregate), local: {local_outside:.1f} s")
    overhead, per_task = overheads["one chunk"]
    print("\nsimulated 8-worker plans (one-chunk tasks: measured times and overhead):")
    plan_row("quick preset, 1,600 train", 1600, 200, 10, per_task, overhead)
    plan_row("quick preset, 16,000 train", 16000, 200, 10, per_task, overhead)
    if paper_task:
        paper_plan(tmp, overhead)


def paper_plan(tmp: Path, overhead: float) -> None:
    """Time one paper-preset task and print its 8-worker plans."""
    secs, n_train, n_test = paper_task_seconds(tmp / "paper")
    print(f"paper preset, scope all: one task (512 train × {n_test} test) {secs:.1f} s")
    plan_row("paper preset all parameters, 1,600 train", n_train, n_test, 10, secs, overhead)
    plan_row("paper preset all parameters, 16,000 train", 16000, n_test, 10, secs, overhead)


if __name__ == "__main__":
    main()
