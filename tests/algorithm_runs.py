"""Shared checks every algorithm passes: a 1-epoch CLI run on digits, and exact resume after a stop."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tdro.config import Config
from tdro.runs import read_jsonl
from tdro.training.trainer import Trainer, resume, train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_seconds", "samples_per_second", "peak_memory_mb", "run_memory_mb", "wall_seconds"}
SMALL = {"progress": False, "batch_size": 64, "latent_dim": 8, "head_hidden": 0, "latent_samples_per_group": 0,
         "log_interval": 2}


def small_config(tmp_path: Path, **keys) -> Config:
    """A digits config that trains in about a second per epoch."""
    return Config(**{"output_dir": str(tmp_path / "runs"), "epochs": 2, **SMALL, **keys})


def cli_one_epoch(tmp_path: Path, **keys) -> dict:
    """`python -m tdro train` for one epoch on digits with these keys; returns summary.json."""
    command = [sys.executable, "-m", "tdro", "train", "-p", "output_dir", str(tmp_path / "cli"),
               "-p", "run_name", "one", "-p", "epochs", "1"]
    for name, value in {**SMALL, **keys}.items():
        command += ["-p", name, json.dumps(value)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "cli" / "one" / "summary.json").read_text())


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def assert_exact_resume(tmp_path: Path, epochs: int = 3, stop_after: int = 1, **keys) -> dict:
    """A run stopped after ``stop_after`` epochs and resumed writes the records of an uninterrupted run."""
    straight = train(small_config(tmp_path, run_name="straight", epochs=epochs, **keys))
    config = small_config(tmp_path, run_name="stopped", epochs=epochs, **keys)
    trainer = Trainer(config)
    trainer.start()
    try:
        def stop(record: dict) -> None:
            if record["epoch"] == stop_after:
                raise KeyboardInterrupt
        trainer.on_epoch = stop
        try:
            trainer.fit()
        except KeyboardInterrupt:
            pass
    finally:
        trainer.close()
    resumed = resume(config.output_dir + "/stopped")
    for name in ("history.jsonl", "steps.jsonl"):
        ours = _without_timing(read_jsonl(resumed.run_dir / name))
        theirs = _without_timing(read_jsonl(straight.run_dir / name))
        assert ours == theirs, f"{name} differs after resume"
    for split in ("val", "test"):
        assert resumed.summary[split] == straight.summary[split]
    assert resumed.summary["algorithm_records"] == straight.summary["algorithm_records"]
    assert resumed.summary["diagnostics"] == straight.summary["diagnostics"]
    return straight.summary
