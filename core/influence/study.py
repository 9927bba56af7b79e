"""The approximation study: a scope or projection measured against exact TracIn."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.influence.registry import engine_for
from core.influence.stage import encode_run_data, resolve_options, run_checkpoints
from core.storage import store
from core.storage.errors import AtlasError


def scope_error(
    exact: np.ndarray, approx: np.ndarray, ks: Sequence[int] = (10, 50)
) -> dict[str, Any]:
    """Per-test-row agreement of approximate with exact scores (both (n_test, n_train)).

    Returns ``per_test`` rows (Spearman rank correlation; top-k overlap of proponents and
    of opponents, as fractions of k) and their mean/median/min in ``summary``.
    """
    from scipy.stats import rankdata

    exact = np.asarray(exact, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    if exact.shape != approx.shape or exact.ndim != 2:
        raise AtlasError("Exact and approximate scores must be matrices of one shape.")
    n_train = exact.shape[1]
    rows = []
    for e, a in zip(exact, approx, strict=True):
        re_, ra = rankdata(e), rankdata(a)
        sd = re_.std() * ra.std()
        row: dict[str, float] = {
            "spearman": float(((re_ - re_.mean()) * (ra - ra.mean())).mean() / sd) if sd else 1.0
        }
        for k in ks:
            kk = min(k, n_train)
            top_e, top_a = np.argsort(-e)[:kk], np.argsort(-a)[:kk]
            bot_e, bot_a = np.argsort(e)[:kk], np.argsort(a)[:kk]
            row[f"top{k}_overlap"] = len(np.intersect1d(top_e, top_a)) / kk
            row[f"bottom{k}_overlap"] = len(np.intersect1d(bot_e, bot_a)) / kk
        rows.append(row)
    summary = {}
    for key in rows[0] if rows else []:
        vals = np.array([r[key] for r in rows])
        summary[key] = {
            "mean": float(vals.mean()),
            "median": float(np.median(vals)),
            "min": float(vals.min()),
        }
    return {"per_test": rows, "summary": summary}


def compare_to_exact(
    run_dir: str | os.PathLike,
    scope: str | None = None,
    project: int | str | None = None,
    seed: int | None = None,
    n_test: int = 20,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Measure a scope/projection against exact 'all' TracIn on ``n_test`` test instances.

    Test instances are evenly spaced over the test split. Scores already in the run's
    tracin.npy are reused when they were computed with the options needed (their seconds
    are then reported as 0). Writes nothing to the run.
    """
    from core.learning.models import load_classifier, resolve_device  # transformers: on use

    run = Path(run_dir)
    options, (manifest, config) = resolve_options(run, scope, project, seed)
    checkpoints = run_checkpoints(run, manifest)
    if n_test <= 0:
        raise AtlasError(f"--compare-n must be positive (got {n_test}).")
    n_test_all = int((store.load_instances(run)["split"] == "test").sum())
    if n_test_all == 0:
        raise AtlasError(f"{run} has no test instances to compare on.")
    rows = np.unique(np.linspace(0, n_test_all - 1, min(n_test, n_test_all)).round().astype(int))
    train, test, test_ids = encode_run_data(run, config.max_length, rows)
    dev = resolve_device(device)

    def scores(
        scope_: str, project_: int | str | None, seed_: int
    ) -> tuple[np.ndarray, float, int]:
        engine = engine_for(
            checkpoints,
            scope=scope_,
            project=project_,
            seed=seed_,
            device=dev,
            loader=load_classifier,
        )
        res = engine.compute(train, test, progress=progress)
        return res.matrix, res.seconds, res.n_params

    def stored(opts: dict[str, Any]) -> tuple[np.ndarray, float, int] | None:
        """Rows of the run's tracin.npy when it was computed with ``opts``."""
        info = manifest.get("tracin") or {}
        if not store.stage_done(run, "tracin") or any(info.get(k) != v for k, v in opts.items()):
            return None
        return np.asarray(store.read_npy(run / store.TRACIN)[rows]), 0.0, int(info["n_params"])

    exact_opts = {"params": "all", "project": None, "seed": None}
    exact, t_exact, n_exact = stored(exact_opts) or scores("all", None, 0)
    approx, t_approx, n_approx = stored(options) or scores(
        options["params"], options["project"], options["seed"] or 0
    )
    report = scope_error(exact, approx)
    for row, tid in zip(report["per_test"], test_ids, strict=True):
        row["test_id"] = int(tid)
    return {
        **options,
        "n_test": len(rows),
        "n_train": int(exact.shape[1]),
        "n_params_exact": n_exact,
        "n_params": n_approx,
        "seconds_exact": round(t_exact, 2),
        "seconds_approx": round(t_approx, 2),
        **report,
    }
