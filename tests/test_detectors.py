"""Detectors on hand-made inputs and on a tiny fake run built in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import runstore_factory as factory

from core.analysis import metrics
from core.analysis.shapes import ShapeRule
from core.cleaning import detectors
from core.storage import store
from core.storage.errors import AtlasError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CHEAP = ["self_influence", "shape_aware", "loss", "aum", "cleanlab", "random"]


def test_loss_and_aum_on_hand_logits():
    logits = np.array(
        [[[2.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 1.0]]]
    )  # 2 epochs × 2 instances
    observed = np.array([0, 0])
    loss = detectors.loss_scores(logits[-1], observed)
    assert loss == pytest.approx([np.log1p(np.exp(-4.0)), np.log1p(np.e)])
    assert detectors.aum_scores(logits, observed) == pytest.approx([-3.0, 0.5])


def test_random_scores_are_seeded():
    a, b = detectors.random_scores(50, 3), detectors.random_scores(50, 3)
    assert (a == b).all() and not (a == detectors.random_scores(50, 4)).all()


def test_cleanlab_on_given_features_flags_the_flips():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 2
    features = rng.normal(0, 1, (120, 5)) + 3.0 * y[:, None]  # two well-separated clusters
    observed = y.copy()
    observed[[4, 9, 50, 77]] ^= 1
    scores, info = detectors.cleanlab_scores([""] * 120, observed, 0, features=features)
    assert info["features"] == "pretrained" and info["n_issues"] >= 4
    assert set(np.argsort(-scores)[:4].tolist()) == {4, 9, 50, 77}


def test_shape_aware_takes_ends_of_s_and_centre_of_z():
    n = 100
    flips = np.array([5, 50, 77, 90])
    flipped = np.zeros(n, bool)
    flipped[flips] = True
    rng = np.random.default_rng(0)
    # S rows: flips at the very top and bottom of a flat curve; Z rows: flips exactly
    # between two plateaus (48 clean instances on each).
    s_row = np.empty(n)
    s_row[~flipped] = rng.normal(0, 0.1, n - 4)
    s_row[flips] = [10.0, -10.0, 9.0, -9.0]
    z_row = np.empty(n)
    z_row[~flipped] = np.where(np.arange(n - 4) < 48, 5.0, -5.0) + rng.normal(0, 0.1, n - 4)
    z_row[flips] = [0.0, 0.01, -0.01, 0.02]
    rows = np.stack([s_row, z_row, s_row, z_row])
    s = np.array([0.8, -0.4, 0.5, -0.3])
    scores, info = detectors.shape_aware_scores(rows, s, np.zeros(4, bool))
    assert info["n_prefer_ends"] == 2 and info["n_prefer_centre"] == 2
    assert metrics.precision_at_k(scores, flipped) == 1.0
    # Only misclassified rows count: with the Z rows correct, the S rows alone decide.
    only_s, info = detectors.shape_aware_scores(rows, s, np.array([False, True, False, True]))
    assert info["n_test_used"] == 2 and metrics.precision_at_k(only_s, flipped) == 1.0
    # A shape-blind reading of the Z rows (looking at the ends) finds none of the flips.
    blind, _ = detectors.shape_aware_scores(
        rows[[1, 3]], s[[1, 3]], np.zeros(2, bool), preference=1.0
    )
    assert metrics.precision_at_k(blind, flipped) == 0.0
    # The rank form (the end ratio's measure) reads these curves the same way.
    ranked, info = detectors.shape_aware_scores(rows, s, np.zeros(4, bool), position="rank")
    assert info["position"] == "rank" and metrics.precision_at_k(ranked, flipped) == 1.0
    with pytest.raises(AtlasError, match="position"):
        detectors.shape_aware_scores(rows, s, np.zeros(4, bool), position="middle")


def test_shape_preference_ramp():
    w = detectors.shape_preference(
        np.array([-0.5, -0.1, 0.05, 0.2, 1.0, np.nan]), ShapeRule(s_min=0.2, z_max=-0.1)
    )
    assert w == pytest.approx([-1, -1, 0, 1, 1, 0])


def test_aggregate_influence_signs():
    m = np.array([[2.0, -4.0, 0.0], [-1.0, 1.0, 0.0]])
    assert detectors.aggregate_influence(m, "abs") == pytest.approx([1 + 1.5, 2 + 1.5, 0])
    assert detectors.aggregate_influence(m, "opponent") == pytest.approx([1.5, 2.0, 0])
    assert detectors.aggregate_influence(m, "proponent") == pytest.approx([1.0, 1.5, 0])
    with pytest.raises(AtlasError):
        detectors.aggregate_influence(m, "nope")


def test_nested_split_is_seeded_stratified_and_disjoint():
    y = np.array([0] * 60 + [1] * 40)
    a = detectors.nested_split(y, 0)
    b = detectors.nested_split(y, 0)
    assert all((p == q).all() for p, q in zip(a, b, strict=True))
    tit, vit, teit = a
    assert (len(tit), len(vit), len(teit)) == (80, 10, 10)
    assert len(np.unique(np.concatenate(a))) == 100
    assert y[teit].sum() == 4  # 40 % positives, kept by stratification


def test_run_detect_writes_the_contract_files(tmp_path):
    run = factory.make_model_run(tmp_path)
    result = detectors.run_detect(run, detectors=CHEAP, progress=False)
    table = pd.read_parquet(run / store.DETECTORS)
    assert list(table.columns) == ["id", *CHEAP]
    inst = store.load_instances(run)
    assert table["id"].tolist() == inst.loc[inst["split"] == "train", "id"].tolist()
    assert np.isfinite(table[CHEAP].to_numpy()).all()
    stored = json.loads((run / store.DETECTION).read_text())
    assert stored == json.loads(json.dumps(result))
    assert {"k", "n_train", "flip_rate", "fractions", "detectors", "random", "notes"} <= set(stored)
    assert stored["k"] == 4 and stored["n_train"] == 48
    for name in CHEAP:
        assert set(stored["detectors"][name]) == set(metrics.METRIC_NAMES)
        assert stored["notes"][name]
    assert set(stored["random"]) == set(metrics.METRIC_NAMES)
    # The synthetic self-influence and loss put the flips on top; the toy texts make
    # the flips easy for an out-of-sample text classifier too.
    assert stored["detectors"]["self_influence"]["auroc"] > 0.8
    assert stored["detectors"]["loss"]["precision_at_k"] == 1.0
    assert stored["detectors"]["aum"]["precision_at_k"] == 1.0
    assert stored["detectors"]["cleanlab"]["auroc"] > 0.8
    assert store.stage_done(run, "detect")
    rows = detectors.detection_table(run)
    assert [r["detector"] for r in rows] == [*CHEAP, "random_baseline"]


def test_run_detect_skips_detectors_without_inputs_and_merges_subsets(tmp_path):
    run = factory.make_model_run(tmp_path)
    (run / store.SELF_INFLUENCE).unlink()
    (run / store.SHAPES).unlink()  # shape_aware falls back to fitting tracin.npy itself
    result = detectors.run_detect(
        run, detectors=["self_influence", "shape_aware", "loss"], progress=False
    )
    assert result["notes"]["self_influence"].startswith("skipped")
    assert "self_influence" not in result["detectors"]
    assert "shape_aware" in result["detectors"] and "loss" in result["detectors"]
    # A later subset keeps the stored columns.
    result = detectors.run_detect(run, detectors=["random"], progress=False)
    table = pd.read_parquet(run / store.DETECTORS)
    assert list(table.columns) == ["id", "shape_aware", "loss", "random"]
    assert set(result["detectors"]) == {"shape_aware", "loss", "random"}
    assert result["notes"]["self_influence"].startswith("skipped")
    # Without force, a complete stage that holds the request is returned as stored.
    again = detectors.run_detect(run, detectors=["loss"], progress=False)
    assert again == result
    # Once the missing input appears, a plain rerun fills the gap and keeps the rest.
    store.write_npy(run / store.SELF_INFLUENCE, np.arange(48, dtype=np.float32))
    filled = detectors.run_detect(run, detectors=["self_influence", "loss"], progress=False)
    assert set(filled["detectors"]) == {"self_influence", "shape_aware", "loss", "random"}
    assert filled["detectors"]["loss"] == result["detectors"]["loss"]


def test_run_detect_without_flips_still_ranks(tmp_path):
    run = factory.make_model_run(tmp_path, flips=0)
    result = detectors.run_detect(run, detectors=["loss", "random"], progress=False)
    assert result["detectors"] == {} and result["random"] is None
    assert "no flipped" in result["notes"]["metrics"]
    assert len(pd.read_parquet(run / store.DETECTORS)) == 48


def test_unknown_detector_and_missing_scores_raise(tmp_path):
    run = factory.make_model_run(tmp_path)
    with pytest.raises(AtlasError, match="Unknown detector"):
        detectors.run_detect(run, detectors=["nope"], progress=False)
    with pytest.raises(AtlasError, match="no detector scores"):
        detectors.load_scores(run, "loss")


def test_misclassified_influence_on_a_tiny_run(tmp_path):
    run = factory.make_model_run(tmp_path, epochs=2)
    result = detectors.run_detect(run, detectors=["misclassified_influence"], progress=False)
    assert "misclassified_influence" in result["detectors"], result["notes"]
    scores = pd.read_parquet(run / store.DETECTORS)["misclassified_influence"].to_numpy()
    assert scores.shape == (48,) and np.isfinite(scores).all() and (scores >= 0).all()
    info = result["info"]["misclassified_influence"]
    assert info["n_test_in_train"] == 5 and info["n_misclassified"] >= 1
    cache = run / detectors.WORK_DIR / detectors.INFLUENCE_CACHE
    assert cache.exists()
    # Scoring again reuses the cached matrix (same scores, no retraining).
    stamp = cache.stat().st_mtime_ns
    again = detectors.run_detect(run, detectors=["misclassified_influence", "loss"], progress=False)
    assert cache.stat().st_mtime_ns == stamp
    assert (
        again["detectors"]["misclassified_influence"]
        == result["detectors"]["misclassified_influence"]
    )


def test_one_registry_entry_declares_each_detector():
    from core.cli import build_parser

    assert tuple(detectors.REGISTRY) == detectors.DETECTORS
    assert {n: d.reason for n, d in detectors.REGISTRY.items()} == detectors.REASONS
    for name, entry in detectors.REGISTRY.items():
        assert entry.name == name and entry.reason.strip() and callable(entry.function)
    # The CLI's choices are the registry's names, not a copy.
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command, dest in (("detect", "detectors"), ("clean", "detector"), ("export", "detector")):
        action = next(a for a in sub[command]._actions if a.dest == dest)
        assert tuple(action.choices) == detectors.DETECTORS


def test_a_detector_whose_needs_are_missing_is_skipped_with_the_reason(tmp_path):
    run = factory.make_model_run(tmp_path)
    (run / store.SELF_INFLUENCE).unlink()
    result = detectors.run_detect(run, detectors=["self_influence", "loss"], progress=False)
    assert result["notes"]["self_influence"] == f"skipped: {store.SELF_INFLUENCE} is missing"
    assert "loss" in result["detectors"]


def test_detect_recomputes_columns_whose_inputs_changed(tmp_path):
    run = factory.make_model_run(tmp_path)
    detectors.run_detect(run, detectors=["self_influence"], progress=False)
    before = pd.read_parquet(run / store.DETECTORS)["self_influence"].to_numpy()
    new = np.load(run / store.SELF_INFLUENCE)[::-1].copy()
    store.write_npy(run / store.SELF_INFLUENCE, new)  # e.g. tracin rerun with other options
    detectors.run_detect(run, detectors=["self_influence"], progress=False)
    after = pd.read_parquet(run / store.DETECTORS)["self_influence"].to_numpy()
    assert not np.array_equal(after, before) and np.allclose(after, new)
