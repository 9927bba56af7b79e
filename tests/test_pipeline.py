"""The study pipeline and CLI end to end on tiny data: completeness, resume, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.cli import main, show_payload
from core.storage import store
from tests.conftest import TINY_ARGS, csv_args, synthetic_reviews

REPO = Path(__file__).resolve().parents[1]


def test_study_run_is_complete_and_consistent(study_run: Path) -> None:
    manifest = store.load_manifest(study_run)
    assert manifest["status"] == "complete"
    assert (manifest["n_train"], manifest["n_val"], manifest["n_test"]) == (96, 12, 12)
    assert manifest["n_flipped"] == 8
    assert manifest["data"]["label_mapping"] == {"neg": 0, "pos": 1}
    assert [c["epoch"] for c in manifest["checkpoints"]] == [1, 2, 3]
    for c in manifest["checkpoints"]:
        assert c["lr"] == manifest["config"]["lr"]
        assert (study_run / c["path"] / "model.safetensors").exists()
    instances = store.load_instances(study_run)
    assert list(instances["split"].unique()) == ["train", "val", "test"]
    assert (instances["id"] == np.arange(len(instances))).all()
    flipped = instances["flipped"]
    assert (instances.loc[flipped, "label"] != instances.loc[flipped, "observed_label"]).all()
    assert (instances.loc[~flipped, "label"] == instances.loc[~flipped, "observed_label"]).all()
    assert not instances.loc[instances["split"] != "train", "flipped"].any()
    logits = np.load(study_run / store.LOGITS)
    assert logits.shape == (3, 120, 2)
    # The stored test accuracy is the last epoch's, recomputed from the stored logits.
    test = (instances["split"] == "test").to_numpy()
    acc = float((logits[-1][test].argmax(1) == instances.loc[test, "label"]).mean())
    assert manifest["test_accuracy"] == pytest.approx(acc)
    assert np.load(study_run / store.TRACIN).shape == (12, 96)
    assert np.load(study_run / store.SELF_INFLUENCE).shape == (96,)
    for name in (store.SHAPES, store.ANALYSIS, store.COORDS, store.DISTANCES):
        assert (study_run / name).exists()


def test_show_json_has_the_documented_keys(study_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["show", str(study_run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    for key in (
        "name",
        "status",
        "config",
        "n_train",
        "n_val",
        "n_test",
        "n_flipped",
        "test_accuracy",
        "timings_s",
    ):
        assert key in payload
    epoch = payload["epochs"][0]
    assert {"epoch", "lr", "train_loss", "val_accuracy", "test_accuracy"} <= set(epoch)
    rows = payload["test_instances"]
    assert len(rows) == 12
    assert {"id", "correct", "s_raw", "s", "shape", "end_ratio", "mean_distance"} <= set(rows[0])


def test_run_prints_its_folder_last_and_reruns_are_skipped(study_run: Path, capsys) -> None:
    cache = study_run.parent
    csv = cache.parent / "reviews.csv"

    def files() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in study_run.rglob("*") if p.is_file()}

    before = files()
    assert main(["run", *TINY_ARGS, *csv_args(csv), "--cache", str(cache), "--name", "tiny"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(study_run)
    # Nothing recomputed and nothing rewritten, the manifest included: a complete shipped run
    # stays as committed when its recorded command is typed again.
    assert files() == before


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "core", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_kill_and_rerun_gives_the_same_result(tmp_path: Path) -> None:
    csv = tmp_path / "reviews.csv"
    synthetic_reviews(240, seed=2).to_csv(csv, index=False)
    args = ["run", *TINY_ARGS, "--epochs", "4", *csv_args(csv), "--until", "train"]

    killed = _cli([*args, "--cache", str(tmp_path / "a"), "--name", "r"])
    state = tmp_path / "a" / "r" / "checkpoints" / "epoch-02" / "epoch_state.json"
    deadline = time.time() + 120
    while not state.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    manifest = store.load_manifest(tmp_path / "a" / "r")
    assert manifest["status"] == "running"  # a killed run never looks complete
    assert not (tmp_path / "a" / "r" / store.LOGITS).exists()

    resumed = _cli([*args, "--cache", str(tmp_path / "a"), "--name", "r"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    straight = _cli([*args, "--cache", str(tmp_path / "b"), "--name", "r"])
    out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err.decode()

    a = np.load(tmp_path / "a" / "r" / store.LOGITS)
    b = np.load(tmp_path / "b" / "r" / store.LOGITS)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ma, mb = store.load_manifest(tmp_path / "a" / "r"), store.load_manifest(tmp_path / "b" / "r")
    assert ma["status"] == mb["status"] == "complete"
    assert [e["train_loss"] for e in ma["epochs"]] == pytest.approx(
        [e["train_loss"] for e in mb["epochs"]]
    )


def test_same_seed_same_flips_and_first_epoch_loss(tmp_path: Path, reviews_csv: Path) -> None:
    args = ["run", *TINY_ARGS, "--epochs", "1", *csv_args(reviews_csv), "--until", "train"]
    for name in ("one", "two"):
        assert main([*args, "--cache", str(tmp_path), "--name", name]) == 0
    one, two = (store.load_instances(tmp_path / n) for n in ("one", "two"))
    pd.testing.assert_frame_equal(one, two)
    loss = [store.load_manifest(tmp_path / n)["epochs"][0]["train_loss"] for n in ("one", "two")]
    assert loss[0] == loss[1]
    assert main([*args, "--seed", "4", "--cache", str(tmp_path), "--name", "other"]) == 0
    other = store.load_instances(tmp_path / "other")
    assert not np.array_equal(one["flipped"].to_numpy(), other["flipped"].to_numpy())


def test_japanese_csv_goes_through_mecab(tmp_path: Path) -> None:
    pos = [
        "とても良い商品でした",
        "大満足です",
        "また買いたい",
        "素晴らしい品質",
        "使いやすくて便利",
    ]
    neg = ["最悪の商品でした", "すぐに壊れた", "二度と買わない", "品質が悪い", "使いにくくて不便"]
    rows = [
        {
            "本文": f"{(pos if i % 2 else neg)[i % 5]}。{i}番目のレビュー",
            "評価": "良い" if i % 2 else "悪い",
        }
        for i in range(200)
    ]
    csv = tmp_path / "レビュー.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    before = hashlib.sha256(csv.read_bytes()).hexdigest()
    args = [
        "run",
        *TINY_ARGS,
        "--epochs",
        "1",
        "--dataset",
        str(csv),
        "--text-col",
        "本文",
        "--label-col",
        "評価",
    ]
    assert main([*args, "--cache", str(tmp_path / "c"), "--name", "ja", "--until", "train"]) == 0
    assert hashlib.sha256(csv.read_bytes()).hexdigest() == before  # input never modified
    from core.learning.models import load_tokenizer

    tokens = load_tokenizer(tmp_path / "c" / "ja").tokenize("とても良い商品でした")
    assert "商品" in tokens  # MeCab split the words before WordPiece
    assert store.load_manifest(tmp_path / "c" / "ja")["status"] == "complete"


def test_rakuten_style_tsv_with_star_ratings(tmp_path: Path) -> None:
    base = synthetic_reviews(300, seed=5)
    stars = [5 if s == "pos" else 1 for s in base["sentiment"]]
    stars[::10] = [3] * len(stars[::10])  # neutral reviews are dropped
    tsv = tmp_path / "rakuten.tsv"
    pd.DataFrame({"レビュー本文": base["review"], "評価ポイント": stars}).to_csv(
        tsv, sep="\t", index=False
    )
    args = [
        "run",
        *TINY_ARGS,
        "--dataset",
        str(tsv),
        "--text-col",
        "レビュー本文",
        "--rating-col",
        "評価ポイント",
    ]
    assert (
        main(
            [*args, "--pos-min", "4", "--neg-max", "2", "--cache", str(tmp_path), "--until", "data"]
        )
        == 0
    )
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    manifest = store.load_manifest(run)
    assert manifest["data"]["n_kept"] == 270
    assert manifest["n_train"] == 96


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--dataset", "missing.csv", "--text-col", "review", "--label-col", "sentiment"],
            "missing.csv",
        ),
        (["--text-col", "nope", "--label-col", "sentiment"], "nope"),
        (
            ["--text-col", "review", "--label-col", "sentiment", "--model", "/no/such/model"],
            "/no/such/model",
        ),
        (["--text-col", "review", "--label-col", "sentiment", "--flip-count", "500"], "flip 500"),
        (["--text-col", "review", "--label-col", "sentiment", "--flip-rate", "1.5"], "--flip-rate"),
    ],
)
def test_bad_input_is_one_sentence_exit_2_and_nothing_written(
    tmp_path: Path, reviews_csv: Path, extra: list[str], needle: str
) -> None:
    args = ["run", "--preset", "quick", "--dataset", str(reviews_csv), *extra]
    if "--dataset" in extra:
        args = ["run", "--preset", "quick", *extra]
    proc = _cli([*args, "--cache", str(tmp_path / "cache")])
    out, err = proc.communicate(timeout=120)
    message = err.decode().strip()
    assert proc.returncode == 2, message
    assert "Traceback" not in message
    error_lines = [line for line in message.splitlines() if not line.startswith("note:")]
    assert len(error_lines) == 1 and needle in error_lines[0]
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_too_few_rows_for_a_split_is_refused(tmp_path: Path) -> None:
    csv = tmp_path / "small.csv"
    synthetic_reviews(12).to_csv(csv, index=False)
    assert main(["run", *csv_args(csv), "--cache", str(tmp_path / "cache")]) == 2
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_a_different_config_under_the_same_name_is_refused(
    tmp_path: Path, reviews_csv: Path, capsys
) -> None:
    args = [
        "run",
        *TINY_ARGS,
        *csv_args(reviews_csv),
        "--until",
        "data",
        "--cache",
        str(tmp_path),
        "--name",
        "x",
    ]
    assert main(args) == 0
    assert main([*args, "--seed", "9"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_show_payload_of_a_missing_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["show", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_list_shows_runs(study_run: Path, capsys) -> None:
    assert main(["list", "--cache", str(study_run.parent), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "tiny" and r["status"] == "complete" for r in rows)
    assert show_payload(study_run)["n_flipped"] == 8
