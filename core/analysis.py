"""The analyze stage: curve shapes, end ratios, [CLS] geometry and their correlations, into the run.

Reads ``tracin.npy``, ``logits.npy``, ``instances.parquet`` and one checkpoint;
writes ``shapes.parquet``, ``curves.parquet``, ``embeddings.npy``,
``distances.npy``, ``coords.parquet`` and ``analysis.json`` (see
``docs/run-store.md``). The paper's two questions are answered in
``analysis.json``: does S-shapedness go with flipped instances at the curve's
ends (Fig. 3), and does it go with the test instance's distance to the training
data (Fig. 2)? Correlations are reported for all test instances and split into
correctly classified and misclassified ones (the paper's focus).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import shapes, store
from core.errors import AtlasError

STAGE = "analyze"
GROUPS = ("all", "correct", "misclassified")
# Rows of the TracIn matrix handled at once: bounds the float64 copies for big runs.
_ROW_BLOCK = 256
# Columns of shapes.parquet that summary_rows (and `show --json`) reports.
SUMMARY_COLUMNS = ["id", "correct", "s_raw", "s", "shape", "end_ratio", "mean_distance"]


def analyze_run(
    run_dir: str | os.PathLike,
    checkpoint: int = -1,
    s_min: float = shapes.S_MIN,
    z_max: float = shapes.Z_MAX,
    k: int = 10,
    max_points: int = 2000,
    progress: bool = True,
    force: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the analyze stage on a run folder and return the content of ``analysis.json``.

    ``checkpoint`` indexes the manifest's checkpoint list (-1: the last) and chooses
    the model whose [CLS] vectors give the embeddings; correctness always comes from
    the last epoch's logits. The stage is skipped (its stored result returned) when
    it is complete with the same checkpoint and parameters, unless ``force``.
    ``device`` defaults to the run's configured device.
    """
    run = Path(run_dir)
    manifest = store.load_manifest(run)
    inputs = _load_inputs(run)  # raises AtlasError before anything is written
    params = _validate_params(manifest, checkpoint, s_min, z_max, k, max_points)
    previous = manifest.get("stages", {}).get(STAGE, {})
    if (
        not force
        and previous.get("status") == store.STATUS_COMPLETE
        and previous.get("params") == params
        and (run / store.ANALYSIS).exists()
    ):
        _say(progress, "analyze: already complete (use --force to recompute)")
        return store.read_json(run / store.ANALYSIS)

    store.mark_stage(run, STAGE, store.STATUS_RUNNING)
    try:
        return _analyze(run, manifest, inputs, params, progress, device)
    except Exception as exc:
        # An interrupt leaves the stage 'running' (the next call recomputes); failures say why.
        store.mark_stage(run, STAGE, store.STATUS_FAILED, error=str(exc) or type(exc).__name__)
        raise


def summary_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return one JSON-ready row per test instance: id, correct, s_raw, s, shape, end_ratio, mean_distance."""
    path = Path(run_dir) / store.SHAPES
    if not path.exists():
        raise AtlasError(f"{path} does not exist; run `python -m core analyze {run_dir}` first.")
    df = pd.read_parquet(path, columns=SUMMARY_COLUMNS)
    return [{c: _plain(row[c]) for c in SUMMARY_COLUMNS} for row in df.to_dict("records")]


def correlations(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the stored analysis for ``show --json``, with the correlations at the top level.

    Keys: ``s_vs_end_ratio`` and ``s_vs_mean_distance`` (each split into all /
    correct / misclassified), then the rest of ``analysis.json`` (checkpoint,
    thresholds, k, counts, ``by_shape``, ``knn_flip_share``).
    """
    path = Path(run_dir) / store.ANALYSIS
    if not path.exists():
        raise AtlasError(f"{path} does not exist; run `python -m core analyze {run_dir}` first.")
    analysis = store.read_json(path)
    return {**analysis.pop("correlations", {}), **analysis}


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Spearman and Pearson correlation with p-values; None where undefined.

    Pairs with a NaN on either side are dropped first. Fewer than 3 pairs or a
    constant side give None rather than an error or NaN, so the result is valid JSON.
    """
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    out: dict[str, Any] = {
        "n": int(x.size),
        "spearman": None,
        "spearman_p": None,
        "pearson": None,
        "pearson_p": None,
    }
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    sp = stats.spearmanr(x, y)
    pe = stats.pearsonr(x, y)
    out.update(
        spearman=_finite(sp.statistic),
        spearman_p=_finite(sp.pvalue),
        pearson=_finite(pe.statistic),
        pearson_p=_finite(pe.pvalue),
    )
    return out


def _analyze(
    run: Path,
    manifest: dict[str, Any],
    inputs: dict[str, Any],
    params: dict[str, Any],
    progress: bool,
    device: str | None,
) -> dict[str, Any]:
    """Compute and write every analyze output; return analysis.json's content."""
    from core import geometry  # torch lives there; keep `import core.analysis` light for readers

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inst: pd.DataFrame = inputs["instances"]
    train = inst[inst["split"] == "train"]
    test = inst[inst["split"] == "test"]
    train_ids = train["id"].to_numpy(np.int64)
    test_ids = test["id"].to_numpy(np.int64)
    flipped = train["flipped"].to_numpy(bool)
    tracin = inputs["tracin"]
    logits = inputs["logits"]

    # Correctness: the final epoch's prediction against the true label.
    pred = np.asarray(logits[-1][test_ids]).argmax(axis=1)
    correct = pred == test["label"].to_numpy()

    t = time.perf_counter()
    _say(progress, f"analyze: curve shapes of {len(test_ids)} test × {len(train_ids)} train")
    fit_parts, rank_parts, curve_parts = [], [], []
    for start in range(0, len(test_ids), _ROW_BLOCK):
        block = np.asarray(tracin[start : start + _ROW_BLOCK], dtype=np.float64)
        fit_parts.append(shapes.curve_fit(block))
        rank_parts.append(shapes.flipped_ranks(block, flipped))
        curve_parts.append(
            _curve_rows(block, test_ids[start : start + _ROW_BLOCK], train_ids, flipped, params)
        )
    fit = {f: np.concatenate([getattr(p, f) for p in fit_parts]) for f in _FIT_FIELDS}
    ranks = np.concatenate(rank_parts) if rank_parts else np.zeros((0, flipped.sum()), int)
    ratio = shapes.end_ratio(ranks, len(train_ids))
    shape = shapes.shape_class(fit["s"], params["s_min"], params["z_max"])
    timings["shapes"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(progress, f"analyze: [CLS] embeddings of {len(inst)} instances (epoch {params['epoch']})")
    dev = device or manifest.get("config", {}).get("device", "auto")
    emb, _ = geometry.run_embeddings(
        run, inst["text"].tolist(), checkpoint=params["checkpoint_index"], device=dev
    )
    timings["embeddings"] = time.perf_counter() - t

    t = time.perf_counter()
    dist = geometry.euclidean_distances(emb[test_ids], emb[train_ids])
    mean_distance = dist.mean(axis=1) if dist.shape[1] else np.full(len(test_ids), np.nan)
    knn = geometry.knn_flip_share(dist, flipped, params["k"])
    timings["distances"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(progress, "analyze: 2-D maps (UMAP, PCA)")
    seed = int(manifest.get("config", {}).get("seed", 0))
    coords = geometry.project_2d(emb, seed=seed)
    timings["projection"] = time.perf_counter() - t

    t = time.perf_counter()
    shapes_df = pd.DataFrame(
        {
            "id": test_ids,
            "correct": correct,
            "s_raw": fit["s_raw"],
            "s": fit["s"],
            "shape": pd.Series(shape, dtype=object).astype(str),
            "end_ratio": ratio,
            "b_reg": fit["b_reg"],
            "a_reg": fit["a_reg"],
            "b_end": fit["b_end"],
            "a_end": fit["a_end"],
            "mean_distance": mean_distance.astype(np.float64),
            "knn_flip_share": knn,
            "flipped_ranks": [r.tolist() for r in ranks],
        }
    )
    coords_df = pd.DataFrame(
        {
            "id": inst["id"].to_numpy(np.int64),
            "umap_x": coords["umap"][:, 0],
            "umap_y": coords["umap"][:, 1],
            "pca_x": coords["pca"][:, 0],
            "pca_y": coords["pca"][:, 1],
        }
    )
    result = _summarise(
        shapes_df, params, seed, n_train=len(train_ids), n_flipped=int(flipped.sum())
    )
    store.write_npy(run / store.EMBEDDINGS, emb.astype(np.float32, copy=False))
    store.write_npy(run / store.DISTANCES, dist)
    store.write_parquet(run / store.SHAPES, shapes_df)
    store.write_parquet(run / store.CURVES, pd.concat(curve_parts, ignore_index=True))
    store.write_parquet(run / store.COORDS, coords_df)
    # analysis.json last: its presence plus the stage mark mean every other file is in place.
    store.write_json(run / store.ANALYSIS, result)
    timings["write"] = time.perf_counter() - t

    seconds = time.perf_counter() - t_start
    store.mark_stage(
        run,
        STAGE,
        store.STATUS_COMPLETE,
        seconds,
        params=params,
        timings_s={name: round(v, 3) for name, v in timings.items()},
    )
    _say(progress, f"analyze: done in {seconds:.1f} s")
    return result


_FIT_FIELDS = ("b_reg", "a_reg", "b_end", "a_end", "s_raw", "s")


def _curve_rows(
    block: np.ndarray,
    test_ids: np.ndarray,
    train_ids: np.ndarray,
    flipped: np.ndarray,
    params: dict[str, Any],
) -> pd.DataFrame:
    """Long-format downsampled sorted curves for a block of test rows."""
    order = shapes.sort_order(block)
    parts = []
    for row in range(block.shape[0]):
        y = block[row, order[row]]
        keep = flipped[order[row]]
        idx = shapes.downsample_curve(y, keep, params["max_points"])
        parts.append(
            pd.DataFrame(
                {
                    "test_id": np.full(idx.size, test_ids[row], dtype=np.int64),
                    "rank": idx.astype(np.int64),
                    "train_id": train_ids[order[row, idx]],
                    "score": y[idx].astype(np.float32),
                    "flipped": keep[idx],
                }
            )
        )
    if not parts:
        return pd.DataFrame(
            {
                "test_id": np.zeros(0, np.int64),
                "rank": np.zeros(0, np.int64),
                "train_id": np.zeros(0, np.int64),
                "score": np.zeros(0, np.float32),
                "flipped": np.zeros(0, bool),
            }
        )
    return pd.concat(parts, ignore_index=True)


def _summarise(
    df: pd.DataFrame, params: dict[str, Any], seed: int, n_train: int, n_flipped: int
) -> dict[str, Any]:
    """Build analysis.json: parameters, correlations per group, per-shape summaries."""
    groups = {
        "all": df,
        "correct": df[df["correct"]],
        "misclassified": df[~df["correct"]],
    }
    s_vs_end = {g: correlation(d["s"], d["end_ratio"]) for g, d in groups.items()}
    s_vs_dist = {g: correlation(d["s"], d["mean_distance"]) for g, d in groups.items()}
    by_shape = {g: _by_shape(d) for g, d in groups.items()}
    return {
        "checkpoint": {
            "index": params["checkpoint_index"],
            "epoch": params["epoch"],
            "path": params["checkpoint_path"],
        },
        "thresholds": {
            "s_min": params["s_min"],
            "z_max": params["z_max"],
            "rule": "S if s >= s_min; Z if s <= z_max; backslash otherwise "
            "(s = (b_reg - b_end) / |b_end| of the descending sorted curve)",
        },
        "k": params["k"],
        "max_points": params["max_points"],
        "seed": seed,
        "n_test": len(df),
        "n_train": n_train,
        "n_flipped": n_flipped,
        "n_correct": len(groups["correct"]),
        "n_misclassified": len(groups["misclassified"]),
        "correlations": {"s_vs_end_ratio": s_vs_end, "s_vs_mean_distance": s_vs_dist},
        "by_shape": by_shape,
        "knn_flip_share": {
            "k": params["k"],
            "mean": _mean(df["knn_flip_share"]),
            "flip_rate": n_flipped / n_train if n_train else None,
        },
    }


def _by_shape(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Count, mean end ratio, distance mean/median and mean S for each shape class."""
    out = {}
    for name in shapes.SHAPES:
        d = df[df["shape"] == name]
        out[name] = {
            "count": len(d),
            "mean_s": _mean(d["s"]),
            "mean_end_ratio": _mean(d["end_ratio"]),
            "mean_distance": _mean(d["mean_distance"]),
            "median_distance": _median(d["mean_distance"]),
            "mean_knn_flip_share": _mean(d["knn_flip_share"]),
        }
    return out


def _validate_params(
    manifest: dict[str, Any], checkpoint: int, s_min: float, z_max: float, k: int, max_points: int
) -> dict[str, Any]:
    """Check the arguments and return them, with the resolved checkpoint, as a plain dict."""
    from core.geometry import checkpoint_entry

    if not z_max < s_min:
        raise AtlasError(f"The Z threshold ({z_max}) must be below the S threshold ({s_min}).")
    if int(k) < 1:
        raise AtlasError(f"k must be at least 1 (got {k}).")
    if int(max_points) < 2:
        raise AtlasError(f"max_points must be at least 2 (got {max_points}).")
    entry = checkpoint_entry(manifest, int(checkpoint))
    return {
        "checkpoint_index": int(entry["index"]),
        "epoch": entry.get("epoch"),
        "checkpoint_path": entry.get("path"),
        "s_min": float(s_min),
        "z_max": float(z_max),
        "k": int(k),
        "max_points": int(max_points),
    }


def _load_inputs(run: Path) -> dict[str, Any]:
    """Load and cross-check instances, TracIn matrix and logits, or raise :class:`AtlasError`."""
    if not (run / store.TRACIN).exists():
        raise AtlasError(
            f"{run / store.TRACIN} does not exist; compute it first with `python -m core tracin {run}`."
        )
    if not (run / store.LOGITS).exists():
        raise AtlasError(f"{run / store.LOGITS} does not exist; the run has not been trained yet.")
    inst = store.load_instances(run)
    missing = {"id", "split", "text", "label", "flipped"} - set(inst.columns)
    if missing:
        raise AtlasError(f"{run / store.INSTANCES} lacks the columns {sorted(missing)}.")
    if not np.array_equal(inst["id"].to_numpy(), np.arange(len(inst))):
        raise AtlasError(f"{run / store.INSTANCES}: ids must equal row positions 0..n-1.")
    n_train = int((inst["split"] == "train").sum())
    n_test = int((inst["split"] == "test").sum())
    if n_train < 2 or n_test < 1:
        raise AtlasError(
            f"The run has {n_train} training and {n_test} test instances; "
            "analysis needs at least 2 and 1."
        )
    tracin = store.read_npy(run / store.TRACIN)
    if tracin.shape != (n_test, n_train):
        raise AtlasError(
            f"{run / store.TRACIN} has shape {tracin.shape}, but the run has "
            f"{n_test} test × {n_train} training instances; recompute it with "
            f"`python -m core tracin {run}`."
        )
    logits = store.read_npy(run / store.LOGITS)
    if logits.ndim != 3 or logits.shape[1:] != (len(inst), 2):
        raise AtlasError(
            f"{run / store.LOGITS} has shape {logits.shape}; expected (epochs, {len(inst)}, 2)."
        )
    return {"instances": inst, "tracin": tracin, "logits": logits}


def _say(progress: bool, message: str) -> None:
    """Print a progress line to stderr (stdout stays clean for --json output)."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def _finite(value: Any) -> float | None:
    """A float, or None for NaN/inf (JSON has no NaN)."""
    v = float(value)
    return v if math.isfinite(v) else None


def _mean(values: pd.Series) -> float | None:
    """Mean of the finite values, None when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def _median(values: pd.Series) -> float | None:
    """Median of the finite values, None when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else None


def _plain(value: Any) -> Any:
    """NumPy scalars to Python ones and NaN to None, for JSON output."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
