"""Handlers that read the run store: ``list`` and ``show`` (and ``show --json``'s payload)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.analysis.analyze import SUMMARY_COLUMNS, correlations, majority_baseline, summary_rows
from core.cli.common import _existing_run, _number
from core.options import commands
from core.orchestration.sweep import sweep_table
from core.storage import provenance, store
from core.storage.errors import AtlasError


def cmd_list(args: argparse.Namespace) -> None:
    """Print the runs and sweeps in the cache."""
    rows = commands.list_runs(args.cache)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    if not rows:
        print(f"No runs in {args.cache}/ yet; make one with: python -m core run --preset quick")
        return
    for r in rows:
        acc = r.get("test_accuracy")
        acc_text = f"{acc:.3f}" if isinstance(acc, float) else "-"
        print(
            f"{r['path']:<48} {r['kind']:<6} {r['status']:<10} {r['dataset']:<16} {r['model']:<8} acc={acc_text}"
        )
        if r.get("error"):
            print(f"  {r['error']}")
        if r.get("note"):
            print(f"  {r['note']}")
        for stage, reason in (r.get("stale_reasons") or {}).items():
            print(f"  stale: {stage} ({reason})")


def show_payload(run_dir: Path) -> dict[str, Any]:
    """What ``show --json`` prints for a run or a sweep."""
    manifest = store.load_manifest(run_dir)
    if manifest.get("kind") == "sweep":
        status = store.run_status(run_dir, manifest)
        manifest = {**manifest, "status": status}
        manifest["note"] = commands.status_note(run_dir, manifest, status)
        try:
            return {**manifest, "table": sweep_table(run_dir)}
        except AtlasError as exc:
            return {**manifest, "status": "damaged", "table": [], "problems": {"sweep": str(exc)}}
    if manifest.get("kind") in ("group", "replication"):
        claims_path = run_dir / (
            "claims.json" if manifest["kind"] == "group" else "replication.json"
        )
        try:
            return {**manifest, "claims": store.read_json(claims_path)}
        except AtlasError as exc:
            return {**manifest, "status": "damaged", "problems": {"claims": str(exc)}}
    # Stages the manifest calls complete are reported complete only when their files are whole.
    problems = store.verify_run(run_dir, manifest)
    stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
    status = store.run_status(run_dir, manifest)
    # A stage marked running while nobody holds the lock was killed or crashed part-way.
    halted = store.STATUS_INTERRUPTED if status != store.STATUS_RUNNING else None
    stages = {
        stage: {**entry, "status": "damaged", "problem": problems[stage]}
        if stage in problems and isinstance(entry, dict)
        else {**entry, "status": halted}
        if halted and isinstance(entry, dict) and entry.get("status") == store.STATUS_RUNNING
        else entry
        for stage, entry in stages.items()
    }
    out = {
        "name": manifest.get("name", run_dir.name),
        "path": str(run_dir),
        "status": "damaged" if problems else status,
        # Interrupted or failed: what happened and the command that resumes it (None else).
        "note": commands.status_note(run_dir, manifest, status),
        "error": manifest.get("error"),
        "command": manifest.get("command"),
        "config": manifest.get("config"),
        "data": manifest.get("data"),
        "n_train": manifest.get("n_train"),
        "n_val": manifest.get("n_val"),
        "n_test": manifest.get("n_test"),
        "n_flipped": manifest.get("n_flipped"),
        "test_accuracy": manifest.get("test_accuracy"),
        "majority_baseline": _majority_baseline(run_dir),
        "purpose": manifest.get("purpose"),
        "epochs": manifest.get("epochs", []),
        "checkpoints": manifest.get("checkpoints", []),
        "stages": stages,
        "timings_s": manifest.get("timings_s", {}),
        "tracin": manifest.get("tracin"),
        "problems": problems,
        # {stage: reason} for stages whose inputs changed since they ran (core.storage.provenance).
        "stale": provenance.stale_stages(run_dir),
    }
    if store.stage_complete(run_dir, "analyze") and "analyze" not in problems:
        try:  # a run analysed by an older version may lack columns this one reports
            store.read_parquet(run_dir / store.SHAPES, SUMMARY_COLUMNS)
            out["test_instances"] = summary_rows(run_dir)
            out["correlations"] = correlations(run_dir)
        except AtlasError as exc:
            problems["analyze"] = str(exc)
    if store.stage_complete(run_dir, "detect") and "detect" not in problems:
        # scikit-learn and SciPy: loaded by the commands that use them
        from core.cleaning.detectors import detection_table

        try:
            out["detection"] = detection_table(run_dir)
        except AtlasError as exc:
            problems["detect"] = str(exc)
    for stage, problem in problems.items():
        if isinstance(stages.get(stage), dict):
            stages[stage] = {**stages[stage], "status": "damaged", "problem": problem}
    if problems:
        out["status"] = "damaged"
    return out


def cmd_show(args: argparse.Namespace) -> None:
    """Print a run's summary (or everything as JSON)."""
    run_dir = _existing_run(args.run)
    payload = show_payload(run_dir)
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=store._json_default))
        return
    print(f"{payload.get('name')}  [{payload.get('status')}]")
    if payload.get("note"):
        print(f"  {payload['note']}")
    if payload.get("purpose"):
        print(f"  purpose        {payload['purpose']}")
    for key in ("n_train", "n_val", "n_test", "n_flipped", "test_accuracy", "majority_baseline"):
        if key in payload:
            print(f"  {key:<14} {payload[key]}")
    for e in payload.get("epochs", []) or []:
        if isinstance(e, dict):
            cells = [f"epoch {e.get('epoch', '?'):>2}"] + [
                f"{label} {_number(e.get(key))}"
                for label, key in (("loss", "train_loss"), ("val", "val_accuracy"))
            ]
            print("  " + "  ".join([*cells, f"test {_number(e.get('test_accuracy'))}"]))
    stages = payload.get("stages") or {}
    for stage, entry in stages.items():
        status = entry.get("status") if isinstance(entry, dict) else entry
        stale = (payload.get("stale") or {}).get(stage)
        print(f"  {stage:<14} {status}" + (f" (stale: {stale})" if stale else ""))
    for stage, stale in (payload.get("stale") or {}).items():
        if stage not in stages:  # clean keeps no manifest entry, only its provenance
            print(f"  {stage:<14} stale: {stale}")
    for stage, secs in (payload.get("timings_s") or {}).items():
        print(f"  {stage:<14} {_number(secs, '.1f')} s")
    for problem in (payload.get("problems") or {}).values():
        print(f"  problem: {problem}")


def _majority_baseline(run_dir: Path) -> float | None:
    """The test split's majority-class accuracy (None while the run has no readable data)."""
    try:
        return majority_baseline(store.load_instances(run_dir))
    except AtlasError:
        return None
