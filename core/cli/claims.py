"""Handlers of the paper's claims: ``claims``, ``group`` and ``replication``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.analysis.replication import (
    CLAIMS_FILE,
    claims_of,
    make_group,
    replication_summary,
    verdict_table,
)
from core.cli.common import _command_line, _existing_target
from core.options.validation import check_name
from core.storage import store


def cmd_claims(args: argparse.Namespace) -> str | None:
    """Test the paper's claims on a run, group or sweep; write claims.json and print a table."""
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
    name = check_name(args.name)
    folder = make_group(args.cache, name, args.runs, args.view, _command_line(args))
    return str(folder)


def cmd_replication(args: argparse.Namespace) -> str:
    """The replication grid's summary: one condition per group, the sweep's C7, the teaching run."""
    name = check_name(args.name)
    return str(replication_summary(args.cache, name, args.groups, args.sweep, _command_line(args)))
