"""Each algorithm's training-step cost relative to ERM's (issue 11), through the real Trainer.train_step.

One Trainer per algorithm on the embedded digits data (600 training samples split over the groups: image (cnn) and coarse (mlp); with
--groups 4 also masked and flat), same seed, same batches. Stage runs of two-stage algorithms are
trained first (1 epoch) in a temporary folder; their step is then the second stage's. All algorithms
run in one process, interleaved: each round times every algorithm's steps back to back in random
order and ratios are taken within the round (medians over rounds).

    python bench/algorithm_step_cost.py [--rounds 7] [--steps 10] [--batches 64 256] [--latents 64 256]
                                        [--groups 2 4] [--threads 1]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import random
import statistics
import tempfile
import time

import torch

from tdro.algorithms import ALGORITHMS
from tdro.config import Config
from tdro.training.trainer import Trainer

# keys each algorithm needs to run here (its defaults otherwise); the anchor losses are off for all, so the
# ratios are the algorithms' own cost (anchors: bench/step_overhead.py)
ALGORITHM_KEYS = {"jtt": {"jtt_epochs": 1}}
GROUPS = {2: ["image", "coarse"], 4: ["image", "coarse", "masked", "flat"]}


def build_trainers(batch_size: int, latent_dim: int, groups: int, root: str) -> dict[str, tuple[Trainer, list]]:
    """A trainer per algorithm and the batches it steps on (the same batch order for all)."""
    trainers = {}
    for name in ALGORITHMS.names():
        keys = ALGORITHM_KEYS.get(name, {})
        config = Config(output_dir=root, progress=False, epochs=1, batch_size=batch_size, latent_dim=latent_dim,
                        digits_groups=GROUPS[groups], digits_sizes=[600 // groups] * groups,
                        digits_majority=[[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] * (groups // 2),
                        latent_samples_per_group=0, lambda_fit=0.0, lambda_sep=0.0, algorithm=name, **keys)
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(config)
        trainer.run_dir = None
        trainer.config = config.replace(log_interval=10**9)
        trainers[name] = (trainer, list(itertools.islice(iter(trainer.batches), 4)))
    return trainers


def time_steps(trainer: Trainer, batches: list, steps: int) -> float:
    trainer.model.train()
    started = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)])
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4], choices=sorted(GROUPS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    print(f"step time / ERM's step time (median over {args.rounds} interleaved rounds of {args.steps} steps; "
          f"{args.threads} thread(s))")
    rows = []
    for batch_size, latent_dim, groups in itertools.product(args.batches, args.latents, args.groups):
        with tempfile.TemporaryDirectory() as root:
            trainers = build_trainers(batch_size, latent_dim, groups, root)
            for trainer, batches in trainers.values():
                time_steps(trainer, batches, 2)  # warm-up
            ratios: dict[str, list[float]] = {name: [] for name in trainers}
            erm_ms = []
            for _ in range(args.rounds):
                order = list(trainers)
                rng.shuffle(order)
                seconds = {name: time_steps(*trainers[name], args.steps) for name in order}
                erm_ms.append(seconds["erm"] * 1e3)
                for name in trainers:
                    ratios[name].append(seconds[name] / seconds["erm"])
        rows.append(((batch_size, latent_dim, groups), statistics.median(erm_ms),
                     {name: statistics.median(values) for name, values in ratios.items()}))
    names = list(rows[0][2])
    print("| batch | latent | groups | ERM ms | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for (batch_size, latent_dim, groups), erm, ratio in rows:
        print(f"| {batch_size} | {latent_dim} | {groups} | {erm:.1f} | " + " | ".join(f"{ratio[n]:.2f}" for n in names)
              + " |")


if __name__ == "__main__":
    main()
