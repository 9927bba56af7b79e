"""Detection metrics on hand-made rankings."""

from __future__ import annotations

import numpy as np
import pytest

from core.analysis import metrics
from core.storage.errors import AtlasError


def _perfect(n: int = 100, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    flipped = np.zeros(n, bool)
    flipped[[3, 17, 42, 60, 99][:k]] = True
    scores = np.where(flipped, 10.0, 0.0) + np.linspace(0, 1, n)  # flips strictly on top
    return scores, flipped


def test_recall_keys_match_the_run_store_contract():
    assert [metrics.recall_key(q) for q in metrics.FRACTIONS] == list(metrics.METRIC_NAMES[:5])


def test_perfect_ranking_scores_one_everywhere():
    scores, flipped = _perfect()
    m = metrics.detection_metrics(scores, flipped)
    # 5 flips in 100: top 5 % holds them all, top 1 % holds one of five.
    assert m["recall_at_1pct"] == pytest.approx(0.2)
    assert m["recall_at_5pct"] == 1.0
    assert m["recall_at_10pct"] == 1.0
    assert m["precision_at_k"] == 1.0
    assert m["average_precision"] == 1.0
    assert m["auroc"] == 1.0
    assert set(m) == set(metrics.METRIC_NAMES)


def test_reversed_ranking_scores_zero():
    scores, flipped = _perfect()
    m = metrics.detection_metrics(-scores, flipped)
    assert m["auroc"] == 0.0
    assert m["recall_at_20pct"] == 0.0
    assert m["precision_at_k"] == 0.0
    assert m["average_precision"] == pytest.approx(
        np.mean([1 / 96, 2 / 97, 3 / 98, 4 / 99, 5 / 100])
    )


def test_constant_scores_give_exactly_the_random_baseline():
    flipped = np.zeros(200, bool)
    flipped[:10] = True  # flips first in id order: a stable sort would find them all
    m = metrics.detection_metrics(np.zeros(200), flipped)
    base = metrics.random_baseline(200, 10)
    for key in ("recall_at_1pct", "recall_at_5pct", "recall_at_10pct", "precision_at_k", "auroc"):
        assert m[key] == pytest.approx(base[key]), key


def test_random_baseline_values():
    base = metrics.random_baseline(1600, 40)
    assert base["recall_at_1pct"] == pytest.approx(0.01)
    assert base["recall_at_2_5pct"] == pytest.approx(0.025)
    assert base["recall_at_10pct"] == pytest.approx(0.1)
    assert base["precision_at_k"] == base["average_precision"] == pytest.approx(0.025)
    assert base["auroc"] == 0.5


def test_random_rankings_average_to_the_baseline():
    rng = np.random.default_rng(0)
    flipped = np.zeros(400, bool)
    flipped[:20] = True
    runs = [metrics.detection_metrics(rng.random(400), flipped) for _ in range(300)]
    mean = {k: np.mean([r[k] for r in runs]) for k in metrics.METRIC_NAMES}
    base = metrics.random_baseline(400, 20)
    assert mean["recall_at_10pct"] == pytest.approx(base["recall_at_10pct"], abs=0.02)
    assert mean["precision_at_k"] == pytest.approx(base["precision_at_k"], abs=0.01)
    assert mean["auroc"] == pytest.approx(0.5, abs=0.02)


def test_ties_split_in_expectation():
    # Two flips tied with two clean ones at the top: inspecting 2 finds one flip on average.
    scores = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    flipped = np.array([True, False, True, False, False, False])
    assert metrics.precision_at_k(scores, flipped) == pytest.approx(0.5)
    assert metrics.expected_hits(scores, flipped).tolist() == pytest.approx(
        [0, 0.5, 1, 1.5, 2, 2, 2]
    )


def test_precision_at_explicit_k_and_single_metrics():
    scores, flipped = _perfect()
    assert metrics.precision_at_k(scores, flipped, k=10) == pytest.approx(0.5)
    assert metrics.recall_at_fraction(scores, flipped, 0.03) == pytest.approx(0.6)
    assert metrics.average_precision(scores, flipped) == 1.0
    assert metrics.auroc(scores, flipped) == 1.0


def test_recall_curve_is_monotone_from_zero_to_one():
    rng = np.random.default_rng(1)
    flipped = rng.random(300) < 0.05
    x, y = metrics.recall_curve(rng.random(300), flipped, n_points=50)
    assert x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == pytest.approx(1)
    assert (np.diff(y) >= -1e-12).all() and (np.diff(x) > 0).all()
    x_all, _ = metrics.recall_curve(rng.random(300), flipped, n_points=None)
    assert len(x_all) == 301


@pytest.mark.parametrize(
    "scores, flipped, match",
    [
        ([0.1, 0.2], [True], "match"),
        ([0.1, 0.2], [False, False], "No instance is flipped"),
        ([0.1, 0.2], [True, True], "Every instance"),
        ([0.1, np.nan], [True, False], "not finite"),
        ([[0.1, 0.2]], [[True, False]], "one-dimensional"),
        ([0.1, 0.2], [2, 0], "booleans"),
    ],
)
def test_invalid_input_raises_atlas_error(scores, flipped, match):
    with pytest.raises(AtlasError, match=match):
        metrics.detection_metrics(scores, flipped)


def test_bad_fraction_and_k_raise():
    scores, flipped = _perfect()
    with pytest.raises(AtlasError):
        metrics.recall_at_fraction(scores, flipped, 0.0)
    with pytest.raises(AtlasError):
        metrics.precision_at_k(scores, flipped, k=0)
    with pytest.raises(AtlasError):
        metrics.random_baseline(10, 0)


def test_metrics_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, core.analysis.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
