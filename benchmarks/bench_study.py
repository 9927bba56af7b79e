"""Study pipeline figures: the quick preset end to end, and what dynamic padding saves.

    python benchmarks/bench_study.py                 # quick preset (data → train) in a temp cache
    python benchmarks/bench_study.py --padding-only  # only the padding comparison
    python benchmarks/bench_study.py --paper-run cache/demo   # report a finished paper run's timings

Targets: quick preset (data, tokenizer, 10 epochs, checkpoints) ≤ 120 s on a 2-core
CPU; the paper preset's time is reported. Padding is measured side by side in one process:
one epoch of forward+backward with length-bucketed batches vs batches padded to max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quick_preset(cache: Path) -> dict:
    """Run the quick preset up to the train stage and return its stage timings."""
    from core.cli import main

    t0 = time.perf_counter()
    assert (
        main(["run", "--preset", "quick", "--until", "train", "--cache", str(cache), "--name", "q"])
        == 0
    )
    wall = time.perf_counter() - t0
    manifest = json.loads((cache / "q" / "manifest.json").read_text())
    return {
        "wall_s": wall,
        "timings_s": manifest["timings_s"],
        "test_accuracy": manifest["test_accuracy"],
    }


def padding_ratio(model_name: str, n: int = 320) -> dict:
    """Seconds for one pass of forward+backward over n sentences: bucketed vs padded to max_length."""
    import numpy as np
    import torch

    from core.inputs.config import PRESETS
    from core.inputs.datasets import load_builtin
    from core.learning.models import (
        build_model,
        build_tokenizer,
        collate,
        length_batches,
        token_ids,
    )

    config = PRESETS["paper" if model_name == "minilm" else "quick"]
    texts = load_builtin("amazon-reviews").frame["text"].tolist()[:n]
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(model_name, texts, Path(tmp) / "tok")
    model = build_model(model_name, tok, config.max_length, 0)
    ids = token_ids(tok, texts, config.max_length)
    labels = torch.zeros(len(ids), dtype=torch.long)

    def one_pass(batches, width=None) -> float:
        t0 = time.perf_counter()
        for b in batches:
            rows = [ids[i] for i in b]
            if width is not None:  # pad every batch to max_length, as a naive collator would
                rows = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
            enc = collate(rows, tok.pad_token_id)
            if width is not None:
                enc["attention_mask"] = (enc["input_ids"] != tok.pad_token_id).long()
            out = model(**enc, labels=labels[b])
            out.loss.backward()
        return time.perf_counter() - t0

    rng = np.random.default_rng(0)
    bucketed = length_batches([len(x) for x in ids], config.batch_size, rng)
    plain = [np.arange(i, min(i + config.batch_size, n)) for i in range(0, n, config.batch_size)]
    one_pass(bucketed[:2])  # warm-up
    dyn = one_pass(bucketed)
    fixed = one_pass(plain, width=config.max_length)
    mean_len = float(np.mean([len(x) for x in ids]))
    return {
        "model": model_name,
        "n": n,
        "mean_tokens": mean_len,
        "max_length": config.max_length,
        "bucketed_s": dyn,
        "padded_s": fixed,
        "speedup": fixed / dyn,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--padding-only", action="store_true")
    parser.add_argument("--paper-run", help="a finished paper-preset run folder to report")
    args = parser.parse_args()
    from core.cli import quiet_libraries

    quiet_libraries()
    print(f"cores: {os.cpu_count()}")
    if not args.padding_only:
        with tempfile.TemporaryDirectory() as tmp:
            q = quick_preset(Path(tmp))
        print(
            f"quick preset (data→train): {q['wall_s']:.1f} s wall, target 120 s, ratio {q['wall_s'] / 120:.2f}"
        )
        print(f"  stages: {q['timings_s']}  test accuracy {q['test_accuracy']:.3f}")
    for name in ("tiny", "minilm"):
        r = padding_ratio(name)
        print(
            f"padding ({name}, {r['n']} sentences, mean {r['mean_tokens']:.1f} tokens, max_length {r['max_length']}):"
            f" bucketed {r['bucketed_s']:.2f} s vs padded {r['padded_s']:.2f} s → {r['speedup']:.2f}× faster"
        )
    if args.paper_run:
        m = json.loads((Path(args.paper_run) / "manifest.json").read_text())
        print(f"paper run {args.paper_run}: timings {m.get('timings_s')}")


if __name__ == "__main__":
    main()
