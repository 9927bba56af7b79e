"""Claims read from the run store: one run, a group of seeds, a sweep, and the replication grid.

``core.analysis.claims`` holds the statistics; this module loads what they need from the stored
arrays (never from derived tables, so every number recomputes from ``tracin*.npy``,
``logits.npy`` and ``distances.npy``), writes ``claims.json``, groups seeds into conditions
and writes the grid summary with the teaching run chosen by the rule of docs/replication.md.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis import claims, shapes, stats, views
from core.storage import locks, provenance, store
from core.storage.errors import AtlasError

CLAIMS_FILE = "claims.json"
GROUP_KIND = "group"
REPLICATION_KIND = "replication"
REPLICATION = "replication.json"
REPLICATION_INSTANCES = "replication_instances.parquet"
REPLICATION_CURVES = "replication_curves.parquet"
REPLICATION_SWEEP = "replication_sweep.parquet"
# Points kept per misclassified curve in the grid's evidence file (both ends and every flip kept).
CURVE_POINTS = 120
INSTANCE_FIELDS = ("condition", "run", "seed", "id", "correct", "s_bulk", "shape",
                   "end_ratio", "mean_distance")  # fmt: skip
TEACHING_RULE = (
    "the run whose misclassified test instances, read in its condition's view, have the largest "
    "count of their rarest class (S, Z, backslash); ties: higher entropy of the class shares, "
    "then the earlier condition, then the lower seed"
)


def run_view(run_dir: Path, view_key: str | None) -> views.View:
    """The view to read a run in: ``view_key`` or all checkpoints raw (the definition)."""
    k = _n_checkpoints(run_dir)
    view = views.full_view(k) if view_key is None else views.View.parse(view_key)
    views.check_view(view, k, have_norms=(run_dir / store.GRAD_NORMS_TRAIN).exists())
    return view


def run_table(run_dir: str | Path, view_key: str | None = None) -> tuple[pd.DataFrame, dict]:
    """Every test instance of a run in one view, and what it was read from.

    Columns: id, correct (at the view's last checkpoint), s_bulk, shape, end_ratio,
    mean_distance (NaN without distances). The second value describes the run (name, seed,
    view key, accuracy, mean training loss at the view's last epoch) and fingerprints the
    files read.
    """
    run = Path(run_dir)
    manifest = store.load_manifest(run)
    view = run_view(run, view_key)
    inst = store.load_instances(run)
    train = inst[inst["split"] == "train"]
    test = inst[inst["split"] == "test"]
    flipped = train["flipped"].to_numpy(bool)
    scores, used = _view_scores(run, view)
    if scores.shape != (len(test), len(train)):
        raise AtlasError(
            f"{run}: the scores have shape {scores.shape}, but the run has {len(test)} test and "
            f"{len(train)} training instances; rebuild with `python -m core tracin {run}`."
        )
    if not np.isfinite(scores).all():
        raise AtlasError(f"{run}: the TracIn scores hold NaN or infinite values; rebuild them "
                         f"with `python -m core tracin {run}`.")  # fmt: skip
    logits = store.read_npy(run / store.LOGITS)
    used.append(store.LOGITS)
    if view.last > logits.shape[0]:
        raise AtlasError(f"{run}: logits.npy has {logits.shape[0]} epochs; the view needs "
                         f"{view.last}.")  # fmt: skip
    ids = test["id"].to_numpy(np.int64)
    pred = np.asarray(logits[view.last - 1][ids]).argmax(axis=1)
    correct = pred == test["label"].to_numpy()
    mean_distance = None
    if (run / store.DISTANCES).exists():
        mean_distance = stats.mean_distances(store.read_npy(run / store.DISTANCES))
        used.append(store.DISTANCES)
    cls = shapes.classify(scores, flipped)
    table = pd.DataFrame(
        {
            "id": ids,
            "correct": correct,
            "s_bulk": np.asarray(cls["s_bulk"], np.float64),
            "shape": np.asarray(cls["shape"]).astype(str),
            "end_ratio": np.asarray(cls["end_ratio"], np.float64),
            "mean_distance": np.full(len(ids), np.nan) if mean_distance is None else mean_distance,
        }
    )
    epochs = manifest.get("epochs") or []
    loss = epochs[view.last - 1].get("train_loss") if len(epochs) >= view.last else None
    info = {
        "run": manifest.get("name", run.name),
        "path": str(run),
        "seed": (manifest.get("config") or {}).get("seed"),
        "config": manifest.get("config") or {},
        "view": view.key,
        "view_label": view.label(_n_checkpoints(run)),
        "n_test": int(len(ids)),
        "n_misclassified": int((~correct).sum()),
        "accuracy": float(correct.mean()) if len(ids) else None,
        "train_loss": loss,
        "inputs": {name: provenance.fingerprint(run / name) for name in [store.INSTANCES, *used]},
    }
    return table, info


def sample_of(table: pd.DataFrame) -> claims.Sample:
    """The misclassified rows of a :func:`run_table` as a claims sample."""
    wrong = table[~table["correct"].to_numpy(bool)]
    return {
        "id": wrong["id"].to_numpy(np.int64),
        "s_bulk": wrong["s_bulk"].to_numpy(np.float64),
        "shape": wrong["shape"].to_numpy(object),
        "end_ratio": wrong["end_ratio"].to_numpy(np.float64),
        "mean_distance": wrong["mean_distance"].to_numpy(np.float64),
    }


def target_kind(folder: Path) -> str:
    """run, group, sweep or replication, from the folder's manifest."""
    if not (folder / store.MANIFEST).exists():
        raise AtlasError(f"{folder} is not a run, group or sweep folder (no manifest.json).")
    kind = store.load_manifest(folder).get("kind", "run")
    if kind not in ("run", GROUP_KIND, "sweep", REPLICATION_KIND):
        raise AtlasError(f"{folder} holds a {kind}, not a run, group or sweep.")
    return kind


def claims_of(folder: str | Path, view_key: str | None = None, write: bool = True) -> dict:
    """The claims of a run, group or sweep (``claims.json``'s content), written into it."""
    target = Path(folder)
    kind = target_kind(target)
    if view_key is not None and kind != "run":
        raise AtlasError(f"--view applies to one run; a {kind} reads the view it was made with.")
    if kind == "run":
        table, info = run_table(target, view_key)
        payload = {
            "kind": "run",
            "name": info["run"],
            "view": info["view"],
            "claims": claims.evaluate([sample_of(table)], info["view"]),
            "runs": [_run_entry(info, table)],
        }
    elif kind == GROUP_KIND:
        payload = _group_claims(target)
        del payload["_samples"], payload["_tables"]
    elif kind == "sweep":
        payload = _sweep_claims(target)
    else:
        payload = store.read_json(target / REPLICATION)
        return payload
    payload["rules"] = "docs/replication.md"
    if write:
        with locks.hold(target):
            store.write_json(target / CLAIMS_FILE, payload)
    return payload


def make_group(
    cache: str | Path, name: str, runs: list[str], view_key: str | None, command: str
) -> Path:
    """Write a group folder (one condition, several seeds) and its claims; return the folder."""
    if len(runs) < 1:
        raise AtlasError("A group needs at least one run.")
    folder = Path(cache) / name
    paths = [_existing(r, cache) for r in runs]
    if len({p.resolve() for p in paths}) != len(paths):
        raise AtlasError("A run is named twice in the group; each seed counts once.")
    seeds = []
    for p in paths:
        if target_kind(p) != "run":
            raise AtlasError(f"{p} is not a run; a group is made of runs.")
        run_view(p, view_key)  # one sentence now, not after the first runs are read
        seeds.append((store.load_manifest(p).get("config") or {}).get("seed"))
    if len(set(seeds)) != len(seeds):
        raise AtlasError(
            f"Two runs of the group have the same seed ({seeds}); pool distinct seeds."
        )
    manifest = folder / store.MANIFEST
    if manifest.exists() and store.load_manifest(folder).get("kind") != GROUP_KIND:
        raise AtlasError(f"{folder} already holds something else; choose another --name.")
    with locks.hold(folder):
        store.write_json(
            folder / store.MANIFEST,
            {
                "kind": GROUP_KIND,
                "name": name,
                "status": store.STATUS_COMPLETE,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": command,
                "runs": [str(p.resolve()) for p in paths],
                "view": view_key,
            },
        )
        claims_of(folder)
    return folder


def replication_summary(
    cache: str | Path,
    name: str,
    groups: list[str],
    sweep: str | None,
    command: str,
) -> Path:
    """The grid summary: one condition per group, pooled claims, evidence, the teaching run."""
    folder = Path(cache) / name
    conditions, rows, curves = [], [], []
    for g in groups:
        gdir = _existing(g, cache)
        if target_kind(gdir) != GROUP_KIND:
            raise AtlasError(f"{gdir} is not a group; make one with `python -m core group`.")
        payload = _group_claims(gdir)
        manifest = store.load_manifest(gdir)
        first = payload["runs"][0]
        conditions.append(
            {
                "name": manifest.get("name", gdir.name),
                "config": {**first["config"], "view": payload["view"]},
                "seeds": [r["seed"] for r in payload["runs"]],
                "runs": [r["run"] for r in payload["runs"]],
                "view": payload["view"],
                "per_run": [
                    {
                        k: r[k]
                        for k in (
                            "run",
                            "seed",
                            "counts",
                            "accuracy",
                            "train_loss",
                            "n_misclassified",
                        )
                    }  # fmt: skip
                    for r in payload["runs"]
                ],
                "counts": claims.class_counts(payload["_samples"]),
                "train_loss": _mean([r["train_loss"] for r in payload["runs"]]),
                "claims": payload["claims"],
            }
        )
        for run_path, table in zip(manifest["runs"], payload["_tables"], strict=True):
            info = next(r for r in payload["runs"] if r["path"] == run_path)
            t = table.assign(condition=conditions[-1]["name"], run=info["run"], seed=info["seed"])
            rows.append(t[list(INSTANCE_FIELDS)])
            curves.append(_curve_rows(Path(run_path), payload["view"], t))
    sweep_block = None
    sweep_rows = None
    if sweep is not None:
        sdir = _existing(sweep, cache)
        sp = _sweep_claims(sdir)
        sweep_block = {"name": sp["name"], "claims": sp["claims"], "config": sp.get("config")}
        sweep_rows = _sweep_cells(sdir)
    summary = {
        "kind": REPLICATION_KIND,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "rules": "docs/replication.md",
        "conditions": conditions,
        "sweep": sweep_block,
        "teaching": teaching_choice(conditions),
    }
    with locks.hold(folder):
        if rows:
            store.write_parquet(folder / REPLICATION_INSTANCES, pd.concat(rows, ignore_index=True))
            store.write_parquet(folder / REPLICATION_CURVES, pd.concat(curves, ignore_index=True))
        if sweep_rows is not None:
            store.write_parquet(folder / REPLICATION_SWEEP, sweep_rows)
        store.write_json(folder / REPLICATION, summary)
        store.write_json(
            folder / store.MANIFEST,
            {
                "kind": REPLICATION_KIND,
                "name": name,
                "status": store.STATUS_COMPLETE,
                "created": summary["created"],
                "command": command,
            },  # fmt: skip
        )
    return folder


def teaching_choice(conditions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The teaching run by the rule written before the grid (docs/replication.md)."""
    best, best_key = None, None
    for ci, cond in enumerate(conditions):
        for run in cond.get("per_run", []):
            counts = run["counts"]
            total = sum(counts.values())
            shares = [v / total for v in counts.values() if total and v]
            entropy = -sum(p * math.log(p) for p in shares)
            key = (min(counts.values()), entropy, -ci, -(run["seed"] or 0))
            if best_key is None or key > best_key:
                best_key = key
                best = {"condition": cond["name"], "run": run["run"], "seed": run["seed"],
                        "view": cond["view"], "counts": counts}  # fmt: skip
    if best is None:
        return None
    best["all_three"] = min(best["counts"].values()) > 0
    best["rule"] = TEACHING_RULE
    return best


def _group_claims(gdir: Path) -> dict[str, Any]:
    manifest = store.load_manifest(gdir)
    view_key = manifest.get("view")
    samples, tables, runs = [], [], []
    for run_path in manifest.get("runs") or []:
        p = Path(run_path)
        if not (p / store.MANIFEST).exists():
            raise AtlasError(f"{gdir}: its run {p} is gone; make the group again.")
        table, info = run_table(p, view_key)
        samples.append(sample_of(table))
        tables.append(table)
        runs.append(_run_entry(info, table))
    if not samples:
        raise AtlasError(f"{gdir} lists no runs.")
    view = runs[0]["view"]
    return {
        "kind": GROUP_KIND,
        "name": manifest.get("name", gdir.name),
        "view": view,
        "claims": claims.evaluate(samples, view),
        "runs": runs,
        "_samples": samples,
        "_tables": tables,
    }


def _run_entry(info: dict[str, Any], table: pd.DataFrame) -> dict[str, Any]:
    wrong = table[~table["correct"].to_numpy(bool)]
    counts = {s: int((wrong["shape"] == s).sum()) for s in shapes.SHAPE_ORDER}
    return {**info, "counts": counts}


def _sweep_cells(sdir: Path) -> pd.DataFrame:
    path = sdir / "sweep.parquet"
    if not path.exists():
        raise AtlasError(f"{sdir} has no sweep.parquet yet; finish the sweep first.")
    df = store.read_parquet(path, ("flip_rate", "seed", "final_test_accuracy"))
    return df[["flip_rate", "seed", "final_test_accuracy"]].reset_index(drop=True)


def _sweep_claims(sdir: Path) -> dict[str, Any]:
    cells = _sweep_cells(sdir)
    manifest = store.load_manifest(sdir)
    c7 = claims.threshold_claim(
        cells["flip_rate"].to_numpy(), cells["seed"].to_numpy(), cells["final_test_accuracy"]
    )
    return {
        "kind": "sweep",
        "name": manifest.get("name", sdir.name),
        "config": manifest.get("config"),
        "claims": [c7],
        "inputs": {"sweep.parquet": provenance.fingerprint(sdir / "sweep.parquet")},
    }


def _curve_rows(run: Path, view_key: str, table: pd.DataFrame) -> pd.DataFrame:
    """Downsampled sorted curves of the misclassified rows (evidence for the grid page)."""
    inst = store.load_instances(run)
    train = inst[inst["split"] == "train"]
    flipped = train["flipped"].to_numpy(bool)
    scores, _ = _view_scores(run, views.View.parse(view_key))
    wrong = np.flatnonzero(~table["correct"].to_numpy(bool))
    frames = []
    for row in wrong:
        order = shapes.sort_order(scores[row])
        curve = scores[row][order]
        flips = flipped[order]
        keep = shapes.downsample_curve(curve, flips, CURVE_POINTS)
        frames.append(
            pd.DataFrame(
                {
                    "condition": table["condition"].iloc[row],
                    "run": table["run"].iloc[row],
                    "id": int(table["id"].iloc[row]),
                    "rank": keep.astype(np.int32),
                    "score": curve[keep],
                    "flipped": flips[keep],
                }
            )
        )
    cols = ["condition", "run", "id", "rank", "score", "flipped"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def _view_scores(run: Path, view: views.View) -> tuple[np.ndarray, list[str]]:
    k = _n_checkpoints(run)
    if view == views.full_view(k) and (run / store.TRACIN).exists():
        return np.asarray(store.read_npy(run / store.TRACIN), np.float64), [store.TRACIN]
    stack_path = run / store.TRACIN_PER_CHECKPOINT
    if not stack_path.exists():
        raise AtlasError(f"{run} has no per-checkpoint scores; only its full raw view can be read.")
    stack = store.read_npy(stack_path)
    used = [store.TRACIN_PER_CHECKPOINT]
    norms: list[np.ndarray | None] = [None, None]
    if view.normalisation != views.RAW:
        for i, name in enumerate((store.GRAD_NORMS_TRAIN, store.GRAD_NORMS_TEST)):
            if (run / name).exists():
                norms[i] = store.read_npy(run / name)
                used.append(name)
    return views.view_scores(stack, view, norms[0], norms[1]), used


def _n_checkpoints(run: Path) -> int:
    manifest = store.load_manifest(run)
    epochs = manifest.get("epochs") or []
    if (run / store.TRACIN_PER_CHECKPOINT).exists():
        return int(store.npy_header(run / store.TRACIN_PER_CHECKPOINT)[0][0])
    if not (run / store.TRACIN).exists():
        raise AtlasError(f"{run} has no TracIn scores yet; run `python -m core tracin {run}`.")
    return max(len(epochs), 1)


def _existing(path: str | Path, cache: str | Path) -> Path:
    p = Path(path)
    if not (p / store.MANIFEST).exists() and (Path(cache) / path / store.MANIFEST).exists():
        p = Path(cache) / path
    if not (p / store.MANIFEST).exists():
        raise AtlasError(f"{path} is not a run, group or sweep folder (no manifest.json).")
    return p


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def verdict_table(summary: dict[str, Any]) -> str:
    """The claims × conditions table of a replication summary, as Markdown.

    One row per condition (and the sweep), one column per claim; a cell is the verdict, the
    statistic and its interval. docs/replication.md carries this table, and a test checks that
    it equals this function's output on the shipped summary.
    """
    ids = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    head = "| condition | view | seeds | S / backslash / Z | " + " | ".join(ids) + " |"
    lines = [head, "|" + "---|" * (4 + len(ids))]

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return ""
        stat, ci = c.get("statistic"), c.get("ci")
        if stat is None:
            return f"{c['verdict']} (n {c['n']})"
        interval = "" if not ci else f" [{ci[0]:.3g}, {ci[1]:.3g}]"
        return f"{c['verdict']}: {stat:.3g}{interval}, n {c['n']}"

    for cond in summary.get("conditions", []):
        by_id = {c["id"]: c for c in cond["claims"]}
        counts = cond.get("counts") or {}
        shapes_text = " / ".join(str(counts.get(s, 0)) for s in shapes.SHAPE_ORDER)
        seeds = ", ".join(str(s) for s in cond.get("seeds", []))
        cells = " | ".join(cell(by_id.get(i)) for i in ids)
        lines.append(f"| {cond['name']} | `{cond['view']}` | {seeds} | {shapes_text} | {cells} |")
    sweep = summary.get("sweep")
    if sweep:
        by_id = {c["id"]: c for c in sweep["claims"]}
        cells = " | ".join(cell(by_id.get(i)) for i in ids)
        lines.append(f"| sweep {sweep['name']} | accuracy vs flip rate | | | {cells} |")
    return "\n".join(lines)
