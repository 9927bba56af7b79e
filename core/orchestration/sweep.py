"""Noise sweeps: accuracy and loss against the flip rate over several seeds (paper Fig. 4–5).

Each (flip rate, seed) cell is an ordinary study run trained up to the ``train`` stage
inside ``<sweep>/cells/``, so cells resume exactly like runs and finished cells are
skipped. For one seed the sample, split and flip permutation are the same at every
rate and a rate flips the first ``round(rate × n_train)`` instances of that
permutation, so the flips nest: the 5 % flips contain the 2.5 % ones, and differences
between rates are not sampling noise.

Threshold rule: with ``acc(r)`` the mean final test accuracy over seeds at rate r and
``spread`` the sample standard deviation (ddof=1) of the final test accuracy over seeds
at rate 0, the threshold is the smallest rate r > 0 with ``acc(0) − acc(r) > spread``.
It needs rate 0 and at least two seeds; otherwise it is reported as undefined.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.execution.executors import ExecutorSpec, Resources, Work, run_tasks
from core.inputs.config import StudyConfig
from core.inputs.datasets import load_dataset
from core.options.validation import check_number, validate_study
from core.orchestration.pipeline import run_name, run_study
from core.storage import locks, store
from core.storage.errors import AtlasError

SWEEP_TABLE = store.SWEEP_TABLE
SWEEP_EPOCHS = store.SWEEP_EPOCHS
CELLS_DIR = store.SWEEP_CELLS_DIR
MAX_SEEDS = 1000


def parse_rates(text: str) -> list[float]:
    """Parse ``--flip-rates`` ('0,0.025,0.05') into sorted unique floats in [0, 1)."""
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise AtlasError(f"--flip-rates must be comma-separated numbers (got '{text}').") from None
    if not rates:
        raise AtlasError("--flip-rates is empty; give e.g. 0,0.025,0.05,0.1.")
    bad = [r for r in rates if not 0 <= r < 1]
    if bad:
        raise AtlasError(f"--flip-rates must lie in [0, 1); {bad[0]} does not.")
    return rates


def cell_name(rate: float, seed: int) -> str:
    """Folder name of one sweep cell."""
    return f"rate-{rate:g}_seed-{seed}"


def sweep_name(config: StudyConfig) -> str:
    """Default sweep folder name, derived from the run naming so reruns resume."""
    return "sweep-" + run_name(config.replace(flip_rate=0.0, seed=0))


def run_sweep(
    config: StudyConfig,
    flip_rates: list[float],
    n_seeds: int,
    cache_dir: str | Path = "cache",
    name: str | None = None,
    jobs: int = 0,
    command: str = "",
    progress: bool = True,
    executor: ExecutorSpec | None = None,
) -> Path:
    """Train every (rate, seed) cell that is not finished yet and write the sweep tables.

    The cells run on ``executor`` (:mod:`core.execution.executors`). Without one, ``jobs`` keeps its
    meaning from before executors: that many processes (0: one per two cores), and this
    process alone when that is one. With one, ``jobs`` stands in for ``--workers`` when
    that is 0 (``--jobs`` is the sweep's older name for it).
    """
    base, sweep_dir, executor = _checked_sweep(config, n_seeds, cache_dir, name, jobs, executor)
    with locks.hold(sweep_dir):
        return _sweep_locked(base, sweep_dir, flip_rates, n_seeds, executor, command, progress)


def _checked_sweep(
    config: StudyConfig,
    n_seeds: int,
    cache_dir: str | Path,
    name: str | None,
    jobs: int,
    executor: ExecutorSpec | None = None,
) -> tuple[StudyConfig, Path, ExecutorSpec]:
    """Every check a sweep makes before it writes: (base configuration, folder, executor)."""
    check_number("--seeds", n_seeds, 1, MAX_SEEDS)
    check_number("--jobs", jobs, 0, 1024)
    executor = _executor(executor, jobs)
    if config.flip_count is not None:
        raise AtlasError("--flip-count does not apply to a sweep; use --flip-rates.")
    validate_study(config, cache_dir, name)
    base = config.replace(flip_rate=0.0)
    sweep_dir = Path(cache_dir) / (name or sweep_name(base))
    # Validate the data once, in this process, before any folder is made.
    load_dataset(base)
    return base, sweep_dir, executor


def _check_same_sweep(sweep_dir: Path, base: StudyConfig) -> None:
    """Refuse to resume a sweep folder that holds a sweep of another configuration."""
    if (sweep_dir / store.MANIFEST).exists():
        old = store.load_manifest(sweep_dir)
        if old.get("config") != base.to_dict():
            raise AtlasError(
                f"{sweep_dir} holds a sweep with another configuration; choose another --name."
            )


def plan_sweep(
    config: StudyConfig,
    flip_rates: list[float],
    n_seeds: int,
    cache_dir: str | Path = "cache",
    name: str | None = None,
    jobs: int = 0,
) -> list[str]:
    """What ``sweep`` would do, as lines to print, after every check it makes; writes nothing."""
    base, sweep_dir, _ = _checked_sweep(config, n_seeds, cache_dir, name, jobs)
    _check_same_sweep(sweep_dir, base)
    cells = [(r, s) for r in flip_rates for s in range(base.seed, base.seed + n_seeds)]
    done = sum(
        store.stage_complete(sweep_dir / CELLS_DIR / cell_name(r, s), "train") for r, s in cells
    )
    return [
        "dry run: everything was checked and nothing was written",
        f"sweep folder  {sweep_dir}",
        f"cells         {len(flip_rates)} flip rates × {n_seeds} seeds = {len(cells)} trainings "
        f"({done} already done) of {base.model}, {base.epochs} epochs, "
        f"{base.n_train:,} training instances each",
    ]


def _executor(executor: ExecutorSpec | None, jobs: int) -> ExecutorSpec:
    """The executor of a sweep from ``--executor``/``--workers`` and the older ``--jobs``."""
    if executor is None:
        workers = jobs if jobs > 0 else max(1, (os.cpu_count() or 1) // 2)
        kind = "processes" if workers > 1 else "local"
        return ExecutorSpec(kind, workers if kind == "processes" else 0)
    if jobs and executor.workers and jobs != executor.workers:
        raise AtlasError(
            f"--jobs {jobs} and --workers {executor.workers} disagree; --jobs is the older "
            "name of --workers, give one of them."
        )
    if jobs and not executor.workers:
        if executor.kind == "local" and jobs > 1:
            raise AtlasError(
                f"--jobs {jobs} needs --executor processes or ray; local trains one cell at a time."
            )
        return dataclasses.replace(executor, workers=jobs if executor.kind != "local" else 0)
    return executor


def _sweep_locked(
    base: StudyConfig,
    sweep_dir: Path,
    flip_rates: list[float],
    n_seeds: int,
    executor: ExecutorSpec,
    command: str,
    progress: bool,
) -> Path:
    """:func:`run_sweep` once the sweep folder's lock is held."""
    cells = [(r, s) for r in flip_rates for s in range(base.seed, base.seed + n_seeds)]
    _check_same_sweep(sweep_dir, base)
    t0 = time.perf_counter()
    store.update_manifest(
        sweep_dir,
        kind="sweep",
        name=sweep_dir.name,
        status=store.STATUS_RUNNING,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        command=command,
        config=base.to_dict(),
        flip_rates=flip_rates,
        seeds=list(range(base.seed, base.seed + n_seeds)),
    )
    cell_root = sweep_dir / CELLS_DIR
    todo = plan_cells(sweep_dir, base, flip_rates, n_seeds)
    gpu = 1.0 if base.device == "cuda" else 0.0
    try:
        run_tasks(
            WORK,
            todo,
            executor,
            resources=Resources(cpus=1.0, gpus=gpu, memory_mb=CELL_MEMORY_MB),
            progress=progress,
            folder=sweep_dir,
        )
    except BaseException as exc:
        if isinstance(exc, Exception):
            store.update_manifest(sweep_dir, status=store.STATUS_FAILED, error=str(exc))
        raise
    table, epochs = collect_cells(cell_root, cells, base.n_train)
    store.write_parquet(sweep_dir / SWEEP_TABLE, table)
    store.write_parquet(sweep_dir / SWEEP_EPOCHS, epochs)
    store.update_manifest(
        sweep_dir,
        status=store.STATUS_COMPLETE,
        threshold=noise_threshold(table),
        executor=executor.kind,
        jobs=executor.workers if executor.kind != "local" else 1,
        timings_s={"sweep": round(time.perf_counter() - t0, 3)},
        error=None,
    )
    return sweep_dir


@dataclass(frozen=True)
class Cell:
    """One sweep cell, an independent unit: a study run trained up to 'train' in ``cells/``."""

    sweep: str
    base: StudyConfig
    flip_rate: float
    seed: int


def plan_cells(
    sweep_dir: str | Path, base: StudyConfig, flip_rates: list[float], n_seeds: int
) -> list[Cell]:
    """The cells of a sweep not trained yet, rate by rate and seed by seed."""
    root = Path(sweep_dir) / CELLS_DIR
    return [
        Cell(str(sweep_dir), base, float(r), int(s))
        for r in flip_rates
        for s in range(base.seed, base.seed + n_seeds)
        if not store.stage_complete(root / cell_name(r, s), "train")
    ]


def compute_cell(cell: Cell, threads: int = 1) -> str:
    """Train one cell (resumes a killed one; a finished one returns at once); its run folder."""
    return train_cell(cell.base, Path(cell.sweep) / CELLS_DIR, cell.flip_rate, cell.seed, threads)


def _compute_cell(cell: Cell) -> str:
    """:func:`compute_cell` as an executor runs it: with the threads torch has in the worker."""
    import torch  # heavy: only the worker that trains a cell loads it

    return compute_cell(cell, threads=torch.get_num_threads())


def _cell_name(cell: Cell) -> str:
    return cell_name(cell.flip_rate, cell.seed)


def _cell_root(cell: Cell) -> str:
    return cell.sweep


def _cell_retarget(cell: Cell, sweep: str) -> Cell:
    return dataclasses.replace(cell, sweep=sweep)


def _cell_inputs(cell: Cell) -> list[str]:
    """Nothing of the sweep folder: a cell reads the dataset (a built-in one must be fetched
    on every node, a file must be at the same path there)."""
    return []


def _cell_outputs(cell: Cell) -> list[str]:
    return [f"{CELLS_DIR}/{_cell_name(cell)}"]


# A cell as every executor (core.execution.executors) runs it; a returned cell replaces a partial one.
WORK = Work(
    stage="sweep",
    compute=_compute_cell,
    name=_cell_name,
    inputs=_cell_inputs,
    outputs=_cell_outputs,
    root=_cell_root,
    retarget=_cell_retarget,
    overwrite=True,
)
# Stated bound on a cell's resident memory (the quick preset's training peaks far below).
CELL_MEMORY_MB = 4096


def train_cell(base: StudyConfig, cell_root: Path, rate: float, seed: int, threads: int) -> str:
    """Train one cell (a study run up to 'train'); safe to call in a worker process."""
    import torch  # heavy: only the worker that trains a cell loads it

    torch.set_num_threads(threads)
    config = base.replace(flip_rate=rate, seed=seed)
    run_dir = run_study(
        config, cache_dir=cell_root, name=cell_name(rate, seed), until="train", progress=False
    )
    return str(run_dir)


def collect_cells(
    cell_root: Path, cells: list[tuple[float, int]], n_train: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per cell (final metrics) and one per cell and epoch (curves)."""
    rows, epoch_rows = [], []
    for rate, seed in cells:
        run_dir = cell_root / cell_name(rate, seed)
        manifest = store.load_manifest(run_dir)
        instances = store.load_instances(run_dir)
        logits = store.read_npy(run_dir / store.LOGITS, mmap=False)
        train = (instances["split"] == "train").to_numpy()
        last = logits[-1][train]
        hist = manifest["epochs"]
        rows.append(
            {
                "flip_rate": rate,
                "seed": seed,
                "flip_count": int(manifest["n_flipped"]),
                "final_test_accuracy": hist[-1]["test_accuracy"],
                "best_test_accuracy": max(h["test_accuracy"] for h in hist),
                "val_accuracy": hist[-1]["val_accuracy"],
                "train_loss_observed": mean_cross_entropy(
                    last, instances.loc[train, "observed_label"].to_numpy()
                ),
                "train_loss_true": mean_cross_entropy(
                    last, instances.loc[train, "label"].to_numpy()
                ),
            }
        )
        for h in hist:
            epoch_rows.append(
                {
                    "flip_rate": rate,
                    "seed": seed,
                    "epoch": h["epoch"],
                    "train_loss": h["train_loss"],
                    "val_accuracy": h["val_accuracy"],
                    "test_accuracy": h["test_accuracy"],
                }
            )
    return pd.DataFrame(rows), pd.DataFrame(epoch_rows)


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``labels`` under ``logits`` (n, 2), computed stably."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def noise_threshold(table: pd.DataFrame) -> dict[str, Any]:
    """The smallest flip rate whose mean accuracy drop exceeds the seed spread at rate 0."""
    rule = (
        "smallest flip rate r > 0 with mean_acc(0) - mean_acc(r) > spread, "
        "spread = sample std (ddof=1) of final test accuracy over seeds at rate 0"
    )
    out: dict[str, Any] = {"rate": None, "rule": rule}
    zero = table.loc[table["flip_rate"] == 0, "final_test_accuracy"]
    if zero.empty:
        return {**out, "note": "rate 0 is not in the sweep, so there is no clean reference"}
    if len(zero) < 2:
        return {**out, "note": "one seed only: the spread at rate 0 is unknown"}
    spread = float(zero.std(ddof=1))
    ref = float(zero.mean())
    means = table.groupby("flip_rate")["final_test_accuracy"].mean()
    drops = {float(r): ref - float(m) for r, m in means.items()}
    out.update(spread_at_zero=spread, mean_accuracy_at_zero=ref, drops=drops)
    for rate in sorted(drops):
        if rate > 0 and drops[rate] > spread:
            out["rate"] = rate
            break
    if out["rate"] is None:
        out["note"] = "no rate in the sweep drops accuracy by more than the spread at rate 0"
    return out


def sweep_table(sweep_dir: str | Path) -> list[dict]:
    """Rows of ``sweep.parquet`` for ``show --json`` (empty until the sweep has finished)."""
    path = Path(sweep_dir) / SWEEP_TABLE
    if not path.exists():
        return []
    return store.read_parquet(path, ("flip_rate", "seed")).to_dict(orient="records")
