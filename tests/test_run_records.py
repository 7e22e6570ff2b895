"""No record is ever lost: real `python -m tdro train` processes SIGKILLed at the exact dangerous moments.

Each moment is reached by a small wrapper script (KILLER) that wraps one library function so the
process kills itself with SIGKILL right there, then runs the real CLI. Afterwards the records on
disk are checked, and a resume must end with exactly the records of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tdro.config import Config, ConfigError
from tdro.runs import RunDirectoryInUseError, load_run, lock_run_directory, read_jsonl
from tdro.training.checkpoint import CheckpointError, load_checkpoint
from tdro.training.trainer import NonFiniteLossError, Trainer, resume, train

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_seconds", "samples_per_second", "peak_memory_mb", "run_memory_mb"}
OVERRIDES = {"progress": False, "epochs": 3, "batch_size": 64, "latent_dim": 8, "head_hidden": 0,
             "groupdro_enabled": True, "groupdro_warmup_epochs": 1, "lambda_fit": 0.1, "lambda_sep": 0.1, "log_interval": 4,
             "latent_samples_per_group": 0}

KILLER = r'''
import os, signal, sys
import tdro.runs
import tdro.training.checkpoint
from tdro.training import trainer

point = sys.argv[1]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("between_record_and_checkpoint:"):  # history.jsonl has epoch E, last.pt does not
    epoch, save = int(point.split(":")[1]), trainer.Trainer._save_checkpoints
    def save_or_die(self, improved):
        if self.epoch == epoch:
            die()
        save(self, improved)
    trainer.Trainer._save_checkpoints = save_or_die
elif point.startswith("mid_rewrite:"):  # resume is rewriting FILE: one record written, the rest not
    name, rewrite = point.split(":")[1], tdro.runs.write_jsonl_atomic
    def rewrite_and_die(path, records):
        def first_then_die():
            for index, record in enumerate(records):
                if index == 1 and path.name == name:
                    die()
                yield record
        rewrite(path, first_then_die())
    trainer.write_jsonl_atomic = rewrite_and_die
elif point.startswith("before_rename:"):  # the rewritten FILE is complete but not yet renamed over the old one
    name, replace = point.split(":")[1], os.replace
    def replace_or_die(source, target):
        if os.path.basename(target) == name:
            die()
        replace(source, target)
    tdro.runs.os.replace = replace_or_die
elif point.startswith("after_best:"):  # the N-th best.pt is renamed into place, that epoch's last.pt is not
    count, replace, renamed = int(point.split(":")[1]), os.replace, []
    def replace_then_die(source, target):
        replace(source, target)
        renamed.extend([target] if os.path.basename(target) == "best.pt" else [])
        if len(renamed) == count:
            die()
    tdro.training.checkpoint.os.replace = replace_then_die
elif point == "before_summary":  # every epoch and checkpoint written, summary.json not
    trainer.Trainer.finish = lambda self: die()
else:
    raise SystemExit(f"unknown kill point {point}")

from tdro.__main__ import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory) -> Path:
    """One finished 2-epoch run, trained once per module; tests damage copies of it."""
    root = tmp_path_factory.mktemp("template")
    return train(Config(output_dir=str(root / "runs"), run_name="r", **{**OVERRIDES, "epochs": 2})).run_dir


@pytest.fixture
def finished_run(finished_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_template, tmp_path / "runs" / "r"))


def cli(*arguments: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    prefix = [sys.executable, "-c", KILLER, kill_at] if kill_at else [sys.executable, "-m", "tdro"]
    return subprocess.run(prefix + list(arguments), cwd=ROOT, capture_output=True, text=True, timeout=300)


def train_arguments(tmp_path: Path, run_name: str, **extra) -> list[str]:
    arguments = ["train", "-p", "output_dir", str(tmp_path / "runs"), "-p", "run_name", run_name]
    for name, value in {**OVERRIDES, **extra}.items():
        arguments += ["-p", name, json.dumps(value)]
    return arguments


def killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {done.returncode}: {done.stderr[-2000:]}"


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def epochs_of(path: Path) -> list[int]:
    return [r["epoch"] for r in read_jsonl(path)]


def assert_same_records(run: Path, reference: Path) -> None:
    assert without_timing(read_jsonl(run / "history.jsonl")) == without_timing(read_jsonl(reference / "history.jsonl"))
    assert read_jsonl(run / "steps.jsonl") == read_jsonl(reference / "steps.jsonl")
    ours, theirs = (json.loads((p / "summary.json").read_text()) for p in (run, reference))
    for key in ("val", "test", "selected_epoch", "epochs_run", "final_q", "initial_q", "diagnostics"):
        assert ours[key] == theirs[key], key


@pytest.mark.slow
def test_kills_between_records_and_checkpoints_inside_resume_and_before_the_summary_lose_nothing(tmp_path):
    reference = train(Config(output_dir=str(tmp_path / "runs"), run_name="reference", **OVERRIDES)).run_dir
    run = tmp_path / "runs" / "killed"

    killed(cli(*train_arguments(tmp_path, "killed"), kill_at="between_record_and_checkpoint:2"))
    assert epochs_of(run / "history.jsonl") == [1, 2, 3], "epoch 3's record is on disk, its checkpoint is not"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1, "the 0-based counter of epoch 2"
    history, steps = ((run / name).read_bytes() for name in ("history.jsonl", "steps.jsonl"))

    for point in ("mid_rewrite:history.jsonl", "before_rename:history.jsonl"):
        killed(cli("train", "--resume", str(run), kill_at=point))
        assert (run / "history.jsonl").read_bytes() == history, f"killed at {point}: history.jsonl changed"
    for point in ("mid_rewrite:steps.jsonl", "before_rename:steps.jsonl"):
        killed(cli("train", "--resume", str(run), kill_at=point))
        assert (run / "steps.jsonl").read_bytes() == steps, f"killed at {point}: steps.jsonl changed"
        assert epochs_of(run / "history.jsonl") == [1, 2], "history.jsonl was rewritten whole: epoch 3 is redone"

    killed(cli("train", "--resume", str(run), kill_at="before_summary"))
    assert epochs_of(run / "history.jsonl") == [1, 2, 3]
    assert not (run / "summary.json").exists()

    done = cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert_same_records(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 2])
def test_a_kill_between_best_and_last_checkpoint_loses_nothing(tmp_path, count):
    """One epoch's best.pt renamed into place, its last.pt not: the first epoch's (no last.pt yet) or a later one's."""
    reference = train(Config(output_dir=str(tmp_path / "runs"), run_name="reference", **OVERRIDES)).run_dir
    run = tmp_path / "runs" / "killed"
    killed(cli(*train_arguments(tmp_path, "killed"), kill_at=f"after_best:{count}"))
    best = load_checkpoint(run / "checkpoints" / "best.pt")["epoch"]
    last = run / "checkpoints" / "last.pt"
    assert (load_checkpoint(last)["epoch"] if last.exists() else -1) == best - 1
    done = cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert_same_records(run, reference)
    for name in ("best.pt", "last.pt"):
        ours, theirs = (load_checkpoint(p / "checkpoints" / name) for p in (run, reference))
        assert ours["epoch"] == theirs["epoch"] and ours["best_value"] == theirs["best_value"], name
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"]), name


@pytest.mark.slow
def test_a_run_that_stopped_early_and_was_killed_before_its_summary_does_not_train_on(tmp_path):
    """lr 1e-12: validation never improves after epoch 1, so patience 1 stops after epoch 2 of 8."""
    stopping = {"epochs": 8, "early_stopping_patience": 1, "lr": 1e-12}
    reference = train(Config(output_dir=str(tmp_path / "runs"), run_name="reference", **{**OVERRIDES, **stopping}))
    assert reference.summary["epochs_run"] == 2
    run = tmp_path / "runs" / "killed"
    killed(cli(*train_arguments(tmp_path, "killed", **stopping), kill_at="before_summary"))
    done = cli("train", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert epochs_of(run / "history.jsonl") == [1, 2]
    assert_same_records(run, reference.run_dir)


def test_resume_refuses_a_config_yaml_that_differs_from_the_checkpoint_naming_the_keys(finished_run, tmp_path):
    run = finished_run
    config_path = run / "config.yaml"
    values = yaml.safe_load(config_path.read_text())
    config_path.write_text(yaml.safe_dump({**values, "lr": 0.5, "latent_dim": 4}))
    with pytest.raises(ConfigError, match=r"latent_dim: 8 → 4, lr: 0\.001 → 0\.5"):
        resume(run)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config_hash"] == Config(**values).result_hash()


def test_a_config_yaml_cut_anywhere_never_resumes_as_another_config(finished_run, tmp_path):
    run = finished_run
    text = (run / "config.yaml").read_bytes()
    (run / "summary.json").unlink()
    original = Config.load([run / "config.yaml"])
    for cut in range(0, len(text), max(1, len(text) // 40)):
        (run / "config.yaml").write_bytes(text[:cut])
        try:
            if Config.load([run / "config.yaml"]) == original:
                continue  # only keys at their defaults were cut: the same config, which may resume
        except ConfigError:
            pass
        with pytest.raises(ConfigError):
            resume(run)
    (run / "config.yaml").write_bytes(text)
    assert resume(run).summary["epochs_run"] == 2


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    """A failure while writing the new file leaves the previous config.yaml whole (temp file + rename)."""
    path = tmp_path / "config.yaml"
    Config(lr=0.1).save(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Config(lr=0.2).save(path)
    assert path.read_bytes() == before


LOCK_HOLDER = r'''
import sys, time
from tdro.runs import lock_run_directory
handle = lock_run_directory(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
'''


def test_a_second_writer_of_one_run_is_refused_until_the_first_dies(finished_run, tmp_path):
    run = finished_run
    (run / "summary.json").unlink()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        done = cli("train", "--resume", str(run))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"being written by another process (pid {holder.pid})" in done.stderr
        with pytest.raises(RunDirectoryInUseError):
            resume(run)
        same_name = cli(*train_arguments(tmp_path, "r"))
        assert same_name.returncode == 2 and "being written by another process" in same_name.stderr
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "summary.json").exists(), "the refused writers wrote nothing"
    assert resume(run).summary["epochs_run"] == 2, "the lock dies with its process"


def test_two_writers_in_one_process_are_refused_too(tmp_path):
    config = Config(output_dir=str(tmp_path / "runs"), run_name="r", **{**OVERRIDES, "epochs": 1})
    first = Trainer(config)
    first.start()
    with pytest.raises(RunDirectoryInUseError):
        Trainer(config).resume()
    first.close()
    lock_run_directory(first.run_dir).close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_last_checkpoint_names_the_file_and_the_remedy(finished_run, tmp_path, damage):
    run = finished_run
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": random.Random(4).randbytes(4096), "empty": b""}[damage])
    done = cli("train", "--resume", str(run))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr
    assert f"checkpoint {last} is cut or corrupt" in done.stderr
    assert f"cp {run / 'checkpoints' / 'best.pt'} {last}" in done.stderr
    with pytest.raises(CheckpointError):
        load_checkpoint(last)


def test_any_damaged_bytes_are_a_checkpoint_error(finished_run, tmp_path):
    """Random bytes fail anywhere in the unpickler (IndexError, KeyError, …): every way is the one clear error."""
    data = (finished_run / "checkpoints" / "last.pt").read_bytes()
    draw = random.Random(0)
    damaged = tmp_path / "checkpoints" / "last.pt"
    damaged.parent.mkdir()
    for trial in range(300):
        garbage = draw.randbytes(draw.choice([1, 7, 64, 4096]))
        damaged.write_bytes(garbage if trial % 2 else data[: draw.randrange(len(data))])
        with pytest.raises(CheckpointError, match="is cut or corrupt"):
            load_checkpoint(damaged)


def test_a_corrupt_summary_names_the_file_and_resume_writes_it_again(finished_run, tmp_path):
    run = finished_run
    summary = (run / "summary.json").read_text()
    (run / "summary.json").write_text(summary[: len(summary) // 2])
    shown = cli("show", str(run))
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert f"{run / 'summary.json'} is cut or corrupt" in shown.stderr and "--resume" in shown.stderr
    with pytest.raises(ValueError, match="cut or corrupt"):
        load_run(run)
    assert resume(run).summary["epochs_run"] == 2
    assert json.loads((run / "summary.json").read_text())["test"] == json.loads(summary)["test"]


def test_exploding_sgd_is_a_clear_error_that_says_no_checkpoint_exists(tmp_path):
    """`-p lr 1e3 -p optimizer sgd -p grad_clip 0` used to die in eigvalsh with a traceback."""
    done = cli(*train_arguments(tmp_path, "boom", lr=1e3, optimizer="sgd", grad_clip=0, epochs=2))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "non-finite steps in a row" in done.stderr
    assert "no checkpoint was written" in done.stderr and "last.pt existed" in done.stderr


def test_a_linalg_error_in_a_step_is_a_skipped_non_finite_step(tmp_path, monkeypatch):
    config = Config(output_dir=str(tmp_path / "runs"), **{**OVERRIDES, "epochs": 2, "max_nonfinite_steps": 3})
    trainer = Trainer(config)
    trainer.start()
    calls = {"n": 0}
    eigvalsh = torch.linalg.eigvalsh

    def failing_eigvalsh(matrix):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return eigvalsh(matrix)

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_eigvalsh)
    trainer.fit()
    history = read_jsonl(trainer.run_dir / "history.jsonl")
    assert [r["nonfinite_steps"] for r in history] == [1, 0]
    trainer.close()


def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_never_saved(tmp_path):
    config = Config(output_dir=str(tmp_path / "runs"), **{**OVERRIDES, "epochs": 2, "max_nonfinite_steps": 2})
    trainer = Trainer(config)
    trainer.start()
    state = {"steps": 0}

    def nan_gradient(gradient: torch.Tensor) -> torch.Tensor:
        """The loss stays finite; from the second epoch on, the head's weight gradient is NaN (in the first once)."""
        state["steps"] += 1
        return gradient * float("nan") if trainer.epoch >= 1 or state["steps"] == 2 else gradient

    trainer.model.head.weight.register_hook(nan_gradient)
    with pytest.raises(NonFiniteLossError, match="the gradient is not finite"):
        trainer.fit()
    trainer.close()
    history = read_jsonl(trainer.run_dir / "history.jsonl")
    assert [r["nonfinite_steps"] for r in history] == [1]
    last = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert torch.isfinite(trainer.algorithm.q.q).all()


def test_keys_without_effect_are_printed_once_and_recorded_in_the_summary(tmp_path):
    done = cli(*train_arguments(tmp_path, "w", epochs=1, groupdro_objective="max", groupdro_gamma=0.5))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("groupdro_gamma") == 1
    summary = json.loads((tmp_path / "runs" / "w" / "summary.json").read_text())
    assert any("groupdro_gamma" in warning for warning in summary["config_warnings"])


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again_with_the_same_command(tmp_path):
    """E.g. an image that decodes wrong in epoch 1: after fixing it, the same `train` must not be blocked."""
    config = Config(output_dir=str(tmp_path / "runs"), run_name="r", **{**OVERRIDES, "epochs": 1})
    trainer = Trainer(config)
    trainer.start()

    def unreadable(module, inputs):
        raise OSError("cannot read image x.jpg")

    hook = trainer.model.head.register_forward_pre_hook(unreadable)
    with pytest.raises(OSError, match="x.jpg"):
        trainer.fit()
    hook.remove()
    trainer.close()
    assert (trainer.run_dir / "config.yaml").exists() and not (trainer.run_dir / "checkpoints").exists()
    assert train(config).summary["epochs_run"] == 1
    assert epochs_of(trainer.run_dir / "history.jsonl") == [1]
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config.replace(lr=0.5))
