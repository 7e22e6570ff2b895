"""Sweep requests refused before anything is created (a study name that leaves the sweeps folder, impossible
worker options), and a trial failed through its stale heartbeat whose sweep.json says so (real SQLite storage,
a real worker process killed mid-trial)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tdro.__main__ import main
from tdro.sweep import SearchSpace, SweepError, attach, create_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = {"name": "guard",
        "base": {"dataset": "digits", "groupdro_enabled": True, "groupdro_warmup_epochs": 0, "epochs": 2,
                 "digits_sizes": [200, 60], "batch_size": 64, "head_hidden": 0, "latent_samples_per_group": 0,
                 "progress": False},
        "space": {"lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-2, "log": True},
                  "latent_dim": {"choices": [8, 16]}},
        "pruner": {"name": "none"}}
BAD_NAMES = ["../../x", "..", ".", "", "a/b", "/tmp/absolute_study", "a\\b"]


def write_space(folder: Path, **base) -> Path:
    data = json.loads(json.dumps(TINY))
    data["base"].update(base)
    path = folder / "guard.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def nothing_created(tmp_path: Path, *allowed: str) -> bool:
    return sorted(p.name for p in tmp_path.iterdir()) == sorted(allowed)


# =============================================================================== study names
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_study_name_must_be_one_folder_name(tmp_path, capsys, name):
    space = write_space(tmp_path)
    sweeps = tmp_path / "sweeps" / "inner"
    for extra in (["-f", str(space)], []):  # create, and attach
        code = main(["sweep", *extra, "--study", name, "--sweeps-dir", str(sweeps), "--trials", "1"])
        err = capsys.readouterr().err
        assert code == 2 and f"--study {name!r} must be one folder name" in err, err
    assert nothing_created(tmp_path, "guard.yaml"), "no sweeps folder, storage or run outside it"
    for call in (lambda: create_sweep(SearchSpace.load(space), name, sweeps_dir=sweeps),
                 lambda: attach(name, sweeps_dir=sweeps),
                 lambda: run_sweep(space, 1, name, sweeps_dir=sweeps)):
        with pytest.raises(SweepError, match=re.escape(f"study name {name!r} must be one folder name")):
            call()
    assert nothing_created(tmp_path, "guard.yaml")


def test_a_search_file_name_that_leaves_the_sweeps_folder_is_refused(tmp_path):
    space = SearchSpace.from_dict({**TINY, "name": "../escape"})
    with pytest.raises(SweepError, match=r"study name \(the name of search space '\.\./escape'\) '\.\./escape' must be "
                                         "one folder name"):
        create_sweep(space, sweeps_dir=tmp_path / "sweeps")
    assert nothing_created(tmp_path)


# =============================================================================== worker options
@pytest.mark.parametrize("arguments, message", [
    (["--trials", "-3"], "trials (--trials) must be an integer >= 0 (0: only report); got -3"),
    (["--max-trials", "0"], "max_trials (--max-trials) must be an integer >= 1"),
    (["--timeout", "0"], "timeout (--timeout) must be a finite number of seconds > 0"),
    (["--timeout", "nan"], "timeout (--timeout) must be a finite number of seconds > 0"),
    (["--seed", "-1"], "seed (--seed) must be an integer in 0..4294967295"),
    (["--heartbeat-interval", "-1"], "heartbeat_interval (--heartbeat-interval) must be an integer >= 0"),
    (["--grace-period", "0"], "grace_period (--grace-period) must be an integer >= 1"),
    (["--heartbeat-interval", "5", "--grace-period", "5"], "grace_period (--grace-period) 5 must exceed"),
    (["--max-retry", "-1"], "max_retry (--max-retry) must be an integer >= 0"),
    (["--top", "0"], "--top must be an integer >= 1"),
    (["--rerun-seeds", "0", "-2"], "--rerun-seeds must be distinct integers >= 0; got 0 -2"),
    (["--rerun-seeds", "1", "1"], "--rerun-seeds must be distinct integers >= 0; got 1 1"),
])
def test_impossible_arguments_are_refused_before_anything_is_created(tmp_path, monkeypatch, capsys, arguments,
                                                                     message):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path)
    for extra in (["-f", str(space)], []):  # create, and attach: the argument is named, not a missing study
        assert main(["sweep", *extra, "--study", "guard", *arguments]) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert nothing_created(tmp_path, "guard.yaml"), "no outputs/sweeps/guard/optuna.db"


def test_run_sweep_checks_its_options_before_the_study(tmp_path):
    space = write_space(tmp_path)
    for options, message in (({"trials": -3}, "trials"), ({"trials": 1, "timeout": -1.0}, "timeout"),
                             ({"trials": 1, "max_retry": -1}, "max_retry"), ({"trials": 1, "seed": 2 ** 32}, "seed")):
        with pytest.raises(SweepError, match=message):
            run_sweep(space, study_name="guard", sweeps_dir=tmp_path / "sweeps", **options)
    assert nothing_created(tmp_path, "guard.yaml")


# =============================================================================== heartbeat failures
@pytest.mark.slow
def test_a_trial_failed_by_its_stale_heartbeat_has_a_failed_record(tmp_path):
    space = write_space(tmp_path, epochs=25)
    sweeps = tmp_path / "sweeps"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"}
    command = [sys.executable, "-m", "tdro", "sweep", "-f", str(space), "--study", "guard", "--sweeps-dir", str(sweeps),
               "--trials", "1", "--heartbeat-interval", "1", "--grace-period", "2"]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweeps / "guard" / "runs" / "trial_0000"
    deadline = time.time() + 120
    while not ((run_dir / "history.jsonl").exists() and (run_dir / "history.jsonl").read_text().count("\n") >= 1):
        assert first.poll() is None, first.communicate()[0]
        assert time.time() < deadline, "the first worker never finished an epoch"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # mid-trial: its worker cannot update sweep.json
    first.communicate(timeout=30)
    record = json.loads((run_dir / "sweep.json").read_text())
    assert record["state"] == "running"
    time.sleep(3.5)  # > grace period: the heartbeat is stale
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    sweep = attach("guard", sweeps_dir=sweeps)
    killed, retry = sweep.study.get_trials()
    assert killed.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    record = json.loads((run_dir / "sweep.json").read_text())
    assert record["state"] == "failed" and "stopped sending heartbeats" in record["error"]
    assert record["retried_by"] == 1 and record["finished"] >= record["started"]
    assert {k: record[k] for k in ("trial", "params", "pid")} == {"trial": 0, "params": killed.params, "pid": first.pid}
    assert json.loads((Path(retry.user_attrs["run_dir"]) / "sweep.json").read_text())["state"] == "complete"
