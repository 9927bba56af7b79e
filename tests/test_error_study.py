"""The error study (core.analysis.error_study): subset exactness, metrics, stored files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from runstore_factory import make_checkpoint_run
from torch import nn
from tracin_reference import (
    batch_rows,
    brute_tracin,
    random_batch,
    relative_error,
)

from core.analysis.error_study import (
    SUMMARY,
    TABLE,
    WORK_DIR,
    detector_metrics,
    error_study,
    load_error_study,
    row_metrics,
    select_test_rows,
    top1pct_k,
)
from core.analysis.shapes import ShapeRule
from core.cli import main
from core.influence import TracInCP, encode_run_data, run_tracin
from core.influence.factorized import FactorizedTracIn
from core.options.error_study_options import parse_dtype, parse_method, parse_methods, parse_subset
from core.storage import store
from core.storage.errors import AtlasError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _with_logits(run: Path, wrong: list[int]) -> Path:
    """Give a test run a logits.npy whose last checkpoint misclassifies test rows ``wrong``."""
    instances = store.load_instances(run)
    labels = instances["label"].to_numpy()
    pred = labels.copy()
    test_pos = np.flatnonzero((instances["split"] == "test").to_numpy())
    pred[test_pos[wrong]] = 1 - pred[test_pos[wrong]]
    logits = np.zeros((2, len(instances), 2), dtype=np.float32)
    logits[:, np.arange(len(instances)), pred] = 1.0
    store.write_npy(run / store.LOGITS, logits)
    return run


# ---- options (torch-free parsing)


def test_methods_parse_to_engine_options():
    assert [(m.name, m.params, m.project) for m in parse_methods("last-2, head,dense:8")] == [
        ("last-2", "last-2", None),
        ("head", "head", None),
        ("dense:8", "all", 8),
    ]
    m = parse_method("dense:256@last-2")
    assert (m.params, m.project, m.slug) == ("last-2", 256, "dense-256_last-2")
    assert parse_method("factorized:16").project == "factorized:16"
    assert parse_subset("misclassified+random:20") == (True, 20)
    assert parse_subset("random:5") == (False, 5) and parse_subset("all") == (False, None)
    assert parse_dtype("bf16") == "bfloat16" and parse_dtype("fp32") == "float32"


@pytest.mark.parametrize(
    "text",
    ["all", "dense:0", "dense:x", "dense", "factorized:0", "factorized:-3", "last-0", "bogus", ""],
)
def test_bad_methods_are_refused(text):
    with pytest.raises(AtlasError):
        parse_methods(text)


@pytest.mark.parametrize("text", ["random:0", "random:", "misclassified+random:-1", "some"])
def test_bad_subsets_are_refused(text):
    with pytest.raises(AtlasError):
        parse_subset(text)


# ---- metrics against hand-computed values


def test_row_metrics_by_hand():
    n = 200
    base = np.linspace(1.0, -1.0, n)  # strictly descending: rank i = index i
    flipped = np.zeros(n, dtype=bool)
    flipped[[0, 199]] = True  # both at the ends: end ratio 100 %
    same = row_metrics(base[None], base[None], flipped)
    assert same.loc[0, "spearman"] == pytest.approx(1.0)
    assert same.loc[0, "top10_overlap"] == 1.0 and same.loc[0, "top1pct_overlap"] == 1.0
    assert bool(same.loc[0, "shape_agree"]) and same.loc[0, "end_ratio_exact"] == pytest.approx(100)
    assert same.loc[0, "end_ratio_diff"] == 0.0
    # Reversed ranking: Spearman −1, no top-10 overlap, ends stay ends (end ratio unchanged).
    rev = row_metrics(base[None], -base[None], flipped)
    assert rev.loc[0, "spearman"] == pytest.approx(-1.0) and rev.loc[0, "top10_overlap"] == 0.0
    assert rev.loc[0, "end_ratio_diff"] == pytest.approx(0.0)
    # Move the two flips to the centre ranks 99 and 100: end ratio (99.5−99)/99.5·100 ≈ 0.503.
    approx = base.copy()
    approx[[0, 199]], approx[[99, 100]] = base[[99, 100]], base[[0, 199]]
    moved = row_metrics(base[None], approx[None], flipped)
    assert moved.loc[0, "end_ratio_method"] == pytest.approx(0.5 / 99.5 * 100)
    assert moved.loc[0, "end_ratio_diff"] == pytest.approx(0.5 / 99.5 * 100 - 100)
    # Top 10 of approx: indices 99 (now largest), 1..9 → 9 of the exact top 10 {0..9}.
    assert moved.loc[0, "top10_overlap"] == pytest.approx(0.9)
    assert top1pct_k(1600) == 16 and top1pct_k(200) == 2 and top1pct_k(50) == 1


def test_shape_agreement_uses_the_run_thresholds():
    rng = np.random.default_rng(0)
    s_curve = rng.standard_t(3, 400)  # heavy tails: an S under the default rule
    z_curve = np.r_[np.full(200, 1.0), np.full(200, -1.0)] + rng.normal(0, 0.01, 400)
    flipped = np.zeros(400, dtype=bool)
    flipped[:4] = True
    table = row_metrics(s_curve[None], z_curve[None], flipped)
    assert table.loc[0, "shape_exact"] == "S" and table.loc[0, "shape_method"] == "Z"
    assert not table.loc[0, "shape_agree"]
    loose = row_metrics(s_curve[None], z_curve[None], flipped, ShapeRule(s_min=5.0, z_max=-5.0))
    assert loose.loc[0, "shape_exact"] == loose.loc[0, "shape_method"] == "backslash"


def test_detector_metrics_by_hand():
    flipped = np.zeros(20, dtype=bool)
    flipped[[0, 1]] = True
    perfect = detector_metrics(np.r_[10.0, 9.0, np.zeros(18)], flipped)
    assert perfect == {"recall_at_10pct": 1.0, "average_precision": 1.0}
    # Flips ranked 1st and 3rd: AP = (1/1 + 2/3) / 2; 10 % of 20 = 2 inspected → recall 0.5.
    mixed = detector_metrics(np.r_[10.0, 8.0, 9.0, np.zeros(17)], flipped)
    assert mixed["recall_at_10pct"] == pytest.approx(0.5)
    assert mixed["average_precision"] == pytest.approx((1 + 2 / 3) / 2)


# ---- test-row subsets


def test_subset_rows_match_the_full_run(checkpoints):
    """A subset's rows agree with the same rows of a full run to float32 rounding.

    Not bitwise: the batched per-example gradients (padding width of the batch), the
    word-embedding vocabulary block (its width is the subset's vocabulary) and the matrix
    product (its blocking depends on the number of test columns) sum in other orders.
    """
    train, test = random_batch(10, 2), random_batch(6, 3)
    rows = [1, 4, 5]
    for engine in (TracInCP(checkpoints, scope="all"), FactorizedTracIn(checkpoints, 4)):
        full = engine.compute(train, test)
        sub = engine.compute(train, batch_rows(test, rows))
        scale = np.abs(full.matrix).max()
        assert np.abs(full.matrix[rows] - sub.matrix).max() <= 1e-5 * scale
        assert np.array_equal(full.self_influence, sub.self_influence)
        assert np.array_equal(
            np.argsort(-full.matrix[rows], axis=1, kind="stable")[:, :3],
            np.argsort(-sub.matrix, axis=1, kind="stable")[:, :3],
        )


def test_select_test_rows(checkpoints, tmp_path):
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints, n_train=12, n_test=8), [2, 5])
    rows, wrong = select_test_rows(run, "misclassified+random:3")
    assert len(rows) == 5 and {2, 5} <= set(rows.tolist()) and wrong.sum() == 2
    again, _ = select_test_rows(run, "misclassified+random:3")
    assert np.array_equal(rows, again)  # seeded by the run's seed
    assert select_test_rows(run, "misclassified")[0].tolist() == [2, 5]
    assert select_test_rows(run, "all")[0].tolist() == list(range(8))
    # More random rows than exist: all of them, not a refusal.
    assert select_test_rows(run, "misclassified+random:7")[0].tolist() == list(range(8))


# ---- the whole study on a tiny run


def test_error_study_writes_its_files(checkpoints, tmp_path):
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints, n_train=12, n_test=6), [0, 3])
    summary = error_study(
        run,
        methods="head,dense:8,factorized:2",
        test_subset="misclassified+random:2",
        device="cpu",
        progress=False,
        command="test",
    )
    table = pd.read_parquet(run / TABLE)
    assert set(table["method"]) == {"head", "dense:8", "factorized:2"} and len(table) == 12
    assert table["misclassified"].sum() == 2 * 3
    assert set(summary["methods"]) == {"head", "dense:8", "factorized:2"}
    stored = json.loads((run / SUMMARY).read_text())
    assert stored["test_positions"] == summary["test_positions"] and stored["command"] == "test"
    for m in stored["methods"].values():
        assert -1 <= m["spearman_median"] <= 1 and 0 <= m["shape_agreement"] <= 1
        assert m["seconds"] >= 0 and m["n_params"] > 0
        assert set(m["self_influence"]) >= {"recall_at_10pct", "average_precision"}
    # The reference is exact all-parameter TracIn of the selected rows (brute force).
    train, test, _ = encode_run_data(run, 16, np.array(summary["test_positions"]))
    ref, ref_self = brute_tracin(checkpoints, train, test, "all")
    saved = np.load(run / WORK_DIR / "all" / "result.npz")
    assert (
        relative_error(saved["matrix"], ref) < 1e-5
        and relative_error(saved["self_influence"], ref_self) < 1e-5
    )
    assert load_error_study(run)[1].equals(table)
    # A rerun reuses every method's result (no shard recomputed).
    stamp = (run / WORK_DIR / "head" / "result.npz").stat().st_mtime_ns
    error_study(run, methods="head", test_subset="misclassified+random:2", progress=False)
    assert (run / WORK_DIR / "head" / "result.npz").stat().st_mtime_ns == stamp


def test_error_study_reuses_the_runs_own_exact_scores(checkpoints, tmp_path):
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints, n_train=12, n_test=6), [1])
    run_tracin(run, device="cpu", progress=False)
    summary = error_study(run, methods="head", test_subset="all", progress=False)
    assert summary["reference"]["source"].startswith("run tracin.npy")
    assert not (run / WORK_DIR / "all").exists()


# ---- bad input on the command line: one sentence, exit 2, nothing written


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "argv",
    [
        ["error-study", "RUN", "--methods", "dense:0"],
        ["error-study", "RUN", "--methods", "factorized:x"],
        ["error-study", "RUN", "--methods", "all"],
        ["error-study", "RUN", "--test-subset", "random:0"],
        ["error-study", "RUN", "--dtype", "fp16"],
        ["tracin", "RUN", "--project", "0"],
        ["tracin", "RUN", "--project", "-4"],
        ["tracin", "RUN", "--project", "factorized:"],
        ["tracin", "RUN", "--project", "factorized:0"],
        ["tracin", "RUN", "--dtype", "int8"],
    ],
)
def test_cli_bad_input(checkpoints, tmp_path, capsys, argv):
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints), [0])
    before = _snapshot(run)
    capsys.readouterr()
    assert main([str(run) if a == "RUN" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert _snapshot(run) == before


@pytest.mark.parametrize("command", ["tracin", "error-study"])
def test_cli_bf16_without_native_support(checkpoints, tmp_path, capsys, monkeypatch, command):
    import core.influence.engine as engine

    monkeypatch.setattr(engine, "bf16_native", lambda device: False)
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints), [0])
    before = _snapshot(run)
    capsys.readouterr()
    assert main([command, str(run), "--dtype", "bf16", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "bf16" in err and err.count("\n") == 1
    assert _snapshot(run) == before


class _NoLinear(nn.Module):
    """A 'classifier' with an embedding and a parameter vector, but no linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb


@pytest.mark.parametrize("command", ["tracin", "error-study"])
def test_cli_factorized_without_linear_layers(checkpoints, tmp_path, capsys, monkeypatch, command):
    import core.learning.models

    monkeypatch.setattr(
        core.learning.models, "load_classifier", lambda path, device="cpu": _NoLinear()
    )
    run = _with_logits(make_checkpoint_run(tmp_path, checkpoints), [0])
    before = _snapshot(run)
    capsys.readouterr()
    argv = (
        ["tracin", str(run), "--project", "factorized:4"]
        if command == "tracin"
        else ["error-study", str(run), "--methods", "factorized:4", "--test-subset", "random:2"]
    )
    assert main(argv) == 2
    assert "nn.Linear" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_bf16_dot_products_are_close_to_fp32(checkpoints):
    """bf16 (where it runs at all: emulated on this CPU) stays within bf16 rounding."""
    train, test = random_batch(10, 2), random_batch(4, 3)
    fp32 = FactorizedTracIn(checkpoints, 4).compute(train, test).matrix
    bf16 = FactorizedTracIn(checkpoints, 4, dtype="bfloat16").compute(train, test).matrix
    assert np.abs(bf16 - fp32).max() <= 0.05 * np.abs(fp32).max()
    dense = TracInCP(checkpoints, scope="all", project=16, dtype=torch.bfloat16)
    dense32 = TracInCP(checkpoints, scope="all", project=16)
    a, b = dense.compute(train, test).matrix, dense32.compute(train, test).matrix
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def test_shards_of_another_dtype_are_refused(checkpoints, tmp_path):
    train, test = random_batch(6, 2), random_batch(2, 3)
    FactorizedTracIn(checkpoints, 2).compute(train, test, shard_dir=tmp_path)
    with pytest.raises(AtlasError, match="dtype"):
        FactorizedTracIn(checkpoints, 2, dtype="bfloat16").compute(train, test, shard_dir=tmp_path)
