"""The options of ``python -m core run`` (and ``sweep``): the parser pieces and their reading.

Kept apart from the CLI's handlers so that the command layer (core.options.commands) can read a
recorded ``run`` line back into a configuration without importing the whole command line.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.execution.executors import EXECUTORS, SHARED_MODES, ExecutorSpec, check_executor
from core.inputs.config import PRESETS, StudyConfig, preset_config
from core.options.tracin_options import covers_every_parameter, project_help_short, record_project
from core.options.validation import DATA_SUFFIXES, check_number
from core.storage.errors import AtlasError

DEFAULT_CACHE = os.environ.get("ATLAS_CACHE", "cache")
# A run's stages in order (``--until`` names the last); the pipeline runs them.
STAGES = ("data", "train", "tracin", "analyze")


class UsageError(AtlasError):
    """A command line argparse cannot read: reported as one sentence, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations (``--epoch`` is not ``--epochs``) and one-sentence errors.

    argparse would print the whole usage block and exit; this raises :class:`UsageError`
    instead, so ``main`` reports it like any other bad input and the app can validate an
    argument list without exiting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see `{self.prog} --help`.")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse, but unknown options name the subcommand whose help lists the valid ones."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise UsageError(f"unrecognized arguments: {' '.join(extras)}; see `{prog} --help`.")
        return parsed


class _CoreChoices(Sequence):
    """A tuple of names from a core module, imported on first use (argparse help or a check)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)
        self._items: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._items is None:
            import importlib

            self._items = tuple(getattr(importlib.import_module(self._where[0]), self._where[1]))
        return self._items

    def __getitem__(self, index):  # type: ignore[override]
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()


class _LazyHelp(str):
    """A help text computed only when help is printed (argparse formats it with ``%``).

    core.inputs.datasets loads scikit-learn; listing its names at parser build time would make
    every command, a mistyped one included, pay for that import.
    """

    def __new__(cls, make: Any) -> _LazyHelp:
        obj = super().__new__(cls, "help")
        obj._make = make
        return obj

    def __mod__(self, params: Any) -> str:
        return self._make() % params


def add_study_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``run`` and ``sweep``: preset, data, model and training overrides."""
    p.add_argument(
        "--preset", default="quick", choices=sorted(PRESETS), help="starting configuration"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help=_LazyHelp(
            lambda: "built-in dataset ({}) or a CSV/TSV/JSONL file".format(
                ", ".join(_CoreChoices("core.inputs.datasets", "BUILTINS"))
            )
        ),
    )
    g.add_argument("--text-col", help="text column of your file")
    g.add_argument("--label-col", help="label column (exactly two classes)")
    g.add_argument("--rating-col", help="numeric rating column (use with --pos-min/--neg-max)")
    g.add_argument("--pos-min", type=float, help="ratings >= this are positive (e.g. 4)")
    g.add_argument("--neg-max", type=float, help="ratings <= this are negative (e.g. 2)")
    g.add_argument("--n-train", type=int, help="training-split size (the sample is n_train / 0.8)")
    g.add_argument(
        "--flip-rate", type=float, help="fraction of training labels to flip (default 0.025)"
    )
    g.add_argument(
        "--flip-count", type=int, help="number of training labels to flip (wins over --flip-rate)"
    )
    g.add_argument("--seed", type=int, help="seed for sampling, split, flips and training")
    m = p.add_argument_group("model and training")
    m.add_argument("--model", help="tiny, minilm, or a local Hugging Face model directory")
    m.add_argument("--epochs", type=int)
    m.add_argument("--lr", type=float)
    m.add_argument("--batch-size", type=int)
    m.add_argument("--max-length", type=int)
    m.add_argument("--device", help="auto (default), cpu or cuda")
    m.add_argument("--params", dest="tracin_params", help="TracIn parameter scope (see `tracin`)")
    m.add_argument(
        "--project",
        dest="tracin_project",
        help=project_help_short(),
    )
    p.add_argument("--cache", default=DEFAULT_CACHE, help="run store folder (default: cache)")
    p.add_argument("--name", help="run folder name (default: derived from the configuration)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything (data, labels, model, options) and say what would run; write nothing",
    )


def add_executor_options(p: argparse.ArgumentParser, what: str = "tasks") -> None:
    """``--executor``, ``--workers``, ``--ray-address``, ``--ray-shared`` (core/execution/executors.py)."""
    g = p.add_argument_group(
        "executor",
        f"where the independent {what} run; the numbers are the same whichever runs them "
        "(docs/cluster.md)",
    )
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="local (default: this process, one task at a time), processes (a pool on this "
        "machine) or ray (a local Ray instance or a cluster; pip install -r requirements-ray.txt)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes: pool size (default one per two cores); ray: tasks at once "
        "(default: as many as the cluster schedules)",
    )
    g.add_argument(
        "--ray-address",
        help="ray: auto or ray://host:port joins a running cluster (default: start a local instance)",
    )
    g.add_argument(
        "--ray-shared",
        choices=SHARED_MODES,
        default=None,
        help="ray: is --cache the same path on every node? auto (default) checks each node; "
        "no ships inputs to the tasks and writes the returned shards here",
    )


def executor_from_args(args: argparse.Namespace) -> ExecutorSpec | None:
    """The validated executor (None when none was asked for: the command's default).

    A sweep's ``--workers N`` alone means what its older ``--jobs N`` does.
    """
    asked = (args.executor, args.workers, args.ray_address, args.ray_shared)
    if all(a is None for a in asked):
        return None
    if args.command == "sweep" and all(a is None for a in asked[:1] + asked[2:]):
        check_number("--workers", args.workers, 0, 1024)
        if args.jobs and args.workers and args.jobs != args.workers:
            raise AtlasError(
                f"--jobs {args.jobs} and --workers {args.workers} disagree; --jobs is the older "
                "name of --workers, give one of them."
            )
        return None
    if args.executor is None and (args.ray_address is not None or args.ray_shared is not None):
        raise AtlasError("--ray-address and --ray-shared need --executor ray.")
    return check_executor(args.executor or "local", args.workers, args.ray_address, args.ray_shared)


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """Preset plus command-line overrides."""
    base = preset_config(args.preset)
    dataset, data_file = args.dataset, None
    if dataset and (Path(dataset).suffix.lower() in DATA_SUFFIXES or Path(dataset).exists()):
        data_file = str(Path(dataset).resolve())
        dataset = "file"
    if data_file is None and (args.text_col or args.label_col or args.rating_col):
        raise AtlasError(
            "--text-col/--label-col/--rating-col need --dataset pointing at your file."
        )
    params, project = args.tracin_params, args.tracin_project
    if project is not None:
        if covers_every_parameter(project) and params is None:
            params = "all"  # the projection covers every parameter (factorized:K)
        project = record_project(project)
    elif params is not None and covers_every_parameter(base.tracin_project):
        # A preset whose default projection covers every parameter (factorized:K) with an
        # explicit scope and no --project: the scope asks for exact gradients (`--params all`:
        # the definition), so the preset's projection goes.
        import dataclasses

        base = dataclasses.replace(base, tracin_project=None)
    return base.replace(
        dataset=dataset,
        data_file=data_file,
        text_col=args.text_col,
        label_col=args.label_col,
        rating_col=args.rating_col,
        pos_min=args.pos_min,
        neg_max=args.neg_max,
        n_train=args.n_train,
        flip_rate=args.flip_rate,
        flip_count=args.flip_count,
        seed=args.seed,
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        tracin_params=params,
        tracin_project=project,
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Every option of ``run``: the study options, ``--until``, ``--detect`` and the executor."""
    add_study_options(p)
    p.add_argument(
        "--until",
        default="analyze",
        choices=STAGES,
        help="last stage to run",
    )
    p.add_argument("--detect", action="store_true", help="also run the detectors afterwards")
    add_executor_options(p, "TracIn shards (and detector 2's retraining with --detect)")
