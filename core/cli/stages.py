"""Handlers of the stage commands on one run: ``tracin``, ``error-study``, ``analyze``, ``detect``,
``clean`` and ``export``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# analyze.analyze_run looked up at call time (tests replace it)
from core.analysis import analyze, shapes
from core.cli.common import _MAX_COUNT, _MAX_SEED, _command_line, _existing_run
from core.execution.executors import LOCAL, warm_pool
from core.options.error_study_options import parse_dtype, parse_methods, parse_subset
from core.options.run_options import executor_from_args
from core.options.tracin_options import parse_project, parse_scope
from core.options.validation import check_device, check_number
from core.storage import locks, store
from core.storage.errors import AtlasError


def cmd_tracin(args: argparse.Namespace) -> str:
    """Compute (or resume) the TracIn matrix of a run."""
    run_dir = _existing_run(args.run)
    if args.params is not None:
        parse_scope(args.params)
    if args.project is not None:
        _, dim = parse_project(args.project)
        check_number("--project", dim, 1, 1_000_000)
    check_number("--seed", args.seed, 0, _MAX_SEED)
    check_number("--compare-n", args.compare_n, 1, _MAX_COUNT)
    check_number("--chunks-per-task", args.chunks_per_task, 1, _MAX_COUNT)
    executor = executor_from_args(args) or LOCAL
    check_device(args.device, on_cluster=executor.kind == "ray")
    if args.compare and executor.kind != "local":
        raise AtlasError("--compare runs in this process; drop --executor.")
    if executor.kind == "processes":  # the pool's fork server imports torch while we do
        warm_pool("core.influence.stage")
    dtype = parse_dtype(args.dtype)
    # torch and transformers: loaded once the request has passed every torch-free check
    from core.influence import check_dtype, compare_to_exact, run_tracin, tasks_use_remote_gpu
    from core.learning.models import resolve_device

    if not tasks_use_remote_gpu(args.device, executor):  # else each task checks its GPU
        check_dtype(dtype, resolve_device(args.device))

    with locks.hold(run_dir):
        if args.compare:
            report = compare_to_exact(
                run_dir, args.params, args.project, args.seed, n_test=args.compare_n
            )
            print(json.dumps(report, indent=2, default=store._json_default))
            return str(run_dir)
        run_tracin(
            run_dir,
            scope=args.params,
            project=args.project,
            seed=args.seed,
            device=args.device,
            executor=executor,
            chunks_per_task=args.chunks_per_task,
            dtype=dtype,
        )
    return str(run_dir)


def cmd_error_study(args: argparse.Namespace) -> str:
    """Measure cheap TracIn methods against exact all-parameter scores on a test subset."""
    run_dir = _existing_run(args.run)
    parse_methods(args.methods)
    parse_subset(args.test_subset)
    dtype = parse_dtype(args.dtype)
    check_device(args.device)
    # torch and transformers: loaded once the request has passed every torch-free check
    from core.analysis.error_study import error_study
    from core.influence import check_dtype
    from core.learning.models import resolve_device

    check_dtype(dtype, resolve_device(args.device))
    with locks.hold(run_dir):
        summary = error_study(
            run_dir,
            methods=args.methods,
            test_subset=args.test_subset,
            dtype=args.dtype,
            device=args.device,
            progress=not args.quiet,
            command=_command_line(args),
            checkpoints=args.checkpoints,
        )
    if not args.quiet:
        _print_error_study(summary)
    return str(run_dir)


def _print_error_study(summary: dict[str, Any]) -> None:
    """The study's per-method summary as a table on stderr (stdout keeps the run folder)."""
    ref = summary["reference"]
    print(
        f"reference: exact all parameters ({ref['n_params']:,}), {ref['seconds']:.1f} s; "
        f"self-influence recall@10% {ref['self_influence']['recall_at_10pct']:.3f} "
        f"AP {ref['self_influence']['average_precision']:.3f}; training {summary.get('train_seconds')} s",
        file=sys.stderr,
    )
    head = f"{'method':<18}{'rho med':>8}{'top10':>7}{'top1%':>7}{'shape':>7}{'|dER|':>7}{'rec10':>7}{'AP':>7}{'sec':>9}"
    print(head, file=sys.stderr)
    for name, m in summary["methods"].items():
        si = m["self_influence"]
        print(
            f"{name:<18}{m['spearman_median']:>8.3f}{m['top10_overlap_mean']:>7.2f}"
            f"{m['top1pct_overlap_mean']:>7.2f}{m['shape_agreement']:>7.2f}"
            f"{m['end_ratio_diff_mean_abs']:>7.2f}{si['recall_at_10pct']:>7.3f}"
            f"{si['average_precision']:>7.3f}{m['seconds']:>9.1f}",
            file=sys.stderr,
        )


def cmd_analyze(args: argparse.Namespace) -> str:
    """Compute curve shapes, end ratios, distances and 2-D maps of a run."""
    run_dir = _existing_run(args.run)
    check_number("--checkpoint", args.checkpoint, -1000, 1000)
    check_number("--s-min", args.s_min, -1.0, 1.0)
    check_number("--z-max", args.z_max, -1.0, 1.0)
    check_number("--trim", args.trim, 0.0, 0.49)
    check_number("--k", args.k, 1, _MAX_COUNT)
    # The rule checks its own consistency (z_max below s_min) before anything is written.
    rule = shapes.ShapeRule(s_min=args.s_min, z_max=args.z_max, trim=args.trim)
    with locks.hold(run_dir):
        analyze.analyze_run(
            run_dir, checkpoint=args.checkpoint, rule=rule, k=args.k, force=args.force
        )
    return str(run_dir)


def cmd_detect(args: argparse.Namespace) -> str:
    """Rank training instances by every detector and score them against the known flips."""
    # scikit-learn and SciPy: loaded by the commands that use them
    from core.cleaning.detectors import run_detect

    run_dir = _existing_run(args.run)
    executor = executor_from_args(args) or LOCAL
    with locks.hold(run_dir):
        run_detect(run_dir, detectors=args.detectors, force=args.force, executor=executor)
    if not args.quiet:
        # scikit-learn and SciPy: loaded by the commands that use them
        from core.cleaning.detectors import detection_table

        for row in detection_table(run_dir):
            print(json.dumps(row, default=store._json_default), file=sys.stderr)
    return str(run_dir)


def cmd_clean(args: argparse.Namespace) -> str:
    """Retrain with the top-k suspects excluded, relabelled or reweighted."""
    run_dir = _existing_run(args.run)
    check_number("--k", args.k, 1, _MAX_COUNT)
    check_number("--seeds", args.seeds, 1, 1000)
    executor = executor_from_args(args) or LOCAL
    # scikit-learn and SciPy: loaded by the commands that use them
    from core.cleaning.interventions import run_clean

    with locks.hold(run_dir):
        run_clean(
            run_dir,
            detector=args.detector,
            action=args.action,
            k=args.k,
            seeds=args.seeds,
            executor=executor,
        )
    return str(run_dir / store.CLEANING_DIR)


def cmd_export(args: argparse.Namespace) -> str:
    """Write the review queue or the cleaned dataset as CSV."""
    run_dir = _existing_run(args.run)
    check_number("--k", args.k, 1, _MAX_COUNT)
    check_number("--top", args.top, 1, _MAX_COUNT)
    # scikit-learn and SciPy: loaded by the commands that use them
    from core.cleaning.interventions import ACTIONS, export_cleaned, export_review_queue

    with locks.hold(run_dir):  # writes into the run's cleaning/ folder
        if args.what == "review":
            path = export_review_queue(run_dir, args.detector, args.out, top=args.top)
        else:
            action = args.action or ACTIONS[0]
            path = export_cleaned(run_dir, args.detector, action, args.k, args.out)
    return str(path)
