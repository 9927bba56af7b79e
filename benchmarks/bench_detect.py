"""Benchmark the detectors of one run: recall at 5 % and 10 % inspected, AP, AUROC, against random.

Usage::

    python benchmarks/bench_detect.py RUN [--force] [--json OUT]

Runs the detect stage first when the run has none (or with ``--force``), then prints
one line per detector and the goal check: some detector finds ≥ 90 % of the
flips within the top 10 % and beats the ``loss`` and ``cleanlab`` baselines on
average precision. It also prints ablations that the stored detectors do not show:

- shape-aware vs shape-blind: the same aggregation with every curve read as an S
  (suspects far from the centre) or every curve as a Z (suspects near it), over all
  test instances instead of only misclassified ones, and with rank positions (the end
  ratio's measure) instead of score distances;
- detector 2's aggregation: |TracIn| vs opponents only vs proponents only, from the
  influence matrix cached in ``detect_work/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.analysis import metrics
from core.cleaning import detectors
from core.storage import store

SHOWN = ("recall_at_5pct", "recall_at_10pct", "average_precision", "auroc", "precision_at_k")


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark table of a run; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder (cache/<run>)")
    parser.add_argument("--force", action="store_true", help="recompute every detector")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    run = Path(args.run)

    t0 = time.perf_counter()
    if args.force or not store.stage_done(run, detectors.STAGE):
        detectors.run_detect(run, force=args.force, progress=True)
    detect_seconds = time.perf_counter() - t0
    result = store.read_json(run / store.DETECTION)
    manifest = store.load_manifest(run)
    config = manifest.get("config", {})
    print(
        f"run {run.name}: preset {config.get('preset')}, model {config.get('model')}, "
        f"n_train {result['n_train']}, flips {result['k']} ({100 * result['flip_rate']:.1f} %), "
        f"test accuracy {manifest.get('test_accuracy')}"
    )
    if not result.get("detectors"):
        print("no metrics:", result["notes"].get("metrics", "no detector was computed"))
        return 1

    rows = {name: values for name, values in result["detectors"].items()}
    rows["(random baseline)"] = result["random"]
    extra = ablations(run)
    _print_table(rows, extra)
    for name, note in result["notes"].items():
        print(f"  {name}: {note}")

    best = max(result["detectors"].items(), key=lambda kv: kv[1]["recall_at_10pct"])
    ap = {name: v["average_precision"] for name, v in result["detectors"].items()}
    baselines = [ap[b] for b in ("loss", "cleanlab") if b in ap]
    winners = [
        name
        for name, v in result["detectors"].items()
        if name not in ("loss", "cleanlab", "random")
        and v["recall_at_10pct"] >= 0.9
        and all(v["average_precision"] > b for b in baselines)
    ]
    print(
        f"\ngoal (≥ 90 % of flips in the top 10 % and AP above loss and cleanlab): "
        f"{'met by ' + ', '.join(winners) if winners else 'NOT met'}; best recall@10% is "
        f"{best[0]} at {best[1]['recall_at_10pct']:.3f}"
    )
    print(f"detect stage: {detect_seconds:.1f} s in this call (0 when it was already stored)")
    if args.json:
        store.write_json(
            args.json,
            {"run": str(run), "detectors": rows, "ablations": extra, "goal_met_by": winners},
        )
    return 0


def ablations(run: Path) -> dict[str, dict[str, float]]:
    """Variants of detectors 2 and 3 computed from stored inputs (no training)."""
    out: dict[str, dict[str, float]] = {}
    inst = store.load_instances(run)
    train = inst[inst["split"] == "train"]
    flipped = train["flipped"].to_numpy(bool)
    if not 0 < flipped.sum() < len(flipped):
        return out
    shapes_path, tracin_path = run / store.SHAPES, run / store.TRACIN
    if shapes_path.exists() and tracin_path.exists():
        tracin = store.read_npy(tracin_path)
        shapes = pd.read_parquet(shapes_path, columns=["correct", "s", "shape"])
        s, correct = shapes["s"].to_numpy(), shapes["correct"].to_numpy(bool)
        everyone = np.zeros_like(correct)  # "all misclassified": every row used
        variants = {
            "shape_aware: all curves as S (ends)": (correct, 1.0, "value"),
            "shape_aware: all curves as Z (centre)": (correct, -1.0, "value"),
            "shape_aware: every test instance": (everyone, None, "value"),
            "shape_aware: rank positions (end-ratio form)": (correct, None, "rank"),
        }
        for label, (mask, pref, position) in variants.items():
            scores, _ = detectors.shape_aware_scores(
                tracin, s, mask, preference=pref, position=position
            )
            out[label] = metrics.detection_metrics(scores, flipped)
        mis = ~correct
        counts = shapes.loc[mis, "shape"].value_counts().to_dict()
        print(f"misclassified test instances by shape: {counts}")
        for how in ("abs", "opponent", "proponent"):
            rows = np.asarray(tracin[mis if mis.any() else slice(None)], dtype=np.float64)
            out[f"run TracIn on misclassified test: {how}"] = metrics.detection_metrics(
                detectors.aggregate_influence(rows, how), flipped
            )
    cache = run / detectors.WORK_DIR / detectors.INFLUENCE_CACHE
    if cache.exists():
        with np.load(cache) as z:
            matrix = z["matrix"]
            self_inf = z["self_influence"] if "self_influence" in z.files else None
        for how in ("abs", "opponent", "proponent"):
            out[f"misclassified_influence: {how}"] = metrics.detection_metrics(
                detectors.aggregate_influence(matrix, how), flipped
            )
        if self_inf is not None:
            out["self-influence at train-in-train checkpoints"] = metrics.detection_metrics(
                self_inf, flipped
            )
    return out


def _print_table(rows: dict[str, dict], extra: dict[str, dict]) -> None:
    """One line per detector, then the ablations."""
    header = f"{'detector':<48}" + "".join(f"{k.replace('_', ' '):>20}" for k in SHOWN)
    print(header)
    print("-" * len(header))
    for name, values in rows.items():
        print(f"{name:<48}" + "".join(f"{values[k]:>20.3f}" for k in SHOWN))
    if extra:
        print("ablations")
        for name, values in extra.items():
            print(f"  {name:<46}" + "".join(f"{values[k]:>20.3f}" for k in SHOWN))


if __name__ == "__main__":
    sys.exit(main())
