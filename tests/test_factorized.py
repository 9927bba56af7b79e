"""Tests of the factorized (LoGra-style) projection against exact TracIn on a tiny random BERT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from runstore_factory import make_checkpoint_run
from torch import nn
from tracin_reference import (
    LRS,
    batch_rows,
    brute_tracin,
    relative_error,
)
from transformers import BertForSequenceClassification

from core.influence import TracInCP, compare_to_exact
from core.influence.factorized import FactorizedGrads, FactorizedTracIn, factorized_tracin
from core.options.tracin_options import parse_project
from core.storage import store
from core.storage.errors import AtlasError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def modules(checkpoints) -> list[tuple[nn.Module, float]]:
    """The same checkpoints loaded once (the seed-averaging test reuses them many times)."""
    return [
        (BertForSequenceClassification.from_pretrained(path).eval(), lr) for path, lr in checkpoints
    ]


@pytest.fixture(scope="module")
def exact(checkpoints, train, test_data) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force all-parameter TracIn (one backward per instance, float64)."""
    return brute_tracin(checkpoints, train, test_data, "all")


def _one_sentence(err: pytest.ExceptionInfo) -> None:
    """The message is a single line ending in a full stop, with no second sentence."""
    text = str(err.value)
    assert text.endswith(".") and "\n" not in text and ". " not in text, text


# ---------------------------------------------------------------- exactness and padding


def test_identity_projections_reproduce_exact_all_parameter_tracin(
    checkpoints, train, test_data, exact
):
    ref_matrix, ref_self = exact
    result = factorized_tracin(
        checkpoints,
        train,
        test_data,
        k=4,
        identity=True,
        batch_size=3,
        chunk_size=4,
        per_checkpoint=True,
    )
    assert result.matrix.shape == (4, 10)
    assert relative_error(result.matrix, ref_matrix) < 1e-4
    assert relative_error(result.self_influence, ref_self) < 1e-4
    assert np.allclose(result.per_checkpoint.sum(0), result.matrix, rtol=1e-5, atol=1e-7)
    # The same numbers as the vmap engine's exact scope 'all' (word part, norms included).
    engine = TracInCP(checkpoints, scope="all").compute(train, test_data)
    assert relative_error(result.matrix, engine.matrix) < 1e-4
    assert relative_error(result.train_grad_norms, engine.train_grad_norms) < 1e-4
    assert relative_error(result.test_grad_norms, engine.test_grad_norms) < 1e-4
    model = BertForSequenceClassification.from_pretrained(checkpoints[0][0])
    # With identities the feature is the whole gradient: one column per parameter.
    grads = FactorizedGrads(model, k=4, identity=True)
    assert grads.width == result.n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("identity", [True, False])
def test_an_instance_scores_the_same_alone_or_in_a_padded_batch(
    modules, train, test_data, identity
):
    full = FactorizedTracIn(modules, k=4, seed=5, batch_size=10, identity=identity)
    matrix = full.compute(train, test_data).matrix
    alone = FactorizedTracIn(modules, k=4, seed=5, batch_size=1, identity=identity)
    assert np.allclose(alone.compute(train, test_data).matrix, matrix, rtol=1e-4, atol=1e-7)
    # Extra padding columns beyond every instance's length change nothing either.
    padded = {
        key: (torch.nn.functional.pad(v, (0, 5)) if v.ndim == 2 else v) for key, v in train.items()
    }
    again = full.compute(padded, batch_rows(test_data, [0, 1, 2, 3])).matrix
    assert np.allclose(again, matrix, rtol=1e-4, atol=1e-7)


def test_token_budget_batches_score_as_one_instance_at_a_time(modules, train, test_data):
    # The default cuts batches by padded tokens, so batches of several sizes occur.
    default = FactorizedTracIn(modules, k=4, seed=5).compute(train, test_data)
    alone = FactorizedTracIn(modules, k=4, seed=5, batch_size=1).compute(train, test_data)
    assert np.allclose(default.matrix, alone.matrix, rtol=1e-4, atol=1e-7)
    assert np.allclose(default.self_influence, alone.self_influence, rtol=1e-4, atol=1e-7)


def test_token_batches_respect_both_limits_and_keep_every_row() -> None:
    from core.influence import EncodedData

    widths = [3, 9, 1, 4, 4, 12, 2, 7, 5, 30]
    ids = torch.zeros(len(widths), 40, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, w in enumerate(widths):
        mask[i, :w] = 1
    data = EncodedData({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(10)}, "x")
    index = np.array([0, 2, 3, 5, 6, 7, 8, 9])
    batches = list(data.token_batches(index, max_tokens=16, max_rows=3))
    assert sorted(np.concatenate(batches).tolist()) == index.tolist()
    for rows in batches:
        padded = len(rows) * max(widths[r] for r in rows)
        assert len(rows) <= 3 and (padded <= 16 or len(rows) == 1)  # row 9 (30) goes alone
    assert [len(b) for b in batches] == [3, 2, 1, 1, 1]  # widths 1,2,3 | 4,5 | 7 | 12 | 30


def test_projection_is_seeded(modules, train, test_data):
    a = factorized_tracin(modules, train, test_data, k=4, seed=7)
    b = factorized_tracin(modules, train, test_data, k=4, seed=7)
    c = factorized_tracin(modules, train, test_data, k=4, seed=8)
    assert np.array_equal(a.matrix, b.matrix) and np.array_equal(a.self_influence, b.self_influence)
    assert not np.allclose(a.matrix, c.matrix)


def test_projected_width_is_k_squared_per_linear_layer(modules):
    model = modules[0][0]
    k = 4
    grads = FactorizedGrads(model, k=k)
    expected = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            # Each side is K wide, or exact when narrower; the bias is one more input column.
            k_in, k_out = min(module.in_features, k), min(module.out_features, k)
            expected += k_out * (k_in + (module.bias is not None))
        elif isinstance(module, nn.Embedding):
            expected += min(module.num_embeddings, k) * min(module.embedding_dim, k)
        elif isinstance(module, nn.LayerNorm):
            expected += 2 * min(module.normalized_shape[0], k)
    assert grads.width == expected


# ------------------------------------------------------------------------ unbiasedness

N_SEEDS = 200


def _bias_check(samples: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(largest |z| of the seed mean against ``target``, error rate of the mean).

    ``samples`` is (n seeds, ...) of estimates; z = (mean − target) / standard error per
    entry. The rate is RMS(mean − target) · sqrt(n) / RMS(one seed − target): about 1 when
    the estimates are unbiased (the mean's error falls like 1/sqrt(n)), growing like
    sqrt(n) with a bias.
    """
    n = len(samples)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(n)
    z = np.abs(mean - target) / np.maximum(se, 1e-12 * np.abs(target).max())
    rms_mean = np.sqrt(((mean - target) ** 2).mean())
    rms_one = np.sqrt(((samples - target) ** 2).mean())
    return float(z.max()), float(rms_mean * np.sqrt(n) / rms_one)


def test_scores_averaged_over_seeds_converge_to_the_exact_ones(modules, train, test_data, exact):
    ref_matrix, ref_self = (t.numpy() for t in exact)
    mats, selfs = [], []
    for seed in range(N_SEEDS):
        res = FactorizedTracIn(modules, k=4, seed=seed).compute(train, test_data)
        mats.append(res.matrix.astype(np.float64))
        selfs.append(res.self_influence.astype(np.float64))
    mats, selfs = np.stack(mats), np.stack(selfs)
    # One seed at K = 4 is far off; otherwise there would be nothing to average away.
    assert np.sqrt(((mats[0] - ref_matrix) ** 2).mean()) > 0.02 * np.abs(ref_matrix).max()
    for samples, target in ((mats, ref_matrix), (selfs, ref_self)):
        for n in (25, N_SEEDS):
            z_max, rate = _bias_check(samples[:n], target)
            # Unbiased: every entry of the mean within 4.5 standard errors of the exact
            # value (about 50 entries), and its error falling like 1/sqrt(n seeds).
            assert z_max < 4.5 and rate < 2.5, (n, z_max, rate)
        # The check has power: a 10 % bias of the same estimates is caught.
        z_biased, rate_biased = _bias_check(1.1 * samples, target)
        assert z_biased > 4.5 and rate_biased > 2.5, (z_biased, rate_biased)


# --------------------------------------------------------------------- shards, options


def test_self_influence_only(modules, train):
    res = factorized_tracin(modules, train, k=4, identity=True)
    assert res.matrix is None and res.test_grad_norms is None
    lrs = np.array(LRS)[:, None]
    assert np.allclose(
        (lrs * res.train_grad_norms.astype(np.float64) ** 2).sum(0), res.self_influence, rtol=1e-4
    )


# -------------------------------------------------------------------- run stage and CLI

RUN_OUTPUTS = (store.TRACIN, store.TRACIN_PER_CHECKPOINT, store.SELF_INFLUENCE)


def test_run_stage_and_cli_take_factorized_k(checkpoints, tmp_path, monkeypatch):
    import core.learning.models
    from core.cli import main
    from core.influence import compute, encode_run_data, plan, run_tracin

    run = make_checkpoint_run(tmp_path, checkpoints)
    train, test = encode_run_data(run, 16)[:2]
    ref = FactorizedTracIn(checkpoints, k=4, seed=3).compute(train, test)
    # Interrupted after the first checkpoint's task: the stage resumes from its shards.
    tasks = plan(run, project="factorized:4", seed=3)
    assert len(tasks) == 3
    compute(tasks[0], device="cpu")
    real, loads = core.learning.models.load_classifier, []

    def counting(path, device="cpu"):
        loads.append(Path(path).name)
        return real(path, device)

    monkeypatch.setattr(core.learning.models, "load_classifier", counting)
    info = run_tracin(run, project="factorized:4", seed=3, device="cpu", progress=False)
    # epoch-01 once, by the up-front check only: its shards were already there.
    assert loads == ["epoch-01", "epoch-02", "epoch-03"]
    assert info["project"] == "factorized:4" and info["params"] == "all"
    assert info["n_params"] == ref.n_params
    assert np.allclose(np.load(run / store.TRACIN), ref.matrix, rtol=1e-5, atol=1e-9)
    assert np.allclose(np.load(run / store.SELF_INFLUENCE), ref.self_influence, rtol=1e-5)
    assert store.load_manifest(run)["stages"]["tracin"]["status"] == "complete"
    # The CLI: a dense dimension still works; factorized:K gives the engine's scores again.
    assert main(["tracin", str(run), "--project", "8", "--device", "cpu"]) == 0
    assert store.load_manifest(run)["tracin"]["project"] == 8
    argv = ["tracin", str(run), "--project", "factorized:4", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    assert np.allclose(np.load(run / store.TRACIN), ref.matrix, rtol=1e-5, atol=1e-9)
    report = compare_to_exact(run, None, "factorized:4", 3, n_test=3, device="cpu", progress=False)
    assert report["project"] == "factorized:4" and report["n_params"] == ref.n_params
    assert report["summary"]["spearman"]["min"] > 0.5  # K = 4 on a 16-wide model: close


@pytest.mark.parametrize(
    "argv",
    [
        ["--project", "factorized:0"],
        ["--project", "factorized:x"],
        ["--project", "0"],
        ["--project", "factorized:4", "--params", "head"],
    ],
)
def test_cli_bad_project_exits_2_and_writes_nothing(checkpoints, tmp_path, capsys, argv):
    from core.cli import main

    run = make_checkpoint_run(tmp_path, checkpoints)
    before = (run / store.MANIFEST).read_text()
    assert main(["tracin", str(run), *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert (run / store.MANIFEST).read_text() == before
    assert not any((run / name).exists() for name in RUN_OUTPUTS)
    assert not (run / store.TRACIN_SHARDS_DIR).exists()


@pytest.mark.parametrize(
    "extra, params, project",
    [
        (["--project", "factorized:16"], "all", "factorized:16"),
        (["--preset", "paper", "--project", "factorized:16"], "all", "factorized:16"),
        (["--project", "64"], "all", 64),
        (["--preset", "paper", "--project", "64"], "all", 64),
        (["--preset", "paper"], "all", "factorized:64"),
        (["--preset", "paper", "--params", "last-2"], "last-2", None),
        (["--preset", "paper", "--params", "all"], "all", None),
    ],
)
def test_run_config_records_the_projection(extra, params, project):
    from core.cli import build_parser, config_from_args
    from core.options.validation import check_config

    config = config_from_args(build_parser().parse_args(["run", *extra]))
    check_config(config)
    assert (config.tracin_params, config.tracin_project) == (params, project)


@pytest.mark.parametrize(
    "extra",
    [
        ["--project", "factorized:0"],
        ["--project", "factorized:4:4"],
        ["--project", "0"],
        ["--project", "factorized:16", "--params", "last-2"],
    ],
)
def test_run_config_refuses_bad_projections(extra):
    from core.cli import build_parser, config_from_args
    from core.options.validation import check_config

    with pytest.raises(AtlasError, match="--project") as err:
        check_config(config_from_args(build_parser().parse_args(["run", *extra])))
    _one_sentence(err)


def test_core_run_with_factorized_projection(tmp_path, reviews_csv):
    from core.cli import main
    from tests.conftest import TINY_ARGS, csv_args

    cache = tmp_path / "cache"
    argv = ["run", *TINY_ARGS, *csv_args(reviews_csv), "--project", "factorized:8"]
    assert main([*argv, "--until", "tracin", "--cache", str(cache), "--name", "fz"]) == 0
    manifest = store.load_manifest(cache / "fz")
    assert manifest["config"]["tracin_project"] == "factorized:8"
    assert manifest["tracin"]["project"] == "factorized:8" and manifest["tracin"]["params"] == "all"
    matrix = np.load(cache / "fz" / store.TRACIN)
    assert matrix.shape == (manifest["tracin"]["n_test"], manifest["tracin"]["n_train"])
    assert np.isfinite(matrix).all() and np.abs(matrix).max() > 0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("k", [0, -3, True, 2.5, "8", None])
def test_bad_dimension_raises_one_sentence(checkpoints, k):
    with pytest.raises(AtlasError) as err:
        FactorizedTracIn(checkpoints, k=k)
    _one_sentence(err)


class _NoLinear(nn.Module):
    """Embeddings and a LayerNorm only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)


class _Conv(nn.Module):
    """A linear layer beside a parameter the method does not cover."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.conv = nn.Conv1d(4, 4, 3)


class _Tied(nn.Module):
    """An output layer that reuses the embedding matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight


@pytest.mark.parametrize(
    "model, match",
    [
        (_NoLinear(), "none"),
        (_Conv(), "conv.weight"),
        (nn.Sequential(), "none"),
        (_Tied(), "tied"),
    ],
)
def test_unsupported_model_raises_one_sentence(model, match, train):
    with pytest.raises(AtlasError, match=match) as err:
        FactorizedGrads(model, k=4)
    _one_sentence(err)
    with pytest.raises(AtlasError):
        factorized_tracin([(model, 0.1)], train, k=4)


def test_bad_checkpoints_and_data_raise(checkpoints, train, tmp_path):
    with pytest.raises(AtlasError):
        FactorizedTracIn([], k=4)
    with pytest.raises(AtlasError):
        FactorizedTracIn([("x",)], k=4)
    with pytest.raises(AtlasError, match="does not exist"):
        FactorizedTracIn([(tmp_path / "nope", 0.1)], k=4).check()
    no_labels = {key: v for key, v in train.items() if key != "labels"}
    with pytest.raises(AtlasError, match="labels"):
        FactorizedTracIn(checkpoints, k=4).compute(no_labels)


# ------------------------------------------------------------------------ parse_project


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("64", ("dense", 64)),
        (64, ("dense", 64)),
        (" 8 ", ("dense", 8)),
        ("factorized:16", ("factorized", 16)),
        ("factorized:1", ("factorized", 1)),
    ],
)
def test_parse_project_accepts(spec, expected):
    assert parse_project(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "0",
        "-3",
        "1.5",
        "",
        "factorized",
        "factorized:",
        "factorized:0",
        "factorized:-2",
        "factorized:x",
        "factorized:4:4",
        "dense:4",
        "Factorized:4",
        0,
        True,
        None,
    ],
)
def test_parse_project_rejects_with_one_sentence(spec):
    with pytest.raises(AtlasError) as err:
        parse_project(spec)
    _one_sentence(err)
