"""Benchmark of the TracIn engine, side by side in one process, printing ratios.

1. captum's ``TracInCP`` (per-example gradients by one backward per instance) against ours on
   the same checkpoints, parameters, loss and data: max relative difference of the full
   test × train matrix and the wall-time ratio.
2. Ours against the floor: k × (n_train + n_test) batched forward+backward passes (one
   summed loss per batch, as in training) plus k matrix products of the size of the full
   gradient matrices (n_test × P) · (P × n_train), computed chunk by chunk.
3. Peak memory (process max RSS, measured in a fresh subprocess per size) of the engine at
   two training-set sizes, to show it does not grow with n_train × parameters.

Default sizes run in a few minutes on 2 CPU cores. The model is the quick preset's tiny
BERT architecture (random weights drifting between checkpoints) unless ``--run`` points at
a trained run, whose first k checkpoints and instances are used instead.

    python benchmarks/bench_tracin.py                       # defaults
    python benchmarks/bench_tracin.py --n-train 1600 --n-test 200 --k 10 --skip-captum \\
        --run cache/<quick run>                             # the quick preset's full size
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

# On a shared CPU, OpenMP threads that spin while waiting make 2-thread runs 10-50x
# slower whenever another process holds a core; passive waiting avoids it. Must be set
# before torch loads OpenMP. Override by setting the variable yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from core.influence import TracInCP, peak_rss_mb, select_parameters

try:  # the quick preset's vocabulary size, when core.learning.models says it
    from core.learning.models import TINY_VOCAB_SIZE as VOCAB
except ImportError:  # pragma: no cover
    VOCAB = 6000
SEQ_MIN, SEQ_MAX = 8, 40  # tokens incl. [CLS]/[SEP]; the default dataset averages ~22


def tiny_checkpoints(folder: Path, k: int, seed: int = 0) -> list[tuple[Path, float]]:
    """k checkpoints of the quick preset's tiny BERT, drifting randomly, lr 1e-3."""
    from transformers import BertConfig, BertForSequenceClassification

    from core.learning.models import TINY_ARCH

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=2, pad_token_id=0, **TINY_ARCH
    )
    model = BertForSequenceClassification(config).eval()
    out = []
    for i in range(k):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        path = folder / f"epoch-{i + 1:02d}"
        model.save_pretrained(path)
        out.append((path, 1e-3))
    return out


def synthetic_data(
    n: int,
    seed: int,
    lo: int = SEQ_MIN,
    hi: int = SEQ_MAX,
    *,
    vocab: int = VOCAB,
    first_word: int = 5,
    cls_sep: tuple[int, int] = (2, 3),
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded sentences with Zipf-distributed tokens (so instances share words),
    lengths uniform in [lo, hi]: word ids from ``first_word`` to ``vocab - 1`` between the
    ``cls_sep`` ids, padded to ``width`` (default: the longest)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab - first_word + 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    lengths = rng.integers(lo, hi + 1, n)
    width = width or int(lengths.max())
    ids = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, length in enumerate(lengths):
        ids[i, 0], ids[i, length - 1] = cls_sep
        ids[i, 1 : length - 1] = first_word + rng.choice(len(ranks), length - 2, p=p)
        mask[i, :length] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.zeros(n, width, dtype=torch.long),
        "labels": torch.from_numpy(rng.integers(0, 2, n)),
    }


def batch_loss(
    model: torch.nn.Module, data: dict[str, torch.Tensor], rows: torch.Tensor, widths: np.ndarray
) -> torch.Tensor:
    """Cross-entropy of the instances ``rows`` of ``data``, cut to the longest of them
    (``widths``: every instance's length), as the engines batch."""
    w = int(widths[rows].max())
    logits = model(
        input_ids=data["input_ids"][rows, :w],
        attention_mask=data["attention_mask"][rows, :w],
        token_type_ids=data["token_type_ids"][rows, :w],
    ).logits
    return torch.nn.functional.cross_entropy(logits, data["labels"][rows])


def run_data(run: Path, k: int, n_train: int, n_test: int):
    """First k checkpoints and first n_train / n_test instances of a trained run."""
    from core.influence import encode_run_data, run_checkpoints
    from core.inputs.config import config_from_dict
    from core.storage import store

    manifest = store.load_manifest(run)
    config = config_from_dict(manifest["config"])
    ckpts = run_checkpoints(run, manifest)[:k]
    train, test, _ = encode_run_data(run, config.max_length)

    def head(d, n):
        d = {key: v[:n] for key, v in d.items()}
        width = int(d["attention_mask"].sum(1).max())
        return {key: (v[:, :width] if v.ndim == 2 else v) for key, v in d.items()}

    return ckpts, head(train, n_train), head(test, n_test)


def load(path) -> torch.nn.Module:
    """A checkpoint as an eval-mode classifier."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path)).eval()


# ------------------------------------------------------------------------ captum


def captum_matrix(checkpoints, train, test, scope: str, batch_size: int) -> np.ndarray:
    """The test × train matrix from captum's TracInCP (one backward per instance)."""
    from captum.influence import TracInCP as CaptumTracInCP
    from torch.utils.data import DataLoader, TensorDataset

    class Logits(torch.nn.Module):
        """captum calls model(*inputs) and wants a tensor."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).logits

    wrapper = Logits(load(checkpoints[0][0])).eval()
    # State dicts preloaded: captum reloads a checkpoint for every training batch, and
    # disk reads should not count against it.
    states = {str(p): load(p).state_dict() for p, _ in checkpoints}
    lrs = {str(p): lr for p, lr in checkpoints}

    def load_func(model, path):
        model.model.load_state_dict(states[path])
        model.eval()
        return lrs[path]

    names = [n for n, _ in select_parameters(wrapper.model, scope)]
    layers = None
    if scope != "all":
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        layers = [f"model.{m}" for m in modules]
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    dataset = TensorDataset(*(train[key] for key in keys))
    tracin = CaptumTracInCP(
        wrapper,
        DataLoader(dataset, batch_size=batch_size, shuffle=False),
        checkpoints=[str(p) for p, _ in checkpoints],
        checkpoints_load_func=load_func,
        layers=layers,
        loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
        batch_size=batch_size,
        sample_wise_grads_per_batch=False,
    )
    scores = tracin.influence(
        (test["input_ids"], test["attention_mask"], test["token_type_ids"], test["labels"])
    )
    return scores.detach().numpy()


# ------------------------------------------------------------------------- floor


def floor_seconds(checkpoints, train, test, scope: str, batch_size: int = 32) -> tuple[float, int]:
    """k × (batched forward+backward over train and test) + k full-size matrix products."""
    n_train, n_test = len(train["labels"]), len(test["labels"])
    total = 0.0
    n_params = 0
    chunk = 512
    for path, _ in checkpoints:
        start = time.perf_counter()
        model = load(path)
        params = [p for _, p in select_parameters(model, scope)]
        n_params = sum(p.numel() for p in params)
        for data in (train, test):
            widths = data["attention_mask"].sum(1).numpy()
            order = np.argsort(widths, kind="stable")
            for lo in range(0, len(order), batch_size):
                rows = torch.as_tensor(order[lo : lo + batch_size])
                torch.autograd.grad(batch_loss(model, data, rows, widths), params)
        total += time.perf_counter() - start
        # The matrix product (n_test × P) · (P × n_train), chunked so it fits in memory.
        a = torch.randn(n_test, n_params)
        b = torch.randn(n_params, min(chunk, n_train))
        start = time.perf_counter()
        for lo in range(0, n_train, chunk):
            width = min(chunk, n_train - lo)
            _ = a @ b[:, :width]
        total += time.perf_counter() - start
        del a, b
    return total, n_params


# ------------------------------------------------------------------------ memory


def memory_child(n_train: int, n_test: int, scope: str) -> None:
    """Run the engine once (1 checkpoint) and print JSON with time and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = tiny_checkpoints(Path(tmp), 1)
        train = synthetic_data(n_train, 1, 8, 16)
        test = synthetic_data(n_test, 2, 8, 16)
        base = peak_rss_mb()
        start = time.perf_counter()
        result = TracInCP(ckpts, scope=scope).compute(train, test)
        seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "n_train": n_train,
                "n_params": result.n_params,
                "seconds": round(seconds, 1),
                "rss_before_mb": round(base, 1),
                "peak_rss_mb": round(peak, 1),
            }
        )
    )


def main() -> None:
    """Parse options and print the three comparisons."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--k", type=int, default=3, help="checkpoints")
    ap.add_argument("--scope", default="all")
    ap.add_argument("--run", type=Path, help="use a trained run's checkpoints and instances")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--skip-captum", action="store_true")
    ap.add_argument("--mem-sizes", default="1600,16000", help="'' to skip the memory part")
    ap.add_argument("--mem-test", type=int, default=20)
    ap.add_argument("--_mem-child", type=int, dest="mem_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_child:
        memory_child(args.mem_child, args.mem_test, args.scope)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            ckpts, train, test = run_data(args.run, args.k, args.n_train, args.n_test)
            source = f"run {args.run}"
        else:
            ckpts = tiny_checkpoints(Path(tmp), args.k)
            train, test = synthetic_data(args.n_train, 1), synthetic_data(args.n_test, 2)
            source = "tiny BERT (quick-preset architecture, random weights)"
        n_train, n_test = len(train["labels"]), len(test["labels"])
        print(
            f"data: {source}; n_train={n_train} n_test={n_test} k={len(ckpts)} "
            f"scope={args.scope} threads={torch.get_num_threads()}"
        )

        engine = TracInCP(ckpts, scope=args.scope)
        start = time.perf_counter()
        ours = engine.compute(train, test)
        t_ours = time.perf_counter() - start
        print(f"ours:    {t_ours:8.2f} s  (P = {ours.n_params:,} parameters)")

        t_floor, n_params = floor_seconds(ckpts, train, test, args.scope)
        print(f"floor:   {t_floor:8.2f} s  ours/floor = {t_ours / t_floor:.2f}  (target ≤ 1.5)")

        if not args.skip_captum:
            start = time.perf_counter()
            theirs = captum_matrix(ckpts, train, test, args.scope, batch_size=32)
            t_captum = time.perf_counter() - start
            rel = np.abs(theirs - ours.matrix).max() / np.abs(theirs).max()
            print(
                f"captum:  {t_captum:8.2f} s  captum/ours = {t_captum / t_ours:.2f}  (target ≥ 3)"
                f"  max relative difference = {rel:.2e}"
            )

    sizes = [int(s) for s in args.mem_sizes.split(",") if s.strip()]
    for n in sizes:
        cmd = [sys.executable, __file__, "--_mem-child", str(n), "--scope", args.scope]
        cmd += ["--mem-test", str(args.mem_test)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"memory:  n_train={row['n_train']:>6}  n_test={args.mem_test}  k=1  "
            f"peak RSS {row['peak_rss_mb']:7.1f} MiB (before compute {row['rss_before_mb']:.1f})"
            f"  {row['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
