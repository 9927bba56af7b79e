"""Views of the influence scores: which checkpoints are summed and how each term is normalised.

TracInCP sums one term per checkpoint, ``η_i ∇ℓ(w_i, z) · ∇ℓ(w_i, z')``. A *view* picks a
range of checkpoints (1-based, inclusive: a single checkpoint, the cumulative sum up to
one, or any range) and a normalisation of each term:

- ``raw``: the term itself (the definition; the full range is ``tracin.npy``);
- ``relative``: the term divided by the training instance's gradient norm ‖∇ℓ(w_i, z)‖
  (relative influence, Barshan et al. 2020, per checkpoint), so instances with large
  gradients no longer dominate every curve;
- ``cosine``: divided by both gradient norms, the η-weighted cosine of the two gradients.

Norms are the exact per-checkpoint norms the engine stores (``grad_norms_train.npy``,
``grad_norms_test.npy``), not approximations from summed self-influence. Pure NumPy:
the app computes any view the pipeline did not precompute with this same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.storage.errors import AtlasError

RAW = "raw"
RELATIVE = "relative"
COSINE = "cosine"
NORMALISATIONS = (RAW, RELATIVE, COSINE)
NORMALISATION_HELP = {
    RAW: "the TracIn definition: η·(gradient dot product)",
    RELATIVE: "each term divided by the training instance's gradient norm (relative influence)",
    COSINE: "each term divided by both gradient norms (η-weighted cosine)",
}


def allowed_normalisations(
    has_stack: bool, has_train_norms: bool, has_test_norms: bool
) -> tuple[str, ...]:
    """The normalisations a run's stored arrays allow, the one rule the analyzer and the app share.

    ``raw`` always (with no per-checkpoint stack it is the one full view, ``tracin.npy``);
    ``relative`` needs the stack and the training gradient norms; ``cosine`` needs the test
    gradient norms as well. Norms without the stack are of no use: every view is built from it.
    """
    if not (has_stack and has_train_norms):
        return (RAW,)
    if not has_test_norms:
        return (RAW, RELATIVE)
    return NORMALISATIONS


def missing_normalisations_note(allowed: tuple[str, ...]) -> str:
    """One sentence saying why the normalisations outside ``allowed`` are missing ("" if none are)."""
    if set(allowed) >= set(NORMALISATIONS):
        return ""
    if RELATIVE in allowed:
        return "This run stores no test gradient norms, so cosine scores do not exist."
    return "This run stores no per-checkpoint gradient norms, so only raw scores exist."


@dataclass(frozen=True)
class View:
    """Checkpoints ``first``..``last`` (1-based, inclusive), each term normalised by ``normalisation``."""

    first: int
    last: int
    normalisation: str = RAW

    @property
    def key(self) -> str:
        """Stable text key, e.g. ``raw:1-10`` (used in the run store and in links)."""
        return f"{self.normalisation}:{self.first}-{self.last}"

    def label(self, n_checkpoints: int | None = None) -> str:
        """Human label, e.g. 'checkpoints 1–10 (all) · raw'."""
        if self.first == self.last:
            span = f"checkpoint {self.first} alone"
        elif self.first == 1 and n_checkpoints == self.last:
            span = f"checkpoints 1–{self.last} (all)"
        else:
            span = f"checkpoints {self.first}–{self.last}"
        return f"{span} · {self.normalisation}"

    @classmethod
    def parse(cls, key: str) -> View:
        """Inverse of :attr:`key`; raise :class:`AtlasError` on anything else."""
        try:
            norm, span = key.split(":")
            first, last = (int(v) for v in span.split("-"))
        except ValueError:
            raise AtlasError(f"'{key}' is not a view; write it like raw:1-10.") from None
        return cls(first, last, norm)


def full_view(n_checkpoints: int, normalisation: str = RAW) -> View:
    """Every checkpoint: with ``raw``, the TracIn matrix itself."""
    return View(1, n_checkpoints, normalisation)


def check_view(view: View, n_checkpoints: int, have_norms: bool) -> None:
    """Raise :class:`AtlasError` with one sentence if ``view`` cannot be computed for this run."""
    if view.normalisation not in NORMALISATIONS:
        raise AtlasError(
            f"'{view.normalisation}' is not a normalisation; use one of {', '.join(NORMALISATIONS)}."
        )
    if not 1 <= view.first <= view.last <= n_checkpoints:
        raise AtlasError(
            f"Checkpoints {view.first}–{view.last} are not a range within 1–{n_checkpoints}."
        )
    if view.normalisation != RAW and not have_norms:
        raise AtlasError(
            f"The {view.normalisation} view needs per-checkpoint gradient norms, which this run "
            "does not store; recompute TracIn (python -m core tracin RUN --force)."
        )


def view_scores(
    stack: np.ndarray,
    view: View,
    train_norms: np.ndarray | None = None,
    test_norms: np.ndarray | None = None,
    rows: np.ndarray | slice | None = None,
) -> np.ndarray:
    """The (n_rows, n_train) scores of ``view`` from the per-checkpoint stack (k, n_test, n_train).

    ``train_norms`` (k, n_train) and ``test_norms`` (k, n_test) are the unweighted gradient
    norms; ``rows`` selects test rows. Raw terms are summed in float32 in checkpoint order,
    exactly as the engine sums ``tracin.npy``, so the full raw view reproduces it bit for
    bit; normalised terms are summed in float64. A zero norm gives a zero term.
    """
    k = stack.shape[0]
    have = train_norms is not None and (view.normalisation != COSINE or test_norms is not None)
    check_view(view, k, have or view.normalisation == RAW)
    sel = slice(None) if rows is None else rows
    if view.normalisation == RAW:
        out = np.zeros_like(np.asarray(stack[0][sel], dtype=np.float32))
        for c in range(view.first - 1, view.last):
            out += np.asarray(stack[c][sel], dtype=np.float32)
        return out.astype(np.float64)
    out = None
    for c in range(view.first - 1, view.last):
        term = np.asarray(stack[c][sel], dtype=np.float64)
        term = term * _inverse(np.asarray(train_norms[c], dtype=np.float64))[None, :]
        if view.normalisation == COSINE:
            term = term * _inverse(np.asarray(test_norms[c][sel], dtype=np.float64))[:, None]
        out = term if out is None else out + term
    return out


def _inverse(norms: np.ndarray) -> np.ndarray:
    """1/norm, and 0 where the norm is 0 (a zero gradient contributes nothing)."""
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, 1.0 / safe, 0.0)


def standard_views(n_checkpoints: int, normalisations: tuple[str, ...]) -> list[tuple[str, View]]:
    """The views the analyze stage precomputes: ``(kind, view)`` for each normalisation and
    checkpoint c, kind ``single`` (c alone) and ``cumulative`` (1..c, for c ≥ 2: the sum up
    to checkpoint 1 is checkpoint 1 alone). Every key appears once."""
    out = []
    for norm in normalisations:
        for c in range(1, n_checkpoints + 1):
            out.append(("single", View(c, c, norm)))
            if c >= 2:
                out.append(("cumulative", View(1, c, norm)))
    return out
