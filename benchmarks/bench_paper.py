"""TracIn time against training time on a paper-preset run, measured side by side in one process.

The budget is "TracIn wall time ≤ 1.0 × the training time of the same run on the same
machine". Training the paper preset takes 10 epochs and TracIn sums 10 checkpoints, so one
epoch and one checkpoint are measured, one after the other in this process, on the run's own
data (1,600 training instances, evaluation of every instance after the epoch as the train stage
does) and the run's first checkpoint:

- ``train``: one epoch of ``core.learning.training.train_model`` (fresh MiniLM, the run's config, eval of
  train/val/test after the epoch; the checkpoint is written to a temporary folder, untimed
  writes excluded only insofar as train_model does not time them: it is included);
- each method: TracIn of one checkpoint over all training × all test instances, as the tracin
  stage computes it (``core.influence.registry.engine_for(...).compute``), no shards.

The ratio printed per method is (one checkpoint's TracIn) / (one epoch's training), which is
the full run's ratio when every epoch and checkpoint costs the same. Device and dtype are
printed with the figures; ``--device cuda`` uses a GPU where there is one (the CUDA path is
the same code with tensors on the device).

    python benchmarks/bench_paper.py cache/demo-es --methods factorized:16,factorized:64,last-2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from core.inputs.config import config_from_dict  # noqa: E402
from core.options.error_study_options import parse_dtype, parse_methods  # noqa: E402
from core.storage import store  # noqa: E402


def main() -> int:
    """Measure and print; the JSON line at the end holds every figure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="a paper-preset run folder with checkpoints")
    ap.add_argument("--methods", default="factorized:16,factorized:64,last-2")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-train", action="store_true", help="use the manifest's train time")
    args = ap.parse_args()
    from core.influence import check_dtype, encode_run_data, run_checkpoints
    from core.influence.registry import engine_for
    from core.learning.models import load_classifier, load_tokenizer, resolve_device
    from core.learning.training import train_model

    run = Path(args.run)
    manifest = store.load_manifest(run)
    config = config_from_dict(manifest["config"])
    dev = resolve_device(args.device)
    dtype = parse_dtype(args.dtype)
    check_dtype(dtype, dev)
    methods = parse_methods(args.methods)
    checkpoints = run_checkpoints(run, manifest)
    k = len(checkpoints)
    out: dict = {
        "run": str(run),
        "device": str(dev),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "epochs": config.epochs,
        "n_checkpoints": k,
        "load_before": os.getloadavg()[0],
    }
    print(f"device {dev}, dtype {dtype}, {torch.get_num_threads()} threads", flush=True)

    if args.skip_train:
        t_epoch = float(manifest["timings_s"]["train"]) / config.epochs
        out["train_source"] = "manifest timings_s.train / epochs"
    else:
        inst = store.load_instances(run)
        tokenizer = load_tokenizer(run)
        sets = {}
        for split in ("train", "val", "test"):
            part = inst[inst["split"] == split]
            col = "observed_label" if split == "train" else "label"
            sets[split] = (part["text"].tolist(), part[col].tolist())
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_model(
                config.replace(epochs=1, device=str(dev)),
                tokenizer,
                sets["train"][0],
                sets["train"][1],
                eval_sets=sets,
                checkpoint_dir=Path(tmp),
                progress=False,
            )
            t_epoch = time.perf_counter() - start
        out["train_source"] = "measured: one epoch of train_model (with eval and checkpoint)"
    out["train_epoch_s"] = round(t_epoch, 1)
    print(f"train: one epoch {t_epoch:.1f} s", flush=True)

    train, test, _ = encode_run_data(run, config.max_length)
    out["methods"] = {}
    for method in methods:
        dt = dtype if method.project is not None else "float32"
        engine = engine_for(
            checkpoints[:1],
            scope=method.params,
            project=method.project,
            seed=int(config.tracin_seed or 0),
            device=dev,
            dtype=dt,
            loader=load_classifier,
        )
        start = time.perf_counter()
        res = engine.compute(train, test)
        secs = time.perf_counter() - start
        out["methods"][method.name] = {
            "one_checkpoint_s": round(secs, 1),
            "ratio_to_training": round(secs / t_epoch, 3),
            "n_params": res.n_params,
            "dtype": dt,
        }
        print(
            f"{method.name:<16} one checkpoint {secs:7.1f} s  = {secs / t_epoch:.2f} × one epoch "
            f"({res.n_params:,} parameters, {dt})",
            flush=True,
        )
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
