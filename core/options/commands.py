"""The command that reproduces a run: its manifest's command, pinned to its configuration.

A manifest records ``run`` as it was typed (``--preset paper --name demo``). When a preset's
default changes later (the paper preset's TracIn method did), that line would make a run of
another configuration, and resuming the run with it is refused. :func:`reproduce_command`
appends the options whose value the run had but today's presets would set differently, and
checks by parsing the result that it gives the run's configuration. The other commands a
run's messages name (resume, rebuild a stage, recreate a shipped run's checkpoints) are
built from it here, above the run store, which only knows which stage wrote each file.
Torch-free: the app shows these commands.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from core.execution.executors import RESUME
from core.options.run_options import UsageError, _Parser, add_run_options, config_from_args
from core.storage import provenance, store
from core.storage.errors import AtlasError

# Configuration keys a `run` option sets, in the order they are appended.
FLAGS = {
    "model": "--model",
    "n_train": "--n-train",
    "flip_rate": "--flip-rate",
    "flip_count": "--flip-count",
    "seed": "--seed",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "tracin_params": "--params",
    "tracin_project": "--project",
}


def _config_of(words: list[str]) -> dict[str, Any] | None:
    """The configuration a ``python -m core run …`` line asks for, or None if it is not one."""
    if words[:4] != ["python", "-m", "core", "run"]:
        return None
    parser = _Parser(prog="python -m core run")
    add_run_options(parser)
    try:
        args = parser.parse_args(words[4:])
        args.command = "run"
        return config_from_args(args).to_dict()
    except (AtlasError, UsageError, SystemExit):
        return None


def pin_command(command: str, config: dict[str, Any]) -> str:
    """``command`` with the options that make it ask for ``config`` again (unchanged when it
    already does, or when no option can express the difference)."""
    words = shlex.split(command)
    asked = _config_of(words)
    if asked is None:
        return command
    extra: list[str] = []
    for key, flag in FLAGS.items():
        want = config.get(key)
        if key in config and want is not None and asked.get(key) != want:
            extra += [flag, f"{want:g}" if isinstance(want, float) else str(want)]
    pinned = words + extra
    again = _config_of(pinned)
    if again is None or any(again.get(k) != config.get(k) for k in FLAGS if k in config):
        return command
    return shlex.join(pinned)


def reproduce_command(run_dir: str | os.PathLike) -> str | None:
    """The run's recorded command, pinned to its configuration (None when none is recorded)."""
    try:
        manifest = store.read_json(Path(run_dir) / store.MANIFEST)
    except AtlasError:
        return None
    command = manifest.get("command") if isinstance(manifest, dict) else None
    if not isinstance(command, str) or not command.strip():
        return None
    config = manifest.get("config")
    return pin_command(command.strip(), config) if isinstance(config, dict) else command.strip()


def resume_command(run_dir: str | os.PathLike) -> str:
    """The command that resumes a run or sweep: its recorded command, pinned to its config."""
    command = reproduce_command(run_dir)
    if command:
        return command
    run = Path(run_dir)
    return (
        f"python -m core run --name {shlex.quote(run.name)} --cache "
        f"{shlex.quote(str(run.parent))} with the options that made it"
    )


def status_note(run_dir: str | os.PathLike, manifest: dict[str, Any], status: str) -> str | None:
    """One sentence for an interrupted or failed run (``status`` from :func:`core.storage.store.run_status`):
    what happened and the command that resumes it; None for any other status."""
    if status == store.STATUS_INTERRUPTED:
        return (
            "No process is writing it (it was killed or crashed); resume it with "
            f"`{resume_command(run_dir)}`."
        )
    if status == store.STATUS_FAILED:
        stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
        failed = [  # a stage command's failure is recorded in its stage's entry
            f"{name}: {_text(e.get('error'))}"
            for name, e in stages.items()
            if isinstance(e, dict) and e.get("status") == store.STATUS_FAILED and e.get("error")
        ]
        error = _text(manifest.get("error") or (failed[0] if failed else "")).strip().rstrip(".")
        error = error or "no error was recorded"
        error = error.replace(f", {RESUME}", "")  # a task's sentence: the command comes next
        return f"It failed: {error}; resume it with `{resume_command(run_dir)}`."
    return None


def recreate_command(run_dir: str | os.PathLike) -> str:
    """The command that makes a full copy (checkpoints and tokenizer included) of a run.

    It is the run's manifest command, pinned to the run's configuration
    (:func:`reproduce_command`), under the name :func:`store.full_copy_name` in the
    same run store, so the shipped files are never overwritten; the same seed and
    configuration give the same study.
    """
    run = Path(run_dir)
    command = reproduce_command(run)
    if not isinstance(command, str) or not command.strip():
        return f"python -m core run --name {store.full_copy_name(run)} with the options that made {run}"
    words = shlex.split(command)
    for flag in ("--name", "--cache"):
        while flag in words:
            i = words.index(flag)
            del words[i : i + 2]
        words = [w for w in words if not w.startswith(flag + "=")]
    words += ["--name", store.full_copy_name(run)]
    if run.parent.resolve() != (Path.cwd() / "cache").resolve():
        words += ["--cache", str(run.parent)]
    return shlex.join(words)


def require_heavy_tier(run_dir: str | os.PathLike, purpose: str) -> None:
    """Raise one sentence naming the command that recreates a shipped run's missing folders.

    ``purpose`` completes "… needs them to …" (e.g. "compute TracIn").
    """
    missing = store.missing_heavy_tier(run_dir)
    if not missing:
        return
    run = Path(run_dir)
    try:
        timings = store.read_json(run / store.MANIFEST).get("timings_s") or {}
        minutes = sum(float(v) for k, v in timings.items() if k in ("train", "tracin")) / 60
    except (AtlasError, AttributeError, TypeError, ValueError):
        minutes = 0.0
    took = f" (training and TracIn took about {minutes:.0f} min here)" if minutes >= 1 else ""
    raise AtlasError(
        f"{run} has no {' or '.join(missing)} (runs shipped in the repository keep only their small "
        f"files) and {purpose} needs them: make a full copy with `{recreate_command(run)}`{took}, "
        f"then use {run.parent / store.full_copy_name(run)}."
    )


def rebuild_command(run_dir: str | os.PathLike, stage: str) -> str:
    """The command that (re)makes ``stage``'s files of a run."""
    run = shlex.quote(str(run_dir))
    if stage == "tracin" and store.missing_heavy_tier(run_dir):
        return recreate_command(run_dir)
    if stage == "tracin":
        return f"python -m core tracin {run}"
    if stage in ("analyze", "detect"):
        return f"python -m core {stage} {run} --force"
    command = reproduce_command(run_dir)
    if command:
        return command
    return f"python -m core run --name {shlex.quote(Path(run_dir).name)} --cache {shlex.quote(str(Path(run_dir).parent))} with the options that made it"


# Damaged or missing files of a run name the command that remakes them (core.storage.store's hints).
store.set_rebuild_phrasing(rebuild_command)


def list_runs(cache_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return one summary dict per run or sweep under ``cache_dir``, newest first.

    Folders without a readable manifest (corrupt JSON, not an object) are reported with
    status 'unreadable' and the reason rather than skipped, so a user sees that something
    is there; a run recorded complete whose stage files are missing says 'incomplete'.
    """
    cache = Path(cache_dir)
    if not cache.is_dir():
        return []
    rows = []
    for child in cache.iterdir():
        if not child.is_dir() or child.name.startswith("."):
            continue
        path = child / store.MANIFEST
        if not path.exists():
            continue
        try:
            manifest = store.load_manifest(child)
        except AtlasError as exc:
            rows.append(
                {
                    "name": child.name,
                    "path": str(child),
                    "kind": "?",
                    "status": "unreadable",
                    "created": "",
                    "dataset": "",
                    "model": "",
                    "test_accuracy": None,
                    "error": str(exc),
                    "note": None,
                    "stale": [],
                    "stale_reasons": {},
                }
            )
            continue
        config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
        acc = manifest.get("test_accuracy")
        kind = _text(manifest.get("kind", "run"))
        status = store.run_status(child, manifest)
        stale = provenance.stale_stages(child) if kind == "run" else {}
        rows.append(
            {
                "name": child.name,
                "path": str(child),
                "kind": kind,
                "status": status,
                # Interrupted or failed: what happened and the command that resumes it.
                "note": status_note(child, manifest, status),
                "created": _text(manifest.get("created", "")),
                "dataset": _text(config.get("dataset", "")),
                "model": _text(config.get("model", "")),
                "test_accuracy": float(acc) if isinstance(acc, int | float) else None,
                # Stages whose inputs changed since they ran (core.storage.provenance).
                "stale": sorted(stale),
                # ... and why, one sentence per stage.
                "stale_reasons": stale,
            }
        )
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def _text(value: Any) -> str:
    """A manifest value shown as text (a hand-edited manifest may hold anything)."""
    return value if isinstance(value, str) else ("" if value is None else str(value))
