"""Noise sweeps: nested flips, resume, the threshold rule and the stored tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from core.cli import main
from core.orchestration.sweep import CELLS_DIR, SWEEP_TABLE, cell_name, noise_threshold, parse_rates
from core.storage import store
from core.storage.errors import AtlasError
from tests.conftest import TINY_ARGS, csv_args, synthetic_reviews


def _table(acc: dict[float, list[float]]) -> pd.DataFrame:
    rows = [
        {"flip_rate": r, "seed": s, "final_test_accuracy": a}
        for r, accs in acc.items()
        for s, a in enumerate(accs)
    ]
    return pd.DataFrame(rows)


def test_threshold_is_the_first_rate_whose_drop_exceeds_the_spread_at_zero() -> None:
    # spread at 0: std of [0.90, 0.92, 0.94] = 0.02; drops: 0.05 → 0.01, 0.1 → 0.03, 0.2 → 0.12
    t = noise_threshold(
        _table({0: [0.90, 0.92, 0.94], 0.05: [0.91] * 3, 0.1: [0.89] * 3, 0.2: [0.80] * 3})
    )
    assert t["rate"] == 0.1
    assert t["spread_at_zero"] == pytest.approx(0.02)
    assert t["drops"][0.2] == pytest.approx(0.12)


def test_threshold_is_undefined_without_rate_zero_or_with_one_seed() -> None:
    assert noise_threshold(_table({0.1: [0.9, 0.8]}))["rate"] is None
    one_seed = noise_threshold(_table({0: [0.9], 0.1: [0.5]}))
    assert one_seed["rate"] is None and "one seed" in one_seed["note"]
    flat = noise_threshold(_table({0: [0.9, 0.8], 0.1: [0.85, 0.85]}))
    assert flat["rate"] is None and "no rate" in flat["note"]


def test_parse_rates_validates() -> None:
    assert parse_rates("0.1, 0,0.05,0.1") == [0.0, 0.05, 0.1]
    for bad in ("", "a,b", "0,1.2"):
        with pytest.raises(AtlasError):
            parse_rates(bad)


def test_sweep_nests_flips_resumes_and_shows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "reviews.csv"
    synthetic_reviews(240, seed=4).to_csv(csv, index=False)
    tiny = [a for a in TINY_ARGS if a not in ("--flip-count", "8")]
    args = ["sweep", *tiny, "--epochs", "1", *csv_args(csv)]
    args += [
        "--flip-rates",
        "0,0.05,0.125",
        "--seeds",
        "2",
        "--jobs",
        "1",
        "--cache",
        str(tmp_path),
        "--name",
        "sw",
    ]
    assert main(args) == 0
    sweep = tmp_path / "sw"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(sweep)

    table = pd.read_parquet(sweep / SWEEP_TABLE)
    assert len(table) == 6
    assert sorted(table["flip_count"].unique()) == [0, 5, 12]
    for seed in (3, 4):
        masks = {}
        for rate in (0.0, 0.05, 0.125):
            inst = store.load_instances(sweep / CELLS_DIR / cell_name(rate, seed))
            masks[rate] = set(inst.loc[inst["flipped"], "text"])
        assert masks[0.0] == set() and masks[0.05] < masks[0.125]
    manifest = store.load_manifest(sweep)
    assert manifest["kind"] == "sweep" and manifest["status"] == "complete"
    assert "rule" in manifest["threshold"]

    # A rerun skips every finished cell.
    cell = sweep / CELLS_DIR / cell_name(0.05, 3) / store.LOGITS
    before = cell.stat().st_mtime_ns
    assert main(args) == 0
    assert cell.stat().st_mtime_ns == before
    capsys.readouterr()

    assert main(["show", str(sweep), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["table"]) == 6
    assert {
        "flip_rate",
        "seed",
        "final_test_accuracy",
        "train_loss_observed",
        "train_loss_true",
    } <= set(payload["table"][0])
