"""Claims read from the run store (core/analysis/replication.py) and their commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runstore_factory import make_run, make_sweep

from core import cli
from core.analysis import claims, replication, shapes, views
from core.storage import store


@pytest.fixture
def cache(tmp_path):
    for seed in (0, 1, 2):
        make_run(tmp_path, f"r{seed}", seed=seed, n_test=30, epochs=3)
    make_sweep(tmp_path)
    return tmp_path


def test_a_run_table_recomputes_from_the_stored_arrays(cache):
    run = cache / "r0"
    table, info = replication.run_table(run)
    inst = store.load_instances(run)
    train, test = inst[inst.split == "train"], inst[inst.split == "test"]
    expected = shapes.classify(np.load(run / store.TRACIN), train.flipped.to_numpy(bool))
    np.testing.assert_array_equal(table["s_bulk"], expected["s_bulk"])
    np.testing.assert_array_equal(table["end_ratio"], expected["end_ratio"])
    logits = np.load(run / store.LOGITS)[-1][test.id.to_numpy()]
    np.testing.assert_array_equal(table["correct"], logits.argmax(1) == test.label.to_numpy())
    stored = store.read_parquet(run / store.SHAPES).set_index("id").loc[test.id, "mean_distance"]
    np.testing.assert_array_equal(table["mean_distance"], stored.to_numpy())
    assert info["view"] == "raw:1-3" and info["seed"] == 0
    assert set(info["inputs"]) >= {store.TRACIN, store.LOGITS, store.DISTANCES}


def test_a_view_reads_its_checkpoints_and_its_last_checkpoints_predictions(cache):
    run = cache / "r0"
    table, info = replication.run_table(run, "cosine:1-2")
    stack = np.load(run / store.TRACIN_PER_CHECKPOINT)
    scores = views.view_scores(
        stack,
        views.View(1, 2, "cosine"),
        np.load(run / store.GRAD_NORMS_TRAIN),
        np.load(run / store.GRAD_NORMS_TEST),
    )
    np.testing.assert_array_equal(table["s_bulk"], shapes.classify(scores)["s_bulk"])
    inst = store.load_instances(run)
    test = inst[inst.split == "test"]
    pred = np.load(run / store.LOGITS)[1][test.id.to_numpy()].argmax(1)
    np.testing.assert_array_equal(table["correct"], pred == test.label.to_numpy())
    assert info["view"] == "cosine:1-2"


def test_claims_json_has_the_public_keys_and_every_claim(cache):
    payload = replication.claims_of(cache / "r0")
    written = json.loads((cache / "r0" / replication.CLAIMS_FILE).read_text())
    assert written == json.loads(json.dumps(payload))
    assert [c["id"] for c in written["claims"]] == ["C1", "C2", "C3", "C4", "C5", "C6"]
    for c in written["claims"]:
        assert {"id", "statement", "verdict", "statistic", "ci", "n", "view", "why"} <= set(c)
        assert c["verdict"] in claims.VERDICTS


def test_a_group_pools_its_seeds_exactly_as_the_claims_do(cache):
    folder = replication.make_group(cache, "g", ["r0", "r1", "r2"], None, "python -m core group")
    payload = json.loads((folder / replication.CLAIMS_FILE).read_text())
    samples = [replication.sample_of(replication.run_table(cache / f"r{s}")[0]) for s in range(3)]
    expected = json.loads(json.dumps(claims.evaluate(samples, "raw:1-3")))
    assert payload["claims"] == expected
    assert [r["seed"] for r in payload["runs"]] == [0, 1, 2]


def test_a_group_refuses_a_seed_twice_and_a_view_it_cannot_read(cache, tmp_path):
    with pytest.raises(claims_error()) as err:
        replication.make_group(cache, "g", ["r0", "r0"], None, "")
    assert "twice" in str(err.value)
    with pytest.raises(claims_error()) as err:
        replication.make_group(cache, "g", ["r0", "r1"], "raw:1-9", "")
    assert not (cache / "g").exists()


def test_a_sweep_gets_the_threshold_claim(cache):
    payload = replication.claims_of(cache / "sweep-quick")
    (c7,) = payload["claims"]
    assert c7["id"] == "C7" and c7["verdict"] in claims.VERDICTS
    assert c7["statistic"] is not None and len(c7["ci"]) == 2


def test_the_replication_summary_and_the_teaching_rule(cache, capsys):
    replication.make_group(cache, "all", ["r0", "r1", "r2"], None, "")
    replication.make_group(cache, "early", ["r0", "r1"], "raw:1-1", "")
    folder = replication.replication_summary(cache, "rep", ["all", "early"], "sweep-quick", "")
    summary = json.loads((folder / replication.REPLICATION).read_text())
    assert [c["name"] for c in summary["conditions"]] == ["all", "early"]
    assert summary["conditions"][1]["seeds"] == [0, 1]
    assert summary["sweep"]["claims"][0]["id"] == "C7"
    # The teaching run follows the written rule: the largest count of the rarest class.
    best = max(
        (min(r["counts"].values()), c["name"], r["run"])
        for c in summary["conditions"]
        for r in c["per_run"]
    )
    teaching = summary["teaching"]
    assert min(teaching["counts"].values()) == best[0]
    assert teaching["all_three"] == (best[0] > 0)
    # `claims` on the summary folder prints its claims x conditions table.
    assert cli.main(["claims", str(folder)]) == 0
    assert replication.verdict_table(summary) in capsys.readouterr().out
    rows = store.read_parquet(folder / replication.REPLICATION_INSTANCES)
    assert set(rows["condition"]) == {"all", "early"}
    curves = store.read_parquet(folder / replication.REPLICATION_CURVES)
    assert len(curves) and curves["flipped"].any()


def test_teaching_ties_go_to_entropy_then_the_earlier_condition():
    runs = lambda *counts: [  # noqa: E731
        {"run": f"x{i}", "seed": i, "counts": dict(zip(("S", "backslash", "Z"), c, strict=True))}
        for i, c in enumerate(counts)
    ]
    conditions = [
        {"name": "a", "view": "raw:1-10", "per_run": runs((10, 3, 3))},
        {"name": "b", "view": "raw:1-1", "per_run": runs((5, 3, 3), (3, 3, 3))},
    ]
    choice = replication.teaching_choice(conditions)
    assert (choice["condition"], choice["run"]) == ("b", "x1")
    assert choice["all_three"]


def test_the_cli_prints_a_table_and_refuses_bad_targets_in_one_sentence(cache, capsys):
    assert cli.main(["claims", str(cache / "r0")]) == 0
    out = capsys.readouterr().out
    assert "C6" in out and out.strip().endswith(replication.CLAIMS_FILE)
    assert cli.main(["claims", str(cache / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run, group or sweep" in err
    assert cli.main(["claims", str(cache / "sweep-quick"), "--view", "raw:1-1"]) == 2
    assert "applies to one run" in capsys.readouterr().err
    assert cli.main(["claims", str(cache / "r0"), "--view", "raw:1-7"]) == 2
    assert cli.main(["claims", str(cache / "r0"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["claims"][0]["id"] == "C1"


def claims_error():
    from core.storage.errors import AtlasError

    return AtlasError
