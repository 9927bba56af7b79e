"""Time the analyze stage (shapes, embeddings, distances, UMAP/PCA, writes) on one run.

Usage::

    python benchmarks/bench_analyze.py cache/<run>          # re-analyze an existing run (--force)
    python benchmarks/bench_analyze.py --synthetic          # a fake 200 test × 1,600 train run

The synthetic run has the quick preset's shape: 1,600 / 200 / 200 instances, 40
flipped, the tiny BERT architecture (random weights, 10 checkpoints listed), a
random TracIn matrix mixing S, Z and straight curves. Each call runs in a fresh
process, so UMAP's one-off compilation is included, as it is in a real
``python -m core analyze``. The synthetic run also stores a 10-checkpoint stack and gradient
norms, so every per-checkpoint view in every normalisation is classified, as on the demo.
Target: ≤ 60 s on a 2-core CPU, all views included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()

import numpy as np  # noqa: E402  (imports are timed from T_START)
import pandas as pd  # noqa: E402

from core.storage import store  # noqa: E402

TARGET_S = 60.0


def build_synthetic_run(
    run: Path, n_train: int = 1600, n_val: int = 200, n_test: int = 200, n_flipped: int = 40
) -> None:
    """Write a pre-analyze run with the quick preset's sizes and a random tiny BERT."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from core.learning.models import TINY_ARCH

    rng = np.random.default_rng(0)
    run.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(2000)]
    vocab = run / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(run / store.TOKENIZER_DIR))
    vocab.unlink()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words), max_position_embeddings=64, num_labels=2, **TINY_ARCH
    )
    BertForSequenceClassification(config).save_pretrained(str(run / "checkpoints/epoch-10"))
    # Only the last checkpoint is read by analyze; the list mimics a 10-epoch run.
    checkpoints = [
        {"epoch": e, "path": f"checkpoints/epoch-{e:02d}", "lr": 1e-3} for e in range(1, 11)
    ]

    n = n_train + n_val + n_test
    labels = rng.integers(0, 2, n)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n_train, n_flipped, replace=False)] = True
    texts = [" ".join(rng.choice(words, rng.integers(5, 40))) for _ in range(n)]
    inst = pd.DataFrame(
        {
            "id": np.arange(n),
            "split": ["train"] * n_train + ["val"] * n_val + ["test"] * n_test,
            "text": texts,
            "label": labels,
            "observed_label": np.where(flipped, 1 - labels, labels),
            "flipped": flipped,
            "source_row": np.arange(n),
        }
    )
    store.write_parquet(run / store.INSTANCES, inst)

    # A third each of S (heavy tails), Z (two plateaus) and straight (uniform) curves.
    kind = rng.integers(0, 3, n_test)[:, None]
    heavy = rng.standard_t(1.5, size=(n_test, n_train)) * 0.01
    plateaus = np.where(rng.random((n_test, n_train)) < 0.5, 1.0, -1.0)
    plateaus += rng.normal(0, 0.05, plateaus.shape)
    straight = rng.uniform(-1, 1, (n_test, n_train))
    tracin = np.where(kind == 0, heavy, np.where(kind == 1, plateaus, straight))
    # Ten checkpoints' contributions summing (in float32, in order) to the matrix, and norms.
    parts = rng.dirichlet(np.ones(10), size=(n_test, n_train)).transpose(2, 0, 1)
    stack = (parts * tracin[None]).astype(np.float32)
    summed = np.zeros((n_test, n_train), np.float32)
    for part in stack:
        summed += part
    store.write_npy(run / store.TRACIN_PER_CHECKPOINT, stack)
    store.write_npy(run / store.TRACIN, summed)
    norms = rng.uniform(0.5, 2.0, (10, n_train + n_test)).astype(np.float32)
    store.write_npy(run / store.GRAD_NORMS_TRAIN, norms[:, :n_train])
    store.write_npy(run / store.GRAD_NORMS_TEST, norms[:, n_train:])
    store.write_npy(run / store.LOGITS, rng.normal(size=(10, n, 2)).astype(np.float32))
    store.write_json(
        run / store.MANIFEST,
        {
            "kind": "run",
            "name": run.name,
            "status": "complete",
            "config": {"preset": "quick", "seed": 0, "max_length": 64, "device": "cpu"},
            "n_train": n_train,
            "n_val": n_val,
            "n_test": n_test,
            "n_flipped": n_flipped,
            "checkpoints": checkpoints,
            "stages": {s: {"status": "complete"} for s in ("data", "train", "tracin")},
        },
    )


def main() -> int:
    """Parse arguments, run analyze once, print stage times; exit 1 when over the target."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="an existing run folder (re-analyzed with force)")
    parser.add_argument("--synthetic", action="store_true", help="build and time a fake run")
    parser.add_argument("--keep", help="with --synthetic: build the fake run here and keep it")
    args = parser.parse_args()
    if bool(args.run) == bool(args.synthetic):
        parser.error("give a run folder or --synthetic (not both)")

    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(args.keep) if args.keep else Path(tmp) / "synthetic"
            t = time.perf_counter()
            build_synthetic_run(run)
            print(f"built synthetic run in {time.perf_counter() - t:.1f} s: {run}", flush=True)
            # Time it in a fresh process, so torch's import and UMAP's compilation count
            # as they do in `python -m core analyze`.
            return subprocess.run([sys.executable, __file__, str(run)], check=False).returncode

    run = Path(args.run)
    t_imports = time.perf_counter()
    import core.analysis.geometry  # noqa: F401  (torch: paid by every CLI call)
    import core.learning.models  # noqa: F401  (transformers)
    from core.analysis.analyze import analyze_run

    t0 = time.perf_counter()
    result = analyze_run(run, force=True, progress=False)
    total = time.perf_counter() - t0
    stage = store.load_manifest(run)["stages"]["analyze"]
    tracin = store.read_npy(run / store.TRACIN)

    print(f"run: {tracin.shape[0]} test × {tracin.shape[1]} train, {run}")
    print(f"  {'imports (torch, HF)':<22} {t0 - t_imports:6.1f} s")
    for name, secs in stage["timings_s"].items():
        print(f"  {name:<22} {secs:6.1f} s")
    print(f"  {'analyze_run total':<22} {total:6.1f} s")
    wall = time.perf_counter() - T_START
    print(f"  {'process wall':<22} {wall:6.1f} s   (target ≤ {TARGET_S:.0f} s)")
    # CPU time is less sensitive than wall time to other jobs sharing the cores.
    print(f"  {'process CPU time':<22} {time.process_time():6.1f} s   (all threads)")
    if hasattr(os, "getloadavg"):
        print(
            f"  {'load average (1 min)':<22} {os.getloadavg()[0]:6.1f}   on {os.cpu_count()} CPUs"
        )
    counts = {k: v["count"] for k, v in result["by_shape"]["all"].items()}
    print(f"  shape counts: {json.dumps(counts)}")
    n_views = len(result.get("views", {}).get("counts", {}))
    print(f"  per-checkpoint views classified: {n_views}")
    return 0 if wall <= TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
