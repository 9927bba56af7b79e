"""Curve-shape indices of sorted TracIn curves: S-shapedness, shape class, end ratio, downsampling.

Pure NumPy and no torch, so the app can import it (for example to re-classify
shapes under other thresholds without recomputing anything). Definitions are
those of ``docs/shapes.md``: a test instance's *sorted curve* is its row of training
scores sorted descending against x = rank 0..n-1. Every function accepts one
curve (1-D) or a matrix of curves (n_test × n_train, one curve per row) and
works on all rows at once where that is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from core.storage.errors import AtlasError

SHAPE_S = "S"
SHAPE_Z = "Z"
SHAPE_BACKSLASH = "backslash"
SHAPES = (SHAPE_S, SHAPE_Z, SHAPE_BACKSLASH)
# Display order, from most S-like to most Z-like (the paper's Fig. 1 order).
SHAPE_ORDER = (SHAPE_S, SHAPE_BACKSLASH, SHAPE_Z)

# The class rule reads the bulk of the curve: the scale-free index on the sorted curve with
# TRIM of the ranks cut off at each end, so a handful of extreme points cannot decide it.
TRIM = 0.05
# Thresholds on that bulk index, calibrated on the reference curves of
# core/analysis/shape_references.py (calibrate(), rounded; docs/shapes.md), never on a run's data.
S_MIN = 0.24
Z_MAX = -0.05
RULE = (
    "S if s_bulk >= s_min; Z if s_bulk <= z_max; backslash otherwise "
    "(s_bulk = (b_reg - b_end) / |b_end| of the descending sorted curve "
    "without its top and bottom `trim` share of ranks)"
)


@dataclass(frozen=True)
class ShapeRule:
    """The shape-class rule: S if bulk S ≥ ``s_min``, Z if ≤ ``z_max``, backslash between.

    ``trim`` is the share of ranks cut at each end before the bulk index is taken. The
    rule checks itself on creation (finite thresholds, ``z_max < s_min``, ``trim`` in
    [0, 0.5)) and raises :class:`AtlasError` otherwise, so every holder of one can use
    it without checking again. It is stored under ``thresholds`` in ``analysis.json``.
    """

    s_min: float = S_MIN
    z_max: float = Z_MAX
    trim: float = TRIM

    def __post_init__(self) -> None:
        for name in _RULE_FIELDS:
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise AtlasError(f"The shape rule's {name} must be a finite number (got {value}).")
            # Stored as plain floats, so equal rules compare, hash and serialise alike.
            object.__setattr__(self, name, value)
        if not self.z_max < self.s_min:
            raise AtlasError(
                f"The Z threshold ({self.z_max:g}) must be below the S threshold ({self.s_min:g})."
            )
        if not 0.0 <= self.trim < 0.5:
            raise AtlasError(f"The trim share must lie in [0, 0.5) (got {self.trim:g}).")

    @classmethod
    def from_json(cls, thresholds: Mapping[str, Any] | None) -> ShapeRule:
        """The rule stored under ``thresholds`` in analysis.json; missing or non-numeric keys default.

        Runs written before a key existed, or with no analyze stage (``None``), read as
        the calibrated defaults for what they lack.
        """
        given = thresholds if isinstance(thresholds, Mapping) else {}
        values = {}
        for name in _RULE_FIELDS:
            value = given.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[name] = float(value)
        return cls(**values)

    @classmethod
    def of_analysis(cls, analysis: Mapping[str, Any] | None) -> ShapeRule:
        """The rule an analyze stage used, from the content of its analysis.json (or defaults)."""
        return cls.from_json((analysis or {}).get("thresholds"))

    def to_json(self) -> dict[str, float]:
        """The three thresholds under their analysis.json keys (``s_min``, ``z_max``, ``trim``)."""
        return {name: getattr(self, name) for name in _RULE_FIELDS}

    def with_value(self, name: str, value: float) -> ShapeRule:
        """The same rule with one threshold moved (checked like any other rule)."""
        if name not in _RULE_FIELDS:
            raise AtlasError(f"Unknown shape threshold '{name}'; choose {', '.join(_RULE_FIELDS)}.")
        return replace(self, **{name: float(value)})

    @property
    def bounds(self) -> tuple[float, float]:
        """``(s_min, z_max)``: where the S and Z classes begin, for drawing the thresholds."""
        return self.s_min, self.z_max

    @property
    def middle(self) -> float:
        """The bulk index halfway between the two thresholds: the centre of the backslash band."""
        return (self.s_min + self.z_max) / 2.0

    def classes(self, s_bulk: float | np.ndarray) -> str | np.ndarray:
        """The class of each bulk-index value under this rule (see :func:`shape_class`)."""
        return shape_class(s_bulk, self.s_min, self.z_max)


_RULE_FIELDS = ("s_min", "z_max", "trim")
DEFAULT_RULE = ShapeRule()


@dataclass(frozen=True)
class CurveFit:
    """The two lines through a sorted curve and the S-shapedness they give.

    Each field is a float for one curve or an array of shape (n_test,) for a matrix.
    ``b_reg``/``a_reg`` are the least-squares slope and intercept (the paper's
    yellow line), ``b_end``/``a_end`` those of the line through the first and last
    points (green line), ``s_raw = b_reg - b_end`` is the paper's index in score
    units and ``s = s_raw / |b_end|`` its scale-free form (0.0 where ``b_end`` is 0,
    which for a sorted curve means a constant one: no shape to speak of).
    """

    b_reg: np.ndarray | float
    a_reg: np.ndarray | float
    b_end: np.ndarray | float
    a_end: np.ndarray | float
    s_raw: np.ndarray | float
    s: np.ndarray | float


def sort_order(scores: np.ndarray) -> np.ndarray:
    """Return the indices that sort each curve descending; equal scores keep their input order."""
    scores = np.asarray(scores)
    # Negating and a stable ascending sort gives a stable descending one (ties by index).
    return np.argsort(-scores, axis=-1, kind="stable")


def sorted_curves(scores: np.ndarray) -> np.ndarray:
    """Return the scores sorted descending along the last axis, as float64."""
    return -np.sort(-np.asarray(scores, dtype=np.float64), axis=-1)


def curve_fit(scores: np.ndarray) -> CurveFit:
    """Fit the regression and endpoint lines to each sorted curve and return S-shapedness.

    ``scores`` is one curve (n_train,) or a matrix (n_test, n_train), in any order;
    it is sorted descending here. Needs at least two scores per curve.
    """
    y = sorted_curves(scores)
    n = y.shape[-1]
    if n < 2:
        raise ValueError(f"a sorted curve needs at least 2 scores, got {n}")
    x = np.arange(n, dtype=np.float64)
    xc = x - x.mean()
    # Closed-form least squares: slope = Σ(x − x̄)y / Σ(x − x̄)², one matrix-vector product.
    b_reg = (y @ xc) / (xc @ xc)
    a_reg = y.mean(axis=-1) - b_reg * x.mean()
    a_end = y[..., 0]
    b_end = (y[..., -1] - a_end) / (n - 1)
    s_raw = b_reg - b_end
    denom = np.abs(b_end)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(denom > 0, s_raw / np.where(denom > 0, denom, 1.0), 0.0)
    if y.ndim == 1:
        return CurveFit(*(float(v) for v in (b_reg, a_reg, b_end, a_end, s_raw, s)))
    return CurveFit(b_reg, a_reg, b_end, a_end, s_raw, s)


def trimmed_curves(scores: np.ndarray, trim: float = TRIM) -> np.ndarray:
    """The sorted curves without their first and last ``ceil(trim · n)`` ranks (at least 2 kept)."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must lie in [0, 0.5), got {trim}")
    y = sorted_curves(scores)
    n = y.shape[-1]
    cut = min(int(np.ceil(trim * n - 1e-9)), max((n - 2) // 2, 0))
    return y[..., cut : n - cut]


def bulk_index(scores: np.ndarray, trim: float = TRIM) -> float | np.ndarray:
    """Scale-free S-shapedness of the bulk: :func:`curve_fit`'s ``s`` on :func:`trimmed_curves`."""
    return curve_fit(trimmed_curves(scores, trim)).s


def classify(
    scores: np.ndarray,
    flipped: np.ndarray | None = None,
    *,
    rule: ShapeRule | None = None,
    s_min: float | None = None,
    z_max: float | None = None,
    trim: float | None = None,
) -> dict[str, np.ndarray]:
    """Shape indices and class of each curve; the one definition the pipeline and the app use.

    ``scores`` is one curve (n_train,) or a matrix (n_test, n_train) of unsorted scores
    (rows = test instances); ``flipped`` an optional boolean (n_train,) mask. Returns a
    dict of arrays with one entry per row: ``s_raw`` and ``s`` (the paper's index on the
    whole curve, in score units and scale-free), ``s_bulk`` (the same on the trimmed
    curve, which the class uses), ``shape``, the line coefficients ``b_reg``, ``a_reg``,
    ``b_end``, ``a_end`` and, when ``flipped`` is given, ``end_ratio`` (%). Invariant to
    a positive affine rescaling of a row. The class rule is ``rule`` (default
    :data:`DEFAULT_RULE`); ``s_min``, ``z_max`` and ``trim`` given one by one override it.
    """
    rule = _rule_with(rule, s_min=s_min, z_max=z_max, trim=trim)
    y = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    fit = curve_fit(y)
    s_bulk = np.atleast_1d(bulk_index(y, rule.trim))
    out: dict[str, np.ndarray] = {
        "s_raw": np.atleast_1d(fit.s_raw),
        "s": np.atleast_1d(fit.s),
        "s_bulk": s_bulk,
        "shape": np.atleast_1d(rule.classes(s_bulk)),
        "b_reg": np.atleast_1d(fit.b_reg),
        "a_reg": np.atleast_1d(fit.a_reg),
        "b_end": np.atleast_1d(fit.b_end),
        "a_end": np.atleast_1d(fit.a_end),
    }
    if flipped is not None:
        out["end_ratio"] = np.atleast_1d(end_ratio(flipped_ranks(y, flipped), y.shape[-1]))
    return out


def _rule_with(rule: ShapeRule | None, **overrides: float | None) -> ShapeRule:
    """``rule`` (or the default) with the thresholds given one by one put in."""
    base = DEFAULT_RULE if rule is None else rule
    given = {k: float(v) for k, v in overrides.items() if v is not None}
    return replace(base, **given) if given else base


def shape_class(
    s: float | np.ndarray, s_min: float = S_MIN, z_max: float = Z_MAX
) -> str | np.ndarray:
    """Classify bulk-index values: 'S' if s ≥ s_min, 'Z' if s ≤ z_max, else 'backslash'.

    A scalar gives a str, an array gives an array of str of the same shape.
    NaN (no curve) is classed 'backslash', the neutral class.
    """
    if not z_max < s_min:
        raise ValueError(f"z_max ({z_max}) must be below s_min ({s_min})")
    arr = np.asarray(s, dtype=np.float64)
    out = np.full(arr.shape, SHAPE_BACKSLASH, dtype=object)
    out[arr >= s_min] = SHAPE_S
    out[arr <= z_max] = SHAPE_Z
    if out.ndim == 0:
        return str(out[()])
    return out


def flipped_ranks(scores: np.ndarray, flipped_mask: np.ndarray) -> np.ndarray:
    """Return the 0-based ranks of the flipped instances in each curve's descending order.

    ``scores`` is (n_train,) or (n_test, n_train); ``flipped_mask`` is a boolean
    (n_train,). Ranks come back ascending: shape (n_flipped,) or (n_test, n_flipped).
    Ties are broken stably (the lower training index gets the lower rank).
    """
    scores = np.asarray(scores)
    mask = np.asarray(flipped_mask, dtype=bool)
    if mask.shape != scores.shape[-1:]:
        raise ValueError(f"flipped_mask has shape {mask.shape}, expected ({scores.shape[-1]},)")
    sorted_mask = mask[sort_order(scores)]
    if scores.ndim == 1:
        return np.flatnonzero(sorted_mask)
    # Every row holds the same number of flips, so row-major nonzero reshapes cleanly.
    return np.nonzero(sorted_mask)[1].reshape(scores.shape[0], int(mask.sum()))


def ranks_of(scores: np.ndarray, flipped_mask: np.ndarray) -> np.ndarray:
    """The 0-based rank of each flipped instance, in training order (not sorted by rank).

    Same ranks as :func:`flipped_ranks` (stable ties), but column j is always the j-th
    flipped training instance, so one instance can be followed across views.
    Shape (n_flipped,) or (n_test, n_flipped).
    """
    scores = np.asarray(scores)
    mask = np.asarray(flipped_mask, dtype=bool)
    if mask.shape != scores.shape[-1:]:
        raise ValueError(f"flipped_mask has shape {mask.shape}, expected ({scores.shape[-1]},)")
    order = sort_order(scores)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(scores.shape[-1]), axis=-1)
    return rank[..., mask]


def end_ratio(ranks: np.ndarray, n: int) -> float | np.ndarray:
    """Return the mean distance (%) of ranks from the curve's centre: 0 centre, 100 either end.

    ``ranks`` is (k,) or (n_test, k) 0-based ranks in a curve of length ``n``.
    With no ranks (no flipped instances) or n < 2 the ratio is undefined: NaN.
    Ranks spread uniformly give about 50.
    """
    r = np.asarray(ranks, dtype=np.float64)
    centre = (n - 1) / 2.0
    if r.shape[-1] == 0 or centre <= 0:
        nan = np.full(r.shape[:-1], np.nan)
        return float(nan) if nan.ndim == 0 else nan
    ratio = (np.abs(r - centre) / centre * 100.0).mean(axis=-1)
    return float(ratio) if np.ndim(ratio) == 0 else ratio


def downsample_curve(
    sorted_scores: np.ndarray, keep_mask: np.ndarray, max_points: int = 2000
) -> np.ndarray:
    """Return ascending ranks that draw a sorted curve with at most about ``max_points`` points.

    Always keeps both ends and every rank where ``keep_mask`` (in sorted order) is
    true, even when those alone exceed ``max_points``. The rest of the budget goes
    half to ranks evenly spaced along x and half to ranks evenly spaced in score,
    so the steep ends of an S curve keep their detail as well as its flat middle.
    """
    y = np.asarray(sorted_scores, dtype=np.float64)
    keep = np.asarray(keep_mask, dtype=bool)
    n = y.shape[0]
    if keep.shape != (n,):
        raise ValueError(f"keep_mask has shape {keep.shape}, expected ({n},)")
    if n <= max_points:
        return np.arange(n)
    required = np.union1d(np.flatnonzero(keep), [0, n - 1])
    budget = max(int(max_points) - required.size, 0)
    n_even = budget // 2
    even = np.round(np.linspace(0, n - 1, n_even)).astype(np.int64)
    levels = np.linspace(y[0], y[-1], budget - n_even)
    # -y is ascending, so searchsorted finds the first rank at or below each score level.
    by_score = np.clip(np.searchsorted(-y, -levels, side="left"), 0, n - 1)
    return np.union1d(required, np.union1d(even, by_score)).astype(np.int64)
