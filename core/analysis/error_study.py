"""The error study: how far each cheap TracIn method lands from exact all-parameter TracIn.

``python -m core error-study RUN --methods last-2,head,dense:256,factorized:16,factorized:64
--test-subset misclassified+random:20`` computes, on a subset of the run's test instances,

- the reference: exact TracIn over ALL parameters (the definition), test rows
  selected (a test row's scores do not depend on which other test rows are computed with it,
  see ``tests/test_error_study.py``), and exact self-influence of every training instance;
- each method's scores on the same rows and its self-influence;

and stores, per test row × method (``error_study.parquet``):

- ``spearman``: rank correlation of the row's training scores with the exact row;
- ``top10_overlap`` / ``top1pct_overlap``: share of the exact row's 10 (resp. ⌈1 % of
  n_train⌉) largest scores (proponents) that the method also puts in its top 10 / 1 %;
- ``shape_exact``, ``shape_method``, ``shape_agree``: the curve's shape class
  (:func:`core.analysis.shapes.classify` with the run's analyze thresholds, or the defaults) under
  exact and method scores, and whether they agree;
- ``end_ratio_exact``, ``end_ratio_method``, ``end_ratio_diff``: the flipped instances' end
  ratio (%) under both, and method − exact in points;

and per method (``error_study.json``, ``methods.<name>``): the summary of those rows
(median/mean/min Spearman, overlaps, share of shape agreement, mean and max |end-ratio
difference|), the self-influence detector (TracIn self-influence from that method's
gradients, ranking training instances against the known flips) as recall@10 % and average
precision beside the exact self-influence's, the seconds the method took on this machine,
its parameter count, and where its scores came from (computed, or the rows of the run's own
``tracin.npy`` when that was computed with the method's options).

Work is resumable: each method's (checkpoint × chunk) shards live in
``error_study_work/<method>/`` (the engine's shard format, options recorded and checked) with
the seconds spent so far; a finished method is kept as ``<method>/result.npz``, so a rerun
computes only what is missing. Nothing outside the run folder is written.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis import metrics, shapes
from core.inputs.config import config_from_dict
from core.options.error_study_options import (
    DEFAULT_METHODS,
    DEFAULT_SUBSET,
    Method,
    parse_dtype,
    parse_methods,
    parse_subset,
)
from core.storage import provenance, store
from core.storage.errors import AtlasError

TABLE = store.ERROR_STUDY
SUMMARY = store.ERROR_STUDY_SUMMARY
WORK_DIR = store.ERROR_STUDY_WORK
REFERENCE = Method("all", "all", None)
DETECT_FRACTION = 0.1


# ---- metrics (numpy only)


def _spearman(e: np.ndarray, a: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 for two constant rows."""
    from scipy.stats import rankdata

    re_, ra = rankdata(e), rankdata(a)
    sd = re_.std() * ra.std()
    return float(((re_ - re_.mean()) * (ra - ra.mean())).mean() / sd) if sd else 1.0


def _top_overlap(e: np.ndarray, a: np.ndarray, k: int) -> float:
    """Share of the exact row's top-k (largest) training instances in the method's top-k."""
    k = max(1, min(int(k), e.shape[0]))
    top_e = shapes.sort_order(e)[:k]
    top_a = shapes.sort_order(a)[:k]
    return len(np.intersect1d(top_e, top_a)) / k


def top1pct_k(n_train: int) -> int:
    """Rows in the top 1 %: ⌈n_train / 100⌉ (16 of 1,600)."""
    return max(1, math.ceil(n_train / 100))


def row_metrics(
    exact: np.ndarray,
    approx: np.ndarray,
    flipped: np.ndarray,
    rule: shapes.ShapeRule = shapes.DEFAULT_RULE,
) -> pd.DataFrame:
    """Per-test-row agreement of ``approx`` with ``exact`` (both (n_rows, n_train)).

    ``flipped`` is the boolean (n_train,) mask of flipped training instances; ``rule`` the
    shape rule both are classed by.
    """
    exact = np.atleast_2d(np.asarray(exact, dtype=np.float64))
    approx = np.atleast_2d(np.asarray(approx, dtype=np.float64))
    if exact.shape != approx.shape:
        raise AtlasError(
            f"Exact {exact.shape} and approximate {approx.shape} scores differ in shape."
        )
    flipped = np.asarray(flipped, dtype=bool)
    ce = shapes.classify(exact, flipped, rule=rule)
    ca = shapes.classify(approx, flipped, rule=rule)
    k1 = top1pct_k(exact.shape[1])
    rows = []
    for i, (e, a) in enumerate(zip(exact, approx, strict=True)):
        rows.append(
            {
                "spearman": _spearman(e, a),
                "top10_overlap": _top_overlap(e, a, 10),
                "top1pct_overlap": _top_overlap(e, a, k1),
                "shape_exact": str(ce["shape"][i]),
                "shape_method": str(ca["shape"][i]),
                "shape_agree": bool(ce["shape"][i] == ca["shape"][i]),
                "s_bulk_exact": float(ce["s_bulk"][i]),
                "s_bulk_method": float(ca["s_bulk"][i]),
                "end_ratio_exact": float(ce["end_ratio"][i]),
                "end_ratio_method": float(ca["end_ratio"][i]),
                "end_ratio_diff": float(ca["end_ratio"][i] - ce["end_ratio"][i]),
            }
        )
    return pd.DataFrame(rows)


def detector_metrics(self_influence: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """recall@10 % and average precision of a self-influence ranking against the flips."""
    scores = np.asarray(self_influence, dtype=np.float64)
    flipped = np.asarray(flipped, dtype=bool)
    if not flipped.any():
        return {"recall_at_10pct": float("nan"), "average_precision": float("nan")}
    return {
        "recall_at_10pct": metrics.recall_at_fraction(scores, flipped, DETECT_FRACTION),
        "average_precision": metrics.average_precision(scores, flipped),
    }


def summarize(rows: pd.DataFrame) -> dict[str, float]:
    """One method's rows in a few numbers (medians, shares, worst cases)."""
    if rows.empty:
        return {}
    diff = rows["end_ratio_diff"].abs()
    return {
        "n_rows": len(rows),
        "spearman_median": float(rows["spearman"].median()),
        "spearman_mean": float(rows["spearman"].mean()),
        "spearman_min": float(rows["spearman"].min()),
        "top10_overlap_mean": float(rows["top10_overlap"].mean()),
        "top1pct_overlap_mean": float(rows["top1pct_overlap"].mean()),
        "shape_agreement": float(rows["shape_agree"].mean()),
        "end_ratio_diff_mean_abs": float(diff.mean()),
        "end_ratio_diff_max_abs": float(diff.max()),
    }


# ---- test subset


def select_test_rows(
    run_dir: str | os.PathLike, subset: str = DEFAULT_SUBSET, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (within the test split, ascending) of the subset, and whether each is
    misclassified by the last checkpoint (argmax of the run's logits.npy ≠ true label).

    ``misclassified+random:N``: every misclassified test instance plus N others drawn
    without replacement by ``numpy.random.default_rng(seed)`` (default: the run's seed),
    or all the others when fewer than N exist.
    """
    run = Path(run_dir)
    with_mis, n_random = parse_subset(subset)
    instances = store.load_instances(run)
    is_test = (instances["split"] == "test").to_numpy()
    n_test = int(is_test.sum())
    if n_test == 0:
        raise AtlasError(f"{run} has no test instances for the error study.")
    logits = np.asarray(store.read_npy(run / store.LOGITS))
    pred = logits[-1][is_test].argmax(axis=1)
    wrong = pred != instances.loc[is_test, "label"].to_numpy()
    if n_random is None:
        return np.arange(n_test), wrong
    if seed is None:
        seed = int((store.load_manifest(run).get("config") or {}).get("seed") or 0)
    chosen = np.flatnonzero(wrong) if with_mis else np.array([], dtype=int)
    rest = np.setdiff1d(np.arange(n_test), chosen)
    # A small test split: every remaining instance (the study records how many rows it used),
    # rather than a refusal of the default subset.
    drawn = np.random.default_rng(seed).choice(rest, size=min(n_random, len(rest)), replace=False)
    rows = np.sort(np.concatenate([chosen, drawn]).astype(int))
    if len(rows) == 0:
        raise AtlasError(f"{run}'s last checkpoint misclassifies no test instance.")
    return rows, wrong[rows]


# ---- computing one method


def parse_checkpoints(text: str | None, k: int) -> list[int]:
    """``--checkpoints`` (1-based positions, comma-separated; None: all) as 0-based positions."""
    if text is None or str(text).strip() in ("", "all"):
        return list(range(k))
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= k:
            raise AtlasError(
                f"--checkpoints '{text}' must list checkpoint numbers between 1 and {k}."
            )
        if int(part) - 1 not in out:
            out.append(int(part) - 1)
    return sorted(out)


def _stored_scores(
    run: Path,
    manifest: dict[str, Any],
    method: Method,
    dtype: str,
    rows: np.ndarray,
    used: list[int],
) -> dict[str, Any] | None:
    """The run's own tracin.npy rows and self-influence when computed with ``method``'s options.

    With a subset of checkpoints (``used``), the rows come from tracin_per_checkpoint.npy and
    the self-influence from the stored gradient norms (Σ η_i ‖g_i‖² over ``used``)."""
    info = manifest.get("tracin") or {}
    wanted = {"params": method.params, "project": method.project}
    if (
        not store.stage_done(run, "tracin")
        or any(info.get(k) != v for k, v in wanted.items())
        or (method.project is not None and info.get("seed") != _seed(manifest))
        or info.get("dtype", "float32") != dtype
        or provenance.stale_reason(run, "tracin") is not None
        or not (run / store.TRACIN).exists()
        or not (run / store.SELF_INFLUENCE).exists()
    ):
        return None
    k = len(manifest.get("checkpoints") or [])
    seconds = float(info.get("seconds") or 0.0)
    source = f"run {store.TRACIN} (all {info.get('n_test')} test rows, tracin stage)"
    if len(used) == k:
        matrix = np.asarray(store.read_npy(run / store.TRACIN))[rows]
        self_inf = np.asarray(store.read_npy(run / store.SELF_INFLUENCE))
    else:
        if not (run / store.TRACIN_PER_CHECKPOINT).exists():
            return None
        stack = store.read_npy(run / store.TRACIN_PER_CHECKPOINT)
        norms = np.asarray(store.read_npy(run / store.GRAD_NORMS_TRAIN), dtype=np.float32)
        lrs = [float(c["lr"]) for c in manifest["checkpoints"]]
        matrix = np.zeros((len(rows), stack.shape[2]), dtype=np.float32)
        self_inf = np.zeros(stack.shape[2], dtype=np.float32)
        for ci in used:
            matrix += np.asarray(stack[ci])[rows]
            self_inf += np.float32(lrs[ci]) * norms[ci] ** 2
        source = (
            f"run {store.TRACIN_PER_CHECKPOINT} and {store.GRAD_NORMS_TRAIN} (tracin stage); "
            "seconds: the stage's for every checkpoint"
        )
    return {
        "matrix": matrix,
        "self_influence": self_inf,
        "seconds": seconds * len(used) / max(k, 1),
        "seconds_per_checkpoint": seconds / max(k, 1),
        "n_params": int(info.get("n_params") or 0),
        "source": source,
    }


def _seed(manifest: dict[str, Any]) -> int:
    """The run's projection seed."""
    return int((manifest.get("config") or {}).get("tracin_seed") or 0)


def _engine(
    checkpoints: list[tuple[Path, float]], method: Method, seed: int, dtype: str, device: Any
) -> Any:
    """The TracIn engine of one method (core.influence.registry: TracInCP, or the factorized
    engine for factorized:K)."""
    from core.influence.registry import engine_for  # torch: imported when a study runs
    from core.learning.models import load_classifier

    return engine_for(
        checkpoints,
        scope=method.params,
        project=method.project,
        seed=seed,
        device=device,
        dtype=dtype,
        loader=load_classifier,
    )


def _compute(
    engine: Any,
    method: Method,
    tr: Any,
    te: Any,
    folder: Path,
    log: Any,
    used: list[int],
) -> dict[str, Any]:
    """One method's scores on the subset over the checkpoints ``used`` (0-based positions).

    Shards live in ``folder`` (resumable; a shard folder always spans every checkpoint of
    the run, so a study over some checkpoints can later be completed to all); the seconds
    spent on each checkpoint are accumulated in ``seconds.json``.
    """
    from core.influence.shards import ShardSink  # torch: loaded when it computes

    checkpoints = engine.checkpoints
    result_file = folder / "result.npz"
    time_file = folder / "seconds.json"
    size = engine.chunk_size
    chunks = [(lo, min(lo + size, tr.n)) for lo in range(0, tr.n, size)]
    options = engine.shard_options(tr, te, len(chunks))
    key = json.dumps({**options, "used": used}, sort_keys=True)
    if result_file.exists():
        saved = np.load(result_file, allow_pickle=False)
        if str(saved["options"]) == key:
            return {
                "matrix": saved["matrix"],
                "self_influence": saved["self_influence"],
                "seconds": float(saved["seconds"]),
                "seconds_per_checkpoint": float(saved["seconds"]) / max(len(used), 1),
                "n_params": int(saved["n_params"]),
                "source": "computed (error_study_work, reused)",
            }
    sink = ShardSink(folder / "shards", options)  # refuses shards of other options
    per_ckpt: dict[str, float] = {}
    if time_file.exists():
        per_ckpt = {str(k): float(v) for k, v in store.read_json(time_file).items()}
    for ci in used:
        start = time.perf_counter()
        done = engine.compute_checkpoint(ci, tr, te, chunks, range(len(chunks)), sink)
        if done:
            per_ckpt[str(ci)] = per_ckpt.get(str(ci), 0.0) + time.perf_counter() - start
            store.write_json(time_file, per_ckpt)
            log(
                f"  {method.name}: checkpoint {ci + 1}/{len(checkpoints)} ({per_ckpt[str(ci)]:.0f} s)"
            )
    if engine.n_params is None:
        engine.check()
    matrix = np.zeros((te.n, tr.n), dtype=np.float32)
    self_inf = np.zeros(tr.n, dtype=np.float32)
    for ci in used:  # checkpoint order, as core.influence's aggregate sums
        for c, (lo, hi) in enumerate(chunks):
            block = sink.get(ci, c)
            matrix[:, lo:hi] += block[: te.n]
            self_inf[lo:hi] += block[te.n]
    spent = float(sum(per_ckpt.get(str(ci), 0.0) for ci in used))
    tmp = folder / "result.tmp.npz"
    np.savez(
        tmp,
        matrix=matrix,
        self_influence=self_inf,
        seconds=np.float64(spent),
        n_params=np.int64(engine.n_params),
        options=np.str_(key),
    )
    os.replace(tmp, result_file)
    return {
        "matrix": matrix,
        "self_influence": self_inf,
        "seconds": spent,
        "seconds_per_checkpoint": spent / max(len(used), 1),
        "n_params": int(engine.n_params),
        "source": "computed",
    }


def check_dtype_supported(dtype: str, device: Any) -> None:
    """Refuse bf16 where the device has no native bf16 arithmetic (see core.influence.engine)."""
    from core.influence.engine import check_dtype  # torch: loaded when it computes

    check_dtype(dtype, device)


def error_study(
    run_dir: str | os.PathLike,
    methods: str = DEFAULT_METHODS,
    test_subset: str = DEFAULT_SUBSET,
    dtype: str = "fp32",
    device: str = "auto",
    progress: bool = True,
    command: str | None = None,
    checkpoints: str | None = None,
) -> dict[str, Any]:
    """Run the error study of a run and write ``error_study.parquet`` and ``error_study.json``.

    Every option is validated (and bf16 checked against the device) before anything is
    written; see the module docstring for what is computed.
    """
    # torch and transformers: imported when a study runs
    from core.influence.inputs import EncodedData
    from core.influence.stage import encode_run_data, run_checkpoints
    from core.learning.models import resolve_device

    run = Path(run_dir)
    wanted = parse_methods(methods)
    dtype_name = parse_dtype(dtype)
    manifest = store.load_manifest(run)
    ckpts = run_checkpoints(run, manifest)
    used = parse_checkpoints(checkpoints, len(ckpts))
    dev = resolve_device(device)
    check_dtype_supported(dtype_name, dev)
    rows, wrong = select_test_rows(run, test_subset)
    config = config_from_dict(manifest.get("config") or {})
    seed = _seed(manifest)
    instances = store.load_instances(run)
    train_df = instances[instances["split"] == "train"]
    flipped = train_df["flipped"].to_numpy(dtype=bool)
    rule = _stored_rule(run)

    def log(message: str) -> None:
        if progress:
            print(message, flush=True)

    train, test, test_ids = encode_run_data(run, config.max_length, rows)
    tr, te = EncodedData(train, "training"), EncodedData(test, "test")
    work = run / WORK_DIR
    # Every engine is built and checked on the first checkpoint (a factorized method on a
    # model without linear layers, a scope that selects nothing) before anything is written.
    engines = {}
    for method in [REFERENCE, *wanted]:
        # --dtype is for projected dot products; exact scopes and the reference stay fp32.
        dt = dtype_name if method.project is not None else "float32"
        engines[method.name] = (_engine(ckpts, method, seed, dt, dev), dt)
        engines[method.name][0].check()
    results: dict[str, dict[str, Any]] = {}
    for method in [REFERENCE, *wanted]:
        engine, dt = engines[method.name]
        log(f"error study: {method.name} ({dt}) on {len(rows)} test rows")
        res = _stored_scores(run, manifest, method, dt, rows, used)
        if res is None:
            res = _compute(engine, method, tr, te, work / method.slug, log, used)
        res["dtype"] = dt
        results[method.name] = res
        log(f"  {method.name}: {res['seconds']:.1f} s ({res['source']})")

    exact = results[REFERENCE.name]
    tables = []
    summary_methods: dict[str, Any] = {}
    for method in wanted:
        res = results[method.name]
        table = row_metrics(exact["matrix"], res["matrix"], flipped, rule)
        table.insert(0, "method", method.name)
        table.insert(1, "test_id", test_ids.astype(np.int64))
        table.insert(2, "test_position", rows.astype(np.int64))
        table.insert(3, "misclassified", wrong.astype(bool))
        tables.append(table)
        summary_methods[method.name] = {
            "params": method.params,
            "project": method.project,
            "dtype": res["dtype"],
            "n_params": res["n_params"],
            "seconds": round(float(res["seconds"]), 2),
            "seconds_per_checkpoint": round(float(res["seconds_per_checkpoint"]), 2),
            "source": res["source"],
            **summarize(table),
            "self_influence": {
                **detector_metrics(res["self_influence"], flipped),
                "spearman_vs_exact": _spearman(exact["self_influence"], res["self_influence"]),
            },
        }
    table = pd.concat(tables, ignore_index=True)
    timings = manifest.get("timings_s") or {}
    summary = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "methods": summary_methods,
        "reference": {
            "params": "all",
            "project": None,
            "dtype": "float32",
            "n_params": exact["n_params"],
            "seconds": round(float(exact["seconds"]), 2),
            "seconds_per_checkpoint": round(float(exact["seconds_per_checkpoint"]), 2),
            "source": exact["source"],
            "self_influence": detector_metrics(exact["self_influence"], flipped),
        },
        "test_subset": test_subset,
        "test_ids": [int(t) for t in test_ids],
        "test_positions": [int(r) for r in rows],
        "n_misclassified": int(wrong.sum()),
        "n_test_rows": len(rows),
        "n_train": int(tr.n),
        "n_flipped": int(flipped.sum()),
        "n_checkpoints": len(ckpts),
        "checkpoints_used": [i + 1 for i in used],
        "top1pct_k": top1pct_k(int(tr.n)),
        "thresholds": rule.to_json(),
        "detector": "TracIn self-influence of each method; recall after inspecting 10 % of "
        "the training set and average precision against the known flips",
        "train_seconds": timings.get("train"),
        "device": str(dev),
        "dtype": dtype_name,
        "seed": seed,
    }
    store.write_parquet(run / TABLE, table)
    store.write_json(run / SUMMARY, summary)
    return summary


def _stored_rule(run: Path) -> shapes.ShapeRule:
    """The shape rule the run's analyze stage used, or core.analysis.shapes' defaults."""
    path = run / store.ANALYSIS
    return shapes.ShapeRule.of_analysis(store.read_json(path) if path.exists() else None)


def load_error_study(run_dir: str | os.PathLike) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """The stored study (summary, table) of a run, or None when it has none (torch-free)."""
    run = Path(run_dir)
    if not (run / SUMMARY).exists() or not (run / TABLE).exists():
        return None
    return store.read_json(run / SUMMARY), pd.read_parquet(run / TABLE)
