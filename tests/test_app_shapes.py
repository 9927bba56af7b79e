"""Score curves, Shape vs position, Learn the shapes (and Home, Neighbourhoods) under AppTest: on the fake store for the
page mechanics, and on a real tiny run (made by the pipeline) for the numbers, which must be
core's own (core.analysis.shapes.classify on core.analysis.views.view_scores), never a copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import page_harness
import pandas as pd
import pytest
import runstore_factory as factory
from page_harness import charts_named, frame_with, one_chart
from streamlit.testing.v1 import AppTest

from core.analysis import shape_references, views
from core.analysis import shapes as core_shapes
from core.storage import store
from ui import charts

CURVES, SHAPE, LEARN, NEIGHBOURHOODS, HOME = "curves", "shape", "learn", "neighbourhoods", "home"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The fake store (demo run, older run, sweep)."""
    return factory.make_store(tmp_path_factory.mktemp("store"))


def open_page(page: str, cache_dir: Path, monkeypatch, query: dict | None = None) -> AppTest:
    """A page opened by the shared harness, which must also show no error box."""
    at = page_harness.open_page(page, cache_dir, monkeypatch, query, timeout=90)
    assert not at.error, [e.value for e in at.error]
    return at


def grid_titles(at: AppTest) -> list[str]:
    """Titles of the small-multiple panels (the over-training panel names its checkpoints)."""
    titles = [spec["title"]["text"] for spec, _ in charts_named(at, "curve_panel")]
    return [t for t in titles if "checkpoint" not in t]


def all_text(at: AppTest) -> str:
    kinds = ("markdown", "caption", "subheader", "info", "success", "warning")
    return "\n".join(str(e.value) for k in kinds for e in getattr(at, k))


# -- fake store: page mechanics -------------------------------------------------------------------


def test_enlarged_curve_has_one_red_point_per_flip(cache, monkeypatch):
    at = open_page(CURVES, cache, monkeypatch)
    spec, frames = one_chart(at, "score_curve")
    pts = frame_with(frames, "rank", "score", "flipped", "text")
    n_flips = int(pd.read_parquet(cache / "demo" / store.INSTANCES).flipped.sum())
    assert int(pts.flipped.sum()) == n_flips and (pts.status == "flipped").sum() == n_flips
    assert set(frame_with(frames, "x2", "y2")["status"]) == {"regression", "endpoints"}
    color = spec["layer"][0]["encoding"]["color"]["scale"]
    assert dict(zip(color["domain"], color["range"], strict=True)) == {
        "clean": charts.BLUE,
        "flipped": charts.RED,
        "regression": charts.YELLOW,
        "endpoints": charts.GREEN,
    }


def test_panels_follow_the_filters_and_wrap_in_columns(cache, monkeypatch):
    shapes = pd.read_parquet(cache / "demo" / store.SHAPES)
    at = open_page(CURVES, cache, monkeypatch)
    titles = grid_titles(at)
    assert len(titles) == min(int((~shapes.correct).sum()), 12)
    assert all("S = " in t and "(" in t for t in titles)
    # The paper's order: bulk S descending.
    s_of = shapes.set_index("id")["s_bulk"]
    ids = [int(t.split(" ")[0]) for t in titles]
    assert list(s_of.loc[ids]) == sorted(s_of.loc[ids], reverse=True)
    at.radio(key="curves_which").set_value("all").run()
    at.multiselect(key="curves_shapes").set_value(["Z"]).run()
    titles = grid_titles(at)
    assert len(titles) == min(int((shapes["shape"] == "Z").sum()), 12)
    assert all("(Z)" in t for t in titles)


def test_one_checkpoint_view_shows_that_checkpoints_contribution(cache, monkeypatch):
    at = open_page(CURVES, cache, monkeypatch)
    test_id = int(
        at.query_params["test"][0]
        if isinstance(at.query_params["test"], list)
        else at.query_params["test"]
    )
    at.slider(key="view_range").set_value((1, 1)).run()
    _, frames = one_chart(at, "score_curve")
    pts = frame_with(frames, "train_id", "score")
    per = np.load(cache / "demo" / store.TRACIN_PER_CHECKPOINT)
    inst = pd.read_parquet(cache / "demo" / store.INSTANCES)
    row = int(np.flatnonzero(inst[inst.split == "test"].id.to_numpy() == test_id)[0])
    expected = np.sort(per[0, row].astype(np.float64))[::-1]
    np.testing.assert_allclose(pts.sort_values("rank").score.to_numpy(), expected, rtol=1e-6)
    # The picker, the panels and the titles all use this view's shapes.
    assert "checkpoint 1 alone" in all_text(at)


def test_query_param_link_selects_the_test_instance(cache, monkeypatch):
    shapes = pd.read_parquet(cache / "demo" / store.SHAPES)
    chosen = int(shapes[shapes.correct].id.iloc[-1])
    at = open_page(CURVES, cache, monkeypatch, {"run": "demo", "test": str(chosen)})
    assert at.selectbox(key="picker_test_demo").value == str(chosen)
    spec, _ = one_chart(at, "score_curve")
    assert spec["title"].startswith(f"{chosen} (")


def test_shape_scatter_one_point_per_instance_and_the_selection_on_top(cache, monkeypatch):
    shapes = pd.read_parquet(cache / "demo" / store.SHAPES)
    chosen = int(shapes.id.iloc[4])
    at = open_page(SHAPE, cache, monkeypatch, {"test": str(chosen)})
    spec, frames = one_chart(at, "shape_scatter")
    pts = [f for f in frames if {"id", "s_bulk", "end_ratio", "selected"} <= set(f.columns)]
    ids = sorted(int(i) for f in pts for i in f.id)
    assert ids == sorted(shapes.id)
    # The selected instance is its own, last layer, drawn large.
    chosen_layer = spec["layer"][-1]
    assert chosen_layer["mark"]["size"] > 300
    assert [int(i) for f in pts if f.selected.all() for i in f.id] == [chosen]
    at.radio(key="shape_y").set_value("mean_distance").run()
    spec, _ = one_chart(at, "shape_scatter")
    assert spec["layer"][-1]["encoding"]["y"]["field"] == "mean_distance"


# -- a real tiny run: the page's numbers are core's ------------------------------------------------


@pytest.fixture(scope="module")
def real(study_run) -> tuple[Path, str]:
    """The session's tiny pipeline run: (cache folder, run name)."""
    return study_run.parent, study_run.name


def test_real_run_stores_views_norms_and_ranks(study_run):
    k = np.load(study_run / store.TRACIN_PER_CHECKPOINT).shape[0]
    assert np.load(study_run / store.GRAD_NORMS_TRAIN).shape[0] == k
    by_view = pd.read_parquet(study_run / store.SHAPES_BY_VIEW)
    assert set(by_view["normalisation"]) == set(views.NORMALISATIONS)
    analysis = json.loads((study_run / store.ANALYSIS).read_text())
    assert len(analysis["views"]["rank_order"]) == np.load(study_run / store.FLIP_RANKS).shape[0]


def test_page_shapes_under_any_view_equal_core_classify(real, study_run, monkeypatch):
    cache_dir, name = real
    at = open_page(SHAPE, cache_dir, monkeypatch, {"run": name})
    at.selectbox(key="view_normalisation").set_value(views.RELATIVE).run()
    at.slider(key="view_range").set_value((2, 3)).run()
    _, frames = one_chart(at, "shape_scatter")
    shown = pd.concat([f for f in frames if {"id", "s_bulk"} <= set(f.columns)])
    stack = np.load(study_run / store.TRACIN_PER_CHECKPOINT)
    scores = views.view_scores(
        stack,
        views.View(2, 3, views.RELATIVE),
        np.load(study_run / store.GRAD_NORMS_TRAIN),
        np.load(study_run / store.GRAD_NORMS_TEST),
    )
    inst = pd.read_parquet(study_run / store.INSTANCES)
    flipped = inst.loc[inst.split == "train", "flipped"].to_numpy(bool)
    want = core_shapes.classify(scores, flipped)
    test_ids = inst.loc[inst.split == "test", "id"].to_numpy()
    got = shown.set_index("id").loc[test_ids]
    np.testing.assert_allclose(got["s_bulk"], want["s_bulk"], rtol=1e-9)
    np.testing.assert_allclose(got["end_ratio"], want["end_ratio"], rtol=1e-9)
    assert list(got["shape"]) == list(want["shape"])


def test_over_training_traces_every_flip(real, study_run, monkeypatch):
    cache_dir, name = real
    at = open_page(CURVES, cache_dir, monkeypatch, {"run": name})
    _, frames = one_chart(at, "flip_ranks")
    traces = frame_with(frames, "train_id", "checkpoint", "rank")
    n_flips = int(pd.read_parquet(study_run / store.INSTANCES).flipped.sum())
    k = np.load(study_run / store.TRACIN_PER_CHECKPOINT).shape[0]
    assert traces.train_id.nunique() == n_flips and traces.checkpoint.nunique() == k
    _, frames = one_chart(at, "index_over_training")
    series = frame_with(frames, "checkpoint", "s_bulk", "scores")
    assert len(series) == 2 * k  # each checkpoint alone and the sum up to it


def test_learn_page_examples_are_real_and_the_guess_reveals(real, study_run, monkeypatch):
    cache_dir, name = real
    at = open_page(LEARN, cache_dir, monkeypatch, {"run": name})
    analysis = json.loads((study_run / store.ANALYSIS).read_text())
    shown = sum(len(v["ids"]) for v in analysis["examples"].values())
    # One panel per example, one for the guess.
    assert len(charts_named(at, "curve_panel")) == shown + 1
    missing = [c for c, v in analysis["examples"].items() if not v["ids"]]
    for cls in missing:
        assert f"No test instance of this run shows a {cls} curve" in all_text(at)
    # One panel per synthetic reference, each its own chart so the grid reflows on a phone.
    references = charts_named(at, "reference_curves")
    assert len(references) == len(shape_references.reference_curves(0))
    titles = {spec["title"]["text"] for spec, _ in references}
    assert titles == {f"{n} ({s})" for n, (_, s) in shape_references.reference_curves(0).items()}
    at.radio(key="learn_choice").set_value("S").run()  # Reveal waits for a guess
    at.button(key="learn_reveal").click().run()
    assert "this curve is" in all_text(at)


def test_a_stale_stage_is_named_with_its_command(study_run, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "cache" / "stale"
    shutil.copytree(study_run, run, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    tracin = np.load(run / store.TRACIN)
    store.write_npy(run / store.TRACIN, (tracin * 2).astype(np.float32))  # inputs changed
    at = open_page(CURVES, tmp_path / "cache", monkeypatch, {"run": "stale"})
    warnings = " ".join(str(w.value) for w in at.warning)
    assert "analyze results of this run are stale" in warnings
    assert any(c.value.startswith("python -m core analyze") for c in at.code)


def test_home_and_neighbourhoods_on_a_real_run_show_cores_numbers(real, study_run, monkeypatch):
    from core.analysis.analyze import final_correct
    from core.analysis.stats import correlation

    cache_dir, name = real
    inst = pd.read_parquet(study_run / store.INSTANCES)
    logits = np.load(study_run / store.LOGITS)
    shapes = pd.read_parquet(study_run / store.SHAPES)
    at = open_page(HOME, cache_dir, monkeypatch, {"run": name})
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["misclassified test"] == str(int((~final_correct(logits, inst)).sum()))
    counts = at.dataframe[0].value.set_index("shape")["all test"]
    assert counts[counts > 0].to_dict() == shapes["shape"].value_counts().to_dict()

    at = open_page(NEIGHBOURHOODS, cache_dir, monkeypatch, {"run": name})
    want = correlation(shapes["s_bulk"], shapes["mean_distance"])
    shown = all_text(at)
    if want["spearman"] is None:
        assert "No correlation of bulk S with mean distance is shown" in shown
    else:
        assert f"{want['spearman']:+.2f}" in shown
    _, frames = one_chart(at, "mean_distance")
    bars = frame_with(frames, "id", "mean_distance").set_index("id")["mean_distance"]
    dist = np.load(study_run / store.DISTANCES)
    test_ids = inst.loc[inst.split == "test", "id"].to_numpy()
    expected = pd.Series(dist.mean(axis=1), index=test_ids).loc[bars.index]
    np.testing.assert_allclose(bars.to_numpy(), expected.to_numpy(), rtol=1e-5)
