"""Benchmark of the factorized (LoGra-style) projection against exact all-parameter TracIn.

Side by side in one run, on the same checkpoints and data, sized like the quick preset
(1,600 train × 200 test × 3 checkpoints): the quick preset's tiny BERT architecture
(core.learning.models.TINY_ARCH) trained from scratch for 3 epochs (AdamW, lr 1e-3, batch 32, a
checkpoint per epoch) on random Zipf-token sentences whose label is carried by a few "polar"
tokens, 2.5 % of training labels flipped; ``--random`` uses random weights drifting between
checkpoints instead (no learnt structure, a harder case for any approximation):

- exact all-parameter TracInCP (core.influence, scope 'all') against core.influence.factorized at each K:
  wall time and its ratio, feature width, per-test-row Spearman (median, min) and top-10
  overlap of proponents (median, mean), Spearman of self-influence;
- every method's time against the training time it accompanies (one epoch per checkpoint);
- the cheap exact scopes ``last-1`` and ``head`` as reference points;
- peak memory (VmHWM) of each method, each measured in its own fresh subprocess.

The default run takes about two minutes on 2 CPU cores.

    python benchmarks/bench_factorized.py
    python benchmarks/bench_factorized.py --ks 8,16,32,64 --n-train 400 --n-test 50 --random
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
from typing import Any

# Passive OpenMP waiting: spinning threads thrash a shared 2-core machine (see bench_tracin).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_tracin import VOCAB, batch_loss, synthetic_data, tiny_checkpoints  # noqa: E402

from core.influence import TracInCP, peak_rss_mb, scope_error  # noqa: E402
from core.influence.factorized import FactorizedTracIn  # noqa: E402

LR = 1e-3  # the quick preset's learning rate
SCOPES = ("last-1", "head")  # the cheap exact scopes, as reference points


POLAR = 20  # tokens per class that carry the label
FLIP_RATE = 0.025


def polar_data(n: int, seed: int, flip_rate: float = 0.0) -> dict:
    """Zipf-token sentences with two class-specific tokens each; labels observed with flips."""
    data = synthetic_data(n, seed)
    rng = np.random.default_rng(seed + 100)
    ids, labels = data["input_ids"].numpy(), data["labels"].numpy()
    lengths = data["attention_mask"].sum(1).numpy()
    # Mid-frequency ids, so the label tokens are neither stop words nor unseen.
    polar = 5 + 100 + np.arange(2 * POLAR).reshape(2, POLAR)
    for i, length in enumerate(lengths):
        pos = rng.choice(np.arange(1, length - 1), size=2, replace=False)
        ids[i, pos] = rng.choice(polar[labels[i]], size=2)
    flip = rng.random(n) < flip_rate
    data["labels"] = torch.from_numpy(np.where(flip, 1 - labels, labels))
    return data


def _inputs(folder: Path) -> tuple[list[tuple[Path, float]], dict, dict]:
    """The checkpoints and data in ``folder``."""
    meta = json.loads((folder / "meta.json").read_text())
    ckpts = [(Path(p), lr) for p, lr in meta["checkpoints"]]
    return ckpts, torch.load(folder / "train.pt"), torch.load(folder / "test.pt")


def _train(folder: Path, k: int, save: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of k training epochs as the quick preset trains; a checkpoint per
    epoch if ``save`` (saving is not timed)."""
    from transformers import BertConfig, BertForSequenceClassification

    from core.learning.models import TINY_ARCH, length_batches

    train = torch.load(folder / "train.pt")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=2, pad_token_id=0, **TINY_ARCH
    )
    model = BertForSequenceClassification(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    widths = train["attention_mask"].sum(1).numpy()
    rng = np.random.default_rng(0)
    seconds = cpu = 0.0
    for epoch in range(k):
        start, start_cpu = time.perf_counter(), time.process_time()
        for rows in length_batches(widths, 32, rng):
            loss = batch_loss(model, train, torch.as_tensor(rows), widths)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if save:
            model.save_pretrained(folder / f"epoch-{epoch + 1:02d}")
    return seconds, cpu


def worker(method: str, folder: Path) -> None:
    """Run methods in this (fresh) process; save their scores and print times and peak RSS.

    ``train:K[:save]`` trains; ``exact`` runs scope 'all' (its peak memory is read before
    the cheap scopes run after it); ``factorized:16,32`` runs each K in ascending order, so
    the peak read after a K is that K's unless a smaller one needed more.
    """
    if method.startswith("train"):
        seconds, cpu = _train(folder, int(method.split(":")[1]), method.endswith(":save"))
        row = {"seconds": seconds, "cpu": cpu, "peak_rss_mb": peak_rss_mb()}
        print(json.dumps({"train": row}))
        return
    ckpts, train, test = _inputs(folder)
    runs: list[tuple[str, Any]] = []
    if method == "exact":
        runs.append(("exact", lambda: TracInCP(ckpts, scope="all")))
        runs += [(scope, lambda s=scope: TracInCP(ckpts, scope=s)) for scope in SCOPES]
    else:
        ks = sorted(int(k) for k in method.split(":")[1].split(","))
        runs += [(str(k), lambda k=k: FactorizedTracIn(ckpts, k=k)) for k in ks]
    out = {}
    for name, make in runs:
        start, start_cpu = time.perf_counter(), time.process_time()
        engine = make()
        result = engine.compute(train, test)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        np.save(folder / f"{name}_matrix.npy", result.matrix)
        np.save(folder / f"{name}_self.npy", result.self_influence)
        width = getattr(engine, "width", None)
        out[name] = {"seconds": seconds, "cpu": cpu, "peak_rss_mb": peak_rss_mb(), "width": width}
    print(json.dumps(out))


def _run(method: str, folder: Path, threads: int | None) -> dict:
    """A worker in a subprocess; its JSON line ({name: seconds, cpu, peak_rss_mb, width})."""
    cmd = [sys.executable, __file__, "--_worker", method, "--_dir", str(folder)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two vectors."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _quality(folder: Path, name: str, exact: np.ndarray, exact_self: np.ndarray) -> str:
    """Agreement columns of method ``name`` with the exact scores."""
    s = scope_error(exact, np.load(folder / f"{name}_matrix.npy"), ks=(10,))["summary"]
    rho_self = _spearman(exact_self, np.load(folder / f"{name}_self.npy"))
    return (
        f"{s['spearman']['median']:7.3f}{s['spearman']['min']:7.3f}"
        f"{s['top10_overlap']['median']:10.2f}{s['top10_overlap']['mean']:11.2f}{rho_self:8.3f}"
    )


def main() -> None:
    """Prepare checkpoints and data, run every method in its own process, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--k", type=int, default=3, help="checkpoints (= training epochs)")
    ap.add_argument("--ks", default="16,32,64", help="factorized per-side dimensions")
    ap.add_argument("--random", action="store_true", help="random drifting weights, no training")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    ap.add_argument("--_dir", dest="dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker, args.dir)
        return

    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train = polar_data(args.n_train, 1, FLIP_RATE)
        test = polar_data(args.n_test, 2)
        torch.save(train, folder / "train.pt")
        torch.save(test, folder / "test.pt")
        rows = _run(f"train:{args.k}" + ("" if args.random else ":save"), folder, args.threads)
        if args.random:
            ckpts = tiny_checkpoints(folder / "random", args.k)
            source = "random weights drifting between checkpoints"
        else:
            ckpts = [(folder / f"epoch-{i + 1:02d}", LR) for i in range(args.k)]
            source = f"trained {args.k} epochs, {FLIP_RATE:.1%} of training labels flipped"
        meta = {"checkpoints": [[str(p), lr] for p, lr in ckpts]}
        (folder / "meta.json").write_text(json.dumps(meta))
        print(
            f"tiny BERT (quick-preset architecture), {source}; n_train={args.n_train} "
            f"n_test={args.n_test} checkpoints={args.k}; threads={torch.get_num_threads()}, "
            f"torch {torch.__version__}, device cpu, float32"
        )
        rows.update(_run("exact", folder, args.threads))
        rows.update(_run(f"factorized:{','.join(map(str, ks))}", folder, args.threads))
        exact = np.load(folder / "exact_matrix.npy")
        exact_self = np.load(folder / "exact_self.npy")
        t_train, t_exact = rows["train"]["seconds"], rows["exact"]["seconds"]
        c_train, c_exact = rows["train"]["cpu"], rows["exact"]["cpu"]
        print(
            f"training ({args.k} epochs): {t_train:.1f} s wall, {c_train:.1f} s CPU, peak "
            f"{rows['train']['peak_rss_mb']:.0f} MiB; load average {os.getloadavg()[0]:.1f} "
            f"(at start {load_start:.1f}) on {os.cpu_count()} CPUs: wall times of a shared "
            "machine vary, CPU times less"
        )
        print(
            f"{'method':<16}{'seconds':>8}{'÷exact':>8}{'÷train':>8}{'cpu s':>7}{'÷exact':>7}"
            f"{'÷train':>7}{'width':>9}"
            f"{'ρ med':>7}{'ρ min':>7}{'top10 med':>10}{'top10 mean':>11}{'self ρ':>8}"
            f"{'peak MiB':>10}"
        )

        def line(label: str, name: str, width: str, quality: str, peak: str) -> None:
            seconds, cpu = rows[name]["seconds"], rows[name]["cpu"]
            print(
                f"{label:<16}{seconds:8.1f}{seconds / t_exact:8.2f}{seconds / t_train:8.2f}"
                f"{cpu:7.1f}{cpu / c_exact:7.2f}{cpu / c_train:7.2f}"
                f"{width:>9}{quality}{peak:>10}"
            )

        blank = f"{'':>7}{'':>7}{'':>10}{'':>11}{'':>8}"
        line("exact (all)", "exact", "", blank, f"{rows['exact']['peak_rss_mb']:.0f}")
        for scope in SCOPES:
            quality = _quality(folder, scope, exact, exact_self)
            line(f"exact {scope}", scope, "", quality, "")
        for k in ks:
            row = rows[str(k)]
            quality = _quality(folder, str(k), exact, exact_self)
            line(
                f"factorized:{k}",
                str(k),
                f"{row['width']:,}",
                quality,
                f"{row['peak_rss_mb']:.0f}",
            )


if __name__ == "__main__":
    main()
