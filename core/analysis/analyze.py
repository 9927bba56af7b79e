"""The analyze stage: curve shapes, end ratios, [CLS] geometry and their correlations, into the run.

Reads ``tracin.npy``, ``logits.npy``, ``instances.parquet``, the per-checkpoint stack and
gradient norms when present, and one checkpoint (or the stored embeddings when the run
ships without checkpoints); writes ``shapes.parquet``, ``curves.parquet``,
``shapes_by_view.parquet``, ``flip_ranks.npy``, ``embeddings.npy``, ``distances.npy``,
``coords.parquet`` and ``analysis.json`` (see ``docs/run-store.md``). Shapes are
:func:`core.analysis.shapes.classify` of every view: the default (all checkpoints, raw scores),
each checkpoint alone and the cumulative sum up to each, in every normalisation the
stored norms allow (:mod:`core.analysis.views`). The paper's two questions are answered in
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

from core.analysis import shapes, stats, views
from core.options import commands
from core.storage import provenance, store
from core.storage.errors import AtlasError

STAGE = "analyze"
GROUPS = ("all", "correct", "misclassified")
# Rows of the TracIn matrix handled at once: bounds the float64 copies for big runs.
_ROW_BLOCK = 256
# Columns of shapes.parquet that summary_rows (and `show --json`) reports.
SUMMARY_COLUMNS = [
    "id",
    "correct",
    "s_raw",
    "s",
    "s_bulk",
    "shape",
    "end_ratio",
    "mean_distance",
]
# Per-test-instance columns of shapes_by_view.parquet (besides view, kind, normalisation, first, last).
VIEW_COLUMNS = ("s_raw", "s", "s_bulk", "shape", "end_ratio")
# The threshold grids of the sensitivity table (class counts as one threshold moves).
SENSITIVITY_GRID = {
    "s_min": tuple(round(v, 3) for v in np.linspace(0.0, 0.6, 13)),
    "z_max": tuple(round(v, 3) for v in np.linspace(-0.3, 0.0, 7)),
    "trim": (0.0, 0.01, 0.025, 0.05, 0.1, 0.2),
}
# Real examples per class on the Learn-the-shapes page.
N_EXAMPLES = 4


def analyze_run(
    run_dir: str | os.PathLike,
    checkpoint: int = -1,
    rule: shapes.ShapeRule = shapes.DEFAULT_RULE,
    k: int = 10,
    max_points: int = 2000,
    progress: bool = True,
    force: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the analyze stage on a run folder and return the content of ``analysis.json``.

    ``checkpoint`` indexes the manifest's checkpoint list (-1: the last) and chooses
    the model whose [CLS] vectors give the embeddings; correctness always comes from
    the last epoch's logits; ``rule`` classes the curves. The stage is skipped (its stored result returned) when
    it is complete with the same checkpoint and parameters, unless ``force``.
    ``device`` defaults to the run's configured device. Without the checkpoint (a run
    shipped with its small files only) the stored embeddings, distances and maps are
    reused when they were made from the same checkpoint.
    """
    run = Path(run_dir)
    manifest = store.load_manifest(run)
    inputs = _load_inputs(run)  # raises AtlasError before anything is written
    provenance.check_upstream(run, STAGE)  # a matrix of other instances: refused, not mixed
    params = _validate_params(manifest, checkpoint, rule, k, max_points)
    previous = manifest.get("stages", {}).get(STAGE, {})
    if (
        not force
        and previous.get("status") == store.STATUS_COMPLETE
        and previous.get("params") == params
        and all((run / name).exists() for name in OUTPUTS)
        and store.stage_problem(run, STAGE) is None  # a damaged file is remade, never kept
        and provenance.stale_reason(run, STAGE) is None  # e.g. tracin.npy rewritten since
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


def final_correct(logits: np.ndarray, instances: pd.DataFrame) -> np.ndarray:
    """Whether each test instance (test order) is predicted right at the last checkpoint.

    ``logits`` is logits.npy (epochs, n_instances, 2), ``instances`` instances.parquet; the
    prediction is the arg-max of the final epoch's logits, compared with the true label.
    """
    test = instances[instances["split"] == "test"]
    pred = np.asarray(logits[-1][test["id"].to_numpy(np.int64)]).argmax(axis=1)
    return pred == test["label"].to_numpy()


def majority_baseline(instances: pd.DataFrame) -> float | None:
    """Test accuracy of always predicting the test split's most frequent true label."""
    labels = instances.loc[instances["split"] == "test", "label"]
    if labels.empty:
        return None
    return float(labels.value_counts().iloc[0] / len(labels))


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """:func:`core.analysis.stats.correlation` (kept here for callers of the analyze stage)."""
    return stats.correlation(x, y)


def _analyze(
    run: Path,
    manifest: dict[str, Any],
    inputs: dict[str, Any],
    params: dict[str, Any],
    progress: bool,
    device: str | None,
) -> dict[str, Any]:
    """Compute and write every analyze output; return analysis.json's content."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inst: pd.DataFrame = inputs["instances"]
    train = inst[inst["split"] == "train"]
    test = inst[inst["split"] == "test"]
    train_ids = train["id"].to_numpy(np.int64)
    test_ids = test["id"].to_numpy(np.int64)
    flipped = train["flipped"].to_numpy(bool)
    logits = inputs["logits"]

    correct = final_correct(logits, inst)

    t = time.perf_counter()
    emb, dist, coords, geometry_note = _geometry(run, manifest, inst, params, device, progress)
    mean_distance = stats.mean_distances(dist)
    from core.analysis import geometry  # torch: loaded when it computes

    knn = geometry.knn_flip_share(dist, flipped, params["k"])
    timings["geometry"] = time.perf_counter() - t

    seed = int(manifest.get("config", {}).get("seed", 0))
    out = score_outputs(
        inputs, test_ids, train_ids, flipped, correct, mean_distance, knn, params, seed, progress
    )
    timings.update(out["timings"])
    result = out["analysis"]
    result["geometry"] = geometry_note
    t = time.perf_counter()
    if coords is not None:
        store.write_npy(run / store.EMBEDDINGS, emb.astype(np.float32, copy=False))
        store.write_npy(run / store.DISTANCES, dist)
        store.write_parquet(run / store.COORDS, coords)
    store.write_parquet(run / store.SHAPES, out["shapes"])
    store.write_parquet(run / store.CURVES, out["curves"])
    store.write_parquet(run / store.SHAPES_BY_VIEW, out["views"])
    store.write_npy(run / store.FLIP_RANKS, out["flip_ranks"])
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


def score_outputs(
    inputs: dict[str, Any],
    test_ids: np.ndarray,
    train_ids: np.ndarray,
    flipped: np.ndarray,
    correct: np.ndarray,
    mean_distance: np.ndarray,
    knn: np.ndarray,
    params: dict[str, Any],
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything the analyze stage derives from the scores, without a model (pure NumPy).

    ``inputs`` holds ``tracin`` (n_test, n_train) and optionally ``stack`` (k, n_test,
    n_train) and ``norms`` (train (k, n_train), test (k, n_test) or None); ``params`` the
    validated analyze parameters (the rule's s_min, z_max, trim; k, max_points, checkpoint fields).
    Returns ``shapes``, ``curves`` and ``views`` (the three tables), ``flip_ranks`` and
    ``analysis`` (analysis.json without its geometry note) and the ``timings`` of the parts.
    The test suite's fake run store is built with this same function.
    """
    timings = {}
    tracin = inputs["tracin"]
    t = time.perf_counter()
    _say(progress, f"analyze: curve shapes of {len(test_ids)} test × {len(train_ids)} train")
    rule = rule_of(params)
    cls_parts, rank_parts, curve_parts = [], [], []
    for start in range(0, len(test_ids), _ROW_BLOCK):
        block = np.asarray(tracin[start : start + _ROW_BLOCK], dtype=np.float64)
        cls_parts.append(shapes.classify(block, flipped, rule=rule))
        rank_parts.append(shapes.flipped_ranks(block, flipped))
        curve_parts.append(
            _curve_rows(block, test_ids[start : start + _ROW_BLOCK], train_ids, flipped, params)
        )
    cls = {f: np.concatenate([p[f] for p in cls_parts]) for f in cls_parts[0]}
    ranks = np.concatenate(rank_parts) if rank_parts else np.zeros((0, flipped.sum()), int)
    timings["shapes"] = time.perf_counter() - t

    t = time.perf_counter()
    view_df, flip_ranks, view_keys = _view_shapes(inputs, test_ids, flipped, rule, progress)
    timings["views"] = time.perf_counter() - t

    shapes_df = pd.DataFrame(
        {
            "id": test_ids,
            "correct": np.asarray(correct, dtype=bool),
            "s_raw": cls["s_raw"],
            "s": cls["s"],
            "s_bulk": cls["s_bulk"],
            "shape": pd.Series(cls["shape"], dtype=object).astype(str),
            "end_ratio": cls["end_ratio"],
            "b_reg": cls["b_reg"],
            "a_reg": cls["a_reg"],
            "b_end": cls["b_end"],
            "a_end": cls["a_end"],
            "mean_distance": np.asarray(mean_distance, dtype=np.float64),
            "knn_flip_share": np.asarray(knn, dtype=np.float64),
            "flipped_ranks": [r.tolist() for r in ranks],
        }
    )
    result = _summarise(
        shapes_df, params, seed, n_train=len(train_ids), n_flipped=int(flipped.sum())
    )
    result["sensitivity"] = sensitivity_table(np.asarray(tracin), flipped, rule)
    result["views"] = _view_summary(view_df, shapes_df, view_keys, flipped, train_ids)
    result["examples"] = learning_examples(shapes_df, view_df, params)
    return {
        "shapes": shapes_df,
        "curves": pd.concat(curve_parts, ignore_index=True)
        if curve_parts
        else _curve_rows(np.zeros((0, len(train_ids))), test_ids[:0], train_ids, flipped, params),
        "views": view_df,
        "flip_ranks": flip_ranks,
        "analysis": result,
        "timings": timings,
    }


OUTPUTS = (
    store.SHAPES,
    store.CURVES,
    store.SHAPES_BY_VIEW,
    store.FLIP_RANKS,
    store.EMBEDDINGS,
    store.DISTANCES,
    store.COORDS,
    store.ANALYSIS,
)


def _view_shapes(
    inputs: dict[str, Any],
    test_ids: np.ndarray,
    flipped: np.ndarray,
    rule: shapes.ShapeRule,
    progress: bool,
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """Shapes of every standard view, long format, and the flipped instances' ranks per view.

    Returns (rows of shapes_by_view.parquet, ranks (n_views, n_test, n_flipped) with column
    j the j-th flipped training instance, view keys in the order of the ranks' first axis).
    Without the per-checkpoint stack: no views.
    """
    stack = inputs.get("stack")
    n_flip = int(flipped.sum())
    if stack is None or len(test_ids) == 0:
        empty = pd.DataFrame(
            columns=["view", "kind", "normalisation", "first", "last", "id", *VIEW_COLUMNS]
        )
        return empty, np.zeros((0, len(test_ids), n_flip), np.int32), []
    norms = inputs.get("norms") or (None, None)
    allowed = views.allowed_normalisations(True, norms[0] is not None, norms[1] is not None)
    todo = views.standard_views(stack.shape[0], allowed)
    _say(progress, f"analyze: shapes of {len(todo)} per-checkpoint views")
    rank_dtype = np.int16 if flipped.size <= np.iinfo(np.int16).max else np.int32
    ranks = np.zeros((len(todo), len(test_ids), n_flip), dtype=rank_dtype)
    frames, keys = [], []
    for i, (kind, view) in enumerate(todo):
        scores = views.view_scores(stack, view, norms[0], norms[1])
        cls = shapes.classify(scores, flipped, rule=rule)
        ranks[i] = shapes.ranks_of(scores, flipped)
        keys.append(view.key)
        frames.append(
            pd.DataFrame(
                {
                    "view": view.key,
                    "kind": kind,
                    "normalisation": view.normalisation,
                    "first": view.first,
                    "last": view.last,
                    "id": test_ids,
                    **{c: cls[c] for c in VIEW_COLUMNS},
                }
            )
        )
    df = pd.concat(frames, ignore_index=True)
    df["shape"] = df["shape"].astype(str)
    return df, ranks, keys


def _geometry(
    run: Path,
    manifest: dict[str, Any],
    inst: pd.DataFrame,
    params: dict[str, Any],
    device: str | None,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame | None, dict[str, Any]]:
    """Embeddings, test → train distances and 2-D maps: computed from the checkpoint, or the
    stored ones reused when the checkpoint is absent and they came from the same one.

    Returns (embeddings, distances, coords frame or None when reused, a note for analysis.json).
    """
    from core.analysis import geometry  # torch: the app imports this module

    train_ids = inst.loc[inst["split"] == "train", "id"].to_numpy(np.int64)
    test_ids = inst.loc[inst["split"] == "test", "id"].to_numpy(np.int64)
    ckpt_dir = run / str(params["checkpoint_path"] or "")
    if params["checkpoint_path"] and ckpt_dir.is_dir():
        _say(
            progress,
            f"analyze: [CLS] embeddings of {len(inst)} instances (epoch {params['epoch']})",
        )
        dev = device or manifest.get("config", {}).get("device", "auto")
        emb, _ = geometry.run_embeddings(
            run, inst["text"].tolist(), checkpoint=params["checkpoint_index"], device=dev
        )
        dist = geometry.euclidean_distances(emb[test_ids], emb[train_ids])
        _say(progress, "analyze: 2-D maps (UMAP, PCA)")
        coords = geometry.project_2d(emb, seed=int(manifest.get("config", {}).get("seed", 0)))
        frame = pd.DataFrame(
            {
                "id": inst["id"].to_numpy(np.int64),
                "umap_x": coords["umap"][:, 0],
                "umap_y": coords["umap"][:, 1],
                "pca_x": coords["pca"][:, 0],
                "pca_y": coords["pca"][:, 1],
            }
        )
        return emb, dist, frame, {"epoch": params["epoch"], "source": "checkpoint"}
    stored = _stored_geometry(run)
    made_from = (stored or {}).get("epoch")
    if stored is None or made_from != params["epoch"]:
        command = (
            manifest.get("command") or f"python -m core run (the command in {run}/manifest.json)"
        )
        raise AtlasError(
            f"The checkpoint {ckpt_dir} is not on disk and no stored embeddings of epoch "
            f"{params['epoch']} exist; recreate the checkpoints with `{command}`."
        )
    emb = store.read_npy(run / store.EMBEDDINGS)
    dist = store.read_npy(run / store.DISTANCES)
    if emb.shape[0] != len(inst) or dist.shape != (len(test_ids), len(train_ids)):
        raise AtlasError(
            f"The stored embeddings or distances of {run} do not match its instances; recreate "
            "the checkpoints and run analyze again."
        )
    _say(
        progress, f"analyze: checkpoint not on disk; reusing the stored epoch-{made_from} geometry"
    )
    return emb, np.asarray(dist), None, {"epoch": made_from, "source": "stored (checkpoint absent)"}


def _stored_geometry(run: Path) -> dict[str, Any] | None:
    """Which checkpoint the stored embeddings, distances and maps came from, if all exist."""
    if not all((run / f).exists() for f in (store.EMBEDDINGS, store.DISTANCES, store.COORDS)):
        return None
    try:
        previous = store.read_json(run / store.ANALYSIS)
    except AtlasError:
        return None
    if not isinstance(previous, dict):
        return None
    note = previous.get("geometry") or {}
    epoch = note.get("epoch", (previous.get("checkpoint") or {}).get("epoch"))
    return {"epoch": epoch}


def sensitivity_table(
    scores: np.ndarray, flipped: np.ndarray, rule: shapes.ShapeRule
) -> list[dict[str, Any]]:
    """Class counts of the default view as each threshold moves over its range, the others fixed.

    One row per (threshold, value): ``{"threshold", "value", "S", "Z", "backslash", "default"}``;
    ``default`` marks the value in force. Values that would put z_max at or above s_min are skipped.
    """
    y = np.asarray(scores, dtype=np.float64)
    if y.shape[0] == 0:
        return []
    bulk = {rule.trim: np.atleast_1d(shapes.bulk_index(y, rule.trim))}
    rows = []
    for name, grid in SENSITIVITY_GRID.items():
        in_force = getattr(rule, name)
        for value in sorted(set(grid) | {in_force}):
            try:
                moved = rule.with_value(name, value)
            except AtlasError:
                continue  # e.g. z_max moved to or above s_min: no rule to count
            if moved.trim not in bulk:
                bulk[moved.trim] = np.atleast_1d(shapes.bulk_index(y, moved.trim))
            cls = moved.classes(bulk[moved.trim])
            rows.append(
                {
                    "threshold": name,
                    "value": float(value),
                    **{c: int((cls == c).sum()) for c in shapes.SHAPES},
                    "default": bool(value == in_force),
                }
            )
    return rows


def _view_summary(
    view_df: pd.DataFrame,
    shapes_df: pd.DataFrame,
    keys: list[str],
    flipped: np.ndarray,
    train_ids: np.ndarray,
) -> dict[str, Any]:
    """Class counts and mean end ratios per view, the order of flip_ranks.npy, the flipped ids."""
    correct = shapes_df.set_index("id")["correct"]
    counts = {}
    for key, d in view_df.groupby("view", sort=False):
        mis = ~correct.loc[d["id"].to_numpy()].to_numpy(bool)
        counts[key] = {
            "kind": str(d["kind"].iloc[0]),
            "normalisation": str(d["normalisation"].iloc[0]),
            "first": int(d["first"].iloc[0]),
            "last": int(d["last"].iloc[0]),
            **{c: int((d["shape"] == c).sum()) for c in shapes.SHAPES},
            "misclassified": {
                c: int(((d["shape"] == c).to_numpy() & mis).sum()) for c in shapes.SHAPES
            },
            "mean_end_ratio": _mean(d["end_ratio"]),
            "mean_end_ratio_misclassified": _mean(d["end_ratio"][mis]),
        }
    return {
        "rank_order": keys,
        "flipped_train_ids": train_ids[flipped].tolist(),
        "normalisations": sorted(set(view_df["normalisation"]), key=views.NORMALISATIONS.index),
        "counts": counts,
    }


def learning_examples(
    shapes_df: pd.DataFrame, view_df: pd.DataFrame, params: dict[str, Any], n: int = N_EXAMPLES
) -> dict[str, Any]:
    """Real test instances that show each class, for the Learn-the-shapes page.

    For each class the view is: the default view when it holds at least ``n`` curves of the
    class; otherwise, among views that discriminate (at least two classes each hold 5 % of
    the test instances), the one with the most curves of the class; otherwise any view
    with the most. Views where every curve has one class teach no contrast, so they come
    last. Up to ``n`` instances are picked, misclassified ones first (as in the paper), the
    most decided first (S: highest bulk index, Z: lowest, backslash: nearest the middle of
    its band). A class that no view shows gets ``count`` 0 and no ids.
    """
    default = shapes_df.assign(view="default", kind="default", normalisation=views.RAW)
    frames = [default] + ([view_df] if len(view_df) else [])
    allv = pd.concat(frames, ignore_index=True)
    counts = allv.groupby(["view", "shape"], sort=False).size().unstack(fill_value=0)
    order = list(dict.fromkeys(allv["view"]))  # default first, then the stored order
    counts = counts.reindex(order).fillna(0)
    n_test = max(len(shapes_df), 1)
    discriminating = (counts >= 0.05 * n_test).sum(axis=1) >= 2
    mis = set(shapes_df.loc[~shapes_df["correct"].astype(bool), "id"].astype(int))
    middle = rule_of(params).middle
    out = {}
    for cls in shapes.SHAPES:
        have = counts[cls] if cls in counts else pd.Series(0, index=counts.index)
        if have.max() <= 0:
            out[cls] = {"view": None, "count": 0, "ids": []}
            continue
        if have.get("default", 0) >= n:
            best = "default"
        elif (have[discriminating] > 0).any():
            best = have[discriminating].idxmax()
        else:
            best = have.idxmax()
        d = allv[(allv["view"] == best) & (allv["shape"] == cls)].copy()
        d["miss"] = d["id"].astype(int).isin(mis)
        key = {
            shapes.SHAPE_S: -d["s_bulk"],
            shapes.SHAPE_Z: d["s_bulk"],
            shapes.SHAPE_BACKSLASH: (d["s_bulk"] - middle).abs(),
        }[cls]
        d = d.assign(order=key).sort_values(["miss", "order"], ascending=[False, True])
        out[cls] = {
            "view": str(best),
            "count": int(have[best]),
            "ids": d["id"].astype(int).head(n).tolist(),
        }
    return out


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

    def corr(col: str, other: str) -> dict[str, dict[str, Any]]:
        return {
            g: stats.correlation(d[col], d[other], names=(col, other)) for g, d in groups.items()
        }

    by_shape = {g: _by_shape(d) for g, d in groups.items()}
    return {
        "checkpoint": {
            "index": params["checkpoint_index"],
            "epoch": params["epoch"],
            "path": params["checkpoint_path"],
        },
        "thresholds": {
            **rule_of(params).to_json(),
            "rule": shapes.RULE,
            "calibration": "docs/shapes.md (reference curves in core/analysis/shape_references.py)",
        },
        "k": params["k"],
        "max_points": params["max_points"],
        "seed": seed,
        "n_test": len(df),
        "n_train": n_train,
        "n_flipped": n_flipped,
        "n_correct": len(groups["correct"]),
        "n_misclassified": len(groups["misclassified"]),
        "correlations": {
            "s_vs_end_ratio": corr("s", "end_ratio"),
            "s_vs_mean_distance": corr("s", "mean_distance"),
            "s_bulk_vs_end_ratio": corr("s_bulk", "end_ratio"),
            "s_bulk_vs_mean_distance": corr("s_bulk", "mean_distance"),
        },
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
            "mean_s_bulk": _mean(d["s_bulk"]),
            "mean_end_ratio": _mean(d["end_ratio"]),
            "mean_distance": _mean(d["mean_distance"]),
            "median_distance": _median(d["mean_distance"]),
            "mean_knn_flip_share": _mean(d["knn_flip_share"]),
        }
    return out


def _validate_params(
    manifest: dict[str, Any],
    checkpoint: int,
    rule: shapes.ShapeRule,
    k: int,
    max_points: int,
) -> dict[str, Any]:
    """Check the arguments and return them, with the resolved checkpoint, as a plain dict.

    The dict is the stage's record in the manifest (the rule flattened into it), so a
    rerun with the same arguments compares equal to the stored one and is skipped.
    """
    from core.analysis.geometry import checkpoint_entry  # torch: loaded when it computes

    if not isinstance(rule, shapes.ShapeRule):
        raise AtlasError(f"The shape rule must be a ShapeRule (got {type(rule).__name__}).")
    if int(k) < 1:
        raise AtlasError(f"k must be at least 1 (got {k}).")
    if int(max_points) < 2:
        raise AtlasError(f"max_points must be at least 2 (got {max_points}).")
    entry = checkpoint_entry(manifest, int(checkpoint))
    return {
        "checkpoint_index": int(entry["index"]),
        "epoch": entry.get("epoch"),
        "checkpoint_path": entry.get("path"),
        **rule.to_json(),
        "k": int(k),
        "max_points": int(max_points),
    }


def rule_of(params: dict[str, Any]) -> shapes.ShapeRule:
    """The shape rule held in the analyze stage's parameters (see :func:`_validate_params`)."""
    return shapes.ShapeRule.from_json(params)


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
    _require_finite(run / store.TRACIN, tracin)
    logits = store.read_npy(run / store.LOGITS)
    if logits.ndim != 3 or logits.shape[1:] != (len(inst), 2):
        raise AtlasError(
            f"{run / store.LOGITS} has shape {logits.shape}; expected (epochs, {len(inst)}, 2)."
        )
    out = {"instances": inst, "tracin": tracin, "logits": logits, "stack": None, "norms": None}
    if (run / store.TRACIN_PER_CHECKPOINT).exists():
        stack = store.read_npy(run / store.TRACIN_PER_CHECKPOINT)
        if stack.ndim == 3 and stack.shape[1:] == (n_test, n_train):
            _require_finite(run / store.TRACIN_PER_CHECKPOINT, stack)
            out["stack"] = stack
        else:
            raise AtlasError(
                f"{run / store.TRACIN_PER_CHECKPOINT} has shape {stack.shape}; expected "
                f"(checkpoints, {n_test}, {n_train}); recompute it with `python -m core tracin {run}`."
            )
    if out["stack"] is not None and (run / store.GRAD_NORMS_TRAIN).exists():
        k = out["stack"].shape[0]
        train_norms = store.read_npy(run / store.GRAD_NORMS_TRAIN)
        test_norms = (
            store.read_npy(run / store.GRAD_NORMS_TEST)
            if (run / store.GRAD_NORMS_TEST).exists()
            else None
        )
        if train_norms.shape == (k, n_train) and (
            test_norms is None or test_norms.shape == (k, n_test)
        ):
            out["norms"] = (train_norms, test_norms)
    return out


def _require_finite(path: Path, scores: np.ndarray) -> None:
    """Refuse TracIn scores holding NaN or ±inf: sorted curves, shapes and end ratios of
    such rows would be computed and marked complete as if they meant something."""
    bad = int(np.count_nonzero(~np.isfinite(scores)))  # memory-mapped: one pass, no copy kept
    if bad:
        raise AtlasError(
            f"{path} holds {bad:,} NaN or infinite scores of {scores.size:,}, made by the "
            "tracin stage (its gradients overflowed or its files were altered), so they are not "
            f"analysed; move {path.parent / store.TRACIN_SHARDS_DIR} away and recompute that "
            f"stage with `{commands.rebuild_command(path.parent, 'tracin')}`, after retraining "
            "with a lower --lr if the checkpoints themselves are not finite."
        )


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
