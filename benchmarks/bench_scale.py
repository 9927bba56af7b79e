"""Scale benchmark of factorized TracIn on a BERT-base-sized classifier: time and peak memory.

The model is a randomly initialised ``BertForSequenceClassification`` the size of BERT-base
(12 layers, hidden 768, 12 heads, intermediate 3,072, vocabulary 30,522 like the MiniLM /
BERT-uncased tokenizer the paper preset uses; about 109 M parameters). Nothing is downloaded.
Checkpoint 1 is the random initialisation, and each further checkpoint is the previous one
after ``--steps`` AdamW steps (lr ``--lr``, batch 16) on the training data: the checkpoints
differ the way consecutive training checkpoints do, but the model has learnt nothing
meaningful. Instances are synthetic: Zipf-distributed token ids between [CLS] and [SEP],
lengths uniform in [``--len-min``, ``--len-max``] tokens (the default 8–48 brackets the
default amazon-reviews data under the MiniLM tokenizer: mean 23, 95th percentile 48), right
padded, ``max_length`` = ``--len-max``; labels are random.

What runs, each part in its own fresh subprocess (so each peak RSS is that part's own):

1. ``full``: the project's factorized engine (``core.influence.factorized.FactorizedTracIn``, the engine
   behind ``--project factorized:K``) computes the whole n_train × n_test × checkpoints job
   through its public ``compute`` with a shard folder, exactly as the run stage's tasks do.
   Printed: wall and CPU seconds, seconds per instance-gradient, peak RSS, peak CUDA memory.
2. ``memory``: for each size in ``--mem-sizes`` (default 1,600 and 16,000 training
   instances) the engine's unit of work (``FactorizedTracIn.compute_checkpoint``, what
   ``core.influence.compute(task)`` runs) computes the first ``--mem-chunks`` training chunks
   (512 instances each) of checkpoint 1 of that size's plan, with all n_test test instances.
   The work is the same for both sizes; only n_train (the data held, the plan, the shard
   options) differs, so equal peaks show memory does not grow with n_train. The full 16,000 ×
   3-checkpoint job is not run on a CPU by default (``--mem-chunks 0`` runs whole plans, for a
   GPU); its time is extrapolated from the measured per-instance cost and printed as such.

It prints the device, dtype, torch threads and the machine's load average. Everything lives in
a temporary folder (checkpoints are about 420 MiB each), removed at the end.

    python benchmarks/bench_scale.py                                   # CPU defaults
    python benchmarks/bench_scale.py --device cuda --mem-chunks 0      # the full 16,000 on a GPU
    python benchmarks/bench_scale.py --n-train 64 --n-test 8 --mem-sizes 64,640 --mem-chunks 1
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

# Passive OpenMP waiting: spinning threads thrash a shared 2-core machine (see bench_tracin).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_tracin import synthetic_data  # noqa: E402

from core.influence import EncodedData, ShardSink, peak_memory_mb  # noqa: E402
from core.influence.factorized import FactorizedTracIn  # noqa: E402

VOCAB = 30522  # the BERT-uncased / MiniLM WordPiece vocabulary the paper preset's model uses
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}


def bert_data(n: int, seed: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Synthetic instances in the BERT-uncased vocabulary, padded to ``hi``: WordPiece words
    start at id 1000, [CLS] and [SEP] are 101 and 102."""
    return synthetic_data(
        n, seed, lo, hi, vocab=VOCAB, first_word=1000, cls_sep=(101, 102), width=hi
    )


def _device(name: str) -> torch.device:
    """The device of ``--device`` (auto: CUDA when present)."""
    from core.learning.models import resolve_device

    return resolve_device(name)


def prepare(folder: Path, args: argparse.Namespace) -> dict:
    """Write the checkpoints and data into ``folder``; return what was made."""
    from transformers import BertConfig, BertForSequenceClassification

    dev = _device(args.device)
    n_max = max([args.n_train, *args.mem_sizes])
    train = bert_data(n_max, 1, args.len_min, args.len_max)
    test = bert_data(args.n_test, 2, args.len_min, args.len_max)
    # One file per size (prefixes of one draw), so a process holds only its own n_train.
    for n in {args.n_train, *args.mem_sizes}:
        torch.save({key: v[:n].clone() for key, v in train.items()}, folder / f"train-{n}.pt")
    torch.save(test, folder / "test.pt")
    torch.manual_seed(args.seed)
    config = BertConfig(
        vocab_size=VOCAB,
        max_position_embeddings=512,
        num_labels=2,
        pad_token_id=0,
        **BERT_BASE,
    )
    model = BertForSequenceClassification(config).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    ckpts = []
    for i in range(args.checkpoints):
        if i:
            model.train()
            for _ in range(args.steps):
                rows = torch.as_tensor(rng.choice(args.n_train, 16, replace=False))
                batch = {key: v[rows].to(dev) for key, v in train.items()}
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        path = folder / f"ckpt-{i + 1:02d}"
        model.save_pretrained(path)
        ckpts.append([str(path), args.lr])
    n_params = sum(p.numel() for p in model.parameters())
    meta = {"checkpoints": ckpts, "n_params": n_params, "seconds": time.perf_counter() - start}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def worker(folder: Path, what: str, n_train: int, args: argparse.Namespace) -> dict:
    """One measured part in this fresh process: ``full`` or ``memory`` (see the docstring)."""
    dev = _device(args.device)
    meta = json.loads((folder / "meta.json").read_text())
    ckpts = [(Path(p), lr) for p, lr in meta["checkpoints"]]
    train = torch.load(folder / f"train-{n_train}.pt")
    test = torch.load(folder / "test.pt")
    engine = FactorizedTracIn(ckpts, k=args.k, device=dev, batch_size=args.batch_size)
    shard_dir = folder / f"shards-{what}-{n_train}"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start, start_cpu = time.perf_counter(), time.process_time()
    if what == "full" or args.mem_chunks == 0:
        result = engine.compute(train, test, shard_dir=shard_dir)
        assert result.matrix is not None and np.isfinite(result.matrix).all()
        n_ckpt, n_rows = len(ckpts), n_train
    else:
        tr, te = EncodedData(train, "training"), EncodedData(test, "test")
        size = engine.chunk_size
        chunks = [(lo, min(lo + size, tr.n)) for lo in range(0, tr.n, size)]
        wanted = range(min(args.mem_chunks, len(chunks)))
        sink = ShardSink(shard_dir, engine.shard_options(tr, te, len(chunks)))
        engine.compute_checkpoint(0, tr, te, chunks, wanted, sink)
        n_ckpt, n_rows = 1, chunks[wanted[-1]][1]
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {
        "what": what,
        "n_train": n_train,
        "n_test": test["labels"].shape[0],
        "checkpoints_run": n_ckpt,
        "train_rows_run": n_rows,
        "instance_gradients": n_ckpt * (n_rows + test["labels"].shape[0]),
        "seconds": seconds,
        "cpu": cpu,
        "width": engine.width,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        **peak_memory_mb(dev),
    }


def _run(folder: Path, what: str, n_train: int, argv: list[str]) -> dict:
    """A worker in a fresh subprocess; its JSON line."""
    cmd = [sys.executable, __file__, *argv, "--_worker", what, "--_n", str(n_train)]
    cmd += ["--_dir", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what} n_train={n_train} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    """The 1/5/15-minute load averages and the CPU count."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} CPUs"


def _line(row: dict) -> str:
    """One measured part, printed."""
    per = row["seconds"] / row["instance_gradients"]
    cuda = f", peak CUDA {row['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in row else ""
    return (
        f"{row['what']:<7} n_train={row['n_train']:>6,} (ran {row['train_rows_run']:,} train × "
        f"{row['n_test']} test × {row['checkpoints_run']} ckpt): {row['seconds']:8.1f} s wall, "
        f"{row['cpu']:8.1f} s CPU, {per * 1000:6.1f} ms per instance-gradient, "
        f"peak RSS {row['peak_rss_mb']:,.0f} MiB{cuda}"
    )


def main() -> None:
    """Prepare checkpoints and data, run each part in its own process, print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=1600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--k", type=int, default=32, help="factorized per-side dimension")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--batch-size", type=int, default=32, help="instances per forward+backward")
    ap.add_argument("--len-min", type=int, default=8)
    ap.add_argument("--len-max", type=int, default=48, help="also the padded max_length")
    ap.add_argument("--steps", type=int, default=2, help="AdamW steps between checkpoints")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-sizes", default="1600,16000", help="n_train sizes; '' to skip")
    ap.add_argument(
        "--mem-chunks", type=int, default=2, help="chunks of checkpoint 1 per size; 0: all"
    )
    ap.add_argument("--skip-full", action="store_true", help="only the memory part")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    ap.add_argument("--_n", dest="n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", dest="dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.mem_sizes = [int(s) for s in str(args.mem_sizes).split(",") if s.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.dir, args.worker, args.n, args)))
        return
    argv = list(sys.argv[1:])
    dev = _device(args.device)
    gpu = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    print(
        f"device {dev}{gpu}, dtype float32 (the factorized engine computes in float32), "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; {_load()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        meta = prepare(folder, args)
        print(
            f"model: random-init BertForSequenceClassification, 12 layers, hidden 768, 12 heads, "
            f"intermediate 3072, vocab {VOCAB}: {meta['n_params']:,} parameters; "
            f"{args.checkpoints} checkpoints (init, then +{args.steps} AdamW steps lr {args.lr:g} "
            f"each; {meta['seconds']:.0f} s to make); data: synthetic Zipf tokens, lengths "
            f"{args.len_min}–{args.len_max} (max_length {args.len_max}); factorized:{args.k}, "
            f"batch {args.batch_size}"
        )
        if not args.skip_full:
            row = _run(folder, "full", args.n_train, argv)
            print(_line(row) + f"; feature width {row['width']:,}; {_load()}")
            per = row["seconds"] / row["instance_gradients"]
            per_cpu = row["cpu"] / row["instance_gradients"]
            for n in args.mem_sizes:
                if n != args.n_train:
                    grads = args.checkpoints * (n + args.n_test)
                    print(
                        f"extrapolated, not run: n_train={n:,} × {args.n_test} × "
                        f"{args.checkpoints} ckpt ≈ {grads * per / 3600:.1f} h wall, "
                        f"{grads * per_cpu / 3600:.1f} h CPU at the measured "
                        f"{per * 1000:.1f} ms wall, {per_cpu * 1000:.1f} ms CPU per "
                        "instance-gradient"
                    )
        for n in args.mem_sizes:
            row = _run(folder, "memory", n, argv)
            print(_line(row) + f"; {_load()}")


if __name__ == "__main__":
    main()
