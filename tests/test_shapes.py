"""Curve-shape indices on synthetic curves whose shape and S value are known in closed form."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from core.analysis import shape_references as refs
from core.analysis.shapes import (
    DEFAULT_RULE,
    RULE,
    S_MIN,
    TRIM,
    Z_MAX,
    CurveFit,
    ShapeRule,
    bulk_index,
    classify,
    curve_fit,
    downsample_curve,
    end_ratio,
    flipped_ranks,
    ranks_of,
    shape_class,
    sort_order,
)
from core.storage.errors import AtlasError


def ideal_s(n: int, m: int = 1, height: float = 5.0) -> np.ndarray:
    """m large positive and m large negative scores, zeros between: flat middle, steep ends."""
    y = np.zeros(n)
    y[:m] = height
    y[n - m :] = -height
    return y


def ideal_z(n: int, height: float = 2.0) -> np.ndarray:
    """Two plateaus with a step in the middle."""
    return np.r_[np.full(n // 2, height), np.full(n - n // 2, -height)]


def test_ideal_s_tends_to_one_and_is_class_s():
    values = []
    for n in (100, 1000, 10000):
        fit = curve_fit(ideal_s(n))
        # Closed form for one value at each end: S = 1 − 6(n − 1)/(n(n + 1)).
        assert fit.s == pytest.approx(1 - 6 * (n - 1) / (n * (n + 1)), rel=1e-9)
        assert shape_class(fit.s) == "S"
        values.append(fit.s)
    assert values[0] < values[1] < values[2] < 1
    assert values[-1] > 0.999


def test_ideal_z_tends_to_minus_half_and_is_class_z():
    for n in (100, 1000, 10000):
        fit = curve_fit(ideal_z(n))
        # Closed form for an even step: S = 1 − 3n/(2(n + 1)).
        assert fit.s == pytest.approx(1 - 3 * n / (2 * (n + 1)), rel=1e-9)
        assert shape_class(fit.s) == "Z"
    assert curve_fit(ideal_z(10000)).s == pytest.approx(-0.5, abs=1e-3)


def test_straight_line_has_zero_s_and_both_lines_coincide():
    y = 3.0 - 0.01 * np.arange(500)
    fit = curve_fit(y)
    assert fit.s == pytest.approx(0.0, abs=1e-10)
    assert fit.s_raw == pytest.approx(0.0, abs=1e-12)
    assert fit.b_reg == pytest.approx(-0.01) and fit.b_end == pytest.approx(-0.01)
    assert fit.a_reg == pytest.approx(3.0) and fit.a_end == pytest.approx(3.0)
    assert shape_class(fit.s) == "backslash"


def test_s_raw_is_the_slope_difference_in_score_units():
    y = ideal_s(200, height=7.0)
    fit = curve_fit(y)
    assert fit.s_raw == pytest.approx(fit.b_reg - fit.b_end)
    assert fit.b_end == pytest.approx(-14.0 / 199)
    assert fit.s == pytest.approx(fit.s_raw / abs(fit.b_end))
    # Scaling the scores scales s_raw but leaves the scale-free s alone.
    scaled = curve_fit(1000 * y)
    assert scaled.s_raw == pytest.approx(1000 * fit.s_raw)
    assert scaled.s == pytest.approx(fit.s)


def test_reference_curves_fall_in_their_documented_class_on_unseen_seeds():
    # Calibration used seeds 0..19; these are others, with and without extreme points.
    for seed in range(100, 110):
        for extremes in (False, True):
            curves = refs.reference_curves(seed, extremes=extremes)
            names = list(curves)
            got = classify(np.stack([curves[k][0] for k in names]))["shape"]
            for name, shape in zip(names, got, strict=True):
                assert shape == curves[name][1], (seed, name)


def test_uniform_two_plateau_and_heavy_tailed_references_are_backslash_z_and_s():
    curves = refs.reference_curves(7)
    want = {
        "uniform": "backslash",
        "two plateaus 50/50": "Z",
        "two plateaus 60/40": "Z",
        "laplace": "S",
        "student-t(3)": "S",
    }
    for name, shape in want.items():
        assert classify(curves[name][0])["shape"][0] == shape


def test_default_thresholds_are_the_calibration_rounded():
    cal = refs.calibrate()
    assert round(cal["s_min"], 2) == S_MIN and round(cal["z_max"], 2) == Z_MAX
    assert cal["margin_s"] > 0 and cal["margin_z"] > 0  # the classes do not overlap


def test_a_few_extreme_points_do_not_decide_the_class():
    rng = np.random.default_rng(3)
    plateaus = np.r_[rng.normal(1, 0.1, 944), rng.normal(-1, 0.1, 656)]  # 59/41
    spiked = refs.with_extremes(plateaus, rng, share=0.025)
    assert curve_fit(spiked).s > 0.5  # the paper's index alone would call it S
    assert classify(spiked)["shape"][0] == "Z" == classify(plateaus)["shape"][0]


def test_classify_is_invariant_to_positive_affine_rescaling():
    rng = np.random.default_rng(4)
    m = np.stack([rng.laplace(size=400), rng.uniform(size=400), np.sign(rng.normal(size=400))])
    a, b = classify(m), classify(3.7 * m - 12.0)
    np.testing.assert_allclose(a["s_bulk"], b["s_bulk"], rtol=1e-9)
    np.testing.assert_allclose(a["s"], b["s"], rtol=1e-9)
    assert list(a["shape"]) == list(b["shape"])


def test_classify_rows_and_fields_and_end_ratio():
    rng = np.random.default_rng(5)
    m = rng.normal(size=(4, 200))
    flipped = np.zeros(200, bool)
    flipped[[3, 50, 120]] = True
    out = classify(m, flipped)
    assert {"s_raw", "s", "s_bulk", "shape", "end_ratio"} <= set(out)
    assert all(len(v) == 4 for v in out.values())
    for i in range(4):
        one = classify(m[i], flipped)
        assert one["s_bulk"][0] == pytest.approx(out["s_bulk"][i])
        ranks = flipped_ranks(m[i], flipped)
        assert one["end_ratio"][0] == pytest.approx(end_ratio(ranks, 200))
    assert "end_ratio" not in classify(m)
    # The bulk index is the paper's index on the curve without TRIM of its ranks at each end.
    y = np.sort(m[0])[::-1]
    cut = int(np.ceil(TRIM * 200))
    assert bulk_index(m[0]) == pytest.approx(curve_fit(y[cut : 200 - cut]).s)


def test_noisy_curves_keep_their_class():
    rng = np.random.default_rng(0)
    n = 1600
    # S: heavy-tailed scores (a few large ± values, most near zero).
    s_curve = rng.standard_t(df=1.5, size=n) * 0.01
    # Z: two noisy plateaus (noise tilts them, which pulls S from −0.5 towards 0).
    z_curve = np.r_[rng.normal(1.0, 0.05, n // 2), rng.normal(-1.0, 0.05, n // 2)]
    # Backslash: uniform scores sort into a noisy straight line.
    line = rng.uniform(-1, 1, n)
    got = classify(np.stack([s_curve, z_curve, line]))
    assert list(got["shape"]) == ["S", "Z", "backslash"]
    assert got["s"][0] > 0.5 and got["s"][1] < -0.25 and abs(got["s"][2]) < 0.05


def test_input_order_does_not_matter():
    rng = np.random.default_rng(1)
    y = rng.normal(size=300)
    assert curve_fit(y) == curve_fit(rng.permutation(y))


def test_matrix_rows_match_single_curves():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(5, 50))
    fits = curve_fit(m)
    assert isinstance(fits, CurveFit) and fits.s.shape == (5,)
    for i in range(5):
        one = curve_fit(m[i])
        assert fits.s[i] == pytest.approx(one.s)
        assert fits.a_reg[i] == pytest.approx(one.a_reg)


def test_constant_curve_is_backslash_without_warnings():
    with np.errstate(all="raise"):
        fit = curve_fit(np.full(10, 0.3))
    assert fit.s == 0.0 and fit.b_end == 0.0
    assert shape_class(fit.s) == "backslash"


def test_too_short_curve_raises():
    with pytest.raises(ValueError):
        curve_fit(np.array([1.0]))


def test_shape_class_thresholds_are_inclusive_and_configurable():
    assert shape_class(S_MIN) == "S"
    assert shape_class(S_MIN - 0.01) == "backslash"
    assert shape_class(Z_MAX) == "Z"
    assert shape_class(0.19, s_min=0.1) == "S"
    assert shape_class(-0.05, z_max=-0.01) == "Z"
    assert list(shape_class(np.array([0.5, 0.0, -0.3, np.nan]))) == [
        "S",
        "backslash",
        "Z",
        "backslash",
    ]
    with pytest.raises(ValueError):
        shape_class(0.0, s_min=-0.2, z_max=0.1)


def test_flipped_ranks_descending_with_stable_ties():
    scores = np.array([0.1, 0.5, 0.5, -0.2, 0.3])
    # Descending order, ties by index: 1, 2, 4, 0, 3.
    assert list(sort_order(scores)) == [1, 2, 4, 0, 3]
    mask = np.array([False, False, True, True, False])
    assert list(flipped_ranks(scores, mask)) == [1, 4]
    matrix = np.stack([scores, -scores])
    ranks = flipped_ranks(matrix, mask)
    # Second row descending: 3, 0, 4, 1, 2 → flipped 3 at rank 0 and 2 at rank 4.
    assert ranks.tolist() == [[1, 4], [0, 4]]
    with pytest.raises(ValueError):
        flipped_ranks(scores, mask[:3])


def test_end_ratio_ends_centre_and_uniform():
    n = 1001
    assert end_ratio(np.array([0, n - 1]), n) == pytest.approx(100.0)
    assert end_ratio(np.array([0, 1, n - 2, n - 1]), n) == pytest.approx(99.9, abs=0.1)
    assert end_ratio(np.array([500]), n) == pytest.approx(0.0)
    uniform = np.arange(n)
    assert end_ratio(uniform, n) == pytest.approx(50.0, abs=0.1)
    rng = np.random.default_rng(3)
    random_ranks = rng.choice(n, size=400, replace=False)
    assert end_ratio(random_ranks, n) == pytest.approx(50.0, abs=5.0)
    both = end_ratio(np.array([[0, n - 1], [500, 500]]), n)
    assert both.tolist() == pytest.approx([100.0, 0.0])


def test_end_ratio_undefined_without_flips():
    assert np.isnan(end_ratio(np.array([], dtype=int), 100))
    assert np.isnan(end_ratio(np.zeros((3, 0), dtype=int), 100)).all()


def test_end_ratio_of_placed_flips_through_flipped_ranks():
    n = 200
    scores = ideal_s(n, m=3)
    mask = np.zeros(n, bool)
    mask[[0, n - 1]] = True  # at the steep ends
    assert end_ratio(flipped_ranks(scores, mask), n) > 98


def test_downsample_keeps_ends_and_every_flipped():
    rng = np.random.default_rng(4)
    n = 20000
    y = np.sort(rng.standard_t(df=2, size=n))[::-1]
    keep = np.zeros(n, bool)
    keep[rng.choice(n, 50, replace=False)] = True
    idx = downsample_curve(y, keep, max_points=1000)
    assert idx[0] == 0 and idx[-1] == n - 1
    assert set(np.flatnonzero(keep)) <= set(idx.tolist())
    assert np.all(np.diff(idx) > 0)
    assert 200 < idx.size <= 1000
    # Steep ends get extra points: the top 1% of ranks holds more than 1% of the points.
    assert (idx < n // 100).sum() > 0.02 * idx.size


def test_downsample_short_curve_keeps_everything():
    y = np.linspace(1, 0, 50)
    assert downsample_curve(y, np.zeros(50, bool), max_points=100).tolist() == list(range(50))


def test_downsample_keeps_all_flipped_beyond_the_budget():
    n = 500
    keep = np.zeros(n, bool)
    keep[::2] = True
    idx = downsample_curve(np.linspace(1, 0, n), keep, max_points=20)
    assert set(np.flatnonzero(keep)) <= set(idx.tolist()) and n - 1 in idx


def test_shapes_module_does_not_import_torch():
    code = "import sys, core.analysis.shapes; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_ranks_of_follow_each_flipped_instance():
    scores = np.array([[0.1, 0.9, 0.5, -0.2], [0.9, -1.0, 0.2, 0.3]])
    mask = np.array([True, False, True, True])
    np.testing.assert_array_equal(ranks_of(scores, mask), [[2, 1, 3], [0, 2, 1]])
    np.testing.assert_array_equal(np.sort(ranks_of(scores, mask), 1), flipped_ranks(scores, mask))


def test_shape_rule_checks_itself():
    assert ShapeRule(S_MIN, Z_MAX, TRIM) == DEFAULT_RULE
    with pytest.raises(AtlasError, match="below"):
        ShapeRule(s_min=0.1, z_max=0.1)
    with pytest.raises(AtlasError, match="trim"):
        ShapeRule(trim=0.5)
    with pytest.raises(AtlasError, match="finite"):
        ShapeRule(s_min=float("nan"))
    with pytest.raises(AtlasError, match="below"):
        DEFAULT_RULE.with_value("z_max", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_RULE.s_min = 0.5  # type: ignore[misc]


def test_shape_rule_reads_back_what_it_writes_and_old_runs_default():
    rule = ShapeRule(s_min=0.3, z_max=-0.1, trim=0.02)
    stored = {**rule.to_json(), "rule": RULE}  # analysis.json's thresholds also hold text
    assert set(rule.to_json()) == {"s_min", "z_max", "trim"}
    assert ShapeRule.from_json(json.loads(json.dumps(stored))) == rule
    assert ShapeRule.of_analysis({"thresholds": stored}) == rule
    # A run with no analyze stage, or written before `trim` was stored, reads the defaults.
    assert ShapeRule.of_analysis(None) == DEFAULT_RULE
    assert ShapeRule.from_json({"s_min": 0.3, "z_max": -0.1}).trim == TRIM
    assert ShapeRule.from_json({"s_min": "x", "trim": True}) == DEFAULT_RULE


def test_classify_takes_a_rule_or_loose_thresholds_alike():
    rng = np.random.default_rng(3)
    scores = rng.standard_t(3, (6, 300))
    rule = ShapeRule(s_min=0.1, z_max=-0.2, trim=0.1)
    by_rule = classify(scores, rule=rule)
    by_floats = classify(scores, s_min=0.1, z_max=-0.2, trim=0.1)
    assert list(by_rule["shape"]) == list(by_floats["shape"])
    assert np.array_equal(by_rule["s_bulk"], by_floats["s_bulk"])
    assert list(rule.classes(by_rule["s_bulk"])) == list(by_rule["shape"])
    assert rule.middle == pytest.approx(-0.05) and rule.bounds == (0.1, -0.2)
