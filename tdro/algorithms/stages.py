"""Stage runs of two-stage algorithms: ordinary runs under ``<output_dir>/stages``, reused by config hash."""
from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from tdro.algorithms.base import ALGORITHMS
from tdro.runs import RunDirectoryInUseError, read_summary

if TYPE_CHECKING:
    from tdro.config import Config

WAIT_SECONDS = 2.0  # poll interval while another process trains a stage run this one needs


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Stage runs reseed the global generators; the run that needs them continues as if they had not run."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def stage_run_dir(config: Config) -> Path:
    """Where the stage run of ``config`` lives: one directory per config hash."""
    return Path(config.output_dir) / "stages" / f"{config.dataset}-{config.algorithm}-{config.result_hash()}"


def finished_stage_runs(config: Config) -> dict[str, Path]:
    """Each stage of ``config``'s algorithm as a finished run directory: reused, resumed or trained."""
    stages = ALGORITHMS.get(config.algorithm).stages(config)
    if not stages:
        return {}
    with preserved_rng():
        return {name: finished_run(stage) for name, stage in stages.items()}


def finished_run(config: Config) -> Path:
    """A finished run of ``config`` in ``stage_run_dir``; waits while another process is training it."""
    from tdro.training.trainer import resume, train

    run_dir = stage_run_dir(config)
    while not (run_dir / "summary.json").is_file():
        try:
            if (run_dir / "checkpoints" / "last.pt").exists():
                resume(run_dir)
            else:
                train(config.replace(run_name=None), run_dir)
        except RunDirectoryInUseError:
            time.sleep(WAIT_SECONDS)
    read_summary(run_dir / "summary.json")
    return run_dir
