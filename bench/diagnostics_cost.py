"""Cost of the per-epoch diagnostics (W₂ alignment on validation) against the whole epoch, on the digits default.

Trains the digits default (or the given ``key=value`` overrides) once and times, per epoch, the
alignment step alone (``Trainer._alignment``: one forward pass over validation plus the float64 W₂
computation) and the whole epoch (training, evaluation, alignment, latent snapshot, checkpoints:
the time between two ``on_epoch`` calls). Prints the medians and their ratio.

    python bench/diagnostics_cost.py [--threads 1] [key=value ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import yaml

from tdro.config import Config
from tdro.training.trainer import Trainer


class TimedTrainer(Trainer):
    """A Trainer that times its alignment step and its epochs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alignment_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self.on_epoch = self._tick
        self._last = time.perf_counter()

    def _alignment(self) -> dict:
        started = time.perf_counter()
        result = super()._alignment()
        self.alignment_seconds.append(time.perf_counter() - started)
        return result

    def _tick(self, record: dict) -> None:
        now = time.perf_counter()
        self.epoch_seconds.append(now - self._last)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    with tempfile.TemporaryDirectory() as folder:
        config = Config(**{"output_dir": folder, "progress": False, **overrides})
        trainer = TimedTrainer(config)
        trainer.start()
        try:
            trainer._last = time.perf_counter()
            trainer.fit()
        finally:
            trainer.close()
    alignment, epoch = statistics.median(trainer.alignment_seconds), statistics.median(trainer.epoch_seconds)
    print(f"{config.dataset}, {config.epochs} epochs, latent_dim {config.latent_dim}: median per epoch "
          f"alignment {1000 * alignment:.1f} ms of {1000 * epoch:.1f} ms ({100 * alignment / epoch:.1f} %)")


if __name__ == "__main__":
    main()
