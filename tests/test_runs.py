"""Run records: JSONL/JSON writers and loading fake run directories (finished, killed) into pandas."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tdro.runs import (append_jsonl, find_runs, load_histories, load_run, load_summaries, q_trajectories,
                       read_jsonl, write_json_atomic)
from tdro.training.metrics import metrics_from_counts

GROUPS = ["mnist", "usps"]
CLASSES = ["0", "1", "2"]


def fake_metrics(seed: int) -> dict:
    """A real METRICS dict from random counts."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 20, size=(2, 3, 3))
    losses = rng.uniform(1, 5, size=2) * counts.sum(axis=(1, 2))
    return metrics_from_counts(counts.tolist(), losses.tolist(), GROUPS, CLASSES)


def write_run(root: Path, name: str, config: dict, epochs: int, groupdro: bool, finished: bool) -> Path:
    """A run directory written with the trainer's helpers: config, history, steps and maybe summary."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    for epoch in range(epochs):
        q = {"mnist": 0.5 - 0.1 * epoch, "usps": 0.5 + 0.1 * epoch} if groupdro else None
        for step in range(2):
            append_jsonl(run / "steps.jsonl", {"step": 2 * epoch + step, "epoch": epoch, "loss": 1.0, "cls": 0.9,
                                               "fit": 0.05, "sep": 0.05, "q": q})
        append_jsonl(run / "history.jsonl", {
            "epoch": epoch, "train": {"loss": 1.0, "cls": 0.9, "fit": 0.05, "sep": 0.05, "acc": 0.5,
                                      "group_loss": {"mnist": 0.8, "usps": 1.2}},
            "q": q, "lr": {"backbone": 1e-3, "new": 1e-3}, "val": fake_metrics(epoch), "epoch_seconds": 1.5,
            "samples_per_second": 1000.0, "peak_memory_mb": 100.0, "nonfinite_steps": 0,
            "monitor": {"name": "val_worst_group_acc", "value": 0.5, "improved": True}})
    if finished:
        write_json_atomic(run / "summary.json", {
            "selected_epoch": epochs - 1, "monitor": "val_worst_group_acc", "monitor_value": 0.5,
            "selection_split": "val", "val": fake_metrics(10), "test": fake_metrics(11), "wall_seconds": 12.5,
            "parameter_count": 1234, "device": "cpu", "versions": {"torch": "2"}, "groups": GROUPS})
    return run


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A finished GroupDRO run, a killed ERM run (truncated last lines, no summary), a nested finished run."""
    base = {"dataset": "digits", "lr": 1e-3, "epochs": 3}
    done = write_run(tmp_path, "a_done", {**base, "seed": 0, "groupdro_enabled": True}, 3, True, True)
    killed = write_run(tmp_path, "b_killed", {**base, "seed": 1, "groupdro_enabled": False}, 2, False, False)
    for name in ("history.jsonl", "steps.jsonl"):
        with open(killed / name, "a") as handle:
            handle.write('{"epoch": 2, "train": {"loss": 0.')  # the kill cut this record
    nested = write_run(tmp_path / "phase1", "c_nested", {**base, "seed": 2, "groupdro_enabled": True}, 1, True, True)
    (tmp_path / "not_a_run").mkdir()
    return done, killed, nested


def test_read_jsonl_ignores_only_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    for i in range(3):
        append_jsonl(path, {"i": i})
    with open(path, "a") as handle:
        handle.write('{"i": 3}')  # complete JSON but no newline: the write was cut before it
    assert [r["i"] for r in read_jsonl(path)] == [0, 1, 2]
    append_jsonl(path, {"i": 4})  # appending drops the cut line instead of gluing onto it
    assert path.read_text() == "".join(json.dumps({"i": i}) + "\n" for i in (0, 1, 2, 4))
    path.write_text('{"i": 0}\n{"i": 1\n{"i": 2}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2 is not valid JSON"):
        read_jsonl(path)


def test_append_survives_sigkill(tmp_path: Path) -> None:
    """A writer killed at an arbitrary moment leaves a file whose complete records all load, in order."""
    path = tmp_path / "steps.jsonl"
    code = (f"from tdro.runs import append_jsonl\n"
            f"for i in range(10**6):\n    append_jsonl({str(path)!r}, {{'step': i, 'pad': 'x' * 5000}})\n")
    writer = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    while (not path.exists() or path.stat().st_size < 50_000) and time.time() < deadline:
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    steps = [r["step"] for r in read_jsonl(path)]
    assert len(steps) >= 5 and steps == list(range(len(steps)))


def test_write_json_atomic_replaces_without_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": [1.5, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_load_run_finished_and_killed(runs) -> None:
    done, killed, _ = runs
    run = load_run(done)
    assert run.run_id == "a_done" and run.finished and run.config["seed"] == 0
    assert run.summary["val"]["acc"] == fake_metrics(10)["acc"]
    assert list(run.history["epoch"]) == [0, 1, 2]
    assert run.history["val.group_acc.mnist"].tolist() == [fake_metrics(e)["group_acc"]["mnist"] for e in range(3)]
    assert run.history["val.group_class_acc.usps.2"].tolist() == [
        fake_metrics(e)["group_class_acc"]["usps"]["2"] for e in range(3)]
    assert run.history["lr.backbone"].tolist() == [1e-3] * 3
    assert run.steps["q.usps"].tolist() == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.7, 0.7])

    partial = load_run(killed)
    assert not partial.finished and partial.summary == {}
    assert list(partial.history["epoch"]) == [0, 1] and list(partial.steps["step"]) == [0, 1, 2, 3]
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        load_run(done.parent / "not_a_run")


def test_find_runs(runs, tmp_path: Path) -> None:
    assert find_runs(tmp_path) == sorted(runs)
    with pytest.raises(FileNotFoundError):
        find_runs(tmp_path / "missing")


def test_load_histories(runs) -> None:
    table = load_histories(runs)
    assert table.columns[0] == "run_id"
    assert table.groupby("run_id")["epoch"].apply(list).to_dict() == {
        "a_done": [0, 1, 2], "b_killed": [0, 1], "c_nested": [0]}
    assert "val.worst_group_acc" in table and "q.mnist" in table
    assert load_histories([]).empty


def test_load_summaries(runs) -> None:
    table = load_summaries(runs).set_index("run_id")
    assert list(table.index) == ["a_done", "b_killed", "c_nested"]
    # default config columns: dataset, seed, then every key that differs between the runs
    assert [c for c in table.columns if c.startswith("config.")] == [
        "config.dataset", "config.seed", "config.groupdro_enabled"]
    assert table["finished"].tolist() == [True, False, True] and table["epochs"].tolist() == [3, 2, 1]
    assert table.loc["a_done", "val.acc"] == fake_metrics(10)["acc"]
    assert table.loc["a_done", "test.worst_group_acc"] == fake_metrics(11)["worst_group_acc"]
    assert table.loc["a_done", "test.group_acc.usps"] == fake_metrics(11)["group_acc"]["usps"]
    assert table.loc["c_nested", "selected_epoch"] == 0 and table.loc["a_done", "wall_seconds"] == 12.5
    assert math.isnan(table.loc["b_killed", "wall_seconds"])
    assert "versions" not in table and "groups" not in table  # non-scalar summary entries stay out
    assert list(load_summaries(runs, config_keys=["lr"]).filter(like="config.").columns) == ["config.lr"]


def test_q_trajectories(runs) -> None:
    table = q_trajectories(runs)
    assert list(table.columns) == ["run_id", "source", "step", "epoch", "group", "q"]
    assert set(table["run_id"]) == {"a_done", "c_nested"}  # the ERM run has no q
    done = table[table["run_id"] == "a_done"]
    steps = done[done["source"] == "step"]
    assert len(steps) == 6 * 2 and steps["step"].tolist()[:4] == [0, 0, 1, 1]
    epochs = done[(done["source"] == "epoch") & (done["group"] == "usps")]
    assert epochs["epoch"].tolist() == [0, 1, 2] and epochs["q"].tolist() == pytest.approx([0.5, 0.6, 0.7])
    assert epochs["step"].isna().all()
    assert q_trajectories([runs[1]]).empty
