"""Error-study options that can be checked without torch: methods, test subsets, dtypes.

The CLI validates a request with these before torch is imported or anything is written;
:mod:`core.analysis.error_study` uses the same functions.

Method spellings (``--methods``, comma-separated):

- a parameter scope other than ``all`` (``no-word-embeddings``, ``last-N``, ``head``): exact
  gradients of that scope;
- ``dense:D``: the dense seeded projection of every parameter's gradient to D values;
  ``dense:D@SCOPE`` the same projection of one scope's gradient (``dense:256@last-2``);
- ``factorized:K``: the Kronecker-factored projection of every parameter
  (core.influence.factorized).

The reference is always exact TracIn over all parameters (the definition), so ``all`` is not
a method. Test subsets (``--test-subset``): ``all``, ``random:N``, ``misclassified`` or
``misclassified+random:N`` (the test instances the last checkpoint gets wrong, plus N others
drawn at random with the run's seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.options.tracin_options import (
    Projection,
    method_projection,
    method_spellings,
    parse_scope,
    positive_int,
)
from core.storage.errors import AtlasError

DEFAULT_METHODS = "last-2,head,dense:256,factorized:16,factorized:64"
DEFAULT_SUBSET = "misclassified+random:20"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class Method:
    """One approximation: the engine options it runs with and its name in the study."""

    name: str  # as spelled in --methods (canonical form)
    params: str  # parameter scope
    project: int | str | None  # None, dense dimension D, or "factorized:K"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the name (``dense-256@last-2`` → ``dense-256_last-2``)."""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", self.name.replace(":", "-"))


def parse_method(text: str) -> Method:
    """One method spelling as a :class:`Method`; :class:`AtlasError` if it is not one.

    A projection is spelled ``PREFIX:DIM`` (its ``method_prefix`` in
    :data:`core.options.tracin_options.PROJECTIONS`), followed by ``@SCOPE`` unless it covers every
    parameter; anything else must be a parameter scope.
    """
    text = str(text).strip()
    if text == "all":
        raise AtlasError(
            "'all' is the exact reference of the error study, not a method; list approximations "
            "(e.g. last-2, head, dense:256, factorized:16)."
        )
    entry = method_projection(text)
    if entry is not None:
        return _projection_method(entry, text)
    try:
        parse_scope(text)
    except AtlasError:
        raise AtlasError(
            f"'{text}' is not an error-study method; use a scope (no-word-embeddings, last-N, "
            f"head), {', '.join(method_spellings()[:-1])} or {method_spellings()[-1]}."
        ) from None
    return Method(text, text, None)


def _projection_method(entry: Projection, text: str) -> Method:
    """``PREFIX:DIM[@SCOPE]`` of one projection as a :class:`Method`."""
    spec, _, scope = text.partition("@")
    dim = (
        positive_int(spec[len(entry.method_prefix) :])
        if spec.startswith(entry.method_prefix)
        else None
    )
    if dim is None or (scope and entry.every_parameter) or ("@" in text and not scope):
        raise AtlasError(f"'{text}' is not a {entry.mode} projection; {entry.method_usage}.")
    scope = scope or "all"
    parse_scope(scope)
    name = f"{entry.method_prefix}{dim}" + ("" if scope == "all" else f"@{scope}")
    return Method(name, scope, entry.record(dim))


def parse_methods(text: str) -> list[Method]:
    """A comma-separated list of methods, each once, in the order given."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise AtlasError("--methods is empty; list at least one method (e.g. last-2,head).")
    methods: list[Method] = []
    for name in names:
        method = parse_method(name)
        if any(m.name == method.name for m in methods):
            raise AtlasError(f"--methods names {method.name} twice.")
        methods.append(method)
    return methods


_SUBSET_RE = re.compile(r"^(misclassified\+)?random:(.+)$")


def parse_subset(text: str) -> tuple[bool, int | None]:
    """``(with_misclassified, n_random)``; n_random None means every test instance."""
    text = str(text).strip()
    if text == "all":
        return False, None
    if text == "misclassified":
        return True, 0
    match = _SUBSET_RE.match(text)
    if match:
        n = positive_int(match.group(2))
        if n is not None:
            return bool(match.group(1)), n
    raise AtlasError(
        f"--test-subset '{text}' is not a test subset; use all, random:N, misclassified or "
        "misclassified+random:N (N ≥ 1)."
    )


def parse_dtype(text: str) -> str:
    """``bf16``/``fp32`` (or the torch names) as the torch dtype name."""
    if text not in DTYPES:
        raise AtlasError(f"--dtype '{text}' is not a dot-product dtype; use fp32 or bf16.")
    return DTYPES[text]
