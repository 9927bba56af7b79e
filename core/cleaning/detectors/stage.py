"""The detect stage: compute the registry's detectors for a run, score them against the flips.

Writes ``detectors.parquet`` (``id`` + one column per detector) and ``detection.json``
(metrics per detector beside the random baseline, and a note on how each was computed),
then marks the stage ``detect`` complete.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.analysis import metrics
from core.cleaning.detectors.registry import DETECTORS, REGISTRY, Inputs, Skip
from core.cleaning.detectors.retraining import WORK_DIR, retrain_elsewhere
from core.execution.executors import LOCAL, ExecutorSpec
from core.inputs.config import StudyConfig, config_from_dict
from core.storage import provenance, store
from core.storage.errors import AtlasError

STAGE = "detect"


def run_detect(
    run_dir: str | os.PathLike,
    detectors: Sequence[str] | None = None,
    force: bool = False,
    progress: bool = True,
    executor: ExecutorSpec = LOCAL,
) -> dict[str, Any]:
    """Compute the detectors (all available, or ``detectors``), score them and store the results.

    Detector 2's retraining (the one heavy unit) runs on ``executor`` (:mod:`core.execution.executors`)
    when it is not the local one; the other detectors are quick and run here.

    Without ``force`` only detectors not yet stored are computed and the stored
    columns are kept, so a rerun after a missing input has appeared fills the gap
    and a complete stage returns at once. ``force`` recomputes the requested
    detectors (all: detector 2's train-in-train model too). Detectors whose inputs
    are missing are skipped, with the reason in the notes. Returns the content of
    ``detection.json``.
    """
    run = Path(run_dir)
    manifest = store.load_manifest(run)
    wanted = _check_names(detectors)
    instances = store.load_instances(run)
    train = instances[instances["split"] == "train"].reset_index(drop=True)
    if len(train) < 2:
        raise AtlasError(
            f"{run} has {len(train)} training instances; detection needs at least two."
        )
    table = pd.DataFrame({"id": train["id"].to_numpy(np.int64)})
    old = pd.read_parquet(run / store.DETECTORS) if (run / store.DETECTORS).exists() else None
    old_json = store.read_json(run / store.DETECTION) if (run / store.DETECTION).exists() else {}
    stored = [c for c in DETECTORS if _same_rows(old, table) and c in old.columns]
    # Inputs changed since the stage ran (tracin.npy rewritten, ...): stored columns are stale.
    stale = store.stage_done(run, STAGE) and provenance.stale_reason(run, STAGE) is not None
    todo = wanted if force or stale else [name for name in wanted if name not in stored]
    if not todo and old_json and store.stage_done(run, STAGE):
        return old_json
    if force and detectors is None:
        shutil.rmtree(run / WORK_DIR, ignore_errors=True)

    t0 = time.perf_counter()
    config = config_from_dict(manifest.get("config", {}))
    inputs = Inputs(run, instances, train)
    scores: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    info: dict[str, Any] = dict(old_json.get("info", {}))
    timings: dict[str, float] = {}
    remote = retrain_elsewhere(run, todo, executor, config, force, progress)
    for name in todo:
        t = time.perf_counter()
        _say(progress, f"detect: {name}")
        try:
            again = force and not (remote and name == "misclassified_influence")
            values, note, extra = _compute(name, inputs, config, again, progress)
        except Skip as skip:
            notes[name] = f"skipped: {skip}"
            _say(progress, f"detect: {name} skipped ({skip})")
            continue
        scores[name] = np.asarray(values, dtype=np.float64)
        notes[name] = note
        info.pop(name, None)
        if extra:
            info[name] = extra
        timings[name] = round(time.perf_counter() - t, 3)

    for name in DETECTORS:
        if name in scores:
            table[name] = scores[name]
        elif name in stored:
            # Not recomputed this time: keep the stored column and its note.
            table[name] = old[name].to_numpy(np.float64)
            notes[name] = old_json.get("notes", {}).get(name, "")
        elif name not in notes and str(old_json.get("notes", {}).get(name, "")).startswith(
            "skipped"
        ):
            notes[name] = old_json["notes"][name]  # still missing: keep saying why
    result = detection_summary(table, train["flipped"].to_numpy(bool), notes)
    result["info"] = info
    store.write_parquet(run / store.DETECTORS, table)
    store.write_json(run / store.DETECTION, result)
    seconds = time.perf_counter() - t0
    store.mark_stage(
        run,
        STAGE,
        store.STATUS_COMPLETE,
        seconds,
        detectors=[c for c in table.columns if c != "id"],
        skipped={k: v for k, v in notes.items() if v.startswith("skipped")},
        timings_s=timings,
    )
    return result


def detection_summary(
    table: pd.DataFrame, flipped: np.ndarray, notes: dict[str, str]
) -> dict[str, Any]:
    """detection.json's content for a detectors table and the flipped mask (train order)."""
    flipped = np.asarray(flipped, dtype=bool)
    n, k = len(flipped), int(flipped.sum())
    out: dict[str, Any] = {
        "k": k,
        "n_train": n,
        "flip_rate": k / n if n else 0.0,
        "fractions": list(metrics.FRACTIONS),
        "detectors": {},
        "random": None,
        "notes": dict(notes),
    }
    if 0 < k < n:
        out["random"] = metrics.random_baseline(n, k)
        for name in DETECTORS:
            if name in table.columns:
                out["detectors"][name] = metrics.detection_metrics(table[name].to_numpy(), flipped)
    else:
        out["notes"]["metrics"] = (
            "no metrics: the run has no flipped training instances to score against"
            if k == 0
            else "no metrics: every training instance is flipped"
        )
    return out


def detection_table(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per detector (then the random baseline) for ``show --json`` and the app."""
    run = Path(run_dir)
    data = store.read_json(run / store.DETECTION)
    rows = []
    for name, values in data.get("detectors", {}).items():
        rows.append({"detector": name, **values, "note": data.get("notes", {}).get(name, "")})
    for name, note in data.get("notes", {}).items():
        if name in DETECTORS and name not in data.get("detectors", {}):
            rows.append({"detector": name, "note": note})
    if data.get("random"):
        rows.append({"detector": "random_baseline", **data["random"], "note": "expected value"})
    return rows


def load_scores(run_dir: str | os.PathLike, detector: str) -> pd.DataFrame:
    """Return ``id`` and ``score`` of one detector (train order), or raise :class:`AtlasError`."""
    run = Path(run_dir)
    path = run / store.DETECTORS
    if detector not in DETECTORS:
        raise AtlasError(f"Unknown detector '{detector}'; choose one of: {', '.join(DETECTORS)}.")
    if not path.exists():
        raise AtlasError(
            f"{run} has no detector scores yet; run `python -m core detect {run}` first."
        )
    table = pd.read_parquet(path)
    if detector not in table.columns:
        raise AtlasError(
            f"The detector '{detector}' was not computed for {run} "
            f"(available: {', '.join(c for c in table.columns if c != 'id')})."
        )
    return pd.DataFrame({"id": table["id"].to_numpy(np.int64), "score": table[detector].to_numpy()})


def _compute(
    name: str, inputs: Inputs, config: StudyConfig, force: bool, progress: bool
) -> tuple[np.ndarray, str, dict[str, Any] | None]:
    """Return (scores in train order, note, extra info) of one detector, or raise Skip."""
    detector = REGISTRY[name]
    for needed in detector.needs:
        inputs.require(needed)
    return detector.function(inputs, config, force, progress)


def _same_rows(old: pd.DataFrame | None, table: pd.DataFrame) -> bool:
    """Whether a stored detectors table covers the same training ids in the same order."""
    return (
        old is not None
        and len(old) == len(table)
        and bool((old["id"].to_numpy() == table["id"].to_numpy()).all())
    )


def _check_names(detectors: Sequence[str] | None) -> list[str]:
    """The detectors to compute, in canonical order; unknown names raise :class:`AtlasError`."""
    if not detectors:
        return list(DETECTORS)
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise AtlasError(f"Unknown detector '{unknown[0]}'; choose from: {', '.join(DETECTORS)}.")
    return [d for d in DETECTORS if d in detectors]


def _say(progress: bool, message: str) -> None:
    """A progress line on stderr."""
    if progress:
        print(message, file=sys.stderr, flush=True)
