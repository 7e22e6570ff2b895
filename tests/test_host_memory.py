"""The trainer keeps freed host memory for reuse: with glibc's defaults every CPU step faults its activations back in."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning is glibc's")

STEPS = r"""
import json, resource, sys
import torch
from tdro.config import Config
from tdro.models.encoders import create_encoder
from tdro.training.host_memory import keep_freed_memory
if sys.argv[1] == "trainer":  # the trainer applies it before building anything
    from tdro.training.trainer import Trainer
    Trainer(Config(output_dir=sys.argv[2], progress=False)).close()
torch.set_num_threads(1)
torch.manual_seed(0)
encoder = create_encoder("cnn", 64, {"in_channels": 1, "image_size": (28, 28)})
optimizer = torch.optim.Adam(encoder.parameters())
inputs = torch.randn(128, 1, 28, 28)

def step():
    optimizer.zero_grad(set_to_none=True)
    encoder(inputs).square().mean().backward()
    optimizer.step()

for _ in range(10):  # the heap grows to its steady size over the first few steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps({"kept": keep_freed_memory(), "faults_per_step": faults}))
"""


FEW_FAULTS = 500  # per step, against the thousands of pages a CNN step maps and unmaps with the defaults


def run_steps(mode: str, tmp_path: Path, **env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEPS, mode, str(tmp_path / "runs")], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_trainer_process_stops_faulting_its_step_memory_back_in(tmp_path):
    default = run_steps("default", tmp_path)
    trained = run_steps("trainer", tmp_path)
    assert trained["kept"] is True
    # glibc's defaults fault thousands of pages per step here (4.6k–7.8k) but none on some machines (CI's: 0,
    # for a reason not established); kept: none, or a few hundred while the heap still grows
    assert trained["faults_per_step"] < max(default["faults_per_step"] / 10, FEW_FAULTS), (default, trained)


def test_the_users_own_malloc_tuning_is_left_alone(tmp_path):
    tuned = run_steps("trainer", tmp_path, MALLOC_MMAP_THRESHOLD_=str(64 << 20))
    assert tuned["kept"] is False
