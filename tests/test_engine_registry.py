"""The engine family's registry: a ``--project`` spec picks its engine, and every caller
(CLI help, option parsing, the error study's methods, the stage) follows the registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import core.options.tracin_options as tracin_options
from core.influence import ENGINES, EncodedData, Engine, FactorizedTracIn, TracInCP, engine_for
from core.influence.registry import engine_class
from core.options.error_study_options import parse_method
from core.options.tracin_options import PROJECTIONS, Projection, parse_project, record_project
from core.storage.errors import AtlasError
from tests.conftest import tiny_bert

SHARD_TAIL = ["n_chunks", "n_train", "n_test", "checkpoints", "train_data", "test_data"]


@pytest.fixture(scope="module")
def checkpoints() -> list[tuple[torch.nn.Module, float]]:
    """Two in-memory checkpoints (engines load nothing until they compute)."""
    return [(tiny_bert(30, seed), lr) for seed, lr in ((0, 0.1), (1, 0.05))]


def _encoded(n: int, seed: int) -> EncodedData:
    """``n`` random right-padded instances."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    labels = torch.randint(0, 2, (n,), generator=gen)
    return EncodedData({"input_ids": ids, "attention_mask": mask, "labels": labels}, "x")


def test_every_projection_has_one_engine_and_every_engine_a_projection():
    assert set(ENGINES) == {p.mode for p in PROJECTIONS}
    assert all(Engine in cls.__mro__ for cls in ENGINES.values())  # members inherit its defaults


@pytest.mark.parametrize(
    ("scope", "project", "cls", "recorded_seed"),
    [
        ("all", None, TracInCP, None),
        ("last-1", 64, TracInCP, 3),
        ("head", "16", TracInCP, 3),
        ("all", "factorized:4", FactorizedTracIn, 3),
        ("all", " factorized:+8 ", FactorizedTracIn, 3),
    ],
)
def test_engine_for_picks_the_engine_and_records_the_spec(
    checkpoints, scope, project, cls, recorded_seed
):
    engine = engine_for(checkpoints, scope=scope, project=project, seed=3)
    assert type(engine) is cls and engine_class(project) is cls
    options = engine.options()
    assert options["scope"] == scope
    # The engine records the spec as the config and the manifest do: 64, "factorized:8".
    assert options["project"] == record_project(project)
    assert options["seed"] == recorded_seed
    assert options["dtype"] == "float32" and options["chunk_size"] == engine.chunk_size


def test_a_projection_over_every_parameter_refuses_another_scope(checkpoints):
    with pytest.raises(AtlasError, match="factorized:4 covers every parameter; use --params all"):
        engine_for(checkpoints, scope="head", project="factorized:4")


@pytest.mark.parametrize("project", [None, 8, "factorized:4"])
def test_shard_options_are_the_options_then_data_and_checkpoints(checkpoints, project):
    engine = engine_for(checkpoints, scope="all", project=project)
    tr, te = _encoded(5, 0), _encoded(3, 1)
    shard = engine.shard_options(tr, te, 2)
    options = engine.options()
    assert list(shard) == [*options, *SHARD_TAIL]
    assert {k: shard[k] for k in options} == options
    assert (shard["n_chunks"], shard["n_train"], shard["n_test"]) == (2, 5, 3)
    assert shard["checkpoints"] == ["<module>", "<module>"]
    assert shard["train_data"] == tr.fingerprint() != te.fingerprint() == shard["test_data"]
    assert engine.shard_options(tr, None, 2)["test_data"] is None


class _Doubled(TracInCP):
    """A made-up projection for the test: the dense projection to twice the dimension."""

    @classmethod
    def from_projection(cls, checkpoints, scope, dim, seed, **options):
        return cls(checkpoints, scope=scope, project=2 * dim, seed=seed, **options)


def test_a_new_projection_is_one_class_and_one_entry(checkpoints, monkeypatch):
    doubled = Projection(
        mode="doubled",
        prefix="doubled:",
        method_prefix="doubled:",
        method_spellings=("doubled:N",),
        spelling="doubled:N",
        detail="a test's projection",
        usage="doubled:N (N ≥ 1)",
        method_usage="use doubled:N with N ≥ 1",
        every_parameter=True,
    )
    monkeypatch.setattr(tracin_options, "PROJECTIONS", (*PROJECTIONS, doubled))
    monkeypatch.setitem(ENGINES, "doubled", _Doubled)

    assert parse_project("doubled:5") == ("doubled", 5)
    assert record_project(" doubled:5 ") == "doubled:5"
    method = parse_method("doubled:5")
    assert (method.name, method.params, method.project) == ("doubled:5", "all", "doubled:5")
    with pytest.raises(AtlasError, match="not a doubled projection"):
        parse_method("doubled:5@head")
    with pytest.raises(AtlasError, match=r"or doubled:N \(N ≥ 1\)"):
        parse_project("doubled:0")
    engine = engine_for(checkpoints, scope="all", project="doubled:5")
    assert type(engine) is _Doubled and engine.project == 10
    with pytest.raises(AtlasError, match="doubled:5 covers every parameter"):
        engine_for(checkpoints, scope="head", project="doubled:5")

    from core.cli import build_parser

    helps = {
        action.dest: action.help
        for sub in build_parser()._subparsers._group_actions[0].choices.values()
        for action in sub._actions
    }
    assert "doubled:N (a test's projection)" in helps["project"]
    assert "doubled:N" in helps["tracin_project"] and "doubled:N" in helps["methods"]


def test_the_projections_stay_as_the_cli_documents_them():
    # The spellings, help words and recorded forms are a public interface.
    assert [dataclasses.astuple(p)[:3] for p in PROJECTIONS] == [
        ("dense", "", "dense:"),
        ("factorized", "factorized:", "factorized:"),
    ]
    assert tracin_options.project_help() == (
        "random projection (approximation): a dimension D (dense) or factorized:K "
        "(K per side of every layer, all parameters; core/influence/factorized.py)"
    )
    assert tracin_options.project_help_short() == (
        "TracIn random projection: a dimension D or factorized:K (see `tracin`)"
    )
    assert tracin_options.method_spellings() == ["dense:D", "dense:D@SCOPE", "factorized:K"]
