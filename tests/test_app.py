"""The Streamlit lab under Streamlit's AppTest, on fake run stores the tests build themselves.

Every page renders without an exception; charts carry the expected data (read
back from the chart elements' Arrow datasets); widgets and ?run= / ?test= links
change what is shown; empty caches, missing stages and corrupted runs give a
sentence, not a traceback. No browser, no torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import runstore_factory as factory
from page_harness import (
    PAGES,
    REPO,
    charts_named,
    frame_with,
    one_chart,
    open_page,
    qp,
    texts,
)
from streamlit.testing.v1 import AppTest

from core.analysis import lesson as core_lesson
from core.analysis import views
from core.cleaning import interventions as core_cleaning
from core.orchestration import jobs
from core.storage import store as run_store
from core.storage.errors import AtlasError
from ui import study, widgets
from ui.pages import BY_KEY
from ui.pages import PAGES as PAGE_SPECS
from ui.screens import cleaning as cleaning_screen
from ui.screens import home as home_screen

FORBIDDEN = {"torch", "transformers", "umap", "fugashi", "ray"}
ROLES = ("training", "held out", "flipped", "proponent", "opponent", "selected")


# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A store with the demo run, an older run and a sweep (read-only for the tests)."""
    return factory.make_store(tmp_path_factory.mktemp("store"))


# -- every page ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_under_its_registry_title_with_charts(page, cache, monkeypatch):
    at = open_page(page, cache, monkeypatch)
    assert not at.error, [e.value for e in at.error]
    title = "Influence Atlas" if page == "home" else BY_KEY[page].title
    assert [t.value for t in at.title] == [title]
    if page != "study":
        assert at.get("vega_lite_chart"), f"{page} drew no chart"


def test_home_summarises_the_default_demo_run(cache, monkeypatch):
    at = open_page("home", cache, monkeypatch)
    assert qp(at, "run") == "demo"  # the demo run wins over newer runs
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["flipped labels"] == "6"
    shapes = pd.read_parquet(cache / "demo" / "shapes.parquet")
    assert metrics["misclassified test"] == str(int((~shapes.correct).sum()))
    _, frames = one_chart(at, "accuracy")
    assert len(frame_with(frames, "epoch", "accuracy")) == 2 * 3  # val + test per epoch
    counts = at.dataframe[0].value
    assert (
        counts.set_index("shape")["all test"].to_dict() == shapes["shape"].value_counts().to_dict()
    )
    assert len(charts_named(at, "teaching")) == 3  # S, backslash, Z illustrations


def test_run_picker_and_link_choose_the_run(cache, monkeypatch):
    at = open_page("home", cache, monkeypatch, {"run": "older-run"})
    assert at.selectbox(key="picker_run").value == "older-run"
    assert "older-run" in texts(at)
    at.selectbox(key="picker_run").select("demo").run()
    assert qp(at, "run") == "demo"


def test_unknown_link_values_show_a_notice(cache, monkeypatch):
    at = open_page("home", cache, monkeypatch, {"run": "no-such-run"})
    assert at.selectbox(key="picker_run").value == "demo"
    notes = " ".join(w.value for w in at.warning)
    assert "no\\-such\\-run" in notes and "showing demo instead" in notes
    at = open_page("curves", cache, monkeypatch, {"run": "demo", "test": "999999"})
    notes = " ".join(w.value for w in at.warning)
    assert "test instance 999999" in notes
    at = open_page("curves", cache, monkeypatch, {"run": "demo"})
    assert not [w for w in at.warning if "The link asks" in w.value]  # no link, no notice


def test_home_names_epochs_in_good_grammar_and_credits_the_data(cache, monkeypatch):
    assert home_screen.plural(1, "epoch") == "1 epoch"
    assert home_screen.plural(10, "epoch") == "10 epochs"
    assert home_screen.plural(None, "epoch") == "? epochs"
    at = open_page("home", cache, monkeypatch)
    assert "1 epochs" not in texts(at)
    assert "vaderSentiment" in texts(at) and "C.J. Hutto" in texts(at)
    notice = (REPO / "NOTICE").read_text("utf-8")
    assert "Copyright (c) 2016 C.J. Hutto" in notice and "Permission is hereby granted" in notice


def test_page_registry_is_the_one_page_list():
    scripts = {p.script for p in PAGE_SPECS if p.script}
    assert scripts == {f"pages/{f.name}" for f in (REPO / "pages").glob("*.py")}
    assert PAGE_SPECS[0].title == "Home" and PAGE_SPECS[0].url_path == ""
    readme = (REPO / "README.md").read_text("utf-8")
    for p in PAGE_SPECS:
        assert f"| {p.title}" in readme, f"README's page table lacks {p.title}"


# -- score curves --------------------------------------------------------------------------------


def test_page_links_take_their_target_title_and_icon_from_the_registry(cache, monkeypatch):
    at = open_page("shape", cache, monkeypatch)
    curves = BY_KEY["curves"]
    (link,) = [el.proto for el in at.get("page_link") if el.proto.page == curves.url_path]
    assert (link.page, link.icon, link.label) == (
        curves.url_path,
        curves.icon,
        f"Open in {curves.title}",
    )
    assert link.query_string == f"run=demo&test={qp(at, 'test')}"
    at = open_page("home", cache, monkeypatch)
    paper = BY_KEY["replication"]
    shown = {(el.proto.page, el.proto.icon, el.proto.label) for el in at.get("page_link")}
    assert (paper.url_path, paper.icon, paper.title) in shown


SHIPPED = REPO / "cache"


@pytest.mark.parametrize("page", ["curves", "shape"])
def test_a_class_that_changes_with_the_view_is_said_and_linked_to_the_lesson(page, monkeypatch):
    """Instance 1978 of the shipped demo is S with all checkpoints raw, another class under
    relative and cosine scores: the page showing its curve says so in core's sentence (the
    classes stored in shapes_by_view.parquet) and links to the lesson's step on why."""
    stored = pd.read_parquet(SHIPPED / "demo" / run_store.SHAPES_BY_VIEW)
    shape = stored.loc[(stored["view"] == "raw:1-10") & (stored["id"] == 1978), "shape"].item()
    others = core_lesson.other_view_classes(stored, 1978, views.View(1, 10), shape)
    assert others  # the example: the class changes with the normalisation
    sentence = core_lesson.other_view_sentence(shape, views.View(1, 10), others, 10)
    at = open_page(page, SHIPPED, monkeypatch, {"run": "demo", "test": "1978"})
    assert widgets.md_escape(sentence) in [c.value for c in at.caption]
    lesson_page = BY_KEY["lesson"]
    (link,) = [el.proto for el in at.get("page_link") if el.proto.page == lesson_page.url_path]
    assert link.query_string == "step=4"
    assert link.label == "Why? Lesson step 4"


def test_the_exercise_says_the_class_changes_with_the_view_only_after_reveal(monkeypatch):
    """The guess on instance 1978 of the shipped demo, all checkpoints raw: no word on its other
    classes before Reveal (it would give the answer away), core's sentence after."""
    stored = pd.read_parquet(SHIPPED / "demo" / run_store.SHAPES_BY_VIEW)
    shape = stored.loc[(stored["view"] == "raw:1-10") & (stored["id"] == 1978), "shape"].item()
    others = core_lesson.other_view_classes(stored, 1978, views.View(1, 10), shape)
    sentence = widgets.md_escape(
        core_lesson.other_view_sentence(shape, views.View(1, 10), others, 10)
    )
    at = open_page("learn", SHIPPED, monkeypatch, {"run": "demo"})
    at.session_state["learn_guess"] = {
        **at.session_state["learn_guess"],
        **{"view": "raw:1-10", "id": 1978, "locked": None, "answer": None},
    }
    at.run()
    assert sentence not in [c.value for c in at.caption]
    at.radio(key="learn_choice").set_value("Z").run()
    at.button(key="learn_reveal").click().run()
    assert f"this curve is {shape}" in texts(at)
    assert sentence in [c.value for c in at.caption]


def test_no_sentence_when_every_stored_view_agrees(cache, monkeypatch):
    """The fake demo's classes are the same in every stored view: no sentence, no lesson link."""
    at = open_page("curves", cache, monkeypatch)
    assert "its shape depends on the view" not in texts(at)
    assert not [el for el in at.get("page_link") if el.proto.page == BY_KEY["lesson"].url_path]


def test_selected_point_reads_streamlit_selection_events():
    assert widgets.selected_point({"selection": {"pick": [{"id": 141}]}}) == 141
    assert widgets.selected_point({"selection": {"pick": {"id": [7]}}}) == 7
    assert widgets.selected_point({"selection": {"pick": []}}) is None
    assert widgets.selected_point(None) is None


# -- neighbourhoods ------------------------------------------------------------------------------


def test_neighbourhoods_map_and_nearest_table(cache, monkeypatch):
    inst = pd.read_parquet(cache / "demo" / "instances.parquet")
    at = open_page("neighbourhoods", cache, monkeypatch)
    test_id = int(qp(at, "test"))
    _, frames = one_chart(at, "embedding_map")
    pts = frame_with(frames, "x", "y", "role")
    assert len(pts) == len(inst)
    assert pts.loc[pts.role == "selected", "id"].tolist() == [test_id]
    assert (pts.role == "proponent").sum() == 10 and (pts.role == "opponent").sum() == 10
    near = at.dataframe[-1].value
    assert len(near) == 10 and near.distance.is_monotonic_increasing
    dist = np.load(cache / "demo" / "distances.npy")
    row = int(np.flatnonzero(inst[inst.split == "test"].id.to_numpy() == test_id)[0])
    assert near.distance.iloc[0] == pytest.approx(dist[row].min(), rel=1e-5)
    _, frames = one_chart(at, "mean_distance")
    shapes = pd.read_parquet(cache / "demo" / "shapes.parquet")
    assert len(frame_with(frames, "mean_distance")) == int((~shapes.correct).sum())
    spec, _ = one_chart(at, "embedding_map")
    assert "size" not in json.dumps([lay.get("encoding", {}) for lay in spec["layer"]])
    sizes = {
        json.dumps(lay["transform"]): lay["mark"]["size"]
        for lay in spec["layer"]
        if "transform" in lay
    }
    size_of = {role: next(v for k, v in sizes.items() if f"'{role}'" in k) for role in ROLES}
    assert size_of["selected"] > size_of["proponent"] > size_of["flipped"] > size_of["training"]
    assert spec["layer"][0]["encoding"]["color"]["legend"] is not None  # one legend of the roles
    # zoomed to the selection and its influencers, not forced through zero
    focus = pts[pts.role.isin(["selected", "proponent", "opponent"])]
    xd = spec["layer"][0]["encoding"]["x"]["scale"]["domain"]
    assert xd[0] <= focus.x.min() and focus.x.max() <= xd[1]
    assert xd[1] - xd[0] < pts.x.max() - pts.x.min()
    at.toggle(key="nb_zoom").set_value(False).run()
    spec, _ = one_chart(at, "embedding_map")
    assert "domain" not in spec["layer"][0]["encoding"]["x"]["scale"]
    assert spec["layer"][0]["encoding"]["x"]["scale"]["zero"] is False
    before = pts.set_index("id").x
    at.radio(key="nb_method").set_value("PCA").run()
    after = frame_with(one_chart(at, "embedding_map")[1], "x", "role").set_index("id").x
    assert not np.allclose(before.to_numpy(), after.loc[before.index].to_numpy())


def test_neighbourhoods_reports_the_stored_correlation(tmp_path, monkeypatch):
    run = factory.make_run(tmp_path, "demo")
    analysis = json.loads((run / "analysis.json").read_text())
    stored = {"n": 18, "spearman": 0.7777, "spearman_p": 0.0123, "pearson": 0.5, "pearson_p": 0.03}
    analysis["correlations"] = {"s_bulk_vs_mean_distance": {"all": {**stored, "reason": None}}}
    (run / "analysis.json").write_text(json.dumps(analysis))
    at = open_page("neighbourhoods", tmp_path, monkeypatch)
    shown = texts(at)
    assert "**+0.78** (p = 0.0123)" in shown  # analysis.json's value, not a recomputation


# -- noise sweep ---------------------------------------------------------------------------------


def test_noise_sweep_lines_band_and_threshold(cache, monkeypatch):
    at = open_page("sweep", cache, monkeypatch)
    table = pd.read_parquet(cache / "sweep-quick" / "sweep.parquet")
    spec, frames = one_chart(at, "sweep_final_test_accuracy")
    seeds = frame_with(frames, "seed", "final_test_accuracy")
    assert len(seeds) == len(table)  # one point per (rate, seed) cell
    band = frame_with(frames, "mean", "min", "max")
    assert len(band) == table.flip_rate.nunique()
    assert any(layer.get("mark", {}).get("type") == "rule" for layer in spec["layer"])  # threshold
    assert charts_named(at, "sweep_train_loss_observed")
    at.radio(key="sweep_x").set_value("number of flipped labels").run()
    spec, _ = one_chart(at, "sweep_final_test_accuracy")
    assert "flip_count" in json.dumps(spec["layer"][1]["encoding"]["x"])


def test_noise_sweep_empty_state_shows_the_command(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "only-run", n_train=40, n_test=6, n_flips=2)
    at = open_page("sweep", tmp_path, monkeypatch)
    assert "python -m core sweep --preset quick" in texts(at)
    assert not at.error


# -- cleaning lab --------------------------------------------------------------------------------


def test_cleaning_lab_compares_detectors_and_hides_flips(cache, monkeypatch):
    at = open_page("cleaning", cache, monkeypatch)
    detection = json.loads((cache / "demo" / "detection.json").read_text())
    _, frames = one_chart(at, "recall")
    curves = frame_with(frames, "detector", "fraction", "recall")
    assert set(curves.detector) == set(detection["detectors"])
    table = at.dataframe[0].value
    assert len(table) == len(detection["detectors"]) + 1  # + the random baseline row
    queue = at.dataframe[1].value
    assert "flipped" not in queue.columns
    at.toggle(key="clean_reveal").set_value(True).run()
    revealed = at.dataframe[1].value
    # the answer is the second column, beside the rank, not off-screen behind the reason
    assert list(revealed.columns[:2]) == ["rank", "flipped"]
    _, frames = one_chart(at, "cleaning")
    rows = json.loads((cache / "demo" / "cleaning" / "results.json").read_text())["rows"]
    shown = frame_with(frames, "arm", "mean").set_index(["action", "arm"])["mean"]
    expected = core_cleaning.intervention_arms(rows).set_index(["action", "arm"])["mean"]
    assert shown.sort_index().to_dict() == expected.sort_index().to_dict()
    for reading in core_cleaning.intervention_effects(rows)["reading"]:
        assert reading in texts(at).replace("\\", "")  # shown escaped as Markdown
    # labels are Markdown: file names are shown escaped (backslashes before punctuation)
    names = {b.proto.label.replace("\\", "") for b in at.get("download_button")}
    assert (
        "review_queue_self_influence.csv" in names and "Download this review queue (CSV)" in names
    )


def test_cleaning_lab_without_detect_stage_shows_the_command(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "demo", stages=("data", "train", "tracin", "analyze"))
    at = open_page("cleaning", tmp_path, monkeypatch)
    assert "python -m core detect" in texts(at)
    assert not at.error


def test_cleaning_lab_without_interventions_points_to_a_run_that_ships_them(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "demo", cleaning=False)
    factory.make_run(tmp_path, "teach", cleaning=True)
    at = open_page("cleaning", tmp_path, monkeypatch, {"run": "demo"})
    assert "No intervention has been run on this run yet" in texts(at)
    links = [el for el in at.get("page_link") if "teach" in el.proto.label]
    assert links and "run=teach" in links[0].proto.query_string
    at = open_page("cleaning", tmp_path, monkeypatch, {"run": "teach"})
    assert "No intervention has been run" not in texts(at)


# -- empty, incomplete and corrupted stores ------------------------------------------------------


@pytest.mark.parametrize("page", list(PAGES))
def test_empty_cache_gives_a_helpful_message(page, tmp_path, monkeypatch):
    at = open_page(page, tmp_path / "nothing-here", monkeypatch)
    assert not at.error
    if page not in ("study",):
        assert "python -m core" in texts(at)


@pytest.mark.parametrize("page", ["curves", "shape", "neighbourhoods"])
def test_run_without_tracin_names_the_missing_stage(page, tmp_path, monkeypatch):
    run = factory.make_run(tmp_path, "demo", stages=("data", "train"), status="running")
    # A local run has its checkpoints and tokenizer (a shipped one would be told to recreate).
    for entry in json.loads((run / "manifest.json").read_text())["checkpoints"]:
        (run / entry["path"]).mkdir(parents=True, exist_ok=True)
    (run / "tokenizer").mkdir()
    at = open_page(page, tmp_path, monkeypatch)
    assert "python -m core analyze" in texts(at) or "python -m core tracin" in texts(at)
    assert not at.error


@pytest.mark.parametrize("how", ["manifest", "instances", "tracin", "shapes"])
@pytest.mark.parametrize("page", ["home", "curves", "shape", "neighbourhoods", "cleaning"])
def test_corrupted_run_gives_a_sentence_not_a_traceback(page, how, tmp_path, monkeypatch):
    factory.corrupt_run(tmp_path, "broken", how=how)
    at = open_page(page, tmp_path, monkeypatch, {"run": "broken"})
    assert at.selectbox(key="picker_run").value == "broken"
    if (
        how in ("tracin", "shapes")
        and page in ("home", "cleaning")
        or (how == "tracin" and page == "shape")
    ):
        return  # these pages do not read that file
    errors = " ".join(e.value for e in at.error)
    assert "cannot be shown" in errors or "could not be read" in errors, texts(at)
    assert "Traceback" not in errors


# -- run a study ---------------------------------------------------------------------------------

FAKE_CLI = f"{sys.executable} -c \"import sys, time; print('fake core', *sys.argv[1:], flush=True); time.sleep(30)\""


def test_study_start_refuse_second_and_cancel(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    req = study.StudyRequest(name="s1", preset="quick", flip_rate=0.05, seed=3)
    j = study.start(tmp_path, req)
    try:
        assert j.state() == "running"
        with pytest.raises(AtlasError, match="already running"):
            study.start(tmp_path, req)
        deadline = time.time() + 10
        while "fake core" not in jobs.tail(j.log_file) and time.time() < deadline:
            time.sleep(0.1)
        log = jobs.tail(j.log_file)
        assert "run --preset quick --name s1" in log and "--flip-rate 0.05" in log
        assert jobs.cancel(j)
        deadline = time.time() + 10
        while j.alive() and time.time() < deadline:
            time.sleep(0.1)
        assert j.state() == "cancelled"
    finally:
        jobs.cancel(j)


def test_study_refuses_a_complete_run_name_and_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    factory.make_run(tmp_path, "done", n_train=40, n_test=6, n_flips=2)
    with pytest.raises(AtlasError, match="already exists"):
        study.start(tmp_path, study.StudyRequest(name="done"))
    for bad in ("", "../escape", ".hidden", "a b", "x" * 80):
        with pytest.raises(AtlasError):
            study.build_command(study.StudyRequest(name=bad), tmp_path)


def test_study_page_starts_a_job_and_survives_a_reload(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    at = open_page("study", tmp_path, monkeypatch)
    at.text_input(key="study_name").set_value("from-page").run()
    assert "--name from-page" in texts(at) and "--detect" in texts(at)
    at.button(key="study_start").click().run()
    assert not at.exception
    j = jobs.job(tmp_path, "from-page")
    try:
        assert j.alive()
        reloaded = open_page("study", tmp_path, monkeypatch)  # a new session: state read from disk
        assert reloaded.selectbox(key="study_job").value == "from-page"
        assert "running" in [m.value for m in reloaded.metric]
        reloaded.text_input(key="study_name").set_value("from-page").run()
        reloaded.button(key="study_start").click().run()  # the same name again
        assert any("already running" in e.value for e in reloaded.error)
    finally:
        jobs.cancel(j)


def test_study_page_upload_columns_and_validation(tmp_path, monkeypatch):
    rows = [{"stars": 1 + i % 5, "レビュー": f"とても良い商品です {i}"} for i in range(60)]
    raw = pd.DataFrame(rows).to_csv(index=False).encode()
    at = open_page("study", tmp_path, monkeypatch)
    at.radio(key="study_source").set_value("upload a file").run()
    at.file_uploader(key="study_upload").upload("rakuten.csv", raw, "text/csv").run()
    assert not at.exception
    assert at.selectbox(key="study_text_col").value == "レビュー"  # guessed: the longest strings
    # five star values are not two classes: refused before anything starts
    assert any("needs exactly two" in e.value for e in at.error)
    assert at.button(key="study_start").disabled
    at.radio(key="study_label_mode").set_value("a rating column (thresholds)").run()
    assert not at.error and not at.button(key="study_start").disabled
    shown = texts(at)
    assert "--rating-col stars --pos-min 4 --neg-max 2" in shown
    assert "/.uploads/" in shown and "--text-col" in shown
    saved = list((tmp_path / ".uploads").glob("*_rakuten.csv"))
    assert len(saved) == 1 and saved[0].read_bytes() == raw


def test_readonly_host_hides_uploads_and_job_starts(cache, tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_READONLY, "1")
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    at = open_page("study", tmp_path, monkeypatch)
    assert not at.get("file_uploader") and not at.button
    assert "read-only demo" in texts(at)
    at = open_page("sweep", cache, monkeypatch)
    assert not [b for b in at.button if b.key == "sweep_start"]
    assert charts_named(at, "sweep_final_test_accuracy")  # the stored sweep is still shown
    with pytest.raises(AtlasError, match="read-only"):
        study.start(tmp_path, study.StudyRequest(name="nope"))
    assert not (tmp_path / jobs.JOBS_DIR).exists()


def test_job_cap_queues_the_next_job_and_starts_it_when_a_slot_frees(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    monkeypatch.delenv(jobs.ENV_MAX_JOBS, raising=False)  # default: one at a time
    first = study.start(tmp_path, study.StudyRequest(name="first"))
    try:
        second = study.start(tmp_path, study.StudyRequest(name="second"))
        assert first.state() == "running" and second.state() == "queued"
        assert [j.name for j in jobs.queued_jobs(tmp_path)] == ["second"]
        with pytest.raises(AtlasError, match="already running or queued"):
            study.start(tmp_path, study.StudyRequest(name="second"))
        assert jobs.dispatch(tmp_path) == []  # no free slot yet
        at = open_page("study", tmp_path, monkeypatch, {"job": "second"})
        assert "queued" in [m.value for m in at.metric]
        assert "place 1 of 1 in the queue" in texts(at)
        assert "1 of at most 1 job(s) running" in texts(at)
        jobs.cancel(first)
        deadline = time.time() + 10
        while first.alive() and time.time() < deadline:
            time.sleep(0.1)
        assert jobs.dispatch(tmp_path) == ["second"]
        assert second.state() == "running" and not jobs.queued_jobs(tmp_path)
    finally:
        jobs.cancel(first)
        jobs.cancel(jobs.job(tmp_path, "second"))


def test_upload_form_refuses_column_names_read_as_options(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    rows = [
        {"--cache=x": f"a long review text number {i}", "y": "pos" if i % 2 else "neg"}
        for i in range(40)
    ]
    at = open_page("study", tmp_path, monkeypatch)
    at.radio(key="study_source").set_value("upload a file").run()
    at.file_uploader(key="study_upload").upload(
        "evil.csv", pd.DataFrame(rows).to_csv(index=False).encode(), "text/csv"
    ).run()
    assert at.selectbox(key="study_text_col").value == "--cache=x"
    assert any("starts with" in e.value for e in at.error)
    assert at.button(key="study_start").disabled


def test_study_page_says_when_the_host_has_no_compute_stack(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.delenv(jobs.ENV_STUDY_CMD, raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "transformers") else real(name, *a),
    )
    assert "no compute stack" in study.compute_stack()
    at = open_page("study", tmp_path, monkeypatch)
    assert "no compute stack" in texts(at)
    assert at.button(key="study_start").disabled


def test_noise_sweep_page_starts_a_sweep_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    at = open_page("sweep", tmp_path, monkeypatch)
    at.text_input(key="sweep_name").set_value("my-sweep").run()
    shown = texts(at)
    assert "sweep --preset quick --name my-sweep" in shown and "--seeds 3" in shown
    at.button(key="sweep_start").click().run()
    assert not at.exception
    j = jobs.job(tmp_path, "my-sweep")
    try:
        assert j.alive() and j.kind() == "sweep"
        again = open_page("sweep", tmp_path, monkeypatch)  # a new session finds it on disk
        assert again.selectbox(key="sweep_job").value == "my-sweep"
        assert "running" in [m.value for m in again.metric]
        assert "fake core sweep" in jobs.tail(j.log_file) or j.alive()
    finally:
        jobs.cancel(j)


def test_sweep_progress_counts_the_trained_cells(tmp_path):
    from core.storage import store

    sweep = tmp_path / "sw"
    store.update_manifest(
        sweep, kind="sweep", status="running", flip_rates=[0.0, 0.1], seeds=[0, 1]
    )
    factory.make_run(
        sweep / "cells", "rate-0_seed-0", n_train=40, n_test=6, n_flips=2, stages=("data", "train")
    )
    from core.storage import locks

    with locks.hold(sweep):  # 'running' only while a live process holds its lock
        prog = jobs.sweep_progress(sweep)
    assert (prog["cells_done"], prog["cells_total"], prog["status"]) == (1, 4, "running")
    assert jobs.sweep_progress(sweep)["status"] == "interrupted"
    assert jobs.sweep_progress(tmp_path / "absent") == {}


def test_study_command_for_an_uploaded_file():
    req = study.StudyRequest(
        name="mine",
        data_file="/c/.uploads/x.tsv",
        text_col="レビュー",
        rating_col="評価",
        pos_min=4,
        neg_max=2,
        dataset=None,
    )
    cmd = study.build_command(req, Path("/c"))
    assert cmd[cmd.index("--text-col") + 1] == "レビュー"
    assert cmd[cmd.index("--rating-col") + 1] == "評価"
    assert cmd[cmd.index("--dataset") + 1] == "/c/.uploads/x.tsv"  # the CLI's file option
    assert cmd[-4:] == ["--pos-min", "4", "--neg-max", "2"]


def test_upload_is_parsed_as_data_and_validated(tmp_path, monkeypatch):
    rows = [
        {"review": f"text number {i}", "stars": 1 + i % 5, "y": "pos" if i % 2 else "neg"}
        for i in range(40)
    ]
    csv = pd.DataFrame(rows).to_csv(index=False).encode()
    df = study.parse_upload(csv, "reviews.csv")
    assert study.guess_text_column(df) == "review"
    problems, summary = study.validate_table(df, "review", label_col="y")
    assert problems == [] and summary["kept"] == 40
    problems, summary = study.validate_table(df, "review", rating_col="stars", pos_min=4, neg_max=2)
    assert problems == [] and summary["dropped_between"] == 8
    assert study.validate_table(df, "review", label_col="stars")[0]  # five classes
    bad = df.assign(stars=df.stars.astype(str).where(df.index != 3, "three"))
    assert "non-numeric" in " ".join(
        study.validate_table(bad, "review", rating_col="stars", pos_min=4, neg_max=2)[0]
    )
    jsonl = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()
    assert len(study.parse_upload(jsonl, "r.jsonl")) == 40
    with pytest.raises(AtlasError, match="UTF-8"):
        study.parse_upload(b"text,label\n\xff\xfe,1\n", "bad.csv")
    with pytest.raises(AtlasError, match=r"\.csv, \.tsv or \.jsonl"):
        study.parse_upload(csv, "evil.pkl")
    monkeypatch.setenv(study.ENV_MAX_UPLOAD_MB, "1")

    with pytest.raises(AtlasError, match="limit is 1 MB"):
        study.parse_upload(b"a,b\n" + b"x,1\n" * 400_000, "big.csv")
    saved = study.save_upload(tmp_path, csv, "my reviews.csv")
    assert saved.read_bytes() == csv and saved.parent.name == ".uploads"


def test_the_upload_form_says_what_core_run_would_say(tmp_path):
    """One definition (core.inputs.datasets): the form and `core run` agree on every file."""
    from core.inputs.datasets import load_user_file

    def both(header: str, rows: list[str], name: str, encoding: str = "utf-8", **cols):
        """Whether core and the form accept the CSV file ``header`` + ``rows``."""
        raw = "\n".join([header, *rows]).encode(encoding)
        path = tmp_path / name
        path.write_bytes(raw)
        try:
            load_user_file(path, **cols)
            core_ok = True
        except AtlasError:
            core_ok = False
        try:
            df = study.parse_upload(raw, name)
            problems, _ = study.validate_table(df, **cols)
            form_ok = not problems
        except AtlasError:
            form_ok = False
        return core_ok, form_ok

    # A 15/5 split: too few of one class for the stratified split, in both.
    rows = [f"review {i},{'pos' if i < 15 else 'neg'}" for i in range(20)]
    assert both("text,y", rows, "a.csv", text_col="text", label_col="y") == (False, False)
    # "NA" is a label value like any other (a third class), in both.
    rows = [f"review {i},{['pos', 'neg', 'NA'][i % 3]}" for i in range(90)]
    assert both("text,y", rows, "b.csv", text_col="text", label_col="y") == (False, False)
    # Japanese cp932 text is read by both.
    rows = [f"レビュー{i}です,{'良い' if i % 2 else '悪い'}" for i in range(60)]
    japanese = both("本文,評価", rows, "c.csv", "cp932", text_col="本文", label_col="評価")
    assert japanese == (True, True)


# -- chart builders and helpers, without Streamlit ----------------------------------------------


def test_recall_curve_and_review_queue():
    flipped = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0], bool)
    perfect = flipped.astype(float)
    rc = cleaning_screen.recall_frame(perfect, flipped, "d")  # core.analysis.metrics.recall_curve
    assert rc.recall.iloc[-1] == 1.0 and rc.recall.iloc[0] == 0.0
    assert rc.loc[rc.fraction >= 0.2, "recall"].min() == 1.0
    train = pd.DataFrame(
        {
            "id": range(10),
            "text": list("abcdefghij"),
            "label": 0,
            "observed_label": [1, 0] * 5,
            "flipped": flipped,
        }
    )
    det = pd.DataFrame({"id": range(10), "d": perfect})
    q = cleaning_screen.review_queue(det, "d", train, 2, ["neg", "pos"])
    assert q.flipped.all() and list(q.suggested_label) == ["neg", "neg"]
    assert list(q.columns[:3]) == ["rank", "flipped", "id"]


def test_app_code_never_imports_heavy_libraries():
    files = [REPO / "app.py", *REPO.glob("pages/*.py"), *REPO.glob("ui/**/*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad = {n.split(".")[0] for n in names} & FORBIDDEN
            assert not bad, f"{path.name} imports {bad}"
    code = "import sys; import ui.screens.home, ui.screens.curves, ui.screens.study; print(sorted(set(sys.modules) & {'torch', 'transformers', 'umap', 'fugashi', 'ray'}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_run_view_and_test_choices_survive_a_page_switch(tmp_path, monkeypatch):
    """Streamlit drops a widget's value when its page is left; the pickers keep theirs."""
    store = factory.make_store(tmp_path)
    runs = sorted(p.name for p in store.iterdir() if (p / "manifest.json").exists())
    at = open_page("curves", store, monkeypatch)
    other = next(
        r
        for r in at.sidebar.selectbox(key="picker_run").options
        if r != at.sidebar.selectbox(key="picker_run").value
    )
    assert other in runs
    at.sidebar.selectbox(key="picker_run").set_value(other).run()
    at.switch_page(PAGES["shape"]).run()
    assert at.sidebar.selectbox(key="picker_run").value == other
    at.switch_page(PAGES["curves"]).run()
    assert at.sidebar.selectbox(key="picker_run").value == other
    norm = at.sidebar.selectbox(key="view_normalisation")
    assert "relative" in norm.options
    norm.set_value("relative").run()
    at.switch_page(PAGES["shape"]).run()
    assert at.sidebar.selectbox(key="view_normalisation").value == "relative"


def test_neighbourhoods_follow_the_view(cache, monkeypatch):
    """The map's proponents, the nearest table and the correlation use the sidebar's view."""
    at = open_page("neighbourhoods", cache, monkeypatch)
    at.sidebar.selectbox(key="view_normalisation").set_value("relative").run()
    assert not at.exception
    table = at.dataframe[-1].value
    assert "relative TracIn score" in table.columns
    assert "· relative" in texts(at)


def test_study_page_shows_task_progress_per_worker(tmp_path, monkeypatch):
    """The bar over a stage's tasks and each worker's throughput, from progress.json."""
    from core.execution.executors import PROGRESS
    from core.storage import store

    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    j = study.start(tmp_path, study.StudyRequest(name="on-ray"))
    try:
        report = {
            "stage": "tracin",
            "executor": "ray",
            "state": "running",
            "done": 3,
            "total": 9,
            "workers": [
                {"worker": "node-a:11", "tasks": 2, "seconds_per_task": 1.5, "tasks_per_min": 4.0},
                {"worker": "node-b:12", "tasks": 1, "seconds_per_task": 2.5, "tasks_per_min": 2.0},
            ],
        }
        store.write_json(tmp_path / "on-ray" / PROGRESS, report)
        assert jobs.task_progress(tmp_path / "on-ray")["done"] == 3
        assert jobs.task_progress(tmp_path / "absent") == {}
        at = open_page("study", tmp_path, monkeypatch)
        assert not at.exception
        bars = [el.proto.text for el in at.get("progress")]
        assert "tracin on ray: 3 of 9 tasks (running)" in bars
        table = next(
            df.value for df in at.dataframe if "worker" in getattr(df.value, "columns", [])
        )
        assert list(table["worker"]) == ["node-a:11", "node-b:12"]
        assert list(table["tasks per min"]) == [4.0, 2.0]
    finally:
        jobs.cancel(j)


def test_study_form_offers_the_executor(tmp_path, monkeypatch):
    at = open_page("study", tmp_path, monkeypatch)
    assert "ray" in at.selectbox(key="study_executor").options or not study.executor_choices()[2:]
    at.selectbox(key="study_executor").set_value("processes").run()
    at.number_input(key="study_workers").set_value(2).run()
    assert "--executor processes --workers 2" in texts(at)


# -- how exact are the scores (the stored error study) --------------------------------------------


def test_home_shows_the_stored_error_study(cache, monkeypatch):
    at = open_page("home", cache, monkeypatch)
    assert any(e.label == "How exact are the scores" for e in at.expander)
    study = json.loads((cache / "demo" / "error_study.json").read_text())
    table = next(d.value for d in at.dataframe if "median Spearman" in d.value.columns)
    assert list(table["method"]) == list(study["methods"])
    fact = table.set_index("method").loc["factorized:16"]
    assert fact["median Spearman"] == pytest.approx(
        study["methods"]["factorized:16"]["spearman_median"]
    )
    assert "The study was made with: python \\-m core error\\-study demo" in texts(at)
    # The fake run has no checkpoints: the command to recompute it names a full copy.
    assert any(c.value.startswith("python -m core error-study ") for c in at.code)


def test_home_without_an_error_study_shows_the_command(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "demo")
    at = open_page("home", tmp_path, monkeypatch)
    assert not at.exception
    assert "python -m core error-study" in texts(at)
    assert not any("median Spearman" in d.value.columns for d in at.dataframe)


# -- Learn the shapes: the guessing exercise ------------------------------------------------------


def _guess_state(at: AppTest) -> dict:
    return at.session_state["learn_guess"]


def test_exercise_draws_every_class_from_a_view_where_it_occurs(cache):
    from ui import compute

    shapes = pd.read_parquet(cache / "demo" / "shapes.parquet")
    by_view = pd.read_parquet(cache / "demo" / "shapes_by_view.parquet")
    pool = compute.exercise_pool(shapes, "raw:1-3", by_view)
    assert not pool.duplicated(["view", "id"]).any()
    # Only the stored views hold any Z: the draw still finds them.
    no_z = pool[(pool["view"] == "raw:1-3") & (pool["shape"] != "Z")]
    pool = pd.concat([no_z, pool[pool["view"] != "raw:1-3"]], ignore_index=True)
    rng = np.random.default_rng(0)
    seen = set()
    drawn = [compute.draw_exercise(pool, rng) for _ in range(30)]
    for key, test_id in drawn:
        row = pool[(pool["view"] == key) & (pool["id"] == test_id)]
        assert len(row) == 1  # a curve that exists, under the view it is drawn from
        seen.add(row["shape"].iloc[0])
    assert seen == {"S", "Z", "backslash"}
    assert compute.draw_exercise(pool, rng, avoid=drawn[0]) != drawn[0]
    one = pool.head(1)
    assert compute.draw_exercise(one, rng, avoid=(one["view"][0], one["id"][0])) == (
        one["view"][0],
        int(one["id"][0]),
    )


def test_exercise_starts_unanswered_locks_at_reveal_and_keeps_score(cache, monkeypatch):
    at = open_page("learn", cache, monkeypatch)
    radio = at.radio(key="learn_choice")
    assert radio.value is None  # nothing preselected
    assert at.button(key="learn_reveal").disabled  # no reveal without a guess
    state = _guess_state(at)
    assert "This curve is shown under checkpoint" in texts(at)  # which view it comes from
    shapes = pd.read_parquet(cache / "demo" / "shapes_by_view.parquet")
    default = pd.read_parquet(cache / "demo" / "shapes.parquet").assign(view="raw:1-3")
    stored = pd.concat([default, shapes]).drop_duplicates(["view", "id"])
    answer = stored[(stored["view"] == state["view"]) & (stored["id"] == state["id"])]
    answer = answer["shape"].iloc[0]
    wrong = next(s for s in ("S", "Z", "backslash") if s != answer)
    at.radio(key="learn_choice").set_value(wrong).run()
    at.button(key="learn_reveal").click().run()
    assert any("Not quite" in str(w.value) for w in at.warning)
    assert f"this curve is {answer}" in texts(at)
    assert at.radio(key="learn_choice").disabled and at.button(key="learn_reveal").disabled
    assert "Score this session: 0 of 1" in texts(at)
    # A changed guess after Reveal cannot turn 'Not quite' into 'Right' (the browser cannot
    # change the disabled radio; the session's value is forced here as if it could).
    at.session_state["learn_choice"] = answer
    at.run()
    assert not at.success and any("Not quite" in str(w.value) for w in at.warning)
    assert "Score this session: 0 of 1" in texts(at)
    # The next curve is another one, unanswered, and the score carries on.
    before = (state["view"], state["id"])
    at.button(key="learn_next").click().run()
    state = _guess_state(at)
    assert (state["view"], state["id"]) != before
    assert at.radio(key="learn_choice").value is None and not at.warning
    answer = stored[(stored["view"] == state["view"]) & (stored["id"] == state["id"])]
    at.radio(key="learn_choice").set_value(answer["shape"].iloc[0]).run()
    at.button(key="learn_reveal").click().run()
    assert at.success and "Score this session: 1 of 2" in texts(at)


def test_exercise_never_opens_on_the_same_curve_twice(cache, monkeypatch):
    firsts = []
    for _ in range(3):
        state = _guess_state(open_page("learn", cache, monkeypatch))
        firsts.append((state["view"], state["id"]))
    assert firsts[0] != firsts[1] and firsts[1] != firsts[2]


# -- the influence view in the URL, one default test instance --------------------------------------


def test_a_share_link_reproduces_the_view_run_and_test(cache, monkeypatch):
    at = open_page("shape", cache, monkeypatch)
    assert "view" not in at.query_params  # the default view keeps the link short
    at.sidebar.selectbox(key="view_normalisation").set_value("cosine").run()
    at.sidebar.slider(key="view_range").set_value((2, 3)).run()
    shapes = pd.read_parquet(cache / "demo" / "shapes.parquet")
    chosen = str(int(shapes.id.iloc[-1]))
    at.sidebar.selectbox(key="picker_test_demo").set_value(chosen).run()
    link = {k: qp(at, k) for k in ("run", "test", "view")}
    assert link == {"run": "demo", "test": chosen, "view": "cosine:2-3"}
    sent = texts(at)
    for page in ("shape", "curves", "neighbourhoods"):  # a fresh session from the link
        fresh = open_page(page, cache, monkeypatch, link)
        assert fresh.sidebar.selectbox(key="view_normalisation").value == "cosine"
        assert fresh.sidebar.slider(key="view_range").value == (2, 3)
        assert fresh.selectbox(key="picker_test_demo").value == chosen
        assert "checkpoints 2–3 · cosine" in texts(fresh)
        assert qp(fresh, "view") == "cosine:2-3"
        if page == "shape":
            assert texts(fresh) == sent  # the same page, exactly what the sender saw


def test_a_link_to_a_view_the_run_lacks_says_so(cache, monkeypatch):
    for bad in ("cosine:2-9", "sideways:1-2", "nonsense"):
        at = open_page("curves", cache, monkeypatch, {"view": bad})
        assert any("cannot show" in str(w.value) for w in at.warning), bad
        assert at.sidebar.selectbox(key="view_normalisation").value == "raw"
        assert "view" not in at.query_params


def test_every_page_opens_on_the_same_default_test_instance(cache, monkeypatch):
    shapes = pd.read_parquet(cache / "demo" / "shapes.parquet")
    want = str(int(shapes.loc[~shapes.correct, "id"].min()))
    for page in ("curves", "shape", "neighbourhoods"):
        at = open_page(page, cache, monkeypatch)
        assert at.selectbox(key="picker_test_demo").value == want, page
        assert qp(at, "test") == want


def test_score_curves_says_how_its_two_checkpoint_controls_differ(cache, monkeypatch):
    at = open_page("curves", cache, monkeypatch)
    assert at.slider(key="view_range") and at.select_slider(key="train_ckpt")
    side = " ".join(str(c.value) for c in at.sidebar.caption)
    assert "*Checkpoints summed* sets the view of every chart on this page except" in side
    assert "*Checkpoint c* moves only this section" in texts(at)


def test_job_picker_drops_running_once_the_job_has_finished(tmp_path, monkeypatch):
    """The browser keeps the label it last got as the picker's value; the page must send the
    fresh one (with the job's new state) without a reload."""
    monkeypatch.setenv(jobs.ENV_STUDY_CMD, FAKE_CLI)
    at = open_page("study", tmp_path, monkeypatch)
    at.text_input(key="study_name").set_value("finishing").run()
    at.button(key="study_start").click().run()
    j = jobs.job(tmp_path, "finishing")
    try:
        stale = "finishing · run · running"
        assert at.selectbox(key="study_job").options == [stale]
        jobs.cancel(j)
        deadline = time.time() + 10
        while j.alive() and time.time() < deadline:
            time.sleep(0.1)
        at.selectbox(key="study_job").set_value(stale)  # what the browser sends back
        at.run()
        picker = at.selectbox(key="study_job")
        assert picker.value == "finishing"
        assert picker.options == ["finishing · run · cancelled"]
        assert picker.proto.set_value and picker.proto.raw_value == "finishing · run · cancelled"
        assert "running" not in [m.value for m in at.metric]
    finally:
        jobs.cancel(j)


def test_a_one_epoch_run_is_told_it_has_one_checkpoint(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "one-epoch", epochs=1, n_train=40, n_test=6, n_flips=2)
    at = open_page("curves", tmp_path, monkeypatch)
    shown = texts(at)
    assert "This run saved one checkpoint (it trained for one epoch)" in shown
    assert "stores no per-checkpoint views" not in shown and "--force" not in shown


def test_captions_of_stacked_charts_do_not_say_left_or_right(cache, monkeypatch):
    for page in ("curves", "shape", "learn", "neighbourhoods", "home"):
        shown = texts(open_page(page, cache, monkeypatch))
        assert "Left:" not in shown and "Right:" not in shown, page
    assert "First: the bulk S of this curve" in texts(open_page("curves", cache, monkeypatch))


# -- robust axes ---------------------------------------------------------------------------------


def test_robust_axis_clips_only_when_a_few_scores_dwarf_the_rest():
    from ui import compute

    rng = np.random.default_rng(0)
    u = np.linspace(1, -1, 1600)
    assert compute.robust_axis(u) is None  # backslash
    assert compute.robust_axis(u**5) is None  # S: its ends are the point, never clipped
    assert compute.robust_axis(np.tanh(6 * u)) is None  # Z
    assert compute.robust_axis(np.sort(rng.standard_t(3, 1600))) is None  # heavy tails
    assert compute.robust_axis(np.ones(50)) is None and compute.robust_axis([1.0, 2.0]) is None
    v = np.r_[rng.normal(0, 1, 797), -800.0, -650.0, 2500.0]
    clip = compute.robust_axis(v)
    q1, q99 = np.percentile(v, [1, 99])
    assert clip.lo == pytest.approx(q1 - 0.25 * (q99 - q1))
    assert clip.hi == pytest.approx(q99 + 0.25 * (q99 - q1))
    assert (clip.n_below, clip.n_above) == (2, 1)
    assert "2 point(s) below and 1 above" in compute.clip_note(clip)


@pytest.fixture(scope="module")
def outlier_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("outliers")
    factory.make_run(cache, "ja-like", n_train=400, outliers=400.0)  # 3 of 400: under 1 %
    return cache


def test_curves_with_outliers_get_a_clipped_marked_axis_and_say_so(outlier_cache, monkeypatch):
    from ui import compute

    at = open_page("curves", outlier_cache, monkeypatch)
    test_id = int(qp(at, "test"))
    spec, frames = one_chart(at, "score_curve")
    stored = pd.read_parquet(outlier_cache / "ja-like" / "curves.parquet")
    clip = compute.robust_axis(stored.loc[stored.test_id == test_id, "score"].to_numpy())
    assert clip is not None and clip.n_below == 3
    domains = [layer["encoding"]["y"].get("scale", {}).get("domain") for layer in spec["layer"]]
    assert [clip.lo, clip.hi] in domains
    marked = frame_with(frames, "clipped", "shown")
    edge = marked[marked["clipped"] != ""]
    assert len(edge) == 3 and np.allclose(edge["shown"], clip.lo)  # on the edge, marked
    assert (edge["score"] < clip.lo).all()  # the tooltip keeps the real score
    shown = texts(at)
    assert compute.clip_note(clip) in shown
    assert "panels, so each one's y axis is clipped" in shown
    # The panels, too, draw their curve within the robust range.
    for spec, _ in charts_named(at, "curve_panel"):
        assert "(axis clipped)" in json.dumps(spec)


def test_curves_without_outliers_keep_the_full_axis(cache, monkeypatch):
    at = open_page("curves", cache, monkeypatch)
    spec, _ = one_chart(at, "score_curve")
    assert "(axis clipped)" not in json.dumps(spec) and "y axis is clipped" not in texts(at)


def test_the_app_reads_run_store_names_and_columns_from_core():
    from core.storage import store
    from ui import data

    names = ("SWEEP_TABLE", "SWEEP_EPOCHS", "CLEANING_RESULTS", "INSTANCE_COLUMNS")
    names += ("SHAPES_COLUMNS", "CURVES_COLUMNS", "COORDS_COLUMNS", "SWEEP_COLUMNS")
    for name in names:
        assert getattr(data, name) is getattr(store, name), name


def test_only_the_page_registry_names_page_scripts():
    for path in [*REPO.glob("ui/**/*.py"), REPO / "app.py"]:
        if path == REPO / "ui" / "pages.py":
            continue
        assert '"pages/' not in path.read_text("utf-8"), path
