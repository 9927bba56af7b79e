"""Executors side by side: local vs Ray with 1 and 2 workers, and a simulated 8-worker plan.

    python benchmarks/bench_executor.py                 # quick preset run, all three, then the plan
    python benchmarks/bench_executor.py --paper-task    # also time one paper-preset task, scope all
    python benchmarks/bench_executor.py --paper-only --overhead 0.1   # only that task and its plan

Part 1 trains one quick-preset run (1,600 × 200, 10 checkpoints) up to ``train`` and computes
its TracIn from scratch in one process: ``--executor local`` (a checkpoint per task), then
Ray with one and two workers at the default chunk size (``default_chunks_per_task``) and at
one chunk of 512 per task (the finest cut, the default on a self-sized cluster), on a local
Ray instance of 2 CPUs started once beforehand (on a cluster Ray is already running).
Two workers are started and import the engine first (worker start-up, a fixed cost per
worker and command, printed apart). Scheduling overhead per task = (Ray wall with one worker −
Σ task seconds measured inside the workers − the stage's work outside tasks) / tasks, beside
the mean task time: the target is ≤ 5 % at the default chunk size.

Part 2 is arithmetic on measured per-task times: task count, bytes per shard and the expected
speed-up on 8 workers (list scheduling of the measured task times, plus the measured overhead
per task) for the quick preset at 16,000 training instances and, with ``--paper-task``, for the
paper preset (MiniLM) with all parameters, whose per-task time is measured on one task of a run
whose checkpoints are the pretrained MiniLM with a fresh head (the cost of a task does not
depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

CHUNK = 512


def _quiet() -> None:
    from core.cli import _quiet_libraries

    _quiet_libraries()
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")


def train_quick(cache: Path) -> Path:
    """A quick-preset run trained up to 'train' (the checkpoints TracIn reads)."""
    from core.cli import main

    assert main(["run", "--preset", "quick", "--until", "train", "--cache", str(cache)]) == 0
    (run,) = [p for p in cache.iterdir() if (p / "manifest.json").exists()]
    return run


def fresh_copy(run: Path, dest: Path) -> Path:
    """The run without its TracIn outputs (each measurement starts from scratch)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("tracin_shards", ".lock"))
    return dest


def timed_tracin(run: Path, spec, chunks_per_task: int | None = None) -> tuple[float, dict]:
    from core.tracin import run_tracin

    t0 = time.perf_counter()
    run_tracin(run, device="cpu", progress=False, executor=spec, chunks_per_task=chunks_per_task)
    wall = time.perf_counter() - t0
    report = json.loads((run / "progress.json").read_text())
    return wall, report


def task_seconds(report: dict) -> float:
    """Σ task seconds measured inside the workers."""
    return sum(w["tasks"] * w["seconds_per_task"] for w in report["workers"])


def _import_engine() -> float:
    """What a fresh worker does before its first task: import torch and the engine."""
    t0 = time.perf_counter()
    import core.tracin.stage  # noqa: F401

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

    from core import store
    from core.cli import main
    from core.models import build_model, load_tokenizer
    from core.tracin import compute, plan

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
    args = parser.parse_args()
    if args.paper_only:
        _quiet()
        with tempfile.TemporaryDirectory() as tmp:
            paper_plan(Path(tmp), args.overhead)
        return
    _quiet()
    import logging

    import ray
    import torch

    from core.executors import check_executor

    print(f"cores: {os.cpu_count()}, load: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base = train_quick(tmp / "cache")
        print(f"quick preset trained in {time.perf_counter() - t0:.0f} s")
        torch.set_num_threads(1)  # local with one thread: the same CPU as one Ray worker
        local_wall, local = timed_tracin(fresh_copy(base, tmp / "local"), check_executor("local"))
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
        if args.paper_task:
            paper_plan(tmp, overhead)


def paper_plan(tmp: Path, overhead: float) -> None:
    """Time one paper-preset task and print its 8-worker plans."""
    secs, n_train, n_test = paper_task_seconds(tmp / "paper")
    print(f"paper preset, scope all: one task (512 train × {n_test} test) {secs:.1f} s")
    plan_row("paper preset all parameters, 1,600 train", n_train, n_test, 10, secs, overhead)
    plan_row("paper preset all parameters, 16,000 train", 16000, n_test, 10, secs, overhead)


if __name__ == "__main__":
    main()
