"""Noise-sweep wall time, and the speed-up from parallel cells, measured side by side.

    python benchmarks/bench_sweep.py                      # 3 rates × 2 seeds, 3 epochs, jobs 1 vs 2
    python benchmarks/bench_sweep.py --full               # quick preset, 7 rates × 3 seeds, jobs 0 (auto)

The side-by-side part runs the same small sweep twice in fresh caches, once with one
cell at a time and once with two parallel cells, and prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def timed_sweep(cache: Path, rates: str, seeds: int, jobs: int, extra: list[str]) -> float:
    """Seconds for one sweep from scratch."""
    from core.cli import main

    t0 = time.perf_counter()
    args = [
        "sweep",
        "--preset",
        "quick",
        "--flip-rates",
        rates,
        "--seeds",
        str(seeds),
        "--jobs",
        str(jobs),
    ]
    assert main([*args, *extra, "--cache", str(cache), "--name", "s"]) == 0
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="the full quick sweep: 7 rates × 3 seeds"
    )
    args = parser.parse_args()
    from core.cli import quiet_libraries

    quiet_libraries()
    print(f"cores: {os.cpu_count()}")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            secs = timed_sweep(Path(tmp), "0,0.025,0.05,0.1,0.2,0.3,0.4", 3, 0, [])
        print(f"quick preset, 7 rates × 3 seeds, auto jobs: {secs:.0f} s wall")
        return
    small = ["--epochs", "3", "--n-train", "400"]
    times = {}
    for jobs in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            times[jobs] = timed_sweep(Path(tmp), "0,0.1,0.3", 2, jobs, small)
        print(f"3 rates × 2 seeds (3 epochs, 400 train), jobs {jobs}: {times[jobs]:.1f} s")
    print(f"parallel speed-up (jobs 2 vs 1): {times[1] / times[2]:.2f}×")


if __name__ == "__main__":
    main()
