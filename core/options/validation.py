"""Checks of a whole study request, made before anything is read heavily or written.

The CLI (``run``, ``sweep``) and the app's Run-a-study page call :func:`validate_study`
with the same :class:`~core.inputs.config.StudyConfig`, so a request the form accepts is one the
CLI accepts. Every check raises :class:`~core.storage.errors.AtlasError` with one sentence. This
module imports no torch (``--device cuda`` imports it lazily, only to ask for a GPU) and
no pandas, so a bad request is reported within a fraction of a second.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from pathlib import Path

from core.inputs.config import StudyConfig
from core.options.tracin_options import parse_scope, projection
from core.storage.errors import AtlasError

# A run or sweep name: one plain folder name (no separators, no '..', not hidden, not absolute).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE = (
    "A run name uses letters, digits, '.', '_' or '-', starts with a letter or digit, "
    "and has at most 64 characters."
)
DEVICES = ("auto", "cpu", "cuda")
MAX_COLUMN_CHARS = 200
# File suffixes that make ``--dataset`` a path rather than a built-in's name.
DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson")

# Inclusive ranges of the integer options: (flag, low, high). The upper bounds are far above
# anything sensible on one machine; they exist so a typo fails now, not after hours.
_INT_RANGES = {
    "n_train": ("--n-train", 10, 10_000_000),
    "epochs": ("--epochs", 1, 1000),
    "batch_size": ("--batch-size", 1, 65_536),
    "max_length": ("--max-length", 8, 8192),
    "seed": ("--seed", 0, 2**32 - 1),
    "tracin_seed": ("--seed", 0, 2**32 - 1),
}


def check_name(name: str | None, flag: str = "--name") -> str:
    """Return ``name`` if it is a plain folder name (the app's rule), else raise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        shown = "" if name is None else f" ('{_printable(str(name))}' is not)"
        raise AtlasError(f"{NAME_RULE[:-1]}{shown}; check {flag}.")
    return name


def check_cache(cache: str | os.PathLike) -> Path:
    """Return ``cache`` as a path if it is a writable folder or can be created as one."""
    path = Path(cache)
    if str(cache) == "":
        raise AtlasError("--cache is empty; give a folder such as cache.")
    if path.exists():
        if not path.is_dir():
            raise AtlasError(f"--cache {path} is a file, not a folder; give a folder.")
        if not os.access(path, os.W_OK | os.X_OK):
            raise AtlasError(f"--cache {path} is a folder this user cannot write to.")
        return path
    # The nearest existing ancestor decides whether the folder can be made.
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise AtlasError(f"--cache {path} cannot be created: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AtlasError(f"--cache {path} cannot be created: {parent} is not writable.")
    return path


def check_device(device: str | None, on_cluster: bool = False) -> str:
    """Return ``device`` if it is auto, cpu, or a CUDA device this machine has.

    ``on_cluster``: the tasks run on a Ray cluster, whose nodes (not this machine) must have
    the GPU; Ray schedules GPU tasks on them and each task checks its own device.
    """
    name = device or "auto"
    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise AtlasError(f"--device must be auto, cpu or cuda (got '{_printable(name)}').")
    if kind == "cuda" and not on_cluster:
        import torch  # only here: a CUDA request is the one check that needs torch

        if not torch.cuda.is_available():
            raise AtlasError(f"--device {name} was requested but no CUDA GPU is available here.")
        if index and int(index) >= torch.cuda.device_count():
            raise AtlasError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
    return name


def check_column(flag: str, name: str | None) -> None:
    """Refuse a column name that could be read as an option or breaks a one-line command."""
    if name is None:
        return
    if not name.strip():
        raise AtlasError(f"{flag} is empty; give the column's name.")
    if name.startswith("-"):
        raise AtlasError(f"{flag} '{_printable(name)}' starts with '-'; rename that column.")
    if len(name) > MAX_COLUMN_CHARS:
        raise AtlasError(f"{flag} is longer than {MAX_COLUMN_CHARS} characters.")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise AtlasError(f"{flag} '{_printable(name)}' contains control characters.")


def check_number(flag: str, value: float | int | None, low: float, high: float) -> None:
    """Refuse a value that is not a finite number in [low, high]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AtlasError(f"{flag} must be a number (got {value!r}).")
    if not math.isfinite(value):
        raise AtlasError(f"{flag} must be a finite number (got {value}).")
    if not low <= value <= high:
        raise AtlasError(f"{flag} must be between {_num(low)} and {_num(high)} (got {value}).")


def check_config(config: StudyConfig) -> None:
    """Numbers finite and in range, columns plain, TracIn scope parseable; no file access."""
    for field_name, (flag, low, high) in _INT_RANGES.items():
        check_number(flag, getattr(config, field_name), low, high)
    check_number("--flip-rate", config.flip_rate, 0.0, 1.0)
    if config.flip_rate >= 1:
        raise AtlasError(f"--flip-rate must be in [0, 1) (got {config.flip_rate}).")
    if config.flip_count is not None:
        check_number("--flip-count", config.flip_count, 0, max(config.n_train - 1, 0))
    check_number("--lr", config.lr, 0.0, 1.0)
    if config.lr <= 0:
        raise AtlasError(f"--lr must be positive (got {config.lr}).")
    if config.tracin_project is not None:
        entry, dim = projection(config.tracin_project)
        check_number("--project", dim, 1, 1_000_000)
        if entry.every_parameter and config.tracin_params != "all":
            raise AtlasError(
                f"--project {entry.record(dim)} covers every parameter; use --params all "
                f"(got '{config.tracin_params}')."
            )
    check_number("--pos-min", config.pos_min, -1e12, 1e12)
    check_number("--neg-max", config.neg_max, -1e12, 1e12)
    both = config.pos_min is not None and config.neg_max is not None
    if both and config.pos_min <= config.neg_max:
        raise AtlasError(
            f"--pos-min ({config.pos_min:g}) must be above --neg-max ({config.neg_max:g})."
        )
    for flag, column in (
        ("--text-col", config.text_col),
        ("--label-col", config.label_col),
        ("--rating-col", config.rating_col),
    ):
        check_column(flag, column)
    if config.label_col and config.label_col == config.text_col:
        raise AtlasError("--text-col and --label-col name the same column; they must differ.")
    if config.rating_col and config.rating_col == config.text_col:
        raise AtlasError("--text-col and --rating-col name the same column; they must differ.")
    if config.label_col and config.rating_col:
        raise AtlasError("Give --label-col or --rating-col, not both.")
    if config.label_col and (config.pos_min is not None or config.neg_max is not None):
        # They only cut a rating column; ignored silently, they would look applied.
        raise AtlasError(
            "--pos-min and --neg-max apply to --rating-col, not to --label-col; drop them, "
            "or give --rating-col instead of --label-col."
        )
    parse_scope(config.tracin_params)


def check_data(config: StudyConfig) -> None:
    """The data file exists and is a readable file, or the built-in dataset is known."""
    if config.data_file:
        path = Path(config.data_file)
        if not path.exists():
            raise AtlasError(f"Data file {path} does not exist.")
        if not path.is_file():
            raise AtlasError(f"Data file {path} is not a file.")
        if not os.access(path, os.R_OK):
            raise AtlasError(f"Data file {path} cannot be read by this user.")
        if not config.text_col:
            raise AtlasError("A data file needs --text-col naming its text column.")
        return
    from core.inputs.datasets import BUILTINS  # pandas and scikit-learn, still no torch

    if config.dataset not in BUILTINS:
        raise AtlasError(
            f"'{_printable(str(config.dataset))}' is neither a built-in dataset "
            f"({', '.join(sorted(BUILTINS))}) nor a .csv/.tsv/.jsonl file."
        )


def validate_study(config: StudyConfig, cache: str | os.PathLike, name: str | None = None) -> Path:
    """Check a whole ``run``/``sweep`` request and return the folder it would write.

    Order: numbers, columns and scope (no I/O), the run name, the cache folder, the
    data, then the device (the only check that may import torch). Raises
    :class:`AtlasError` with one sentence at the first problem; writes nothing.
    """
    check_config(config)
    if name is not None:
        check_name(name)
    cache_path = check_cache(cache)
    if name is not None and (cache_path / name).exists() and not (cache_path / name).is_dir():
        raise AtlasError(f"{cache_path / name} is a file; choose another --name.")
    check_data(config)
    check_device(config.device)
    return cache_path / name if name is not None else cache_path


def _num(value: float) -> str:
    """A bound as text: integers in full (4294967295, not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _printable(text: str, limit: int = 60) -> str:
    """``text`` shortened, with control characters shown as escapes, for an error sentence."""
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
