"""Embedding geometry: final-layer [CLS] vectors, test→train distances, kNN flip share, 2-D maps.

This is the similarity side of the paper's hypothesis (§III, Fig. 2): a test
instance with many close training instances should have a Z-shaped curve, a
lonely one an S-shaped curve. The compute functions take plain arrays or a
model and batches, so tests can drive them with a tiny random BERT; only
:func:`run_embeddings` knows about the run store.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.storage import store
from core.storage.errors import AtlasError

# Rows of test embeddings per distance block: bounds the float64 temporary to
# block × n_train × 8 bytes (about 100 MB for 16,000 training instances).
_DISTANCE_BLOCK = 768


@torch.no_grad()
def cls_embeddings(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Return the final-layer hidden state of the first ([CLS]) token for every batch, stacked.

    ``batches`` are dicts of tensors as ``core.learning.models.collate`` makes them; rows come
    back in batch order as float32 (n, hidden). The model is put in eval mode
    (dropout off) and restored afterwards.
    """
    was_training = model.training
    model.eval()
    # The encoder alone when the model has one (BERT: model.bert) skips the head;
    # base_model is the model itself for a bare encoder.
    base = getattr(model, "base_model", model)
    chunks = []
    try:
        for batch in batches:
            enc = {k: v.to(device) for k, v in batch.items()}
            out = base(**enc)
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:  # a model whose base is not an encoder: ask for all layers
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
            chunks.append(hidden[:, 0].float().cpu().numpy())
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros((0, _hidden_size(model)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def embed_token_ids(
    model: torch.nn.Module,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
) -> np.ndarray:
    """Return [CLS] embeddings (n, hidden) for pre-tokenized instances, in input order.

    Batches group similar lengths so little compute goes to padding; the attention
    mask keeps padding from changing any instance's vector.
    """
    from core.learning.models import collate, length_batches  # transformers: loaded on use

    batches = length_batches([len(x) for x in ids], batch_size)
    emb = cls_embeddings(
        model, (collate([ids[i] for i in b], pad_id) for b in batches), device=device
    )
    out = np.empty_like(emb)
    out[np.concatenate(batches) if batches else np.zeros(0, dtype=int)] = emb
    return out


def checkpoint_entry(manifest: Mapping[str, Any], checkpoint: int = -1) -> dict[str, Any]:
    """Return the manifest's entry for a checkpoint chosen by list index (-1: the last).

    Raises :class:`AtlasError` when the run has no checkpoints or the index is out of range.
    """
    checkpoints = manifest.get("checkpoints") or []
    if not checkpoints:
        raise AtlasError("The run has no checkpoints yet; train it first (python -m core run ...).")
    try:
        entry = dict(checkpoints[checkpoint])
    except IndexError:
        raise AtlasError(
            f"Checkpoint index {checkpoint} is out of range; the run has {len(checkpoints)} "
            f"checkpoints (use 0..{len(checkpoints) - 1}, or -1 for the last)."
        ) from None
    entry["index"] = checkpoint % len(checkpoints)
    return entry


def run_embeddings(
    run_dir: str | os.PathLike,
    texts: Sequence[str],
    checkpoint: int = -1,
    device: str = "auto",
    batch_size: int = 128,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embed ``texts`` with a run's tokenizer and checkpoint; return (float32 array, checkpoint entry)."""
    from core.learning import models  # transformers: loaded on use

    run = Path(run_dir)
    manifest = store.load_manifest(run)
    entry = checkpoint_entry(manifest, checkpoint)
    path = run / entry["path"]
    if not path.is_dir():
        raise AtlasError(
            f"{path} does not exist; the checkpoint files were deleted or never written."
        )
    max_length = int(manifest.get("config", {}).get("max_length", 64))
    dev = models.resolve_device(device)
    tokenizer = models.load_tokenizer(run)
    model = models.load_classifier(path, dev)
    ids = models.token_ids(tokenizer, texts, max_length)
    emb = embed_token_ids(model, ids, tokenizer.pad_token_id, device=dev, batch_size=batch_size)
    return emb, entry


def euclidean_distances(test_emb: np.ndarray, train_emb: np.ndarray) -> np.ndarray:
    """Return Euclidean distances (n_test, n_train) as float32.

    Uses ‖a‖² + ‖b‖² − 2a·b (one matrix product per block) in float64, so the
    cancellation for near neighbours stays far below float32 resolution.
    """
    a = np.asarray(test_emb, dtype=np.float64)
    b = np.asarray(train_emb, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two 2-D arrays with equal width, got {a.shape} and {b.shape}")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float32)
    b_sq = np.einsum("ij,ij->i", b, b)
    for start in range(0, a.shape[0], _DISTANCE_BLOCK):
        blk = a[start : start + _DISTANCE_BLOCK]
        sq = np.einsum("ij,ij->i", blk, blk)[:, None] + b_sq[None, :] - 2.0 * (blk @ b.T)
        out[start : start + blk.shape[0]] = np.sqrt(np.maximum(sq, 0.0))
    return out


def knn_flip_share(distances: np.ndarray, flipped: np.ndarray, k: int = 10) -> np.ndarray:
    """Return, per test instance, the share of flipped instances among its k nearest training ones.

    ``k`` is capped at n_train. Among equal distances the choice is arbitrary.
    """
    d = np.asarray(distances)
    mask = np.asarray(flipped, dtype=bool)
    if d.ndim != 2 or mask.shape != (d.shape[1],):
        raise ValueError(f"distances {d.shape} and flipped {mask.shape} do not match")
    n_train = d.shape[1]
    k = int(min(k, n_train))
    if k < 1:
        return np.full(d.shape[0], np.nan)
    nearest = d.argsort(axis=1)[:, :k] if k == n_train else np.argpartition(d, k - 1, axis=1)[:, :k]
    return mask[nearest].mean(axis=1)


def project_2d(emb: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Return 2-D maps of the embeddings: {'umap': (n, 2), 'pca': (n, 2)}, both float32.

    UMAP is seeded (which makes it single-threaded, but reproducible). Its first fit
    in a process spends about 20 s compiling. With fewer than 4 points UMAP is not
    defined and its coordinates are NaN; PCA pads with zeros when the data have
    fewer than two directions.
    """
    x = np.asarray(emb, dtype=np.float32)
    return {"umap": _umap_2d(x, seed), "pca": _pca_2d(x, seed)}


def _pca_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """First two principal-component scores, zero-padded when fewer exist."""
    from sklearn.decomposition import PCA

    n, dim = x.shape
    out = np.zeros((n, 2), dtype=np.float32)
    n_comp = min(2, n, dim)
    # Identical points have no principal directions (sklearn would divide by zero).
    if n_comp >= 1 and n >= 2 and np.ptp(x, axis=0).max() > 0:
        out[:, :n_comp] = PCA(n_components=n_comp, random_state=seed).fit_transform(x)
    return out


def _umap_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """Seeded 2-D UMAP, or NaN coordinates when there are too few points for it."""
    n = x.shape[0]
    if n < 4:
        return np.full((n, 2), np.nan, dtype=np.float32)
    import warnings

    import umap  # imported here: importing it costs seconds (numba)

    k = min(15, n - 1)
    # Exact neighbours by BLAS: below 4,096 points UMAP would otherwise compute all
    # pairs through sklearn with a numba metric called once per pair (tens of seconds).
    knn_idx, knn_dist = exact_knn(x, k)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=k,
        precomputed_knn=(knn_idx, knn_dist, None),
        random_state=seed,
        n_jobs=1,  # random_state forces one thread anyway; saying so silences its warning
        # UMAP's own epoch count for large data; plenty for a picture, and it keeps the
        # quick preset's 2,000 points within the stage's time budget.
        n_epochs=200,
        # Spectral initialisation needs a connected-enough graph; tiny sets get random init.
        init="spectral" if n > 50 else "random",
    )
    with warnings.catch_warnings():
        # Notices about n_jobs, tiny data and the missing NNDescent index (we never call
        # transform) are expected, not the user's problem.
        warnings.simplefilter("ignore", UserWarning)
        coords = reducer.fit_transform(x)
    return np.asarray(coords, dtype=np.float32)


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices int64, distances float32), each (n, k): every point's k nearest, itself included.

    Distances are Euclidean; rows are sorted by distance. Memory stays at one block
    of rows × n distances at a time.
    """
    n = x.shape[0]
    k = min(k, n)
    idx = np.empty((n, k), dtype=np.int64)
    dist = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, _DISTANCE_BLOCK):
        d = euclidean_distances(x[start : start + _DISTANCE_BLOCK], x)
        rows = np.arange(d.shape[0])
        # A point's distance to itself is 0 up to rounding; pin it so it sorts first.
        d[rows, start + rows] = 0.0
        part = (
            np.argpartition(d, k - 1, axis=1)[:, :k]
            if k < n
            else np.tile(np.arange(n), (len(d), 1))
        )
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.argsort(part_d, axis=1, kind="stable")
        idx[start : start + len(d)] = np.take_along_axis(part, order, axis=1)
        dist[start : start + len(d)] = np.take_along_axis(part_d, order, axis=1)
    return idx, dist


def _hidden_size(model: torch.nn.Module) -> int:
    """Width of the model's hidden state, for an empty result of the right shape."""
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or 0)
