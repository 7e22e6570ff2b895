"""tdro.phases: the seed's phases as data, applicability per dataset, the idempotent runner, impact tables."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from tdro.config import Config
from tdro.phases import BASELINE, PHASE_NAMES, PhaseError, load_phase, plan_phase, run_phase, scale_epochs
from tdro.studies.results import format_impact, impact_table
from tdro.studies import ensure_run, find_run
from tdro.studies.tables import paired_difference

from processes import alive, children, command_line, descendants, wait_gone  # tests/processes.py

ROOT = Path(__file__).resolve().parents[1]
SEED_FILE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "hyperparameter-optimization-analysis.md"

SEED_ARMS = {
    "phase1_quick_wins": {
        "batch_64": {"batch_size": 64},
        "epochs_50": {"epochs": 50},
        "char_cnn_text": {"text_encoder": "char_cnn_text"},
        "linear_decay": {"lr_start": 1e-3, "lr_end": 1e-5},
        "all_four": {"batch_size": 64, "epochs": 50, "text_encoder": "char_cnn_text", "lr_start": 1e-3, "lr_end": 1e-5},
    },
    "phase2_architecture": {
        "latent_128": {"latent_dim": 128, "head_hidden": 256},
        "differential_lr": {"lr_backbone": 1e-4, "lr_new": 1e-3},
        "both": {"latent_dim": 128, "head_hidden": 256, "lr_backbone": 1e-4, "lr_new": 1e-3},
    },
    "phase3_finetuning": {
        "warmup_5": {"groupdro_warmup_epochs": 5},
        "latent_256": {"latent_dim": 256, "head_hidden": 512},
        "classes_15": {"textcaps_num_classes": 15},
        "classes_20": {"textcaps_num_classes": 20},
    },
}


# ------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("name", PHASE_NAMES)
def test_seed_phases_have_the_seed_arms(name):
    spec = load_phase(name)
    assert spec.name == name
    assert {arm.name: arm.changes for arm in spec.arms[1:]} == SEED_ARMS[name]
    assert spec.arms[0].name == BASELINE == spec.reference
    start = Config.from_dict({**spec.base, **spec.adds})  # the starting config is a valid Config
    assert all(arm.label and arm.expected for arm in spec.arms[1:])
    if name == "phase1_quick_wins":  # the seed's "Current Settings"
        assert (start.batch_size, start.epochs, start.latent_dim, start.head_hidden, start.lr, start.lr_scheduler) == (
            32, 10, 64, 128, 1e-3, "none")
    if name == "phase3_finetuning":
        assert start.groupdro_enabled and start.groupdro_warmup_epochs == 2 and start.latent_dim == 128
    assert spec.previous == {"phase1_quick_wins": None, "phase2_architecture": "phase1_quick_wins",
                             "phase3_finetuning": "phase2_architecture"}[name]


@pytest.mark.skipif(not SEED_FILE.is_file(), reason="the seed document is not beside the repository")
def test_expected_impact_is_the_seeds_column():
    table = {}
    for line in SEED_FILE.read_text().splitlines():
        match = re.match(r"\| \*\*(.+?)\*\* \| (.+?) \| (\w+) \|", line)
        if match:
            table[match.group(1)] = (match.group(2), match.group(3))
    arms = {arm.name: arm for name in PHASE_NAMES for arm in load_phase(name).arms}
    for arm, row in {"batch_64": "Batch 32→64", "epochs_50": "Epochs 10→50", "char_cnn_text": "MLP→CharCNN",
                     "linear_decay": "LR scheduler", "latent_128": "Latent 64→128",
                     "differential_lr": "Differential LR"}.items():
        expected, risk = table[row]
        assert arms[arm].expected.startswith(expected) and arms[arm].risk == risk


@pytest.mark.parametrize("content, message", [
    ("name: x\narms: []\nbogus: 1\n", "unknown keys \\['bogus'\\]"),
    ("name: x\nbase: {latnt_dim: 3}\narms: []\n", "unknown config key 'latnt_dim'; did you mean 'latent_dim'"),
    ("name: x\narms: [{name: a, changes: {lr: 0.1}}, {name: a, changes: {lr: 0.2}}]\n", "used twice"),
    ("name: x\narms: [{name: baseline, changes: {lr: 0.1}}]\n", "reserved 'baseline'"),
    ("name: x\narms: [{name: a}]\n", "changes nothing"),
    ("arms: []\n", "needs 'name'"),
])
def test_phase_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(PhaseError, match=message):
        load_phase(path)
    with pytest.raises(PhaseError, match="no phase 'nope'"):
        load_phase("nope")


def test_scale_epochs():
    values = {"epochs": 50, "groupdro_warmup_epochs": 5, "lr_warmup_epochs": 0, "T_max": None}
    assert scale_epochs(values, 0.1) == {"epochs": 5, "groupdro_warmup_epochs": 1, "lr_warmup_epochs": 0,
                                         "T_max": None, "lr_step_size": 2}  # default step size 15 scaled too
    assert scale_epochs({"epochs": 10}, 0.04)["epochs"] == 1  # never below one epoch
    assert scale_epochs(values, 1.0) == values
    with pytest.raises(PhaseError, match="epochs_scale must be > 0"):
        scale_epochs(values, 0)


# ------------------------------------------------------------------------------------------- applicability
def _plan_table(name, **kwargs):
    plan = plan_phase(name, seeds=1, smoke=True, **kwargs)
    return plan, plan.table().set_index("arm")


def test_applicability_on_digits(tmp_path):
    plan, table = _plan_table("phase1_quick_wins", output_dir=tmp_path)
    assert not table.loc["char_cnn_text", "applicable"]
    assert "digits has no text group (its groups: image (image), coarse (tabular))" in table.loc["char_cnn_text", "reason"]
    assert table.loc["all_four", "applicable"] and "no text group" in table.loc["all_four", "notes"]
    assert "text_encoder" not in plan.arm("all_four").values
    assert table.loc["epochs_50", "epochs"] == 2 and table.loc[BASELINE, "epochs"] == 1  # smoke: 50 -> 2, 10 -> 1
    assert plan.arm("epochs_50").values["epochs"] == 50  # unscaled values are kept for chosen.yaml
    config = plan.arm(BASELINE).configs[0]
    assert config.group_max_train_samples == [120, 120] and config.progress is False
    assert config.run_name.startswith("baseline-seed0-") and Path(config.output_dir) == tmp_path / "phase1_quick_wins" / "runs"

    plan, table = _plan_table("phase2_architecture", output_dir=tmp_path)
    assert any("text_encoder=char_cnn_text" in note for note in plan.base_notes)
    assert not table.loc["differential_lr", "applicable"]
    assert "no encoder has pretrained backbone parameters (image=cnn, coarse=mlp_tabular)" in table.loc["differential_lr", "reason"]
    assert table.loc["both", "applicable"] and "lr_backbone" in table.loc["both", "notes"]

    _, table = _plan_table("phase3_finetuning", output_dir=tmp_path)
    for arm in ("classes_15", "classes_20"):
        assert not table.loc[arm, "applicable"]
        assert "only the textcaps dataset reads it; digits has its fixed 10 classes" in table.loc[arm, "reason"]
    assert table.loc["warmup_5", "applicable"] and table.loc["latent_256", "applicable"]


@pytest.fixture(scope="module")
def textcaps_root(tmp_path_factory):
    from test_data_textcaps import make_root  # the test module's real TextCaps annotation samples

    return make_root(tmp_path_factory.mktemp("textcaps_phases"))


def test_applicability_on_textcaps(tmp_path, textcaps_root):
    overrides = {"data_root": str(textcaps_root), "image_size": 32}
    plan, table = _plan_table("phase2_architecture", dataset="textcaps", output_dir=tmp_path, overrides=overrides)
    assert plan.base_notes == [] and table["applicable"].all()  # ResNet backbone: differential LRs apply
    assert plan.arm(BASELINE).values["text_encoder"] == "char_cnn_text"

    spec = tmp_path / "classes.yaml"
    spec.write_text(yaml.safe_dump({"name": "classes", "base": {"textcaps_num_classes": 10}, "arms": [
        {"name": "c20", "changes": {"textcaps_num_classes": 20}},
        {"name": "c60", "changes": {"textcaps_num_classes": 60}}]}))
    _, table = _plan_table(spec, dataset="textcaps", output_dir=tmp_path, overrides=overrides)
    assert table.loc["c20", "applicable"]
    assert not table.loc["c60", "applicable"]
    assert "textcaps_num_classes=60: the textcaps train split has only 43 classes" in table.loc["c60", "reason"]


# ------------------------------------------------------------------------------------------- impact statistics
def test_paired_difference_is_a_t_interval():
    arm, base = [0.8, 0.7, 0.9, 0.85], [0.6, 0.65, 0.7, 0.7]
    d = np.subtract(arm, base)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert paired_difference(arm, base) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    mean, low, high = paired_difference([0.5], [0.4])
    assert mean == pytest.approx(0.1) and math.isnan(low) and math.isnan(high)


def _metrics_rows():
    rows = []
    for seed, (b, a) in enumerate([(0.60, 0.70), (0.62, 0.69), (0.58, 0.71)]):
        rows.append({"arm": BASELINE, "seed": seed, "worst_group_acc": b, "acc": b + 0.1, "wall_seconds": 10.0,
                     "peak_memory_mb": 100.0})
        rows.append({"arm": "big", "seed": seed, "worst_group_acc": a, "acc": a + 0.05, "wall_seconds": 25.0,
                     "peak_memory_mb": 150.0})
    rows.append({"arm": "single", "seed": 0, "worst_group_acc": 0.5, "acc": 0.6, "wall_seconds": 5.0,
                 "peak_memory_mb": 100.0})
    arms = pd.DataFrame([
        {"arm": BASELINE, "label": "Base", "applicable": True, "reason": "", "notes": "", "expected": "", "risk": ""},
        {"arm": "big", "label": "Big", "applicable": True, "reason": "", "notes": "", "expected": "+3-8%", "risk": "Medium"},
        {"arm": "single", "label": "One seed", "applicable": True, "reason": "", "notes": "", "expected": "", "risk": ""},
        {"arm": "text", "label": "Text", "applicable": False, "reason": "no text group", "notes": "",
         "expected": "+5-15% text accuracy", "risk": "Low"},
    ])
    return pd.DataFrame(rows), arms


def test_impact_table_statistics_and_not_applicable_rows():
    metrics, arms = _metrics_rows()
    table = impact_table(metrics, arms)
    assert list(table.index) == [BASELINE, "big", "single", "text"]  # a row per arm, n/a included
    big = table.loc["big"]
    assert big["worst_group_acc"] == pytest.approx(0.70)
    assert big["worst_group_acc_std"] == pytest.approx(np.std([0.70, 0.69, 0.71], ddof=1))
    diff, low, high = paired_difference([0.70, 0.69, 0.71], [0.60, 0.62, 0.58])
    assert (big["worst_group_acc_diff"], big["worst_group_acc_ci_low"], big["worst_group_acc_ci_high"]) == pytest.approx(
        (diff, low, high))
    assert big["acc_diff"] == pytest.approx(np.mean([0.75, 0.74, 0.76]) - np.mean([0.70, 0.72, 0.68]))
    assert (big["time_ratio"], big["memory_ratio"]) == pytest.approx((2.5, 1.5))
    assert (big["status"], big["seeds"], big["paired_seeds"]) == ("measured", 3, 3)
    assert table.loc[BASELINE, "status"] == "baseline" and table.loc[BASELINE, "time_ratio"] == 1.0
    assert math.isnan(table.loc["single", "worst_group_acc_ci_low"]) and table.loc["single", "paired_seeds"] == 1
    text = table.loc["text"]
    assert (text["status"], text["notes"], text["expected"]) == ("not applicable", "no text group", "+5-15% text accuracy")

    shown = format_impact(table)
    assert list(shown.index) == ["Base", "Big", "One seed", "Text"]
    assert shown.loc["Big", "worst-group acc (test)"] == "70.0 ± 1.0 %"
    assert shown.loc["Big", "Δ worst-group acc [95% CI]"] == (
        f"{100 * diff:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]")
    assert shown.loc["Big", "time ×"] == "2.50×" and shown.loc["Big", "expected impact (seed)"] == "+3-8%"
    assert shown.loc["One seed", "Δ worst-group acc [95% CI]"] == "-10.0 pp (1 seed: no CI)"
    assert shown.loc["Text", "worst-group acc (test)"] == "not applicable" and shown.loc["Text", "notes"] == "no text group"
    assert shown.loc["Base", "Δ acc [95% CI]"] == "(reference)"


# ------------------------------------------------------------------------------------------- the runner (real tiny runs)
@pytest.fixture
def tiny_phase(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "title": "Tiny", "base": {"epochs": 25, "latent_dim": 8, "head_hidden": 0},
        "arms": [{"name": "wide", "label": "Latent 16", "changes": {"latent_dim": 16}, "expected": "+1%"},
                 {"name": "text", "label": "Text", "changes": {"text_encoder": "mlp_text"}}]}))
    return path


def test_run_phase_trains_reuses_and_resumes(tmp_path, tiny_phase):
    out = tmp_path / "out"
    plan = plan_phase(tiny_phase, seeds=[0, 1], smoke=True, output_dir=out)
    assert [a.applicable for a in plan.arms] == [True, True, False]
    result = run_phase(plan, log=None)
    assert list(result.runs["status"]) == ["trained"] * 4
    assert list(result.runs["arm"]) == [BASELINE, BASELINE, "wide", "wide"]
    for row in result.runs.itertuples():
        run_dir = Path(row.run_dir)
        assert (run_dir / "summary.json").is_file() and (run_dir / "history.jsonl").is_file()
        meta = json.loads((run_dir / "study.json").read_text())
        assert (meta["study"], meta["arm"], meta["seed"]) == ("tiny", row.arm, row.seed)
        assert json.loads((run_dir / "summary.json").read_text())["config_hash"] == row.config_hash

    table = result.impact_table()
    assert list(table.index) == [BASELINE, "wide", "text"]
    assert table.loc["wide", "seeds"] == 2 and not math.isnan(table.loc["wide", "worst_group_acc_ci_low"])
    assert table.loc["text", "status"] == "not applicable"
    assert result.save_impact().is_file()

    # idempotent: nothing new is trained, no new directory appears
    dirs = sorted((out / "tiny" / "runs").iterdir())
    again = run_phase(plan_phase(tiny_phase, seeds=[0, 1], smoke=True, output_dir=out), log=None)
    assert list(again.runs["status"]) == ["reused"] * 4
    assert sorted((out / "tiny" / "runs").iterdir()) == dirs

    # an interrupted run (no summary.json yet) is resumed, not retrained
    victim = Path(result.runs.loc[2, "run_dir"])
    (victim / "summary.json").unlink()
    resumed = run_phase(plan, log=None)
    assert list(resumed.runs["status"]) == ["reused", "reused", "resumed", "reused"]
    assert (victim / "summary.json").is_file() and len(list(Path(victim, "..").iterdir())) == 4

    # the chosen config is unscaled and starts the next phase
    arm = result.best_arm()
    assert arm in (BASELINE, "wide")
    chosen = result.save_chosen(arm="wide")
    values = Config.load([chosen])
    assert values.latent_dim == 16 and values.epochs == 25 and values.group_max_train_samples is None
    with pytest.raises(PhaseError, match="validation metric"):
        result.best_arm("worst_group_acc")
    follow = plan_phase(tiny_phase, seeds=1, smoke=True, output_dir=out, start_from=chosen).table().set_index("arm")
    assert not follow.loc["wide", "applicable"]
    assert follow.loc["wide", "reason"] == "no change from the baseline on this dataset"


def test_find_run_ignores_non_result_keys(tmp_path):
    config = Config(epochs=1, progress=False, latent_dim=4, head_hidden=0, group_max_train_samples=[60, 60],
                    latent_samples_per_group=0, output_dir=str(tmp_path / "a"), run_name="first")
    run_dir, status = ensure_run(config, tmp_path)
    assert status == "trained" and run_dir == tmp_path / "a" / "first"
    twin = config.replace(output_dir=str(tmp_path / "b"), run_name="second", log_interval=3)
    assert find_run(tmp_path, twin) == (run_dir, True)
    assert ensure_run(twin, tmp_path) == (run_dir, "reused")
    assert find_run(tmp_path, config.replace(seed=1)) == (None, False)


@pytest.mark.slow
def test_isolated_runs_train_in_a_child_process(tmp_path):
    config = Config(epochs=1, progress=False, latent_dim=4, head_hidden=0, group_max_train_samples=[60, 60],
                    output_dir=str(tmp_path / "runs"), run_name="child")
    run_dir, status = ensure_run(config, tmp_path, {"arm": "x"}, isolate=True)
    assert status == "trained" and (run_dir / "summary.json").is_file() and (run_dir / "study.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["config_hash"] == config.result_hash()
    (run_dir / "summary.json").unlink()
    assert ensure_run(config, tmp_path, isolate=True) == (run_dir, "resumed")
    assert (run_dir / "summary.json").is_file()


ORPHAN_PARENT = """
import sys
from tdro.config import Config
from tdro.studies import ensure_run

config = Config(epochs=5000, progress=False, latent_dim=4, head_hidden=0, group_max_train_samples=[60, 60],
                output_dir=sys.argv[1], run_name="orphan")
ensure_run(config, sys.argv[1], isolate=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children die with their parent through Linux's prctl")
def test_an_isolated_child_run_dies_when_its_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_PARENT)
    runs = tmp_path / "runs"
    parent = subprocess.Popen([sys.executable, str(script), str(runs)], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    history = runs / "orphan" / "history.jsonl"
    child = None
    try:
        deadline = time.time() + 120
        while not (history.is_file() and history.read_text().count("\n") >= 1):  # the child is training
            assert parent.poll() is None and time.time() < deadline, "the child never finished an epoch"
            time.sleep(0.05)
        (child,) = children(parent.pid)
        assert "-m tdro train" in command_line(child)
        os.kill(parent.pid, signal.SIGKILL)  # as when papermill (and with it the kernel) is killed
        parent.wait(timeout=30)
        assert wait_gone([child], timeout=5) == [], "the child `python -m tdro train` outlived its parent"
        assert not (runs / "orphan" / "summary.json").exists(), "it was killed, not finished"
    finally:
        for pid in [parent.pid] + ([child] if child else []):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="children die with their parent through Linux's prctl")
def test_killing_papermill_ends_the_phase_notebooks_kernel_and_training_child(tmp_path):
    from jupyter_client.kernelspec import find_kernel_specs

    kernel = "tdro" if "tdro" in find_kernel_specs() else "python3"
    out = tmp_path / "outputs"
    command = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "phase1_quick_wins.ipynb"),
               str(tmp_path / "phase1.ipynb"), "-k", kernel, "--cwd", str(ROOT), "-p", "dataset", "digits",
               "-p", "seeds", "1", "-p", "epochs_scale", "100", "-p", "output_dir", str(out)]
    papermill = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spawned: list[int] = []
    try:
        deadline = time.time() + 240
        while not any(h.read_text().count("\n") >= 1 for h in out.rglob("history.jsonl")):  # a child is training
            assert papermill.poll() is None and time.time() < deadline, "no isolated run finished an epoch"
            time.sleep(0.1)
        spawned = descendants(papermill.pid)
        assert any("-m tdro train" in command_line(pid) for pid in spawned), [command_line(p) for p in spawned]
        os.kill(papermill.pid, signal.SIGKILL)
        papermill.wait(timeout=30)
        left = wait_gone(spawned, timeout=10)  # the kernel notices within a second; its child dies with it
        assert left == [], f"still running after papermill was killed: {[command_line(p) for p in left]}"
    finally:
        for pid in [papermill.pid, *spawned]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
