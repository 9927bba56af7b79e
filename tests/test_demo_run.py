"""The shipped runs (cache/demo, cache/ja-demo) and sweep (cache/sweep-quick) load and are
internally consistent.

They are made by the commands in their manifests and committed without checkpoints; these
checks recompute what they can from the stored scores with core's own definitions.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.analysis import views
from core.analysis.shapes import classify
from core.storage import store

CACHE = Path(__file__).resolve().parents[1] / "cache"
DEMO = Path(os.environ.get("ATLAS_DEMO_RUN", CACHE / "demo"))
SHIPPED = {"demo": (DEMO, "paper"), "ja-demo": (CACHE / "ja-demo", "quick")}


@pytest.fixture(scope="module", params=list(SHIPPED))
def shipped(request) -> tuple[Path, str]:
    path, preset = SHIPPED[request.param]
    assert (path / store.MANIFEST).exists(), f"the shipped run {path} is missing"
    return path, preset


def test_shipped_run_is_complete(shipped) -> None:
    run, preset = shipped
    m = store.load_manifest(run)
    assert m["status"] == "complete"
    assert m["config"]["preset"] == preset
    assert m["command"].startswith(f"python -m core run --preset {preset}")
    for stage in ("data", "train", "tracin", "analyze", "detect"):
        assert m["stages"][stage]["status"] == "complete"
    assert len(m["epochs"]) == len(m["checkpoints"]) == m["config"]["epochs"]


def test_shipped_counts_and_arrays_agree(shipped) -> None:
    run, _ = shipped
    m = store.load_manifest(run)
    inst = store.load_instances(run)
    split = inst["split"].value_counts()
    assert (split["train"], split["val"], split["test"]) == (m["n_train"], m["n_val"], m["n_test"])
    assert (
        int(inst["flipped"].sum())
        == m["n_flipped"]
        == round(m["config"]["flip_rate"] * m["n_train"])
    )
    n_train, n_test, k = m["n_train"], m["n_test"], len(m["checkpoints"])
    assert np.load(run / store.TRACIN, mmap_mode="r").shape == (n_test, n_train)
    assert np.load(run / store.TRACIN_PER_CHECKPOINT, mmap_mode="r").shape == (k, n_test, n_train)
    assert np.load(run / store.GRAD_NORMS_TRAIN).shape == (k, n_train)
    assert np.load(run / store.GRAD_NORMS_TEST).shape == (k, n_test)
    assert np.load(run / store.SELF_INFLUENCE).shape == (n_train,)
    assert np.load(run / store.LOGITS, mmap_mode="r").shape == (len(m["epochs"]), len(inst), 2)
    assert np.load(run / store.DISTANCES, mmap_mode="r").shape == (n_test, n_train)
    assert len(pd.read_parquet(run / store.COORDS)) == len(inst)


def test_shipped_test_accuracy_matches_its_logits(shipped) -> None:
    run, _ = shipped
    m = store.load_manifest(run)
    inst = store.load_instances(run)
    logits = np.load(run / store.LOGITS)
    test = (inst["split"] == "test").to_numpy()
    acc = float((logits[-1][test].argmax(1) == inst.loc[test, "label"].to_numpy()).mean())
    assert acc == pytest.approx(m["test_accuracy"])


def test_shipped_shapes_recomputed_from_the_stored_scores(shipped) -> None:
    run, _ = shipped
    tracin = np.load(run / store.TRACIN)
    inst = store.load_instances(run)
    flipped = inst.loc[inst["split"] == "train", "flipped"].to_numpy()
    shapes = pd.read_parquet(run / store.SHAPES)
    rule = store.read_json(run / store.ANALYSIS)["thresholds"]
    got = classify(tracin, flipped, s_min=rule["s_min"], z_max=rule["z_max"], trim=rule["trim"])
    assert list(got["shape"]) == list(shapes["shape"])
    np.testing.assert_allclose(got["s"], shapes["s"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["s_bulk"], shapes["s_bulk"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got["end_ratio"], shapes["end_ratio"], rtol=1e-9)
    # The per-checkpoint stack sums, in the engine's order, to the stored matrix exactly.
    stack = np.load(run / store.TRACIN_PER_CHECKPOINT)
    np.testing.assert_array_equal(
        views.view_scores(stack, views.full_view(stack.shape[0])), tracin.astype(np.float64)
    )


def test_shipped_views_recomputed_from_the_stored_stack(shipped) -> None:
    run, _ = shipped
    stack = np.load(run / store.TRACIN_PER_CHECKPOINT)
    norms = np.load(run / store.GRAD_NORMS_TRAIN), np.load(run / store.GRAD_NORMS_TEST)
    inst = store.load_instances(run)
    flipped = inst.loc[inst["split"] == "train", "flipped"].to_numpy()
    by_view = pd.read_parquet(run / store.SHAPES_BY_VIEW)
    rule = store.read_json(run / store.ANALYSIS)["thresholds"]
    k = stack.shape[0]
    for view in (
        views.View(1, 1),
        views.View(k, k, views.RELATIVE),
        views.View(1, k, views.COSINE),
    ):
        want = classify(
            views.view_scores(stack, view, *norms),
            flipped,
            **{n: rule[n] for n in ("s_min", "z_max", "trim")},
        )
        stored = by_view[by_view["view"] == view.key]
        assert list(stored["shape"]) == list(want["shape"]), view.key
        np.testing.assert_allclose(stored["s_bulk"], want["s_bulk"], rtol=1e-9)


def test_shipped_sweep_loads_with_its_threshold() -> None:
    sweep = CACHE / "sweep-quick"
    m = store.read_json(sweep / store.MANIFEST)
    assert m["kind"] == "sweep" and m["command"].startswith("python -m core sweep --preset quick")
    table = pd.read_parquet(sweep / "sweep.parquet")
    assert sorted(table["flip_rate"].unique()) == [0.0, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4]
    assert table.groupby("flip_rate")["seed"].nunique().eq(3).all()
    assert m["threshold"]["rate"] in set(table["flip_rate"])


def test_the_repository_tracks_only_the_shipped_runs_result_files() -> None:
    """A lock, progress file or scratch folder left by a command run on a shipped run must
    never be committed (a tracked ``cache/demo/.lock`` once slipped in with ``git add -A``)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        ["git", "ls-files", "cache"], cwd=repo, capture_output=True, text=True, check=False
    )
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout (the container image copies the files without .git)")
    tracked = out.stdout.split()
    odd = [
        name
        for name in tracked
        if Path(name).suffix not in (".json", ".parquet", ".npy")
        or Path(name).name in (".lock", "progress.json")
        or "_work/" in name
    ]
    assert odd == []


@pytest.mark.parametrize("name", ["demo", "ja-demo", "paper-s2"])
def test_shipped_claims_recompute_from_the_stored_arrays(name) -> None:
    import json

    from core.analysis import replication

    run = CACHE / name
    stored = json.loads((run / replication.CLAIMS_FILE).read_text())
    fresh = json.loads(json.dumps(replication.claims_of(run, write=False)))
    assert stored["claims"] == fresh["claims"]


def test_shipped_sweep_claim_recomputes() -> None:
    import json

    from core.analysis import replication

    sweep = CACHE / "sweep-quick"
    stored = json.loads((sweep / replication.CLAIMS_FILE).read_text())
    assert (
        stored["claims"]
        == json.loads(json.dumps(replication.claims_of(sweep, write=False)))["claims"]
    )


def test_shipped_replication_claims_recompute_from_its_instance_table() -> None:
    """Each condition's pooled claims equal claims.evaluate on the shipped per-instance rows."""
    import json

    from core.analysis import claims, replication

    folder = CACHE / "replication"
    summary = json.loads((folder / replication.REPLICATION).read_text())
    rows = pd.read_parquet(folder / replication.REPLICATION_INSTANCES)
    assert len(summary["conditions"]) >= 6
    for cond in summary["conditions"]:
        assert len(cond["seeds"]) >= 3, cond["name"]
        mine = rows[rows["condition"] == cond["name"]]
        samples = [
            replication.sample_of(mine[mine["run"] == run].reset_index(drop=True))
            for run in cond["runs"]
        ]
        fresh = json.loads(json.dumps(claims.evaluate(samples, cond["view"])))
        assert cond["claims"] == fresh, cond["name"]
    assert summary["teaching"] == json.loads(
        json.dumps(replication.teaching_choice(summary["conditions"]))
    )


def test_the_docs_carry_the_shipped_verdict_table() -> None:
    import json

    from core.analysis import replication

    summary = json.loads((CACHE / "replication" / replication.REPLICATION).read_text())
    docs = (CACHE.parent / "docs" / "replication.md").read_text("utf-8")
    assert replication.verdict_table(summary) in docs


def test_the_teaching_run_is_shipped_and_its_counts_recompute() -> None:
    """The grid's teaching run is in the store, and its view's class counts come from its arrays."""
    import json

    from core.analysis import replication

    summary = json.loads((CACHE / "replication" / replication.REPLICATION).read_text())
    teaching = summary["teaching"]
    run = CACHE / teaching["run"]
    table, _ = replication.run_table(run, teaching["view"])
    wrong = table[~table["correct"]]
    assert {s: int((wrong["shape"] == s).sum()) for s in teaching["counts"]} == teaching["counts"]
