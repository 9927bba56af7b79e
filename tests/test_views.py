"""Influence views: checkpoint ranges and normalisations, against brute force on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.analysis.views import (
    COSINE,
    RAW,
    RELATIVE,
    View,
    allowed_normalisations,
    full_view,
    missing_normalisations_note,
    standard_views,
    view_scores,
)
from core.storage.errors import AtlasError
from tests.conftest import tiny_bert

LRS = [0.1, 0.05]


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Random unpadded sequences of length 6 over a 30-token vocabulary, random labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (n, 6), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def _grads(model, data) -> torch.Tensor:
    """Per-instance loss gradients over every parameter, one backward each, float64."""
    params = list(model.parameters())
    out = []
    for i in range(len(data["labels"])):
        logits = model(
            input_ids=data["input_ids"][i : i + 1],
            attention_mask=data["attention_mask"][i : i + 1],
            token_type_ids=data["token_type_ids"][i : i + 1],
        ).logits
        loss = torch.nn.functional.cross_entropy(logits, data["labels"][i : i + 1])
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).double())
    return torch.stack(out)


@pytest.mark.usefixtures("one_torch_thread")
def test_normalisations_equal_brute_force_on_a_tiny_model(tmp_path):
    from core.influence import TracInCP

    ckpts = []
    for i, lr in enumerate(LRS):
        path = tmp_path / f"epoch-{i + 1:02d}"
        tiny_bert(40, seed=i, initializer_range=0.3, pad_token_id=0).eval().save_pretrained(path)
        ckpts.append((path, lr))
    train, test = _data(8, 1), _data(3, 2)
    result = TracInCP(ckpts, scope="all").compute(train, test, per_checkpoint=True)

    from transformers import AutoModelForSequenceClassification

    ref = {RAW: 0.0, RELATIVE: 0.0, COSINE: 0.0}
    for path, lr in ckpts:
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        g, g_test = _grads(model, train), _grads(model, test)
        dots = g_test @ g.T
        n_train, n_test = g.norm(dim=1), g_test.norm(dim=1)
        ref[RAW] = ref[RAW] + lr * dots
        ref[RELATIVE] = ref[RELATIVE] + lr * dots / n_train[None, :]
        ref[COSINE] = ref[COSINE] + lr * dots / n_train[None, :] / n_test[:, None]
    for norm, expected in ref.items():
        got = view_scores(
            result.per_checkpoint,
            full_view(2, norm),
            result.train_grad_norms,
            result.test_grad_norms,
        )
        expected = expected.numpy()
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5, norm
    # Cosine terms are cosines times η: bounded by Σ η.
    cos = view_scores(
        result.per_checkpoint, full_view(2, COSINE), result.train_grad_norms, result.test_grad_norms
    )
    assert np.abs(cos).max() <= sum(LRS) + 1e-6


def test_the_full_raw_view_is_the_engines_float32_sum_bit_for_bit():
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(5, 7, 30)).astype(np.float32)
    summed = np.zeros((7, 30), np.float32)
    for part in stack:
        summed += part
    got = view_scores(stack, full_view(5))
    np.testing.assert_array_equal(got, summed.astype(np.float64))
    np.testing.assert_array_equal(view_scores(stack, View(3, 3)), stack[2].astype(np.float64))
    np.testing.assert_array_equal(
        view_scores(stack, View(2, 4), rows=[1, 5]),
        (stack[1, [1, 5]] + stack[2, [1, 5]] + stack[3, [1, 5]]).astype(np.float64),
    )


def test_zero_norms_contribute_nothing_and_bad_views_are_one_sentence():
    stack = np.ones((2, 2, 3), np.float32)
    train_norms = np.array([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    got = view_scores(stack, View(1, 2, RELATIVE), train_norms)
    np.testing.assert_allclose(got, [[2.0, 1.0, 1.5]] * 2)
    with pytest.raises(AtlasError, match="not a range"):
        view_scores(stack, View(2, 3))
    with pytest.raises(AtlasError, match="gradient norms"):
        view_scores(stack, View(1, 2, COSINE), train_norms)
    with pytest.raises(AtlasError, match="normalisation"):
        view_scores(stack, View(1, 2, "zscore"))
    with pytest.raises(AtlasError, match="raw:1-10"):
        View.parse("1-10")
    assert View.parse("cosine:2-5") == View(2, 5, COSINE)
    assert View(2, 5, COSINE).key == "cosine:2-5"


def test_standard_views_are_every_single_and_cumulative_checkpoint():
    got = standard_views(3, (RAW,))
    assert [(k, v.key) for k, v in got] == [
        ("single", "raw:1-1"),
        ("single", "raw:2-2"),
        ("cumulative", "raw:1-2"),
        ("single", "raw:3-3"),
        ("cumulative", "raw:1-3"),
    ]


def test_the_normalisations_a_run_allows_follow_its_stored_arrays():
    assert allowed_normalisations(True, True, True) == (RAW, RELATIVE, COSINE)
    assert allowed_normalisations(True, True, False) == (RAW, RELATIVE)
    # Norms without the per-checkpoint stack, or test norms without training norms, allow raw only.
    assert allowed_normalisations(False, True, True) == (RAW,)
    assert allowed_normalisations(True, False, True) == (RAW,)
    assert allowed_normalisations(False, False, False) == (RAW,)
    assert missing_normalisations_note((RAW, RELATIVE, COSINE)) == ""
    assert "no test gradient norms" in missing_normalisations_note((RAW, RELATIVE))
    assert "only raw" in missing_normalisations_note((RAW,))
