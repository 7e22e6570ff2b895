"""Wall time of a 40-run digits study with 1 and 2 workers (1 torch thread per run), and the speed-up.

Each repeat trains the same 40 planned runs (4 arms x 10 seeds, digits default) into a fresh folder,
once per worker count, alternating the order between repeats (the machine is noisy). Prints one
line per measurement and the median speed-up.

    .venv/bin/python bench/study_workers.py [--repeats 2] [--epochs 10] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tdro.config import Config
from tdro.studies import PlannedRun, run_study

ARMS = {"erm": {}, "groupdro": {"algorithm": "groupdro"}, "anchors": {"lambda_fit": 0.1},
        "cells": {"algorithm": "groupdro", "groupdro_cells": "group_class"}}


def plan(root: Path, epochs: int) -> list[PlannedRun]:
    runs = []
    for arm, changes in ARMS.items():
        for seed in range(10):
            config = Config(**changes, epochs=epochs, seed=seed, progress=False, latent_samples_per_group=0,
                            output_dir=str(root / "runs"))
            runs.append(PlannedRun(config.replace(run_name=f"{arm}-seed{seed}"), {"arm": arm, "seed": seed}))
    return runs


def measure(workers: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        runs = plan(Path(tmp), epochs)
        started = time.perf_counter()
        table = run_study(runs, tmp, workers=workers, threads=1, log=None)
        elapsed = time.perf_counter() - started
        assert (table["status"] == "trained").all(), table[table["status"] != "trained"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    times: dict[int, list[float]] = {w: [] for w in args.workers}
    for repeat in range(args.repeats):
        order = args.workers if repeat % 2 == 0 else list(reversed(args.workers))
        for workers in order:
            seconds = measure(workers, args.epochs)
            times[workers].append(seconds)
            print(f"repeat {repeat}: {len(ARMS) * 10} runs, {workers} worker(s) x 1 thread: {seconds:.1f} s", flush=True)
    base = statistics.median(times[args.workers[0]])
    for workers in args.workers:
        median = statistics.median(times[workers])
        print(f"{workers} worker(s): median {median:.1f} s, speed-up over {args.workers[0]}: {base / median:.2f}x")


if __name__ == "__main__":
    main()
