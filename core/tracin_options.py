"""TracIn options that can be checked without torch: parameter scopes (and, later, projections).

The CLI and the app validate a request with these before anything heavy is imported or
written; the engine (``core.tracin``) uses the same functions, so there is one definition.
"""

from __future__ import annotations

import re

from core.errors import AtlasError

SCOPES_FIXED = ("all", "no-word-embeddings", "head")
_SCOPE_RE = re.compile(r"^last-(\d+)$")


def parse_scope(scope: str) -> tuple[str, int]:
    """Split a scope string into (kind, N); raise :class:`AtlasError` if it is not one."""
    if scope in SCOPES_FIXED:
        return scope, 0
    match = _SCOPE_RE.match(str(scope))
    if match and int(match.group(1)) >= 1:
        return "last", int(match.group(1))
    raise AtlasError(
        f"'{scope}' is not a TracIn parameter scope; use all, no-word-embeddings, last-N (N ≥ 1) or head."
    )
