"""TracIn options that can be checked without torch: parameter scopes and projections.

The CLI and the app validate a request with these before anything heavy is imported or
written; the engine (``core.influence``) uses the same functions, so there is one definition.

:data:`PROJECTIONS` is the registry of ``--project`` spellings: each :class:`Projection` says
how its spec is typed, how it is recorded in the config and the manifest, what the CLI help
and the error study call it, and whether it covers every parameter. ``core.influence.registry``
maps each entry's ``mode`` to the engine class that computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.storage.errors import AtlasError

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


def positive_int(text: str) -> int | None:
    """``text`` as a positive decimal integer, or None."""
    return int(text) if re.fullmatch(r"\+?[0-9]+", text) and int(text) > 0 else None


@dataclass(frozen=True)
class Projection:
    """One ``--project`` spelling: a prefix followed by a positive dimension.

    ``prefix`` is what ``--project`` starts with (``""`` for a bare dimension D);
    ``method_prefix`` the error study's spelling (``dense:``) and ``method_spellings`` how its
    ``--methods`` help lists it; ``spelling`` and ``detail`` make the CLI help, ``usage`` the
    refusal of a bad spec, ``method_usage`` the refusal of a bad error-study method. ``every_parameter`` projections cover every parameter, so they take
    scope ``all`` only (and no ``@SCOPE`` in the error study).
    """

    mode: str
    prefix: str
    method_prefix: str
    method_spellings: tuple[str, ...]
    spelling: str
    detail: str
    usage: str
    method_usage: str
    every_parameter: bool

    def parse(self, text: str) -> int | None:
        """The dimension of a spec typed with this prefix, or None when it is not one."""
        if not text.startswith(self.prefix):
            return None
        return positive_int(text[len(self.prefix) :])

    def record(self, dim: int) -> int | str:
        """The spec as the config, the manifest and the shard options store it (``64``,
        ``"factorized:64"``): a bare dimension as an int, any other as its spelling."""
        return int(dim) if not self.prefix else f"{self.prefix}{int(dim)}"


DENSE = Projection(
    mode="dense",
    prefix="",
    method_prefix="dense:",
    method_spellings=("dense:D", "dense:D@SCOPE"),
    spelling="a dimension D",
    detail="dense",
    usage="a positive dimension D",
    method_usage="use dense:D with a positive dimension D",
    every_parameter=False,
)
FACTORIZED = Projection(
    mode="factorized",
    prefix="factorized:",
    method_prefix="factorized:",
    method_spellings=("factorized:K",),
    spelling="factorized:K",
    detail="K per side of every layer, all parameters; core/influence/factorized.py",
    usage="factorized:K (K ≥ 1)",
    method_usage="use factorized:K with K ≥ 1",
    every_parameter=True,
)
# Every projection, in the order the help lists them. A new one is an entry here, its engine
# class in core.influence.registry.ENGINES, and their tests.
PROJECTIONS: tuple[Projection, ...] = (DENSE, FACTORIZED)
PROJECT_MODES = tuple(p.mode for p in PROJECTIONS)


def projection(spec: str | int) -> tuple[Projection, int]:
    """The :class:`Projection` of a spec and its dimension; :class:`AtlasError` if it is none."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip()
    else:
        text = None
    if text is not None:
        # Longest prefix first, so the bare dimension never claims another spelling.
        for entry in sorted(PROJECTIONS, key=lambda p: -len(p.prefix)):
            dim = entry.parse(text)
            if dim is not None:
                return entry, dim
    raise AtlasError(
        f"--project '{spec}' is not a TracIn projection; use "
        f"{' or '.join(p.usage for p in PROJECTIONS)}."
    )


def parse_project(spec: str | int) -> tuple[str, int]:
    """Split a projection spec into (mode, dim); raise :class:`AtlasError` if it is not one.

    ``"D"`` (or the int D) is the dense seeded projection of every gradient to D values;
    ``"factorized:K"`` the Kronecker-factored one with K values per side of each layer
    (core.influence.factorized). D and K must be positive integers.
    """
    entry, dim = projection(spec)
    return entry.mode, dim


def record_project(spec: str | int | None) -> int | str | None:
    """A spec in the form the config and the manifest record (None: no projection)."""
    if spec is None:
        return None
    entry, dim = projection(spec)
    return entry.record(dim)


def covers_every_parameter(spec: str | int | None) -> bool:
    """Whether a spec's projection covers every parameter (scope ``all`` only)."""
    return spec is not None and projection(spec)[0].every_parameter


def project_help() -> str:
    """``--project``'s help on ``tracin``: every projection with its detail."""
    kinds = " or ".join(f"{p.spelling} ({p.detail})" for p in PROJECTIONS)
    return f"random projection (approximation): {kinds}"


def project_help_short() -> str:
    """``--project``'s help on ``run``: every projection's spelling."""
    return (
        f"TracIn random projection: {' or '.join(p.spelling for p in PROJECTIONS)} (see `tracin`)"
    )


def method_projection(text: str) -> Projection | None:
    """The projection an error-study method's spelling names (``dense…``, ``factorized…``),
    or None (a parameter scope, or nothing)."""
    return next((p for p in PROJECTIONS if text.startswith(p.method_prefix.rstrip(":"))), None)


def method_spellings() -> list[str]:
    """Every projection's error-study spellings (``dense:D``, ``dense:D@SCOPE``, ...)."""
    return [s for p in PROJECTIONS for s in p.method_spellings]
