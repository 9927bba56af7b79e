"""Embedding geometry: [CLS] vectors from a tiny random BERT, distances, kNN flip share, 2-D maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from core.analysis.geometry import (
    checkpoint_entry,
    cls_embeddings,
    embed_token_ids,
    euclidean_distances,
    exact_knn,
    knn_flip_share,
    project_2d,
)
from core.learning.models import collate
from core.storage.errors import AtlasError
from tests.conftest import tiny_bert


def tiny_model(seed: int = 0) -> BertForSequenceClassification:
    """A randomly initialised two-layer BERT over a 40-token vocabulary."""
    return tiny_bert(40, seed)


def random_ids(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id lists of varied length: [CLS]=2 … [SEP]=3, words from 5..39."""
    rng = np.random.default_rng(seed)
    return [[2, *rng.integers(5, 40, size=rng.integers(1, 12)).tolist(), 3] for _ in range(n)]


@torch.no_grad()
def direct_cls(model, seq: list[int]) -> np.ndarray:
    """The final-layer [CLS] vector of one unpadded instance, through the full model."""
    model.eval()
    out = model(input_ids=torch.tensor([seq]), output_hidden_states=True)
    return out.hidden_states[-1][0, 0].numpy()


def test_cls_embeddings_match_a_direct_forward_pass():
    model = tiny_model()
    ids = random_ids(6)
    emb = cls_embeddings(model, [collate(ids[:3], 0), collate(ids[3:], 0)])
    assert emb.shape == (6, 16) and emb.dtype == np.float32
    for i, seq in enumerate(ids):
        np.testing.assert_allclose(emb[i], direct_cls(model, seq), rtol=1e-4, atol=1e-5)


def test_embed_token_ids_returns_input_order_and_restores_training_mode():
    model = tiny_model(1)
    model.train()  # dropout on: embeddings must still be deterministic
    ids = random_ids(11, seed=5)
    emb = embed_token_ids(model, ids, pad_id=0, batch_size=4)
    assert model.training
    for i in (0, 4, 10):
        np.testing.assert_allclose(emb[i], direct_cls(model, ids[i]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(emb, embed_token_ids(model, ids, pad_id=0, batch_size=4))


def test_euclidean_distances_match_brute_force():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5)).astype(np.float32)
    b = rng.normal(size=(9, 5)).astype(np.float32)
    b[0] = a[0]  # a zero distance must come out as 0, not NaN from rounding
    d = euclidean_distances(a, b)
    assert d.shape == (7, 9) and d.dtype == np.float32
    expected = np.linalg.norm(a[:, None, :].astype(np.float64) - b[None, :, :], axis=2)
    np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        euclidean_distances(a, b[:, :3])


def test_knn_flip_share():
    d = np.array([[0.1, 0.2, 0.3, 5.0, 6.0], [9.0, 8.0, 0.1, 0.2, 0.3]])
    flipped = np.array([True, False, False, True, True])
    assert knn_flip_share(d, flipped, k=3).tolist() == pytest.approx([1 / 3, 2 / 3])
    assert knn_flip_share(d, flipped, k=1).tolist() == [1.0, 0.0]
    # k beyond n_train is capped: the share of the whole training set.
    assert knn_flip_share(d, flipped, k=50).tolist() == pytest.approx([0.6, 0.6])
    with pytest.raises(ValueError):
        knn_flip_share(d, flipped[:2])


def test_exact_knn_matches_a_full_sort(monkeypatch):
    import core.analysis.geometry as geometry

    monkeypatch.setattr(geometry, "_DISTANCE_BLOCK", 7)  # several blocks
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    idx, dist = exact_knn(x, 5)
    full = np.linalg.norm(x[:, None] - x[None], axis=2)
    assert idx.shape == (30, 5) and idx.dtype == np.int64 and dist.dtype == np.float32
    np.testing.assert_array_equal(idx, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5], atol=1e-5)
    assert (idx[:, 0] == np.arange(30)).all() and (dist[:, 0] == 0).all()
    assert exact_knn(x[:3], 5)[0].shape == (3, 3)


@pytest.mark.slow
def test_project_2d_umap_and_pca():
    # The only test that fits UMAP, on tiny data; still slow, as its first fit compiles (~20 s).
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(8)[:3] * 10, 12, axis=0)
    emb = (centres + rng.normal(size=(36, 8))).astype(np.float32)
    maps = project_2d(emb, seed=3)
    assert set(maps) == {"umap", "pca"}
    for coords in maps.values():
        assert coords.shape == (36, 2) and coords.dtype == np.float32
        assert np.isfinite(coords).all()
    again = project_2d(emb, seed=3)
    np.testing.assert_allclose(again["umap"], maps["umap"], atol=1e-5)
    # UMAP keeps the three clusters apart: within-cluster spread below between-cluster gaps.
    u = maps["umap"]
    means = np.stack([u[i * 12 : (i + 1) * 12].mean(axis=0) for i in range(3)])
    spread = max(
        np.linalg.norm(u[i * 12 : (i + 1) * 12] - means[i], axis=1).max() for i in range(3)
    )
    gaps = [np.linalg.norm(means[i] - means[j]) for i in range(3) for j in range(i + 1, 3)]
    assert min(gaps) > spread


def test_pca_of_collinear_points_lies_on_the_first_axis(monkeypatch):
    import core.analysis.geometry as geometry

    monkeypatch.setattr(geometry, "_umap_2d", lambda x, seed: np.zeros((len(x), 2), np.float32))
    t = np.linspace(-1, 1, 10)
    emb = np.stack([t, 2 * t, -t], axis=1)
    pca = project_2d(emb)["pca"]
    np.testing.assert_allclose(pca[:, 1], 0.0, atol=1e-5)
    np.testing.assert_allclose(np.abs(pca[:, 0]), np.abs(t) * np.sqrt(6), rtol=1e-4)


def test_project_2d_with_too_few_points():
    maps = project_2d(np.ones((3, 4)))
    assert np.isnan(maps["umap"]).all() and maps["pca"].shape == (3, 2)


def test_checkpoint_entry():
    manifest = {"checkpoints": [{"epoch": 1, "path": "a"}, {"epoch": 2, "path": "b"}]}
    assert checkpoint_entry(manifest)["epoch"] == 2
    assert checkpoint_entry(manifest, -1)["index"] == 1
    assert checkpoint_entry(manifest, 0)["path"] == "a"
    with pytest.raises(AtlasError, match="out of range"):
        checkpoint_entry(manifest, 2)
    with pytest.raises(AtlasError, match="no checkpoints"):
        checkpoint_entry({})
