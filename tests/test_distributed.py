"""One run over several processes (torchrun, gloo on CPU) equals the single-process run, and resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tdro.training.distributed import batch_layout

from processes import alive, children

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "samples_per_second", "peak_memory_mb", "run_memory_mb", "wall_seconds", "processes",
          "run_id", "device")
# GroupDRO over (group, class) cells that moves q, anchors with both terms; no dropout (each rank draws its own masks)
CONFIG = {"epochs": 4, "algorithm": "groupdro", "groupdro_cells": "group_class", "groupdro_eta": 0.5,
          "lambda_fit": 0.1, "lambda_sep": 0.1, "head_hidden": 0, "latent_dim": 8, "log_interval": 1,
          "progress": False, "latent_samples_per_group": 0, "batch_size": 32,
          "groups": [{"name": "coarse", "encoder": "mlp_tabular", "dropout": 0.0}]}


def test_batch_layout_puts_gathered_shares_back_in_batch_order():
    rows, world = [5, 3, 0, 4], 3
    order, share = batch_layout(rows, world)
    starts = [0, 5, 8, 8]
    gathered = [starts[g] + i for r in range(world) for g, n in enumerate(rows) for i in range(r, n, world)]
    assert torch.tensor(gathered)[order].tolist() == list(range(sum(rows)))
    assert share.tolist() == [5, 4, 3]


def command(processes: int, *arguments: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "tdro", "train", *arguments]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "tdro", "train", *arguments]


def run(processes: int, config: Path, name: str, **changes) -> subprocess.CompletedProcess:
    extra = [x for key, value in changes.items() for x in ("-p", key, json.dumps(value))]
    return subprocess.run(command(processes, "-f", str(config), "-p", "run_name", name, *extra), cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def records(run_dir: Path) -> dict:
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in TIMING}
        return [clean(v) for v in value] if isinstance(value, list) else value
    lines = lambda name: [clean(json.loads(line)) for line in (run_dir / name).read_text().splitlines()]
    return {"history": lines("history.jsonl"), "steps": lines("steps.jsonl"),
            "summary": clean(json.loads((run_dir / "summary.json").read_text()))}


def assert_close(got, want, path="", tolerance=1e-5):
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}", tolerance)
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{path}[{i}]", tolerance)
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=tolerance), path
    else:
        assert got == want, path


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(tmp_path / "runs")}))
    return path


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_run(tmp_path, config_file):
    one = run(1, config_file, "one")
    two = run(2, config_file, "two")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("run directory:") == 1  # rank 0 alone prints (and writes)
    single, double = records(tmp_path / "runs" / "one"), records(tmp_path / "runs" / "two")
    assert len(single["steps"]) == len(double["steps"]) > 20
    assert max(abs(q - 1 / 8) for q in single["steps"][-1]["q"].values()) > 0.01  # GroupDRO did move q
    assert_close(double, single)  # per-step q and loss parts, every epoch's metrics, the final metrics
    assert json.loads((tmp_path / "runs" / "two" / "summary.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_cvar_over_the_global_batch_matches_too(tmp_path, config_file):
    changes = {"algorithm": "cvar_dro", "groupdro_cells": "group", "groupdro_eta": 0.01, "epochs": 2}
    one, two = run(1, config_file, "one", **changes), run(2, config_file, "two", **changes)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    assert_close(records(tmp_path / "runs" / "two"), records(tmp_path / "runs" / "one"))


@pytest.mark.slow
def test_a_batch_that_does_not_split_is_refused(tmp_path, config_file):
    done = run(2, config_file, "odd", batch_size=31)
    assert done.returncode != 0
    assert "key 'batch_size' is 31 but the run has 2 processes" in done.stderr + done.stdout
    assert not (tmp_path / "runs" / "odd").exists()


def rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_run_and_resume_gives_the_uninterrupted_records(tmp_path, config_file):
    changes = {"epochs": 8}
    whole = run(2, config_file, "whole", **changes)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_dir = tmp_path / "runs" / "killed"
    extra = [x for key, value in changes.items() for x in ("-p", key, json.dumps(value))]
    launcher = subprocess.Popen(command(2, "-f", str(config_file), "-p", "run_name", "killed", *extra), cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        history = killed_dir / "history.jsonl"
        while not (history.is_file() and history.read_text().count("\n") >= 3):  # past the third checkpoint
            assert launcher.poll() is None and time.time() < deadline, "the run never reached epoch 3"
            time.sleep(0.02)
        ranks = {rank_of(pid): pid for pid in children(launcher.pid)}
        os.kill(ranks[1], signal.SIGKILL)
        launcher.wait(timeout=120)  # the launcher stops rank 0 too: no hang
        assert launcher.returncode != 0 and not alive(ranks[0])
        assert not (killed_dir / "summary.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
    resumed = subprocess.run(command(2, "--resume", str(killed_dir)), cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(records(killed_dir), records(tmp_path / "runs" / "whole"), tolerance=0.0)


def test_every_algorithm_says_whether_it_runs_distributed():
    from tdro.algorithms import ALGORITHMS

    for name in ALGORITHMS.names():
        assert ALGORITHMS.get(name).distributed in ("exact", "unsupported"), name
