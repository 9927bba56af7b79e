"""Tests of the TracIn engine against a brute-force reference on a tiny random BERT."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from runstore_factory import make_checkpoint_run
from tracin_reference import (
    LRS,
    batch_rows,
    brute_grads,
    brute_tracin,
    relative_error,
    tiny_model,
)
from transformers import BertForSequenceClassification

from core.influence import (
    FactorizedTracIn,
    Projector,
    TracInCP,
    compare_to_exact,
    norm_shard_name,
    run_tracin,
    scope_error,
    select_parameters,
    shard_name,
)
from core.storage import store
from core.storage.errors import AtlasError

SCOPES = ["all", "no-word-embeddings", "last-1", "head"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scope", SCOPES)
def test_matches_brute_force_for_every_scope(checkpoints, train, test_data, scope):
    ref_matrix, ref_self = brute_tracin(checkpoints, train, test_data, scope)
    engine = TracInCP(checkpoints, scope=scope, batch_size=3, chunk_size=4)
    result = engine.compute(train, test_data, per_checkpoint=True)
    assert result.matrix.shape == (4, 10)
    assert relative_error(result.matrix, ref_matrix) < 1e-5
    assert relative_error(result.self_influence, ref_self) < 1e-5
    assert np.allclose(result.per_checkpoint.sum(0), result.matrix, rtol=1e-5, atol=1e-7)
    model = BertForSequenceClassification.from_pretrained(checkpoints[0][0])
    assert result.n_params == sum(p.numel() for _, p in select_parameters(model, scope))


@pytest.mark.parametrize("scope", ["all", "last-1"])
def test_per_checkpoint_gradient_norms_match_brute_force(checkpoints, train, test_data, scope):
    from transformers import AutoModelForSequenceClassification

    result = TracInCP(checkpoints, scope=scope, batch_size=3, chunk_size=4).compute(
        train, test_data
    )
    assert result.train_grad_norms.shape == (3, 10) and result.test_grad_norms.shape == (3, 4)
    for i, (path, _) in enumerate(checkpoints):
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        ref_train = brute_grads(model, train, scope).norm(dim=1)
        ref_test = brute_grads(model, test_data, scope).norm(dim=1)
        assert relative_error(result.train_grad_norms[i], ref_train) < 1e-5
        assert relative_error(result.test_grad_norms[i], ref_test) < 1e-5


def test_scopes_select_the_documented_parameters():
    model = tiny_model(0)
    names = lambda scope: [n for n, _ in select_parameters(model, scope)]  # noqa: E731
    assert "bert.embeddings.word_embeddings.weight" in names("all")
    assert "bert.embeddings.word_embeddings.weight" not in names("no-word-embeddings")
    assert len(names("no-word-embeddings")) == len(names("all")) - 1
    assert names("head") == ["classifier.weight", "classifier.bias"]
    last1 = names("last-1")
    assert all("layer.0." not in n and "embeddings" not in n for n in last1)
    assert any("layer.1." in n for n in last1) and "bert.pooler.dense.weight" in last1
    assert set(names("last-2")) > set(last1)


def test_self_influence_is_the_diagonal_of_train_by_train(checkpoints, train):
    for scope in ("all", "last-1"):
        engine = TracInCP(checkpoints, scope=scope, batch_size=4)
        diag = torch.diagonal(engine.influence(train, train))
        self_inf = engine.influence(train)
        assert torch.allclose(self_inf, diag, rtol=1e-5, atol=0)


def test_alone_equals_inside_a_padded_batch(checkpoints, train, test_data):
    engine = TracInCP(checkpoints, scope="all", batch_size=5)
    full = engine.influence(train, test_data)
    for j in range(4):
        alone = engine.influence(train, batch_rows(test_data, [j]))
        assert torch.allclose(alone[0], full[j], rtol=1e-5, atol=1e-6 * full.abs().max())
    # A training instance alone versus among longer ones (its batch is padded).
    short = int(train["attention_mask"].sum(1).argmin())
    alone = engine.influence(batch_rows(train, [short]), test_data)
    assert torch.allclose(alone[:, 0], full[:, short], rtol=1e-5, atol=1e-6 * full.abs().max())
    # Extra padding columns beyond every instance's length change nothing either.
    padded = {
        k: (torch.nn.functional.pad(v, (0, 5)) if v.ndim == 2 else v) for k, v in train.items()
    }
    assert torch.allclose(engine.influence(padded, test_data), full, rtol=1e-5, atol=1e-9)


def test_top_k_and_per_checkpoint(checkpoints, train, test_data):
    engine = TracInCP(checkpoints, scope="last-1")
    matrix = engine.influence(train, test_data)
    top = engine.influence(train, test_data, top_k=3)
    assert top.proponents.shape == (4, 3) and top.opponents.shape == (4, 3)
    for j in range(4):
        order = torch.argsort(matrix[j], descending=True)
        assert top.proponents[j].tolist() == order[:3].tolist()
        assert top.opponents[j].tolist() == order.flip(0)[:3].tolist()
        assert torch.allclose(top.proponent_scores[j], matrix[j, order[:3]])
    stack = engine.influence_per_checkpoint(train, test_data)
    assert stack.shape == (3, 4, 10)
    assert torch.allclose(stack.sum(0), matrix, rtol=1e-5, atol=1e-7)
    with pytest.raises(AtlasError):
        engine.influence(train, test_data, top_k=0)


def test_projection_is_seeded_and_preserves_dot_products(checkpoints, train, test_data):
    exact = TracInCP(checkpoints, scope="all").compute(train, test_data)
    a = TracInCP(checkpoints, scope="all", project=2048, seed=7).compute(train, test_data)
    b = TracInCP(checkpoints, scope="all", project=2048, seed=7).compute(train, test_data)
    c = TracInCP(checkpoints, scope="all", project=2048, seed=8).compute(train, test_data)
    assert np.array_equal(a.matrix, b.matrix) and np.array_equal(a.self_influence, b.self_influence)
    assert not np.array_equal(a.matrix, c.matrix)
    # Johnson–Lindenstrauss: norms within a few 1/sqrt(dim), dot products correlated.
    assert np.allclose(a.self_influence, exact.self_influence, rtol=0.1)
    assert np.corrcoef(a.matrix.ravel(), exact.matrix.ravel())[0, 1] > 0.95


def test_projection_of_sparse_rows_equals_dense_projection():
    proj = Projector(dim=8, seed=3, device=torch.device("cpu"))
    shape = (50, 6)
    dense = torch.zeros(2, 50, 6)
    rows = torch.tensor([1, 7, 33, 49])
    vals = torch.randn(2, 4, 6)
    dense[:, rows] = vals
    full = proj.project("w", shape, dense.reshape(2, -1))
    assert torch.allclose(proj.project_rows("w", shape, rows, vals), full, atol=1e-5)
    # A fresh projector with the same seed reproduces it (no hidden global state).
    again = Projector(dim=8, seed=3, device=torch.device("cpu"))
    assert torch.equal(again.project("w", shape, dense.reshape(2, -1)), full)


@pytest.mark.parametrize(
    ("engine_class", "options", "other", "refusal"),
    [
        (
            TracInCP,
            {"scope": "all"},
            {"scope": "head"},
            "--params all \\(this request: --params head\\)",
        ),
        (FactorizedTracIn, {"k": 4, "seed": 1}, {"k": 4, "seed": 2}, "seed"),
    ],
    ids=["exact", "factorized"],
)
def test_shards_resume_without_recomputing(
    engine_class, options, other, refusal, checkpoints, train, test_data, tmp_path
):
    loads = []

    def loader(path, device):
        loads.append(Path(path).name)
        return BertForSequenceClassification.from_pretrained(path).to(device).eval()

    shard_dir = tmp_path / "shards"
    engine = engine_class(checkpoints, chunk_size=4, loader=loader, **options)
    first = engine.compute(train, test_data, shard_dir=shard_dir)
    files = sorted(p.name for p in shard_dir.glob("ckpt-*_chunk-*.npy"))
    assert files == [shard_name(i, c) for i in range(3) for c in range(3)]
    assert sorted(p.name for p in shard_dir.glob("ckpt-*_test-norms.npy")) == [
        norm_shard_name(i) for i in range(3)
    ]
    assert np.load(shard_dir / shard_name(0, 0)).shape == (4 + 1, 4)
    stamps = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("ckpt-*_chunk-*.npy")}
    (shard_dir / shard_name(1, 2)).unlink()
    loads.clear()
    again = engine.compute(train, test_data, shard_dir=shard_dir)
    assert loads == ["epoch-02"]  # only the checkpoint with a missing shard is loaded
    for name, stamp in stamps.items():
        if name != shard_name(1, 2):
            assert (shard_dir / name).stat().st_mtime_ns == stamp
    assert np.array_equal(first.matrix, again.matrix)
    assert np.array_equal(first.self_influence, again.self_influence)
    assert np.array_equal(first.test_grad_norms, again.test_grad_norms)
    # Shards of an older layout without test norms: only the norms are recomputed.
    (shard_dir / norm_shard_name(0)).unlink()
    third = engine.compute(train, test_data, shard_dir=shard_dir)
    assert np.allclose(third.test_grad_norms, first.test_grad_norms, rtol=1e-6)
    # Other options are refused in one sentence, naming the option, instead of mixing or
    # deleting shards.
    before = {p.name: p.read_bytes() for p in shard_dir.iterdir()}
    with pytest.raises(AtlasError, match=refusal) as err:
        engine_class(checkpoints, chunk_size=4, loader=loader, **other).compute(
            train, test_data, shard_dir=shard_dir
        )
    assert str(err.value).endswith(".") and "\n" not in str(err.value), err.value
    assert {p.name: p.read_bytes() for p in shard_dir.iterdir()} == before


def test_test_chunking_gives_the_same_matrix(checkpoints, train, test_data):
    whole = TracInCP(checkpoints, scope="all").compute(train, test_data)
    parts = TracInCP(checkpoints, scope="all", max_test_bytes=1).compute(train, test_data)
    assert np.allclose(parts.matrix, whole.matrix, rtol=1e-5, atol=1e-7)
    assert np.allclose(parts.self_influence, whole.self_influence, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scope": "everything"},
        {"scope": "last-0"},
        {"scope": "last-x"},
        {"project": 0},
        {"project": -4},
        {"batch_size": 0},
        {"dtype": "int8"},
    ],
)
def test_bad_options_raise(checkpoints, kwargs):
    with pytest.raises(AtlasError):
        TracInCP(checkpoints, **kwargs)


def test_bad_inputs_raise(checkpoints, train, tmp_path):
    with pytest.raises(AtlasError):
        TracInCP([])
    with pytest.raises(AtlasError, match="3 layers"):
        TracInCP(checkpoints, scope="last-3").check()
    with pytest.raises(AtlasError, match="does not exist"):
        TracInCP([(tmp_path / "nope", 0.1)]).check()
    no_labels = {k: v for k, v in train.items() if k != "labels"}
    with pytest.raises(AtlasError, match="labels"):
        TracInCP(checkpoints).influence(no_labels)


# ------------------------------------------------------------------------- run stage


def _run_inputs(run: Path) -> tuple[dict, dict]:
    """The run's train/test tensors, encoded as the stage does."""
    from core.influence import encode_run_data

    train, test, _ = encode_run_data(run, 16)
    return train, test


OUTPUTS = (store.TRACIN, store.TRACIN_PER_CHECKPOINT, store.SELF_INFLUENCE)


def test_run_stage_writes_the_contract_files(checkpoints, tmp_path):
    run = make_checkpoint_run(tmp_path, checkpoints)
    info = run_tracin(run, device="cpu", progress=False)
    matrix = np.load(run / store.TRACIN)
    stack = np.load(run / store.TRACIN_PER_CHECKPOINT)
    self_inf = np.load(run / store.SELF_INFLUENCE)
    assert matrix.dtype == np.float32 and matrix.shape == (5, 12)
    assert stack.dtype == np.float32 and stack.shape == (3, 5, 12)
    assert self_inf.dtype == np.float32 and self_inf.shape == (12,)
    norms_train = np.load(run / store.GRAD_NORMS_TRAIN)
    norms_test = np.load(run / store.GRAD_NORMS_TEST)
    assert norms_train.shape == (3, 12) and norms_test.shape == (3, 5)
    lrs = np.array([lr for _, lr in checkpoints])
    assert np.allclose(
        (lrs[:, None] * norms_train.astype(np.float64) ** 2).sum(0), self_inf, rtol=1e-4
    )
    assert np.allclose(stack.sum(0), matrix, rtol=1e-5, atol=1e-6 * abs(matrix).max())
    train, test = _run_inputs(run)
    ref, ref_self = brute_tracin(checkpoints, train, test, "all")
    assert relative_error(matrix, ref) < 1e-5 and relative_error(self_inf, ref_self) < 1e-5
    manifest = store.load_manifest(run)
    assert manifest["stages"]["tracin"]["status"] == "complete"
    assert manifest["tracin"]["params"] == "all" and manifest["tracin"]["n_checkpoints"] == 3
    assert info["n_params"] > 0 and "peak_rss_mb" in info and "tracin" in manifest["timings_s"]
    # Complete with the same options: skipped, files untouched.
    stamp = (run / store.TRACIN).stat().st_mtime_ns
    run_tracin(run, device="cpu", progress=False)
    assert (run / store.TRACIN).stat().st_mtime_ns == stamp
    # Other options recompute.
    run_tracin(run, scope="head", device="cpu", progress=False)
    assert store.load_manifest(run)["tracin"]["params"] == "head"
    assert not np.allclose(np.load(run / store.TRACIN), matrix)


def test_run_stage_resumes_after_an_interruption(checkpoints, tmp_path, monkeypatch):
    import core.learning.models

    run = make_checkpoint_run(tmp_path, checkpoints)
    real = core.learning.models.load_classifier
    calls = []

    def flaky(path, device="cpu"):
        calls.append(Path(path).name)
        if len(calls) == 3:  # the check, checkpoint 1, then dies loading checkpoint 2
            raise KeyboardInterrupt
        return real(path, device)

    monkeypatch.setattr(core.learning.models, "load_classifier", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_tracin(run, device="cpu", progress=False)
    assert not (run / store.TRACIN).exists()
    assert (run / store.TRACIN_SHARDS_DIR / shard_name(0, 0)).exists()
    monkeypatch.setattr(core.learning.models, "load_classifier", real)
    run_tracin(run, device="cpu", progress=False)
    train, test = _run_inputs(run)
    ref, _ = brute_tracin(checkpoints, train, test, "all")
    assert relative_error(np.load(run / store.TRACIN), ref) < 1e-5


@pytest.mark.parametrize(
    "kwargs, complete",
    [({}, False), ({"scope": "last-9"}, True), ({"project": 0}, True), ({"scope": "x"}, True)],
)
def test_run_stage_bad_input_writes_nothing(checkpoints, tmp_path, kwargs, complete):
    run = make_checkpoint_run(tmp_path, checkpoints, complete=complete)
    before = json.loads((run / store.MANIFEST).read_text())
    with pytest.raises(AtlasError):
        run_tracin(run, device="cpu", progress=False, **kwargs)
    assert json.loads((run / store.MANIFEST).read_text()) == before
    assert not any((run / name).exists() for name in OUTPUTS)
    assert not (run / store.TRACIN_SHARDS_DIR).exists()


def test_compare_to_exact(checkpoints, tmp_path):
    run = make_checkpoint_run(tmp_path, checkpoints)
    same = compare_to_exact(run, "all", None, None, n_test=3, device="cpu", progress=False)
    assert same["n_test"] == 3 and same["summary"]["spearman"]["min"] == pytest.approx(1.0)
    head = compare_to_exact(run, "head", None, None, n_test=3, device="cpu", progress=False)
    assert -1 <= head["summary"]["spearman"]["mean"] <= 1
    assert {"test_id", "spearman", "top10_overlap"} <= set(head["per_test"][0])
    assert not any((run / name).exists() for name in OUTPUTS)
    # With the stage done, its stored exact scores are reused and agree with a recompute.
    run_tracin(run, device="cpu", progress=False)
    reused = compare_to_exact(run, "head", None, None, n_test=3, device="cpu", progress=False)
    assert reused["seconds_exact"] == 0
    assert reused["summary"]["spearman"]["mean"] == pytest.approx(
        head["summary"]["spearman"]["mean"]
    )


def test_scope_error_on_known_rankings():
    exact = np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    report = scope_error(exact, np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]), ks=(1,))
    assert [r["spearman"] for r in report["per_test"]] == pytest.approx([1.0, -1.0])
    assert [r["top1_overlap"] for r in report["per_test"]] == [1.0, 0.0]


if os.environ.get("TRACIN_TEST_CUDA") and torch.cuda.is_available():  # pragma: no cover

    def test_cuda_bf16_close_to_cpu(checkpoints, train, test_data):
        cpu = TracInCP(checkpoints).influence(train, test_data)
        gpu = TracInCP(checkpoints, device="cuda", dtype="bfloat16").influence(train, test_data)
        assert relative_error(gpu, cpu) < 2e-2


# ----------------------------------------------------------------- public task API

_WORKER = """
import pickle, sys
import torch
torch.set_num_threads(1)
from core.influence import compute
for task in pickle.load(open(sys.argv[1], "rb")):
    compute(task, device="cpu")
"""


def test_tasks_in_shuffled_order_in_two_processes_match_the_stage_bitwise(checkpoints, tmp_path):
    import pickle
    import subprocess
    import sys

    from core.influence import Task, aggregate, compute, plan

    single = make_checkpoint_run(tmp_path / "single", checkpoints)
    run_tracin(single, device="cpu", progress=False, chunk_size=4)
    spread = make_checkpoint_run(tmp_path / "spread", checkpoints)
    tasks = plan(spread, chunk_size=4, chunks_per_task=1)
    assert len(tasks) == 3 * 3 and all(isinstance(t, Task) for t in tasks)
    assert {t.chunks for t in tasks} == {(0, 1), (1, 2), (2, 3)}
    assert [t.lr for t in tasks[::3]] == LRS and len({t.sha1 for t in tasks}) == 3
    order = np.random.default_rng(5).permutation(len(tasks))
    half = len(order) // 2
    halves = [[tasks[i] for i in order[:half]], [tasks[i] for i in order[half:]]]
    procs = []
    for n, half in enumerate(halves):
        path = tmp_path / f"tasks-{n}.pkl"
        path.write_bytes(pickle.dumps(half))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(path)]))
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    assert plan(spread, chunk_size=4, chunks_per_task=1) == []  # nothing left to do
    # A task run again changes nothing: its shards are present.
    stamps = [p.stat().st_mtime_ns for p in tasks[0].shard_paths()]
    assert compute(tasks[0], device="cpu") == tasks[0].shard_paths()
    assert [p.stat().st_mtime_ns for p in tasks[0].shard_paths()] == stamps
    aggregate(spread)
    for name in (*OUTPUTS, store.GRAD_NORMS_TRAIN, store.GRAD_NORMS_TEST):
        a, b = np.load(single / name), np.load(spread / name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), name


def test_aggregate_names_the_missing_shard(checkpoints, tmp_path):
    from core.influence import aggregate, compute, plan

    run = make_checkpoint_run(tmp_path, checkpoints)
    tasks = plan(run, chunk_size=4, chunks_per_task=1)
    for task in tasks[1:]:
        compute(task, device="cpu")
    with pytest.raises(AtlasError, match=r"lacks ckpt-00_chunk-0000\.npy"):
        aggregate(run)
    assert not (run / store.TRACIN).exists()


def test_a_task_refuses_a_checkpoint_changed_since_the_plan(checkpoints, tmp_path):
    from core.influence import compute, plan

    run = make_checkpoint_run(tmp_path, checkpoints)
    task = plan(run)[0]
    model = BertForSequenceClassification.from_pretrained(run / "checkpoints" / "epoch-01")
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(run / "checkpoints" / "epoch-01")
    with pytest.raises(AtlasError, match="plan the run's TracIn again|another checkpoint 1"):
        compute(task, device="cpu")
    assert not task.shard_paths()[0].exists()
