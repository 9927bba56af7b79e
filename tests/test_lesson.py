"""The lesson's numbers (core/analysis/lesson.py) and its page under AppTest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import runstore_factory as factory
from page_harness import open_page, texts

from core.analysis import lesson, replication, shapes, views
from core.storage import store
from ui import widgets


def table(rows):
    return pd.DataFrame(rows, columns=["id", "correct", "shape", "s_bulk", "end_ratio"])


def test_examples_follow_the_written_rule():
    t = table(
        [
            (1, False, "S", 0.30, 90),
            (2, False, "S", 0.50, 80),
            (3, False, "S", 0.40, 85),  # the median S of the misclassified: chosen
            (4, True, "S", 0.40, 10),
            (5, True, "Z", -0.20, 30),  # no misclassified Z: taken from the correct ones
            (6, False, "backslash", 0.1, 60),
        ]
    )
    ex = lesson.class_examples(t)
    assert ex["S"]["id"] == 3 and ex["S"]["misclassified"]
    assert ex["Z"]["id"] == 5 and not ex["Z"]["misclassified"]
    assert ex["backslash"]["id"] == 6


@pytest.mark.parametrize(
    ("shape", "er", "agrees"),
    [("S", 88, True), ("S", 52, False), ("Z", 35, True), ("Z", 56, False), ("backslash", 70, True)],
)
def test_placement_sentences_say_whether_the_paper_holds(shape, er, agrees):
    sentence = lesson.placement_sentence(shape, er)
    assert f"{er} %" in sentence
    assert ("as the paper says" in sentence) == agrees
    assert ("not where the paper says" in sentence) == (not agrees)


def test_the_trace_recomputes_each_cumulative_view(tmp_path):
    run = factory.make_run(tmp_path, "r", epochs=3)
    stack = np.load(run / store.TRACIN_PER_CHECKPOINT)
    inst = store.load_instances(run)
    flipped = inst[inst.split == "train"].flipped.to_numpy(bool)
    tn, sn = np.load(run / store.GRAD_NORMS_TRAIN), np.load(run / store.GRAD_NORMS_TEST)
    trace = lesson.view_trace(stack, flipped, 2, tn, sn, [0.6, 0.3, 0.1])
    assert len(trace) == 6
    for r in trace.itertuples():
        scores = views.view_scores(stack, views.View(1, r.checkpoint, r.normalisation), tn, sn)[2]
        cls = shapes.classify(scores, flipped)
        assert r.s_bulk == pytest.approx(float(cls["s_bulk"][0]), abs=0)
        assert r.shape == cls["shape"][0]
    assert "0.60" in lesson.trace_sentence(trace) and "0.10" in lesson.trace_sentence(trace)


def test_the_lesson_walks_five_steps_and_its_numbers_are_cores(tmp_path, monkeypatch):
    run = factory.make_run(tmp_path, "demo", n_test=30, epochs=3)
    at = open_page("lesson", tmp_path, monkeypatch)
    assert "Step 1 of 5" in texts(at)
    next_button = next(b for b in at.button if b.key == "lesson_next")
    assert next_button.disabled  # the question comes first
    radio = next(r for r in at.radio if r.key == "lesson_q1")
    assert radio.value is None  # nothing preselected
    radio.set_value(radio.options[1])
    at.run()
    next(b for b in at.button if b.key == "lesson_q1_check").click()
    at.run()
    assert "Not quite" in texts(at)
    radio = next(r for r in at.radio if r.key == "lesson_q1")
    assert radio.disabled  # locked once checked
    # Step 3's captions carry core's examples and sentences.
    at.query_params["step"] = "3"
    at.run()
    assert not at.exception
    table_ = replication.run_table(run, None)[0]
    ex = lesson.class_examples(table_)
    text = texts(at)
    for cls, e in ex.items():
        if e:
            assert lesson.placement_sentence(cls, e["end_ratio"]) in text
    for step in ("2", "4", "5"):
        at.query_params["step"] = step
        at.run()
        assert not at.exception, step
        assert f"Step {step} of 5" in texts(at)


def test_the_lesson_on_the_shipped_store_teaches_from_the_teaching_run(monkeypatch):
    """A fresh clone's lesson: the grid's teaching run in its view; captions are core's words."""
    import json
    from pathlib import Path

    cache = Path(__file__).resolve().parents[1] / "cache"
    teaching = json.loads((cache / "replication" / replication.REPLICATION).read_text())["teaching"]
    at = open_page("lesson", cache, monkeypatch, {"step": "3"})
    text = texts(at)
    assert widgets.md_escape(teaching["run"]) in text and teaching["view"] in text
    table_, _ = replication.run_table(cache / teaching["run"], teaching["view"])
    for cls, ex in lesson.class_examples(table_).items():
        assert ex is not None, cls  # the teaching run shows all three shapes
        assert lesson.placement_sentence(cls, ex["end_ratio"]) in text


def test_step_one_sums_the_checkpoints_of_its_view(monkeypatch):
    """The per-checkpoint terms add up to the score in the table (the view's range, not all)."""
    import re
    from pathlib import Path

    cache = Path(__file__).resolve().parents[1] / "cache"
    at = open_page("lesson", cache, monkeypatch, {"step": "1"})
    assert not at.exception
    score = float(at.dataframe[0].value["TracIn"].iloc[0])
    text = texts(at)
    assert f"{score:.4g}, the TracIn in the table" in text
    summed_all = re.search(r"all (\d+) add up to ([-0-9.e]+)\)", text)
    assert summed_all is not None  # the teaching view sums only part of the checkpoints
    assert float(summed_all.group(2)) != pytest.approx(score)


def stored_views(rows):
    """A shapes_by_view-like table: (view key, id, shape) rows."""
    return pd.DataFrame(rows, columns=["view", "id", "shape"])


def test_other_view_classes_names_the_nearest_stored_views_that_disagree():
    stored = stored_views(
        [
            ("raw:1-1", 7, "Z"),
            ("raw:1-2", 7, "Z"),
            ("raw:1-3", 7, "S"),
            ("relative:1-3", 7, "backslash"),
            ("cosine:1-3", 7, "Z"),
            ("not a view", 7, "Z"),  # a damaged key is skipped, not an error
            ("raw:1-3", 8, "S"),  # another instance: never read for 7
            ("cosine:1-3", 8, "S"),
            ("relative:1-3", 8, "S"),
        ]
    )
    full = views.View(1, 3)
    # Same checkpoints, the other normalisations first, in their fixed order.
    others = lesson.other_view_classes(stored, 7, full, "S")
    assert others == [
        (views.View(1, 3, views.RELATIVE), "backslash"),
        (views.View(1, 3, views.COSINE), "Z"),
    ]
    assert lesson.other_view_sentence("S", full, others, 3) == (
        "This test instance is S under checkpoints 1–3 (all) · raw but backslash under "
        "relative scores and Z under cosine scores: its shape depends on the view, not only "
        "on the data."
    )
    both_z = [(v, "Z") for v, _ in others]
    assert "but Z under relative and cosine scores:" in lesson.other_view_sentence(
        "S", full, both_z, 3
    )
    # Every normalisation agrees on the same checkpoints: the latest other cumulative sum.
    agreeing = stored.assign(
        shape=np.where(stored["view"].str.endswith("1-3"), "S", stored["shape"])
    )
    assert lesson.other_view_classes(agreeing, 7, full, "S") == [(views.View(1, 2), "Z")]
    assert "S under checkpoints 1–3 (all) · raw but Z under checkpoints 1–2 · raw:" in (
        lesson.other_view_sentence("S", full, [(views.View(1, 2), "Z")], 3)
    )
    # Nothing disagrees, or nothing is stored for the instance: no sentence.
    assert lesson.other_view_classes(stored, 8, full, "S") == []
    assert lesson.other_view_classes(stored, 99, full, "S") == []
    assert lesson.other_view_sentence("S", full, []) == ""
    # A view the run does not store (checkpoints 2-3) is compared with the stored sums.
    assert lesson.other_view_classes(stored, 7, views.View(2, 3), "backslash") == [
        (views.View(1, 3), "S")
    ]


def test_other_view_classes_on_the_shipped_demo_are_its_stored_classes():
    """Instance 1978 of the shipped demo (the issue's example): S with all checkpoints raw,
    backslash under relative and Z under cosine scores, as shapes_by_view.parquet stores them."""
    path = Path(__file__).resolve().parents[1] / "cache" / "demo" / store.SHAPES_BY_VIEW
    stored = pd.read_parquet(path)
    full = views.View(1, 10)
    shape = stored.loc[(stored["view"] == full.key) & (stored["id"] == 1978), "shape"].item()
    others = lesson.other_view_classes(stored, 1978, full, shape)
    for v, cls in others:
        row = stored[(stored["view"] == v.key) & (stored["id"] == 1978)]
        assert row["shape"].item() == cls != shape
    assert [v.normalisation for v, _ in others] == [views.RELATIVE, views.COSINE]
