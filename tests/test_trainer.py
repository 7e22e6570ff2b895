"""End-to-end trainer checks on the real digits data: learning, records, non-finite steps, resume, CLI."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tdro.config import Config
from tdro.runs import read_jsonl
from tdro.training.checkpoint import load_checkpoint
from tdro.training.trainer import NonFiniteLossError, Trainer, resume, train

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TIMING_KEYS = {"epoch_seconds", "samples_per_second", "peak_memory_mb", "run_memory_mb"}


def tiny(tmp_path: Path, **overrides) -> Config:
    values = dict(output_dir=str(tmp_path / "runs"), progress=False, epochs=2, batch_size=64, latent_dim=16,
                  head_hidden=0, latent_samples_per_group=20)
    values.update(overrides)
    return Config(**values)


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def test_digits_run_with_groupdro_and_anchors_learns_and_writes_complete_records(tmp_path):
    config = tiny(tmp_path, epochs=6, groupdro_enabled=True, groupdro_warmup_epochs=1, groupdro_eta=0.1,
                  lambda_fit=0.1, lambda_sep=0.1, log_interval=5, lr=3e-3)
    result = train(config)
    run = result.run_dir
    assert Config.load([run / "config.yaml"]) == config
    history = read_jsonl(run / "history.jsonl")
    assert [r["epoch"] for r in history] == list(range(1, 7)), "epochs count from 1: epoch e = after e passes"
    groups = result.summary["groups"]
    for record in history:
        assert set(record["train"]) >= {"loss", "cls", "fit", "sep", "acc", "group_loss"}
        assert record["train"]["fit"] > 0 and record["train"]["sep"] > 0
        assert set(record["q"]) == set(groups) and sum(record["q"].values()) == pytest.approx(1, abs=1e-5)
        assert set(record["lr"]) == {"new"}
        assert record["val"]["worst_group_acc"] == min(record["val"]["group_acc"].values())
        assert record["samples_per_second"] > 0 and record["peak_memory_mb"] > 0
    assert history[0]["q"] == {g: 1 / len(groups) for g in groups}, "warm-up holds q at its initial value"
    assert history[-1]["q"] != history[0]["q"], "after warm-up q moves"
    steps = read_jsonl(run / "steps.jsonl")
    assert steps and all(s["q"] is not None for s in steps)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection_split"] == "val" and not summary["test_selection"]
    assert summary["selected_epoch"] == 1 + max(range(6), key=lambda e: (history[e]["val"]["worst_group_acc"], -e))
    selected = next(r for r in history if r["epoch"] == summary["selected_epoch"])
    assert summary["val"]["worst_group_acc"] == pytest.approx(selected["val"]["worst_group_acc"])
    assert summary["test"]["worst_group_acc"] > 0.5, "10 classes: chance is 0.1"
    assert summary["parameter_count"] > 0 and summary["wall_seconds"] > 0
    latents = sorted(p.name for p in (run / "latents").glob("epoch_*.npz"))
    assert latents == [f"epoch_{e:03d}.npz" for e in range(1, 7)]
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] + 1 == summary["selected_epoch"], "checkpoints keep the 0-based loop counter"


def test_test_selection_is_refused_unless_allowed_and_then_labelled(tmp_path):
    config = tiny(tmp_path, epochs=1, monitor="test_acc", allow_test_selection=True)
    summary = train(config).summary
    assert summary["test_selection"] and summary["selection_split"] == "test"


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_with_the_checkpoint_intact(tmp_path):
    config = tiny(tmp_path, epochs=3, max_nonfinite_steps=3)
    trainer = Trainer(config)
    trainer.start()
    poisoned_steps = {"count": 0}

    def poison(module, inputs, output):
        """Corrupt the head's output: from the second epoch on every step, in the first only the second step."""
        poisoned_steps["count"] += 1
        if trainer.epoch >= 1 or (module.training and poisoned_steps["count"] == 2):
            return output * float("nan")
        return output

    trainer.model.head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row .* at epoch 2, .*checkpoint is "
                                                 r".*last.pt \(epoch 1\)"):
        trainer.fit()
    history = read_jsonl(trainer.run_dir / "history.jsonl")
    assert [r["epoch"] for r in history] == [1]
    assert history[0]["nonfinite_steps"] == 1
    last = load_checkpoint(trainer.run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_recorded_learning_rates_follow_the_schedule_per_parameter_group(tmp_path):
    config = tiny(tmp_path, epochs=4, lr_start=1e-2, lr_end=1e-4)
    run = train(config).run_dir
    lrs = [r["lr"]["new"] for r in read_jsonl(run / "history.jsonl")]
    assert lrs == pytest.approx([1e-2 + (1e-4 - 1e-2) * e / 3 for e in range(4)], rel=1e-9)


@pytest.mark.slow
def test_a_run_killed_at_a_random_moment_resumes_to_the_same_result(tmp_path):
    overrides = {"output_dir": str(tmp_path / "runs"), "progress": False, "epochs": 4, "batch_size": 32,
                 "latent_dim": 16, "groupdro_enabled": True, "groupdro_warmup_epochs": 1,
                 "lambda_fit": 0.1, "lambda_sep": 0.1, "log_interval": 3, "latent_samples_per_group": 0}
    started = time.perf_counter()
    reference = train(Config(run_name="reference", **overrides))
    step_lines = len(_complete_lines(reference.run_dir / "steps.jsonl"))
    seconds_per_line = (time.perf_counter() - started) / step_lines  # this machine's pace, set-up and evaluation included (an upper bound)
    command = [sys.executable, "-m", "tdro", "train", "-p", "run_name", "killed"]
    for name, value in overrides.items():
        command += ["-p", name, json.dumps(value)]
    killed_dir = tmp_path / "runs" / "killed"
    rng = random.Random(os.getpid())
    for attempt in range(5):
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target_lines = rng.randint(1, step_lines - 1)
        while process.poll() is None and len(_complete_lines(killed_dir / "steps.jsonl")) < target_lines:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, seconds_per_line))  # anywhere before the next record, however fast the machine
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (killed_dir / "summary.json").exists():
            break
        subprocess.run(["rm", "-rf", str(killed_dir)], check=True)
    else:
        pytest.fail("the run finished before it could be killed five times in a row")
    resumed = resume(killed_dir)
    ours = [without_timing(r) for r in read_jsonl(killed_dir / "history.jsonl")]
    theirs = [without_timing(r) for r in read_jsonl(reference.run_dir / "history.jsonl")]
    assert ours == theirs
    assert read_jsonl(killed_dir / "steps.jsonl") == read_jsonl(reference.run_dir / "steps.jsonl")
    assert resumed.summary["test"] == reference.summary["test"]
    assert resumed.summary["val"] == reference.summary["val"]


def _complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().split("\n")[:-1] if line]


def test_cli_trains_and_reports_bad_input_in_one_line(tmp_path):
    base = [sys.executable, "-m", "tdro", "train", "-p", "output_dir", str(tmp_path / "runs"), "-p", "progress", "false"]
    done = subprocess.run(base + ["-p", "epochs", "1", "-p", "run_name", "cli"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "worst" in done.stdout and (tmp_path / "runs" / "cli" / "summary.json").exists()
    shown = subprocess.run([sys.executable, "-m", "tdro", "show", str(tmp_path / "runs" / "cli")], cwd=ROOT,
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "selected epoch" in shown.stdout
    bad = subprocess.run(base + ["-p", "latent_dm", "8"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: unknown key 'latent_dm' in parameters; did you mean 'latent_dim'?"]
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"epochs": 1, "run_name": "from-file"}))
    again = subprocess.run(base + ["-f", str(params)], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "runs" / "from-file" / "summary.json").exists()


def test_mnist_usps_on_the_real_files_trains_one_short_epoch(tmp_path):
    config = tiny(tmp_path, dataset="mnist_usps", data_root=str(SHARED_DATA), epochs=1, batch_size=128,
                  mnist_size=600, usps_size=200)
    summary = train(config).summary
    assert set(summary["groups"]) >= {"mnist", "usps"}
    assert summary["test"]["acc"] > 0.1


def test_textcaps_with_a_combined_group_trains_end_to_end(tmp_path):
    from test_data_textcaps import make_root

    root = make_root(tmp_path / "textcaps")
    config = tiny(tmp_path, dataset="textcaps", data_root=str(root), image_size=32, textcaps_num_classes=3,
                  include_combined_group=True, epochs=1, groupdro_enabled=True, groupdro_warmup_epochs=0,
                  lambda_fit=0.1, latent_samples_per_group=5)
    summary = train(config).summary
    assert summary["groups"] == ["visual", "text", "combined"]
    assert set(summary["final_q"]) == {"visual", "text", "combined"}
    assert summary["test"]["group_acc"]["combined"] is not None


def test_on_epoch_sees_each_saved_record_and_can_stop_the_run(tmp_path):
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(record):
        seen.append(record["epoch"])
        assert (tmp_path / "runs" / "hooked" / "checkpoints" / "last.pt").exists()
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(tiny(tmp_path, epochs=4, run_name="hooked"), on_epoch=on_epoch)
    assert seen == [1, 2]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "runs" / "hooked" / "history.jsonl")] == [1, 2]


def test_groupdro_over_group_class_cells_upweights_the_minority_cells(tmp_path):
    config = tiny(tmp_path, epochs=2, groupdro_enabled=True, groupdro_cells="group_class", groupdro_update_mode="exp",
                  groupdro_eta=0.1, groupdro_warmup_epochs=0)
    summary = train(config).summary
    q = summary["final_q"]
    classes = summary["classes"]
    assert list(q) == [f"{g}/{c}" for g in summary["groups"] for c in classes]
    assert sum(q.values()) == pytest.approx(1, abs=1e-5)
    minority = [q[f"image/{c}"] for c in classes[5:]] + [q[f"coarse/{c}"] for c in classes[:5]]
    majority = [q[f"image/{c}"] for c in classes[:5]] + [q[f"coarse/{c}"] for c in classes[5:]]
    assert sum(minority) > sum(majority), "the skewed groups' minority classes have the larger losses"


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    config = tiny(tmp_path, epochs=6, lr=1e-12, early_stopping_patience=2, latent_samples_per_group=0)
    summary = train(config).summary
    history = read_jsonl(result_dir(tmp_path) / "history.jsonl")
    assert [r["monitor"]["improved"] for r in history] == [True, False, False]
    assert summary["epochs_run"] == 3 and summary["selected_epoch"] == 1


def result_dir(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_freeze_backbone_epochs_holds_the_pretrained_trunk_then_trains_it(tmp_path):
    from test_data_textcaps import make_root

    root = make_root(tmp_path / "textcaps")
    config = tiny(tmp_path, dataset="textcaps", data_root=str(root), image_size=32, textcaps_num_classes=3,
                  epochs=1, freeze_backbone_epochs=1, latent_samples_per_group=0, lr_backbone=1e-2)
    trainer = Trainer(config)
    trainer.start()
    backbone = trainer.model.parameter_groups()["backbone"]
    before = [p.detach().clone() for p in backbone]
    new_before = [p.detach().clone() for p in trainer.model.parameter_groups()["new"]]
    trainer.train_epoch()
    assert all(torch.equal(a, b) for a, b in zip(before, backbone)), "frozen during the first epoch"
    assert any(not torch.equal(a, b) for a, b in zip(new_before, trainer.model.parameter_groups()["new"]))
    trainer.epoch = 1
    trainer.train_epoch()
    assert any(not torch.equal(a, b) for a, b in zip(before, backbone)), "trained after the frozen epochs"
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"backbone": 1e-2, "new": 1e-3}


def test_val_loss_monitor_selects_the_lowest_validation_loss(tmp_path):
    summary = train(tiny(tmp_path, epochs=3, monitor="val_loss", progress=True)).summary
    history = read_jsonl(result_dir(tmp_path) / "history.jsonl")
    losses = [r["val"]["loss"] for r in history]
    assert summary["selected_epoch"] == 1 + losses.index(min(losses))
    assert summary["monitor_value"] == pytest.approx(min(losses))


def test_groupdro_update_timing_changes_the_trajectory(tmp_path):
    trajectories = {}
    for timing in ("after_step", "before_loss"):
        config = tiny(tmp_path, run_name=timing, epochs=1, log_interval=1, groupdro_enabled=True,
                      groupdro_warmup_epochs=0, groupdro_eta=1.0, groupdro_update_mode="exp",
                      groupdro_update_timing=timing)
        trajectories[timing] = [s["q"] for s in read_jsonl(train(config).run_dir / "steps.jsonl")]
    after, before = trajectories["after_step"], trajectories["before_loss"]
    assert after[0] == pytest.approx(before[0]), "both update from the first batch's losses"
    assert after[-1] != pytest.approx(before[-1]), "later batches are weighted differently"


def test_device_switches_are_validated(tmp_path):
    with pytest.raises(ValueError, match="bf16 autocast runs on CUDA only"):
        Trainer(tiny(tmp_path, bf16=True, device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            Trainer(tiny(tmp_path, device="cuda"))
    deterministic = train(tiny(tmp_path, run_name="det", epochs=1, deterministic=True))
    assert torch.are_deterministic_algorithms_enabled()
    again = train(tiny(tmp_path, run_name="det2", epochs=1, deterministic=True))
    assert again.summary["test"] == deterministic.summary["test"]
    train(tiny(tmp_path, run_name="free", epochs=1))
    assert not torch.are_deterministic_algorithms_enabled()


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path):
    try:  # tensorboard is not a dependency: without it the key must fail clearly, with it it must work
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard, or set tensorboard: false"):
            Trainer(tiny(tmp_path, tensorboard=True))
    else:
        trainer = Trainer(tiny(tmp_path, tensorboard=True))
        assert trainer.tensorboard is not None
