"""Shared fixtures: small synthetic review files, one tiny real study run per session, and the
engine tests' tiny-BERT checkpoints and batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["great", "excellent", "love", "perfect", "happy", "wonderful", "works", "recommend"]
NEGATIVE = ["awful", "broken", "hate", "terrible", "refund", "useless", "disappointed", "poor"]
NEUTRAL = ["the", "this", "product", "item", "arrived", "box", "price", "color", "size", "it"]


def synthetic_reviews(n: int, seed: int = 0) -> pd.DataFrame:
    """Short English reviews whose sentiment is carried by a few polar words (learnable fast)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(i % 2)
        polar = POSITIVE if label else NEGATIVE
        words = list(rng.choice(NEUTRAL, size=4)) + list(rng.choice(polar, size=2))
        rng.shuffle(words)
        rows.append({"review": " ".join(words) + f" #{i}", "sentiment": "pos" if label else "neg"})
    return pd.DataFrame(rows)


def python_lines(
    code: str, *args: object, env: dict[str, str], timeout: int, python: str = sys.executable
) -> list[str]:
    """Run ``code`` in a fresh ``python`` from the repository root; its output lines. A
    non-zero exit fails the test with the end of its stderr."""
    out = subprocess.run(
        [python, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


def csv_args(csv: Path) -> list[str]:
    """CLI options that point a study at a :func:`synthetic_reviews` file."""
    return ["--dataset", str(csv), "--text-col", "review", "--label-col", "sentiment"]


def tiny_bert(vocab_size: int, seed: int | None = 0, layers: int = 2, **config: object):
    """A random BERT classifier (hidden 16) small enough to run in milliseconds."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if seed is not None:
        torch.manual_seed(seed)
    settings = {
        "hidden_size": 16,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
        **config,
    }
    bert = BertConfig(vocab_size=vocab_size, num_hidden_layers=layers, num_labels=2, **settings)
    return BertForSequenceClassification(bert)


@pytest.fixture
def one_torch_thread():
    """Train with one torch thread: on a shared 2-core machine more threads thrash."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, float]]:
    """The engine tests' three drifting checkpoints of a tiny BERT, saved for the module
    (see ``tracin_reference.saved_checkpoints``)."""
    from tracin_reference import saved_checkpoints

    return saved_checkpoints(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def train() -> dict[str, torch.Tensor]:
    """The engine tests' ten training instances, of varied length."""
    from tracin_reference import random_batch

    return random_batch(10, seed=2)


@pytest.fixture(scope="module")
def test_data() -> dict[str, torch.Tensor]:
    """The engine tests' four test instances."""
    from tracin_reference import random_batch

    return random_batch(4, seed=3)


@pytest.fixture
def reviews_csv(tmp_path: Path) -> Path:
    """A 200-row CSV with columns review / sentiment (neg|pos)."""
    path = tmp_path / "reviews.csv"
    synthetic_reviews(200).to_csv(path, index=False)
    return path


TINY_ARGS = [
    "--preset",
    "quick",
    "--n-train",
    "96",
    "--flip-count",
    "8",
    "--epochs",
    "3",
    "--max-length",
    "16",
    "--batch-size",
    "16",
    "--seed",
    "3",
]


@pytest.fixture(scope="session")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny study (data → train → tracin → analyze) made by the real CLI code."""
    from core.cli import main

    root = tmp_path_factory.mktemp("study")
    csv = root / "reviews.csv"
    synthetic_reviews(240, seed=1).to_csv(csv, index=False)
    cache = root / "cache"
    args = ["run", *TINY_ARGS, *csv_args(csv)]
    assert main([*args, "--cache", str(cache), "--name", "tiny"]) == 0
    return cache / "tiny"
