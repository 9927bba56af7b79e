"""A brute-force TracIn reference on a tiny random BERT, shared by the engine tests.

Three saved checkpoints of one model drifting a little, random padded token batches, and
per-instance gradients by one ordinary backward each: what every engine (exact, dense
projection, factorized) is checked against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import BertForSequenceClassification

from core.influence import select_parameters
from tests.conftest import tiny_bert

VOCAB = 50
LRS = [0.1, 0.05, 0.02]


def tiny_model(seed: int) -> BertForSequenceClassification:
    """A random 2-layer BERT (hidden 16); a large init range gives non-trivial gradients."""
    return tiny_bert(VOCAB, seed, initializer_range=0.3, pad_token_id=0).eval()


def saved_checkpoints(root: Path) -> list[tuple[Path, float]]:
    """Three saved checkpoints of one model drifting a little, with their learning rates."""
    model = tiny_model(0)
    out = []
    gen = torch.Generator().manual_seed(1)
    for i, lr in enumerate(LRS):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        path = root / f"epoch-{i + 1:02d}"
        model.save_pretrained(path)
        out.append((path, lr))
    return out


def random_batch(n: int, seed: int, min_len: int = 3, max_len: int = 12) -> dict[str, torch.Tensor]:
    """Random right-padded token sequences of varied length with random labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    width = int(lengths.max())
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        # Ids from a small range so training and test instances share tokens.
        ids[i, :length] = torch.randint(1, 20, (length,), generator=gen)
        mask[i, :length] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def batch_rows(data: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """A subset of instances, padded only to their own widest row."""
    width = int(data["attention_mask"][rows].sum(1).max())
    return {k: (v[rows, :width] if v.ndim == 2 else v[rows]) for k, v in data.items()}


def brute_grads(model, data: dict[str, torch.Tensor], scope: str) -> torch.Tensor:
    """One ordinary backward per instance (unpadded, 2-D mask): flattened float64 gradients."""
    params = [p for _, p in select_parameters(model, scope)]
    out = []
    for i in range(len(data["labels"])):
        n = int(data["attention_mask"][i].sum())
        logits = model(
            input_ids=data["input_ids"][i : i + 1, :n],
            attention_mask=data["attention_mask"][i : i + 1, :n],
            token_type_ids=data["token_type_ids"][i : i + 1, :n],
        ).logits
        loss = torch.nn.functional.cross_entropy(logits, data["labels"][i : i + 1])
        grads = torch.autograd.grad(loss, params)
        out.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(out)


def brute_tracin(checkpoints, train, test, scope):
    """Reference matrix Σ_i η_i g_test·g_train and self-influence, in float64."""
    from transformers import AutoModelForSequenceClassification

    matrix, self_inf = 0.0, 0.0
    for path, lr in checkpoints:
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        g_train = brute_grads(model, train, scope)
        g_test = brute_grads(model, test, scope)
        matrix = matrix + lr * g_test @ g_train.T
        self_inf = self_inf + lr * (g_train * g_train).sum(1)
    return matrix, self_inf


def relative_error(a, b) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    a, b = torch.as_tensor(np.asarray(a), dtype=torch.float64), torch.as_tensor(np.asarray(b))
    return float((a - b.double()).abs().max() / b.double().abs().max())
