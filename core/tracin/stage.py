"""The tracin stage of a run: options from the run's config, its checkpoints and data."""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import store
from core.errors import AtlasError
from core.tracin.engine import TracInCP
from core.tracin.shards import write_per_checkpoint
from core.tracin_options import parse_scope


def _run_checkpoints(run: Path, manifest: dict[str, Any]) -> list[tuple[Path, float]]:
    """The run's (checkpoint folder, lr) list, or :class:`AtlasError` if training is incomplete."""
    entries = manifest.get("checkpoints") or []
    if not store.stage_done(run, "train") or not entries:
        raise AtlasError(
            f"{run} has no complete checkpoints yet; finish training first (python -m core run)."
        )
    out = []
    for entry in entries:
        path = run / str(entry.get("path", ""))
        if not entry.get("path") or not path.is_dir():
            raise AtlasError(f"Checkpoint {path} listed in the manifest is missing.")
        if entry.get("lr") is None:
            raise AtlasError(f"Checkpoint {path} has no learning rate in the manifest.")
        out.append((path, float(entry["lr"])))
    return out


def _run_options(
    run: Path, scope: str | None, project: int | None, seed: int | None
) -> tuple[dict[str, Any], Any]:
    """Resolve and validate scope/projection against the run's config defaults."""
    from core.config import config_from_dict

    manifest = store.load_manifest(run)
    config = config_from_dict(manifest.get("config") or {})
    scope = scope or config.tracin_params
    project = project if project is not None else config.tracin_project
    seed = seed if seed is not None else config.tracin_seed
    parse_scope(scope)
    if project is not None and int(project) <= 0:
        raise AtlasError(f"--project must be a positive dimension (got {project}).")
    options = {
        "params": scope,
        "project": None if project is None else int(project),
        "seed": int(seed) if project is not None else None,
    }
    return options, (manifest, config)


def _run_data(
    run: Path, max_length: int, test_rows: np.ndarray | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, np.ndarray]:
    """Encode the run's train (observed labels) and test (true labels) instances."""
    from core.models import encode, load_tokenizer

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
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Process peak RSS (and CUDA peak allocation) in MiB."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run_tracin(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    progress: bool = True,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The tracin stage: write tracin.npy, tracin_per_checkpoint.npy and self_influence.npy.

    Options default to the run's config (``tracin_params``, ``tracin_project``,
    ``tracin_seed``). Skipped when already complete with the same options; resumes from
    the shards of an interrupted run. Returns the manifest's ``tracin`` entry.
    """
    from core.models import load_classifier, resolve_device

    run = Path(run_dir)
    options, (manifest, config) = _run_options(run, scope, project, seed)
    checkpoints = _run_checkpoints(run, manifest)
    previous = manifest.get("tracin") or {}
    outputs = [
        run / store.TRACIN,
        run / store.TRACIN_PER_CHECKPOINT,
        run / store.SELF_INFLUENCE,
        run / store.GRAD_NORMS_TRAIN,
    ]
    if (
        store.stage_done(run, "tracin")
        and {k: previous.get(k) for k in options} == options
        and all(p.exists() for p in outputs)
    ):
        return previous
    dev = resolve_device(device)
    engine = TracInCP(
        checkpoints,
        scope=options["params"],
        project=options["project"],
        seed=options["seed"] or 0,
        device=dev,
        dtype=dtype,
        loader=load_classifier,
    )
    train, test, _ = _run_data(run, config.max_length)
    # Loads the first checkpoint: a scope that selects nothing fails here, before any write.
    n_params = engine.check()

    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    store.mark_stage(run, "tracin", store.STATUS_RUNNING, **options)
    shard_dir = run / store.TRACIN_SHARDS_DIR
    result = engine.compute(train, test, shard_dir=shard_dir, progress=progress)
    n_train = len(train["labels"])
    n_test = 0 if test is None else len(test["labels"])
    matrix = result.matrix if result.matrix is not None else np.zeros((0, n_train), np.float32)
    store.write_npy(run / store.TRACIN, matrix.astype(np.float32))
    write_per_checkpoint(
        shard_dir,
        len(checkpoints),
        n_train,
        n_test,
        engine.chunk_size,
        run / store.TRACIN_PER_CHECKPOINT,
    )
    store.write_npy(run / store.SELF_INFLUENCE, result.self_influence.astype(np.float32))
    store.write_npy(run / store.GRAD_NORMS_TRAIN, result.train_grad_norms)
    if result.test_grad_norms is not None:
        store.write_npy(run / store.GRAD_NORMS_TEST, result.test_grad_norms)
    seconds = time.perf_counter() - start
    info = {
        **options,
        "n_params": n_params,
        "n_checkpoints": len(checkpoints),
        "n_train": n_train,
        "n_test": n_test,
        "device": str(dev),
        "dtype": dtype,
        "chunk_size": engine.chunk_size,
        "seconds": round(seconds, 2),
        **_peak_memory_mb(dev),
    }
    store.update_manifest(run, tracin=info)
    stage_info = {k: v for k, v in info.items() if k != "seconds"}
    store.mark_stage(run, "tracin", store.STATUS_COMPLETE, seconds, **stage_info)
    # The final files hold everything the shards did; they are only resumption state.
    shutil.rmtree(shard_dir, ignore_errors=True)
    return info
