"""The "Does the paper hold?" page under AppTest, on a replication summary built from fake runs."""

from __future__ import annotations

import runstore_factory as factory
from page_harness import charts_named, frame_with, one_chart, open_page, texts

from core.analysis import claims, replication
from ui.screens import replication as screen


def build(cache):
    for seed in (0, 1, 2):
        factory.make_run(cache, f"r{seed}", seed=seed, n_test=30, epochs=3)
    factory.make_sweep(cache)
    replication.make_group(cache, "all", ["r0", "r1", "r2"], None, "")
    replication.make_group(cache, "first", ["r0", "r1", "r2"], "raw:1-1", "")
    return replication.replication_summary(cache, "rep", ["all", "first"], "sweep-quick", "")


def test_the_grid_shows_every_claim_of_every_condition_and_its_paragraphs(tmp_path, monkeypatch):
    folder = build(tmp_path)
    at = open_page("replication", tmp_path, monkeypatch)
    _, frames = one_chart(at, "verdict_grid")
    grid = frame_with(frames, "condition", "claim", "verdict")
    summary = replication.store.read_json(folder / replication.REPLICATION)
    expected = {
        (c["name"], k["id"]): k["verdict"] for c in summary["conditions"] for k in c["claims"]
    }
    expected[("sweep: sweep-quick", "C7")] = summary["sweep"]["claims"][0]["verdict"]
    got = {(r.condition, r.claim): r.verdict for r in grid.itertuples()}
    assert got == expected
    text = texts(at)
    for cid in ("C1", "C6", "C7"):
        assert f"**{cid}**" in text or cid in text
    # The paragraphs are computed by core, never written per result.
    pairs = [(c["name"], c["claims"][1]) for c in summary["conditions"]]
    assert claims.paragraph("C2", pairs).replace("**", "") in text.replace("**", "")
    assert "teaching run" in text.lower()


def test_each_claim_opens_its_evidence(tmp_path, monkeypatch):
    build(tmp_path)
    at = open_page("replication", tmp_path, monkeypatch)
    for cond, cid, chart in [
        ("all", "C1", "evidence_curves"),
        ("all", "C5", "shape_scatter"),
        ("first", "C6", "shape_scatter"),
        ("sweep: sweep-quick", "C7", "threshold_fit"),
    ]:
        at.selectbox(key="rep_condition").set_value(cond)
        at.selectbox(key="rep_claim").set_value(cid)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        if cond.startswith("sweep") and cid != "C7":
            continue
        assert charts_named(at, chart), (cond, cid)


def test_without_a_summary_the_page_says_how_to_make_one(tmp_path, monkeypatch):
    factory.make_run(tmp_path, "r0")
    at = open_page("replication", tmp_path, monkeypatch)
    assert screen.MAKE_COMMAND in texts(at)
