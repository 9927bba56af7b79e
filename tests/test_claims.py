"""The claims' statistics and verdicts (core/analysis/claims.py) on samples built to hold and to fail."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core.analysis import claims

S, Z, BS = "S", "Z", "backslash"


def sample(shape, end_ratio, s_bulk=None, distance=None):
    """A claims sample from plain lists (s_bulk and distance default to increasing values)."""
    n = len(shape)
    return {
        "id": np.arange(n),
        "shape": np.asarray(shape, dtype=object),
        "end_ratio": np.asarray(end_ratio, dtype=np.float64),
        "s_bulk": np.linspace(-0.3, 0.8, n) if s_bulk is None else np.asarray(s_bulk, float),
        "mean_distance": np.linspace(1, 2, n) if distance is None else np.asarray(distance, float),
    }


def paper_like(rng, n_each=12):
    """S near the ends, backslash between, Z near the centre; S index rises with both."""
    shape = [S] * n_each + [BS] * n_each + [Z] * n_each
    er = np.concatenate(
        [rng.uniform(80, 95, n_each), rng.uniform(55, 70, n_each), rng.uniform(25, 40, n_each)]
    )
    s_bulk = np.concatenate(
        [
            rng.uniform(0.3, 0.6, n_each),
            rng.uniform(0, 0.2, n_each),
            rng.uniform(-0.3, -0.1, n_each),
        ]
    )
    dist = s_bulk * 3 + 10 + rng.normal(0, 0.1, 3 * n_each)
    return sample(shape, er, s_bulk, dist)


def by_id(result):
    return {c["id"]: c for c in result}


def test_a_paper_like_sample_holds_every_claim():
    out = by_id(claims.evaluate([paper_like(np.random.default_rng(0))], "raw:1-10"))
    assert [out[c]["verdict"] for c in ("C1", "C2", "C3", "C4", "C5", "C6")] == [claims.HOLDS] * 6
    assert out["C1"]["statistic"] == pytest.approx(1 / 3)
    assert out["C3"]["statistic"] < 50 < out["C2"]["statistic"]
    assert all(out[c]["view"] == "raw:1-10" for c in out)


def test_the_opposite_sample_contradicts_the_paper():
    rng = np.random.default_rng(1)
    base = paper_like(rng)
    # Flips at the centre of S curves, at the ends of Z curves, S index falling with both.
    flipped = {
        **base,
        "end_ratio": 100 - base["end_ratio"],
        "mean_distance": -base["mean_distance"],
    }
    out = by_id(claims.evaluate([flipped], "raw:1-10"))
    for cid in ("C2", "C3", "C4", "C5", "C6"):
        assert out[cid]["verdict"] == claims.CONTRADICTED, cid
        lo, hi = out[cid]["ci"]
        assert lo <= out[cid]["statistic"] <= hi


def test_noise_is_inconclusive():
    rng = np.random.default_rng(2)
    n = 40
    shape = [S] * n
    noise = sample(shape, rng.uniform(0, 100, n), rng.normal(0, 1, n), rng.normal(0, 1, n))
    out = by_id(claims.evaluate([noise], "raw:1-10"))
    assert out["C2"]["verdict"] == claims.INCONCLUSIVE
    assert out["C2"]["ci"][0] < 50 < out["C2"]["ci"][1]
    assert out["C5"]["verdict"] == claims.INCONCLUSIVE


def test_too_few_instances_are_not_testable_and_say_how_many():
    tiny = sample([S, S, Z, BS], [90, 80, 40, 60])
    out = by_id(claims.evaluate([tiny], "raw:1-3"))
    for cid in ("C1", "C2", "C3", "C4", "C5", "C6"):
        assert out[cid]["verdict"] == claims.NOT_TESTABLE, cid
        assert out[cid]["statistic"] is None and out[cid]["ci"] is None
        assert any(ch.isdigit() for ch in out[cid]["why"])
    assert "only 1 Z curves" in out["C3"]["why"]


def test_c1_absent_class_is_contradicted_only_in_a_large_sample():
    small = sample([S] * 20, [90] * 20)
    large = sample([S] * 30 + [BS] * 10, [90] * 40)
    assert by_id(claims.evaluate([small], "v"))["C1"]["verdict"] == claims.INCONCLUSIVE
    out = by_id(claims.evaluate([large], "v"))["C1"]
    assert out["verdict"] == claims.CONTRADICTED
    assert out["statistic"] == 0 and out["counts"] == {S: 30, BS: 10, Z: 0}


def test_c1_rare_class_seen_once_is_inconclusive():
    seen_once = sample([S] * 20 + [BS] * 19 + [Z], [90] * 40)
    out = by_id(claims.evaluate([seen_once], "v"))["C1"]
    assert out["verdict"] == claims.INCONCLUSIVE and out["ci"][0] == 0


def test_every_verdict_is_reachable():
    rng = np.random.default_rng(3)
    reached = set()
    for sample_ in (paper_like(rng), sample([S] * 40, rng.uniform(0, 100, 40)), sample([S], [50])):
        reached |= {c["verdict"] for c in claims.evaluate([sample_], "v")}
    base = paper_like(rng)
    reached |= {
        c["verdict"] for c in claims.evaluate([{**base, "end_ratio": 100 - base["end_ratio"]}], "v")
    }
    assert reached == set(claims.VERDICTS)


def test_the_interval_covers_the_true_mean_at_about_the_stated_rate():
    # Flips' end ratio on S curves ~ N(70, 15²): the interval should hold 70 about 95 % of the time.
    rng = np.random.default_rng(4)
    hits, reps = 0, 300
    for _ in range(reps):
        s = sample([S] * 40, rng.normal(70, 15, 40))
        _, lo, hi, _ = claims.bootstrap(
            [s],
            lambda x: claims.class_mean_end_ratio(x, S),
            n_boot=300,
            seed=int(rng.integers(1e9)),
        )
        hits += lo <= 70 <= hi
    assert 0.89 <= hits / reps <= 0.99


def test_pooled_statistics_equal_a_hand_computation_on_two_runs():
    a = sample([S, S, S, BS, Z], [90, 85, 70, 60, 30], [0.5, 0.4, 0.3, 0.1, -0.2], [5, 4, 3, 2, 1])
    b = sample([S, S, Z, Z], [95, 80, 40, 20], [0.6, 0.3, -0.1, -0.3], [1, 2, 3, 4])
    # Pooled mean end ratio on S curves: every S instance of both runs.
    assert claims.class_mean_end_ratio([a, b], S) == pytest.approx(np.mean([90, 85, 70, 95, 80]))
    # Pooled Spearman: the per-run correlations weighted by n.
    ra = stats.spearmanr(a["s_bulk"], a["mean_distance"]).statistic
    rb = stats.spearmanr(b["s_bulk"], b["mean_distance"]).statistic
    assert claims.weighted_spearman([a, b], "mean_distance") == pytest.approx((5 * ra + 4 * rb) / 9)
    # The two-stage bootstrap by hand: seeds drawn with replacement, then each seed's rows.
    rng = np.random.default_rng(11)
    values = []
    for _ in range(200):
        picks = rng.integers(0, 2, 2)
        er, shp = [], []
        for i in picks:
            s = (a, b)[i]
            rows = rng.integers(0, 5 if i == 0 else 4, 5 if i == 0 else 4)
            er.append(s["end_ratio"][rows])
            shp.append(s["shape"][rows])
        er, shp = np.concatenate(er), np.concatenate(shp)
        if (shp == S).any():
            values.append(er[shp == S].mean())
    point, lo, hi, failed = claims.bootstrap(
        [a, b], lambda x: claims.class_mean_end_ratio(x, S), n_boot=200, seed=11
    )
    assert [lo, hi] == pytest.approx(list(np.percentile(values, [2.5, 97.5])))
    assert failed == pytest.approx(1 - len(values) / 200)


def test_the_bootstrap_recomputes_exactly():
    s = paper_like(np.random.default_rng(5))
    assert claims.evaluate([s], "v") == claims.evaluate([s], "v")


def test_hinge_finds_a_known_breakpoint_and_a_line_has_none():
    rates = np.repeat([0, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4], 3)
    seeds = np.tile([0, 1, 2], 7)
    rng = np.random.default_rng(6)
    flat_then_drop = 0.9 - 1.5 * np.maximum(rates - 0.1, 0) + rng.normal(0, 0.004, rates.size)
    out = claims.threshold_claim(rates, seeds, flat_then_drop)
    assert out["verdict"] == claims.HOLDS
    assert out["statistic"] == pytest.approx(0.1, abs=0.02)
    assert out["ci"][0] > 0
    line = 0.9 - 0.8 * rates + rng.normal(0, 0.004, rates.size)
    out = claims.threshold_claim(rates, seeds, line)
    assert out["verdict"] == claims.CONTRADICTED and out["statistic"] == pytest.approx(0, abs=0.01)
    few = claims.threshold_claim(rates[:6], seeds[:6], line[:6])
    assert few["verdict"] == claims.NOT_TESTABLE and "needs at least 4 rates" in few["why"]
