"""The study runner (one reuse rule, failures per run, threads, Dask across worker processes) and collect."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from tdro.__main__ import main
from tdro.config import Config
from tdro.studies import METADATA_FILE, PlannedRun, StudyError, run_study
from tdro.studies.collect import CollectError, collect
from tdro.studies.runner import check_workers

from processes import alive

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(progress=False, latent_dim=4, head_hidden=0, group_max_train_samples=[60, 60], latent_samples_per_group=0)
TIMING = ("epoch_seconds", "samples_per_second", "peak_memory_mb", "wall_seconds", "run_memory_mb")


def planned(root: Path, arms: dict[str, dict], seeds=(0, 1), **base) -> list[PlannedRun]:
    runs = []
    for arm, changes in arms.items():
        for seed in seeds:
            config = Config(**{**TINY, "epochs": 2, **base, **changes, "seed": seed, "output_dir": str(root / "runs")})
            config = config.replace(run_name=f"{arm}-seed{seed}-{config.result_hash()[:8]}")
            runs.append(PlannedRun(config, {"study": "t", "arm": arm, "seed": seed}))
    return runs


def without_timing(record):
    if isinstance(record, dict):
        return {k: without_timing(v) for k, v in record.items() if k not in TIMING}
    return record


def records(run_dir: Path) -> dict:
    """What a run recorded, less wall-clock figures: history, steps and the summary's metrics."""
    lines = lambda name: [without_timing(json.loads(line)) for line in (run_dir / name).read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"history": lines("history.jsonl"), "steps": lines("steps.jsonl"),
            "val": summary["val"], "test": summary["test"], "selected_epoch": summary["selected_epoch"]}


def test_one_reuse_rule_labels_and_a_failed_run_that_does_not_stop_the_others(tmp_path):
    runs = planned(tmp_path, {"small": {}, "wide": {"latent_dim": 8}}, seeds=(0,))
    broken = Config(**{**TINY, "group_max_train_samples": None, "dataset": "heart",
                       "data_root": str(tmp_path / "no-such-folder"),
                       "output_dir": str(tmp_path / "runs"), "run_name": "broken"})
    table = run_study([*runs, PlannedRun(broken, {"study": "t", "arm": "broken", "seed": 0})], tmp_path, log=None)
    assert list(table["status"]) == ["trained", "trained", "failed"]
    error = table.loc[2, "error"]
    assert "no-such-folder" in error and error.split(":")[0].endswith("Error")
    for row in table.iloc[:2].itertuples():
        labels = json.loads((Path(row.run_dir) / METADATA_FILE).read_text())
        assert labels == {"study": "t", "arm": row.arm, "seed": 0}
    # the same configs under other names and folders are found by hash: nothing is trained again
    twins = [PlannedRun(r.config.replace(run_name="elsewhere-" + r.labels["arm"], output_dir=str(tmp_path / "b"),
                                         log_interval=7), r.labels) for r in runs]
    again = run_study(twins, tmp_path, log=None)
    assert list(again["status"]) == ["reused", "reused"] and list(again["run_dir"]) == list(table["run_dir"][:2])
    # an interrupted run is resumed in place
    (Path(table.loc[0, "run_dir"]) / "summary.json").unlink()
    assert list(run_study(runs, tmp_path, log=None)["status"]) == ["resumed", "reused"]


def test_duplicate_configs_train_once_and_share_their_row(tmp_path):
    (run,) = planned(tmp_path, {"a": {}}, seeds=(0,))
    table = run_study([run, PlannedRun(run.config, {"study": "t", "arm": "copy", "seed": 0})], tmp_path, log=None)
    assert list(table["status"]) == ["trained", "trained"] and table["run_dir"].nunique() == 1
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_threads_key_sets_torch_threads_for_the_run(tmp_path):
    before = torch.get_num_threads()
    try:
        (run,) = planned(tmp_path, {"a": {}}, seeds=(0,))
        run_study([run], tmp_path, threads=1, log=None)
        assert torch.get_num_threads() == 1
        assert Config.load([tmp_path / "runs" / run.config.run_name / "config.yaml"]).threads == 1
        assert Config(threads=3).result_hash() == Config(threads=1).result_hash()  # threads do not change results
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("workers, threads, scheduler, message", [
    (0, 1, None, "workers must be a whole number"),
    (2, -1, None, "threads must be"),
    (1, 1, "localhost:8786", "scheduler must be a Dask scheduler address"),
    (64, 4, None, "exceeds this machine's"),
])
def test_bad_worker_settings_are_refused_before_anything_runs(tmp_path, workers, threads, scheduler, message):
    with pytest.raises(StudyError, match=message):
        check_workers(workers, threads, scheduler)
    with pytest.raises(StudyError, match=message):
        run_study(planned(tmp_path, {"a": {}}, seeds=(0,)), tmp_path, workers, threads, scheduler, log=None)
    assert not (tmp_path / "runs").exists()


def test_collect_groups_by_the_keys_that_differ_with_t_intervals(tmp_path, capsys):
    runs = planned(tmp_path, {"small": {}, "wide": {"latent_dim": 8}}, seeds=(0, 1, 2))
    table = run_study(runs, tmp_path, log=None)
    collected = collect(tmp_path / "runs", ["test.worst_group_acc", "val.acc"])
    assert collected.group_keys == ["latent_dim"]
    wga = collected.tables["test.worst_group_acc"]
    for latent, arm in ((4, "small"), (8, "wide")):
        values = [json.loads((Path(d) / "summary.json").read_text())["test"]["worst_group_acc"]
                  for d in table[table["arm"] == arm]["run_dir"]]
        row = wga.loc[latent]
        half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
        assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(values))
        assert row["std"] == pytest.approx(np.std(values, ddof=1))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert main(["collect", str(tmp_path / "runs"), "--metrics", "test.worst_group_acc", "--out",
                 str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert "grouped by: latent_dim" in out and "| latent_dim | n | mean ± std | 95 % CI |" in out
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "test.worst_group_acc.csv", "test.worst_group_acc.md", "test.worst_group_acc.tex"]
    assert "\\begin{tabular}" in (tmp_path / "tables" / "test.worst_group_acc.tex").read_text()
    csv = pd.read_csv(tmp_path / "tables" / "test.worst_group_acc.csv", index_col=0)
    assert csv.loc[8, "mean"] == pytest.approx(wga.loc[8, "mean"])
    with pytest.raises(CollectError, match="unknown metric.*test.acc"):
        collect(tmp_path / "runs", ["test.accuracy"])
    with pytest.raises(CollectError, match="no finished run"):
        collect(tmp_path / "tables")


# ============================================================================================ Dask
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dask_cluster(tmp_path):
    """A real Dask scheduler and two worker processes (no nanny: a killed worker stays dead) on loopback."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "dask.log", "w")
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", address.rsplit(":", 1)[1], "--no-dashboard"], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                 "--no-nanny", "--no-dashboard", "--name", str(i)], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT) for i in range(2)]
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address, workers
    finally:
        for process in [*workers, scheduler]:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_a_study_on_dask_survives_a_killed_worker_and_matches_one_worker(tmp_path, dask_cluster):
    address, workers = dask_cluster
    worker_pids = {w.pid for w in workers}
    runs = planned(tmp_path / "dask", {"a": {}, "b": {"latent_dim": 8}}, seeds=(0, 1), epochs=40)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(
        table=run_study(runs, tmp_path / "dask", scheduler=address, log=None)))
    runner.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and runner.is_alive() and time.time() < deadline:
        for run in runs:  # a run past its first checkpoint, not finished: SIGKILL the worker that trains it
            run_dir = Path(run.config.output_dir) / run.config.run_name
            lock = run_dir / ".lock"
            if (run_dir / "checkpoints" / "last.pt").exists() and not (run_dir / "summary.json").exists() \
                    and lock.exists() and lock.read_text().strip().isdigit():
                pid = int(lock.read_text())
                if pid in worker_pids:
                    os.kill(pid, signal.SIGKILL)
                    killed = (run, pid)
                    break
        time.sleep(0.02)
    runner.join(timeout=600)
    assert killed is not None, "no run was caught mid-training"
    assert not alive(killed[1])
    table = outcome["table"]
    assert list(table["status"].isin(["trained", "resumed"])) == [True] * 4, table[["arm", "seed", "status", "error"]]
    victim = table[table["run_dir"] == str(Path(killed[0].config.output_dir) / killed[0].config.run_name)]
    assert list(victim["status"]) == ["resumed"]  # by the other worker, from last.pt
    assert victim["worker"].item() != f"{socket.gethostname()}:{killed[1]}"
    # every planned run exactly once: one directory each, no duplicated epochs
    assert sorted(p.name for p in (tmp_path / "dask" / "runs").iterdir()) == sorted(r.config.run_name for r in runs)
    serial = run_study(planned(tmp_path / "one", {"a": {}, "b": {"latent_dim": 8}}, seeds=(0, 1), epochs=40),
                       tmp_path / "one", log=None)
    for dask_dir, one_dir in zip(table["run_dir"], serial["run_dir"]):
        got, want = records(Path(dask_dir)), records(Path(one_dir))
        assert [r["epoch"] for r in got["history"]] == sorted({r["epoch"] for r in got["history"]})
        assert len(got["history"]) == 40
        assert got == want


# ============================================================================================ spec + results
def write_study(path: Path, **extra) -> Path:
    data = {"name": "tiny", "title": "Tiny", "base": {**TINY, "epochs": 2}, "seeds": 2, "reference": "small",
            "settings": [{"name": "plain", "label": "plain"}, {"name": "cells", "label": "cells",
                                                               "changes": {"groupdro_cells": "group_class"}}],
            "arms": [{"name": "small", "label": "latent 4"},
                     {"name": "wide", "label": "latent 8", "changes": {"latent_dim": 8}, "expected": "+1 pp"}],
            **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def test_one_spec_format_and_one_results_object_for_phases_and_experiments(tmp_path):
    from tdro.experiments import plan_experiment, run_experiment
    from tdro.phases import PhaseResult, load_phase
    from tdro.studies.results import StudyResult
    from tdro.studies.spec import load_study

    spec = load_study(write_study(tmp_path / "tiny.yaml"))
    assert [a.name for a in spec.arms] == ["small", "wide"] and spec.baseline.name == "small"
    phase = load_phase("phase1_quick_wins")
    assert phase.arms[0].name == phase.reference == "baseline" and type(phase) is type(spec)
    result = run_experiment(plan_experiment(spec, output_dir=tmp_path / "out"), log=None)
    assert isinstance(result, StudyResult) and issubclass(PhaseResult, StudyResult)
    m = result.metrics()
    for setting in ("plain", "cells"):
        impact = result.impact_table(setting)
        part = m[m["setting"] == setting].set_index(["arm", "seed"])["worst_group_acc"]
        diff = (part["wide"] - part["small"]).mean()
        assert impact.loc["wide", "worst_group_acc_diff"] == pytest.approx(diff)
        assert impact.loc["wide", "expected"] == "+1 pp" and impact.loc["small", "status"] == "baseline"
        paired = result.paired_numbers(setting)
        assert paired.loc["wide", "diff"] == pytest.approx(diff) and paired.loc["wide", "pairs"] == 2
    assert set(result.cost_table().index.get_level_values("setting")) == {"plain", "cells"}
    diagnostics = result.diagnostics_table("plain")
    assert list(diagnostics.index) == ["latent 4", "latent 8"]
    assert diagnostics.loc["latent 8", "W₂ to anchors (selected)"] != "—"  # anchors (default λ) were measured
    assert diagnostics.loc["latent 8", "q moved (runs)"] == "—"  # ERM has no q


@pytest.mark.parametrize("extra, message", [
    ({"baseline": {"label": "b"}}, "either `baseline:`"),
    ({"arms": [{"name": "small"}, {"name": "same"}]}, "arm 'same' changes nothing"),
    ({"reference": "nope"}, "reference 'nope' is not an arm"),
    ({"arms": [{"name": "small", "changes": {"latent_dimm": 3}}]}, "did you mean 'latent_dim'"),
    ({"seeds": 0}, "seeds must be at least 1"),
    ({"base": {"monitor": "test_acc", "allow_test_selection": True}}, "selects on the test split"),
])
def test_bad_study_files_name_the_problem(tmp_path, extra, message):
    from tdro.studies.spec import load_study

    with pytest.raises(StudyError, match=message):
        load_study(write_study(tmp_path / "bad.yaml", **extra))
