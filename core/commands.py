"""The command that reproduces a run: its manifest's command, pinned to its configuration.

A manifest records ``run`` as it was typed (``--preset paper --name demo``). When a preset's
default changes later (the paper preset's TracIn method did), that line would make a run of
another configuration, and resuming the run with it is refused. :func:`reproduce_command`
appends the options whose value the run had but today's presets would set differently, and
checks by parsing the result that it gives the run's configuration. Torch-free: the app
shows these commands.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from core import store
from core.errors import AtlasError

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
    from core.cli import build_parser, config_from_args

    try:
        args = build_parser().parse_args(words[3:])
        return config_from_args(args).to_dict()
    except (AtlasError, SystemExit):
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
