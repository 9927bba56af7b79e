"""The analyze stage on a tiny fake run: files, shapes, geometry against a direct forward pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import runstore_factory as factory
import torch
from scipy import stats
from transformers import BertForSequenceClassification, BertTokenizer

import core.analysis.geometry as geometry
from core.analysis import shapes, views
from core.analysis.analyze import analyze_run, correlation, correlations, summary_rows
from core.storage import store
from core.storage.errors import AtlasError
from ui import data, influence

N_TRAIN, N_VAL, N_TEST = factory.ANALYSIS_SIZES
FLIPPED = factory.ANALYSIS_FLIPPED  # training rows whose labels were flipped
HIDDEN = factory.ANALYSIS_HIDDEN


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One fake run built per module; each test gets its own copy."""
    run = tmp_path_factory.mktemp("template") / "run"
    factory.make_analysis_run(run)
    return run


@pytest.fixture
def run(template, tmp_path) -> Path:
    """A fresh copy of the fake run."""
    dst = tmp_path / "run"
    shutil.copytree(template, dst)
    return dst


@pytest.fixture(autouse=True)
def no_umap(monkeypatch):
    """Replace UMAP by a cheap stand-in: its real fit is tested once, in test_geometry."""
    monkeypatch.setattr(geometry, "_umap_2d", lambda x, seed: np.asarray(x[:, :2], np.float32))


def strict_json(path: Path) -> dict:
    """Parse JSON that must not contain NaN or Infinity."""

    def reject(token):
        raise AssertionError(f"{path} contains {token}")

    return json.loads(path.read_text(), parse_constant=reject)


@torch.no_grad()
def direct_cls(run: Path, texts: list[str], checkpoint: str) -> np.ndarray:
    """[CLS] vectors computed one instance at a time, independently of core.learning.models."""
    tok = BertTokenizer.from_pretrained(str(run / store.TOKENIZER_DIR))
    model = BertForSequenceClassification.from_pretrained(str(run / checkpoint)).eval()
    rows = []
    for text in texts:
        enc = tok(text, return_tensors="pt")
        rows.append(model(**enc, output_hidden_states=True).hidden_states[-1][0, 0].numpy())
    return np.stack(rows)


def test_analyze_writes_every_file_with_consistent_shapes(run):
    result = analyze_run(run, progress=False)
    n = N_TRAIN + N_VAL + N_TEST
    emb = np.load(run / store.EMBEDDINGS)
    dist = np.load(run / store.DISTANCES)
    assert emb.shape == (n, HIDDEN) and emb.dtype == np.float32
    assert dist.shape == (N_TEST, N_TRAIN) and dist.dtype == np.float32

    shapes_df = pd.read_parquet(run / store.SHAPES)
    assert list(shapes_df.columns) == [
        "id", "correct", "s_raw", "s", "s_bulk", "shape", "end_ratio", "b_reg", "a_reg",
        "b_end", "a_end", "mean_distance", "knn_flip_share", "flipped_ranks",
    ]  # fmt: skip
    assert shapes_df["id"].tolist() == list(range(N_TRAIN + N_VAL, n))
    assert set(shapes_df["shape"]) <= {"S", "Z", "backslash"}
    assert all(len(r) == len(FLIPPED) for r in shapes_df["flipped_ranks"])
    np.testing.assert_allclose(shapes_df["mean_distance"], dist.mean(axis=1), rtol=1e-5)
    assert shapes_df["end_ratio"].between(0, 100).all()

    coords = pd.read_parquet(run / store.COORDS)
    assert list(coords.columns) == ["id", "umap_x", "umap_y", "pca_x", "pca_y"]
    assert coords["id"].tolist() == list(range(n))

    curves = pd.read_parquet(run / store.CURVES)
    assert list(curves.columns) == ["test_id", "rank", "train_id", "score", "flipped"]
    assert len(curves) == N_TEST * N_TRAIN  # short curves are kept whole

    assert strict_json(run / store.ANALYSIS) == json.loads(json.dumps(result))
    assert result["n_test"] == N_TEST and result["n_flipped"] == len(FLIPPED)
    assert result["thresholds"]["s_min"] == shapes.S_MIN
    assert result["thresholds"]["z_max"] == shapes.Z_MAX
    assert result["thresholds"]["trim"] == shapes.TRIM
    assert result["k"] == 10 and result["checkpoint"]["epoch"] == 2
    counts = sum(v["count"] for v in result["by_shape"]["all"].values())
    assert counts == N_TEST
    for group in ("all", "correct", "misclassified"):
        for key in ("s_vs_end_ratio", "s_vs_mean_distance"):
            assert set(result["correlations"][key][group]) == {
                "n", "spearman", "spearman_p", "pearson", "pearson_p", "reason",
            }  # fmt: skip

    stage = store.load_manifest(run)["stages"]["analyze"]
    assert stage["status"] == "complete"
    assert set(stage["timings_s"]) == {"shapes", "views", "geometry", "write"}
    assert "analyze" in store.load_manifest(run)["timings_s"]


def test_stored_embeddings_and_distances_match_a_direct_forward_pass(run):
    analyze_run(run, progress=False)
    inst = store.load_instances(run)
    emb = np.load(run / store.EMBEDDINGS)
    dist = np.load(run / store.DISTANCES)
    picks = [0, 3, 17, N_TRAIN + 1, N_TRAIN + N_VAL, N_TRAIN + N_VAL + 7]
    direct = direct_cls(run, inst["text"].iloc[picks].tolist(), "checkpoints/epoch-02")
    np.testing.assert_allclose(emb[picks], direct, rtol=1e-4, atol=1e-5)
    # Distances: test instance 7 (global id 51) to training instances 0, 3 and 17.
    t = N_TRAIN + N_VAL + 7
    for j, train_id in enumerate([0, 3, 17]):
        expected = np.linalg.norm(direct[-1].astype(np.float64) - direct[j])
        assert dist[7, train_id] == pytest.approx(expected, rel=1e-4)
    assert dist[7, 0] == pytest.approx(np.linalg.norm(emb[t] - emb[0]), rel=1e-5)


def test_checkpoint_choice_changes_the_embeddings(run):
    result = analyze_run(run, checkpoint=0, progress=False)
    assert result["checkpoint"] == {"index": 0, "epoch": 1, "path": "checkpoints/epoch-01"}
    inst = store.load_instances(run)
    emb = np.load(run / store.EMBEDDINGS)
    direct = direct_cls(run, inst["text"].iloc[:2].tolist(), "checkpoints/epoch-01")
    np.testing.assert_allclose(emb[:2], direct, rtol=1e-4, atol=1e-5)
    with pytest.raises(AtlasError, match="out of range"):
        analyze_run(run, checkpoint=5, progress=False, force=True)


def test_known_shapes_end_ratios_and_correctness(run):
    analyze_run(run, progress=False)
    df = pd.read_parquet(run / store.SHAPES)
    s_row, z_row = df.iloc[0], df.iloc[1]
    assert s_row["shape"] == "S" and s_row["s"] > 0.5 and s_row["s_bulk"] >= shapes.S_MIN
    assert list(s_row["flipped_ranks"]) == [0, 1, N_TRAIN - 2, N_TRAIN - 1]
    assert s_row["end_ratio"] > 95
    assert z_row["shape"] == "Z" and z_row["s"] < -0.3
    assert z_row["end_ratio"] < 10
    assert df["s_raw"].to_numpy() == pytest.approx((df["b_reg"] - df["b_end"]).to_numpy())
    assert df["correct"].tolist() == [True] * 5 + [False] * 5


def test_curves_keep_both_ends_and_every_flipped(run):
    analyze_run(run, max_points=10, progress=False)
    curves = pd.read_parquet(run / store.CURVES)
    tracin = np.load(run / store.TRACIN)
    for test_id, curve in curves.groupby("test_id"):
        row = test_id - N_TRAIN - N_VAL
        assert {0, N_TRAIN - 1} <= set(curve["rank"])
        assert set(FLIPPED) <= set(curve["train_id"])
        assert len(curve) <= 10
        assert curve["score"].is_monotonic_decreasing
        np.testing.assert_array_equal(curve["score"], tracin[row, curve["train_id"]])
        assert curve["flipped"].tolist() == [t in FLIPPED for t in curve["train_id"]]
        assert curve["score"].iloc[0] == tracin[row].max()


def test_skips_when_complete_and_recomputes_on_force_or_new_params(run, monkeypatch):
    first = analyze_run(run, progress=False)
    calls = []
    real = geometry.run_embeddings
    monkeypatch.setattr(
        geometry, "run_embeddings", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    assert analyze_run(run, progress=False) == first and calls == []
    analyze_run(run, progress=False, force=True)
    assert len(calls) == 1
    changed = analyze_run(run, rule=shapes.ShapeRule(s_min=0.5), progress=False)
    assert len(calls) == 2 and changed["thresholds"]["s_min"] == 0.5


def test_missing_tracin_names_the_command_and_writes_nothing(run):
    (run / store.TRACIN).unlink()
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(AtlasError, match="python -m core tracin"):
        analyze_run(run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == before
    assert "analyze" not in store.load_manifest(run)["stages"]


def test_mismatched_tracin_shape_is_an_atlas_error(run):
    store.write_npy(run / store.TRACIN, np.zeros((3, 3), np.float32))
    with pytest.raises(AtlasError, match="shape"):
        analyze_run(run, progress=False)


def test_missing_checkpoint_files_mark_the_stage_failed(run):
    shutil.rmtree(run / "checkpoints" / "epoch-02")
    with pytest.raises(AtlasError, match="epoch-02"):
        analyze_run(run, progress=False)
    assert store.load_manifest(run)["stages"]["analyze"]["status"] == "failed"


def test_all_correct_leaves_misclassified_correlations_empty(run):
    inst = store.load_instances(run)
    logits = np.load(run / store.LOGITS)
    labels = inst["label"].to_numpy()
    logits[-1] = np.stack([1.0 - labels, labels.astype(float)], axis=1)
    store.write_npy(run / store.LOGITS, logits)
    result = analyze_run(run, progress=False)
    assert result["n_misclassified"] == 0
    assert result["correlations"]["s_vs_end_ratio"]["misclassified"]["spearman"] is None
    assert result["by_shape"]["misclassified"]["S"]["mean_end_ratio"] is None
    assert result["correlations"]["s_vs_end_ratio"]["all"]["n"] == N_TEST
    strict_json(run / store.ANALYSIS)


def test_summary_rows_and_correlations_for_show_json(run):
    with pytest.raises(AtlasError, match="analyze"):
        summary_rows(run)
    analyze_run(run, progress=False)
    rows = summary_rows(run)
    assert len(rows) == N_TEST
    assert set(rows[0]) == {
        "id", "correct", "s_raw", "s", "s_bulk", "shape", "end_ratio", "mean_distance",
    }  # fmt: skip
    assert isinstance(rows[0]["id"], int) and isinstance(rows[0]["correct"], bool)
    json.dumps(rows, allow_nan=False)
    corr = correlations(run)
    assert corr["s_vs_end_ratio"]["misclassified"]["n"] == N_TEST // 2
    assert {"s_vs_mean_distance", "by_shape", "thresholds", "checkpoint"} <= set(corr)
    # show --json carries the sensitivity table and the per-view counts with the correlations.
    assert {"sensitivity", "views", "examples"} <= set(corr) and corr["sensitivity"]
    json.dumps(corr, allow_nan=False)


def test_correlation_is_nan_safe_and_says_when_it_means_nothing():
    none = {"spearman": None, "spearman_p": None, "pearson": None, "pearson_p": None}
    few = correlation([1, 2], [3, 4])
    assert {k: few[k] for k in none} == none and few["n"] == 2 and "at least 8" in few["reason"]
    flat = correlation(np.arange(12.0), np.r_[np.full(11, 0.12345), 0.12346])
    assert flat["spearman"] is None and "no spread" in flat["reason"]
    assert correlation([1, np.nan, 3], [1, 2, 3])["n"] == 2
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, np.nan])
    y = np.array([2.0, 1.0, 4.0, 3.0, 6.0, 5.0, 9.0, 7.0, 8.0, 1.0])
    got = correlation(x, y)
    assert got["n"] == 9 and got["reason"] is None
    assert got["spearman"] == pytest.approx(stats.spearmanr(x[:9], y[:9]).statistic)
    assert got["pearson_p"] == pytest.approx(stats.pearsonr(x[:9], y[:9]).pvalue)


@pytest.mark.parametrize(
    ("dropped", "allowed"),
    [
        ((), views.NORMALISATIONS),
        ((store.GRAD_NORMS_TEST,), (views.RAW, views.RELATIVE)),
        ((store.GRAD_NORMS_TRAIN,), (views.RAW,)),
    ],
)
def test_the_analyzer_and_the_app_allow_the_same_normalisations(run, dropped, allowed):
    for name in dropped:
        (run / name).unlink()
    analyze_run(run, progress=False)
    stored = pd.read_parquet(run / store.SHAPES_BY_VIEW)["normalisation"]
    assert tuple(dict.fromkeys(stored)) == allowed
    assert influence.normalisations(data.Run(run)) == allowed


def test_views_cumulative_to_the_last_checkpoint_reproduce_the_default_shapes(run):
    result = analyze_run(run, progress=False)
    default = pd.read_parquet(run / store.SHAPES).set_index("id")
    by_view = pd.read_parquet(run / store.SHAPES_BY_VIEW)
    # 3 normalisations × 2 checkpoints × (single, cumulative).
    assert set(by_view["view"]) == {
        f"{n}:{a}-{b}" for n in views.NORMALISATIONS for a, b in ((1, 1), (2, 2), (1, 2))
    }
    full = by_view[(by_view["view"] == "raw:1-2") & (by_view["kind"] == "cumulative")]
    full = full.set_index("id").loc[default.index]
    assert (full["shape"] == default["shape"]).all()
    np.testing.assert_array_equal(full["s_bulk"], default["s_bulk"])
    np.testing.assert_array_equal(full["end_ratio"], default["end_ratio"])
    ranks = np.load(run / store.FLIP_RANKS)
    order = result["views"]["rank_order"]
    assert ranks.shape == (len(order), N_TEST, len(FLIPPED))
    np.testing.assert_array_equal(
        np.sort(ranks[order.index("raw:1-2")], axis=1),
        np.stack(default["flipped_ranks"].to_numpy()),
    )
    # Column j follows the j-th flipped training instance: row 0 puts FLIPPED at the ends.
    np.testing.assert_array_equal(
        ranks[order.index("raw:1-2"), 0], [0, 1, N_TRAIN - 2, N_TRAIN - 1]
    )
    assert result["views"]["flipped_train_ids"] == FLIPPED
    counts = result["views"]["counts"]["raw:1-2"]
    assert sum(counts[c] for c in shapes.SHAPES) == N_TEST


def test_sensitivity_table_and_learning_examples(run):
    result = analyze_run(run, progress=False)
    table = pd.DataFrame(result["sensitivity"])
    assert set(table["threshold"]) == {"s_min", "z_max", "trim"}
    assert (table[list(shapes.SHAPES)].sum(axis=1) == N_TEST).all()
    default = table[table["default"] & (table["threshold"] == "s_min")].iloc[0]
    for c in shapes.SHAPES:
        assert default[c] == result["by_shape"]["all"][c]["count"]
    # Raising s_min can only move curves out of S.
    s_rows = table[table["threshold"] == "s_min"].sort_values("value")
    assert s_rows["S"].is_monotonic_decreasing
    ex = result["examples"]
    df = pd.read_parquet(run / store.SHAPES).set_index("id")
    by_view = pd.read_parquet(run / store.SHAPES_BY_VIEW)
    assert ex["S"]["view"] is not None and ex["Z"]["view"] is not None  # rows 0 and 1
    for c in shapes.SHAPES:
        if ex[c]["view"] is None:
            assert ex[c]["ids"] == [] and ex[c]["count"] == 0
            continue
        assert 1 <= len(ex[c]["ids"]) <= min(4, ex[c]["count"])
        if ex[c]["view"] == "default":
            shown = df.loc[ex[c]["ids"], "shape"]
        else:
            shown = by_view[by_view["view"] == ex[c]["view"]].set_index("id").loc[ex[c]["ids"]]
            shown = shown["shape"]
        assert (shown == c).all()


def test_a_run_without_checkpoints_is_reanalysed_from_its_stored_geometry(run):
    analyze_run(run, progress=False)
    emb = np.load(run / store.EMBEDDINGS)
    shutil.rmtree(run / "checkpoints")
    (run / store.SHAPES).unlink()
    again = analyze_run(run, rule=shapes.ShapeRule(s_min=0.3), progress=False)
    assert again["geometry"]["source"].startswith("stored")
    np.testing.assert_array_equal(np.load(run / store.EMBEDDINGS), emb)
    assert (run / store.SHAPES).exists() and again["thresholds"]["s_min"] == 0.3
