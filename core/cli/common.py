"""What the command handlers share: the folder an argument names, number bounds, the command as typed."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from core.options.run_options import DEFAULT_CACHE
from core.storage import store
from core.storage.errors import AtlasError

# Bounds of the per-command integer options (typos fail at once, not after hours).
_MAX_COUNT = 10_000_000
_MAX_SEED = 2**32 - 1


def _existing_run(path: str, what: str = "a run folder") -> Path:
    """Resolve a folder argument (a path, or a name inside the cache) or raise :class:`AtlasError`."""
    candidate = Path(path)
    if not candidate.is_dir() and (Path(DEFAULT_CACHE) / path).is_dir():
        candidate = Path(DEFAULT_CACHE) / path
    if not (candidate / store.MANIFEST).exists():
        raise AtlasError(f"{path} is not {what} (no {store.MANIFEST}); see `python -m core list`.")
    return candidate


def _existing_target(path: str) -> Path:
    """A run, group or sweep folder (or its name inside the cache), or :class:`AtlasError`."""
    return _existing_run(path, "a run, group or sweep folder")


def _number(value: Any, fmt: str = ".4f") -> str:
    """A manifest number for the text summary ('-' when absent or not a number)."""
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, for the manifest (as ``python -m core``, which works in any venv).

    The arguments given to :func:`main`, not ``sys.argv``: a caller in Python (a test, a
    notebook) records its own request, not its interpreter's command line.
    """
    return "python -m core " + " ".join(shlex.quote(a) for a in args.argv)
