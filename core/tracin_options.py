"""TracIn options that can be checked without torch: parameter scopes and projections.

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


PROJECT_MODES = ("dense", "factorized")
_FACTORIZED_RE = re.compile(r"^factorized:(\S+)$")


def _positive_int(text: str) -> int | None:
    """``text`` as a positive decimal integer, or None."""
    return int(text) if re.fullmatch(r"\+?[0-9]+", text) and int(text) > 0 else None


def parse_project(spec: str | int) -> tuple[str, int]:
    """Split a projection spec into (mode, dim); raise :class:`AtlasError` if it is not one.

    ``"D"`` (or the int D) is the dense seeded projection of every gradient to D values;
    ``"factorized:K"`` the Kronecker-factored one with K values per side of each layer
    (core.factorized). D and K must be positive integers.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip()
    else:
        text = None
    if text is not None:
        dim = _positive_int(text)
        if dim is not None:
            return "dense", dim
        match = _FACTORIZED_RE.match(text)
        if match and (dim := _positive_int(match.group(1))) is not None:
            return "factorized", dim
    raise AtlasError(
        f"--project '{spec}' is not a TracIn projection; use a positive dimension D or "
        "factorized:K (K ≥ 1)."
    )
