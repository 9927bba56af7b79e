"""Intervention bookkeeping, retraining records and exports that never touch their input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import runstore_factory as factory

from core.cleaning import detectors
from core.cleaning import interventions as cleaning
from core.storage import store
from core.storage.errors import AtlasError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def scored_run(tmp_path):
    run = factory.make_model_run(tmp_path)
    detectors.run_detect(run, detectors=["loss", "aum", "random"], progress=False)
    return run


def test_exclude_removes_exactly_k():
    texts = [f"t{i}" for i in range(10)]
    labels = np.arange(10) % 2
    chosen = np.array([7, 2, 5])
    out_texts, out_labels, weights, keep = cleaning.apply_action(texts, labels, chosen, "exclude")
    assert len(out_texts) == 7 and weights is None
    assert set(out_texts) == {f"t{i}" for i in range(10)} - {"t7", "t2", "t5"}
    assert (out_labels == labels[keep]).all()


def test_relabel_flips_exactly_k():
    labels = np.arange(10) % 2
    chosen = np.array([0, 3, 9])
    _, out_labels, weights, keep = cleaning.apply_action(
        list("abcdefghij"), labels, chosen, "relabel"
    )
    assert len(keep) == 10 and weights is None
    assert np.flatnonzero(out_labels != labels).tolist() == [0, 3, 9]
    assert labels.tolist() == (np.arange(10) % 2).tolist()  # the input array is not modified


def test_reweight_ramps_by_suspicion_and_keeps_everyone():
    _, _, weights, keep = cleaning.apply_action(
        list("abcdef"), np.zeros(6, int), np.array([4, 1, 2]), "reweight"
    )
    assert len(keep) == 6
    assert weights.tolist() == pytest.approx([1, 2 / 4, 3 / 4, 1, 1 / 4, 1])


def test_oracle_fixes_exactly_the_flips():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, 40)
    flipped = np.zeros(40, bool)
    flipped[[3, 11, 25, 31]] = True
    observed = np.where(flipped, 1 - true, true)
    chosen = cleaning.oracle_choice(flipped, scores=rng.random(40))
    assert sorted(chosen.tolist()) == [3, 11, 25, 31]
    _, relabeled, _, _ = cleaning.apply_action([""] * 40, observed, chosen, "relabel")
    assert (relabeled == true).all()
    _, kept_labels, _, keep = cleaning.apply_action([""] * 40, observed, chosen, "exclude")
    assert not flipped[keep].any() and len(keep) == 36 and (kept_labels == true[keep]).all()


def test_top_k_random_choice_and_validation():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
    assert cleaning.top_k(scores, 3).tolist() == [1, 3, 2]
    a = cleaning.random_choice(100, 10, seed=1)
    assert len(set(a.tolist())) == 10 and (a == cleaning.random_choice(100, 10, seed=1)).all()
    with pytest.raises(AtlasError):
        cleaning.top_k(scores, 0)
    with pytest.raises(AtlasError, match="Unknown action"):
        cleaning.apply_action(["a"], np.array([0]), np.array([0]), "delete")
    with pytest.raises(AtlasError, match="repeats"):
        cleaning.apply_action(["a", "b"], np.array([0, 1]), np.array([1, 1]), "relabel")


def test_run_clean_records_every_arm_and_reuses_shared_ones(scored_run, monkeypatch):
    import core.learning.training

    calls = []
    real = core.learning.training.train_model

    def counting(config, tokenizer, texts, labels, **kwargs):
        calls.append(
            (len(texts), None if kwargs.get("weights") is None else len(kwargs["weights"]))
        )
        return real(config, tokenizer, texts, labels, **kwargs)

    monkeypatch.setattr(core.learning.training, "train_model", counting)
    out = cleaning.run_clean(scored_run, "loss", "exclude", k=4, seeds=[0], progress=False)
    # no change (48), oracle (48 − 4 flips), random (44), detector (44)
    assert [c[0] for c in calls] == [48, 44, 44, 44]
    row = out["rows"][0]
    assert set(row) == set(cleaning.ROW_KEYS)
    assert row["n_flips_caught"] == 4  # the synthetic final loss puts the flips on top
    for key in ("test_accuracy", "no_change_accuracy", "oracle_accuracy", "random_accuracy"):
        assert 0.0 <= row[key] <= 1.0

    calls.clear()
    cleaning.run_clean(scored_run, "random", "exclude", k=4, seeds=[0], progress=False)
    assert len(calls) == 1  # only the detector's arm is new
    calls.clear()
    cleaning.run_clean(scored_run, "aum", "reweight", k=4, seeds=[0], progress=False)
    assert len(calls) == 3 and calls[-1] == (48, 48)  # oracle, random, detector; no-change reused
    rows = cleaning.load_results(scored_run)
    assert [(r["detector"], r["action"]) for r in rows] == [
        ("aum", "reweight"),
        ("loss", "exclude"),
        ("random", "exclude"),
    ]
    # A rerun replaces its row instead of appending a duplicate.
    cleaning.run_clean(scored_run, "random", "exclude", k=4, seeds=[0], progress=False)
    assert len(cleaning.load_results(scored_run)) == 3


def test_run_clean_validates_before_training(scored_run):
    with pytest.raises(AtlasError, match="Unknown action"):
        cleaning.run_clean(scored_run, "loss", "drop", k=4, seeds=1, progress=False)
    with pytest.raises(AtlasError, match="k must"):
        cleaning.run_clean(scored_run, "loss", "exclude", k=0, seeds=1, progress=False)
    with pytest.raises(AtlasError, match="not computed"):
        cleaning.run_clean(scored_run, "cleanlab", "exclude", k=4, seeds=1, progress=False)
    assert not (scored_run / store.CLEANING_DIR / cleaning.RESULTS).exists()


def test_exports_never_touch_the_input(scored_run, tmp_path):
    source = tmp_path / "input.csv"  # the manifest names it as the study's data source
    source.write_text("text,label\nfoo,1\n", "utf-8")
    watched = [scored_run / store.INSTANCES, scored_run / store.DETECTORS, source]
    before = [_digest(p) for p in watched]

    queue_path = cleaning.export_review_queue(scored_run, "loss")
    assert queue_path == scored_run / store.CLEANING_DIR / "review_queue_loss.csv"
    queue = pd.read_csv(queue_path, encoding="utf-8-sig")
    assert list(queue.columns) == [
        "id",
        "source_row",
        "text",
        "label",
        "suggested_label",
        "score",
        "rank",
        "reason",
    ]
    assert len(queue) == 4 and queue["rank"].tolist() == [1, 2, 3, 4]
    assert (queue["suggested_label"] == 1 - queue["label"]).all()
    inst = store.load_instances(scored_run).set_index("id")
    assert (queue["label"].to_numpy() == inst.loc[queue["id"], "observed_label"].to_numpy()).all()
    assert inst.loc[queue["id"], "flipped"].all()

    cleaned_path = cleaning.export_cleaned(
        scored_run, "loss", "relabel", k=4, path=tmp_path / "out" / "c.csv"
    )
    cleaned = pd.read_csv(cleaned_path, encoding="utf-8-sig")
    assert len(cleaned) == len(inst)
    assert (cleaned["label"].to_numpy() == inst["observed_label"].to_numpy()).all()
    assert (cleaned["action"] == "relabel").sum() == 4
    changed = cleaned["new_label"] != cleaned["label"]
    assert changed.sum() == 4 and (cleaned.loc[changed, "action"] == "relabel").all()
    assert (
        cleaned["new_label"].to_numpy() == inst["label"].to_numpy()
    ).all()  # the flips are fixed
    assert cleaned.loc[cleaned["split"] != "train", "score"].isna().all()

    excluded = pd.read_csv(
        cleaning.export_cleaned(scored_run, "aum", "exclude", k=3), encoding="utf-8-sig"
    )
    assert (excluded["action"] == "exclude").sum() == 3
    assert (excluded.loc[excluded["action"] == "exclude", "weight"] == 0).all()

    for target in (source, scored_run / store.INSTANCES, scored_run / "detectors.csv"):
        with pytest.raises(AtlasError, match="Refusing"):
            cleaning.export_cleaned(scored_run, "loss", "exclude", k=4, path=target)
        with pytest.raises(AtlasError, match="Refusing"):
            cleaning.export_review_queue(scored_run, "loss", path=target)
    assert [_digest(p) for p in watched] == before


def test_cleaning_arms_are_independent_units(scored_run, monkeypatch):
    import core.learning.training

    arms = cleaning.plan_arms(scored_run, "loss", "exclude", k=4, seeds=[0, 1])
    assert [a.kind for a in arms] == ["no_change", "oracle", "random", "detector"] * 2
    assert len({a.key for a in arms}) == len(arms) and all(len(a.chosen) == 4 for a in arms[1:4])
    # Any order, one at a time (as an executor would): each result lands in its own file.
    order = np.random.default_rng(0).permutation(len(arms))
    accs = {arms[i].key: cleaning.compute_arm(arms[i]) for i in order}
    assert all(a.path().exists() for a in arms)
    assert cleaning.plan_arms(scored_run, "loss", "exclude", k=4, seeds=[0, 1]) == []
    calls = []
    real = core.learning.training.train_model
    monkeypatch.setattr(
        core.learning.training, "train_model", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    out = cleaning.run_clean(scored_run, "loss", "exclude", k=4, seeds=[0, 1], progress=False)
    assert calls == []  # the loop runs the same units, all present
    for row, seed in zip(out["rows"], (0, 1), strict=True):
        by_kind = {a.kind: accs[a.key] for a in arms if a.seed == seed}
        assert row["test_accuracy"] == by_kind["detector"]
        assert row["no_change_accuracy"] == by_kind["no_change"]
        assert row["oracle_accuracy"] == by_kind["oracle"]
        assert row["random_accuracy"] == by_kind["random"]


def test_the_page_and_the_export_show_one_review_queue(scored_run):
    from ui.screens import cleaning as cleaning_screen

    exported = pd.read_csv(cleaning.export_review_queue(scored_run, "loss"), encoding="utf-8-sig")
    assert tuple(exported.columns) == cleaning.REVIEW_COLUMNS
    inst = store.load_instances(scored_run)
    train = inst[inst["split"] == "train"]
    shown = cleaning_screen.review_queue(
        pd.read_parquet(scored_run / store.DETECTORS), "loss", train, len(exported), ["a", "b"]
    )
    assert shown["id"].tolist() == exported["id"].tolist()
    assert shown["rank"].tolist() == exported["rank"].tolist()
    assert shown["reason"].tolist() == exported["reason"].tolist()
    assert np.allclose(shown["score"], exported["score"])
    assert shown["suggested_label"].tolist() == [["a", "b"][v] for v in exported["suggested_label"]]


def test_a_shipped_run_answers_the_interventions_it_ships_without_its_checkpoints(tmp_path):
    """The teaching run ships its arms but no checkpoints: its own request needs no retraining,
    one more seed does, and that is refused in one sentence naming the full copy."""
    import json
    import shutil

    shipped = Path(__file__).resolve().parents[1] / "cache" / "paper-s2"
    run = tmp_path / "paper-s2"
    shutil.copytree(shipped, run)
    stored = json.loads((run / store.CLEANING_DIR / cleaning.RESULTS).read_text())["rows"]
    shipped_rows = [r for r in stored if r["action"] == "exclude"]
    seeds = len(shipped_rows)
    got = cleaning.run_clean(run, "self_influence", "exclude", 40, seeds=seeds, progress=False)
    assert got["rows"] == shipped_rows
    with pytest.raises(AtlasError, match="retraining needs them: make a full copy"):
        cleaning.run_clean(run, "self_influence", "exclude", 40, seeds=seeds + 1, progress=False)


def _row(action: str, seed: int, test: float, no_change: float, detector: str = "d") -> dict:
    return {
        "detector": detector,
        "action": action,
        "k": 4,
        "seed": seed,
        "test_accuracy": test,
        "no_change_accuracy": no_change,
        "oracle_accuracy": 0.9,
        "random_accuracy": no_change - 0.01 * seed,
        "n_flips_caught": 1,
    }


def test_intervention_effects_pair_each_seed_with_its_own_no_change():
    rows = [
        _row("exclude", s, t, n)
        for s, (t, n) in enumerate([(0.80, 0.75), (0.86, 0.85), (0.70, 0.65)])
    ]
    rows += [
        _row("relabel", s, t, n)
        for s, (t, n) in enumerate([(0.80, 0.85), (0.85, 0.85), (0.90, 0.85)])
    ]
    effects = cleaning.intervention_effects(rows).set_index("action")
    ex, re = effects.loc["exclude"], effects.loc["relabel"]
    assert ex["seeds"] == 3 and ex["seeds_better"] == 3 and ex["seeds_worse"] == 0
    assert ex["gain_vs_no_change"] == pytest.approx((0.05 + 0.01 + 0.05) / 3)
    assert ex["gain_vs_random"] == pytest.approx(np.mean([0.05, 0.02, 0.07]))
    assert ex["sign_test_p"] == pytest.approx(0.25)  # 2 * 0.5**3
    assert "helped on every seed" in ex["reading"] and "p = 0.25" in ex["reading"]
    assert (re["seeds_better"], re["seeds_equal"], re["seeds_worse"]) == (1, 1, 1)
    assert re["sign_test_p"] == pytest.approx(1.0)
    assert re["reading"].endswith("no consistent effect.")
    assert "+0.0 points" in re["reading"]


def test_intervention_effects_need_three_seeds_to_read_anything():
    effects = cleaning.intervention_effects(
        [_row("exclude", 0, 0.9, 0.8), _row("exclude", 1, 0.9, 0.8)]
    )
    assert effects["seeds_better"].item() == 2
    assert "too few seeds to tell" in effects["reading"].item()
    hurt = cleaning.intervention_effects([_row("exclude", s, 0.7, 0.8) for s in range(6)])
    assert "hurt on every seed" in hurt["reading"].item()
    assert hurt["sign_test_p"].item() == pytest.approx(2 * 0.5**6)
    assert cleaning.intervention_effects([]).empty


def test_intervention_arms_count_each_shared_reference_arm_once_per_seed():
    rows = [
        _row("exclude", s, 0.8 + 0.01 * s, 0.75, detector=d) for s in range(3) for d in ("a", "b")
    ]
    arms = cleaning.intervention_arms(rows).set_index("arm")
    assert set(arms.index) == {"a", "b", "no change", "random", "oracle"}
    assert (arms["seeds"] == 3).all()
    assert arms.loc["a", "mean"] == pytest.approx(0.81)
    assert (arms.loc["a", "min"], arms.loc["a", "max"]) == pytest.approx((0.80, 0.82))
    assert arms.loc["random", "min"] == pytest.approx(0.73)


def test_intervention_summaries_leave_out_damaged_rows():
    good = [_row("exclude", s, 0.8, 0.75) for s in range(3)]
    bad = [
        "x",
        {"detector": "d"},
        {**good[0], "seed": 9, "test_accuracy": "high"},
        {**good[0], "k": float("nan")},
    ]
    effects = cleaning.intervention_effects(good + bad)
    assert effects["seeds"].tolist() == [3]
    assert set(cleaning.intervention_arms(good + bad)["seeds"]) == {3}
