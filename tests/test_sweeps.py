"""Sweeps (tdro.sweep): search spaces checked before any trial, trials as normal run directories, pruning,
seeds, best config and re-runs, the CLI, workers sharing a PostgreSQL study, a killed worker, the notebook."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tdro.__main__ import main
from tdro.config import Config
from tdro.runs import find_runs, load_summaries, read_jsonl
from tdro.sweep import SearchSpace, SweepError, attach, build_pruner, build_sampler, create_sweep, run_sweep
from tdro.sweep import plots

ROOT = Path(__file__).resolve().parents[1]
SEARCH_DIR = ROOT / "params" / "search"
TINY_BASE = {"dataset": "digits", "groupdro_enabled": True, "groupdro_warmup_epochs": 0, "epochs": 2,
             "digits_sizes": [200, 60], "batch_size": 64, "head_hidden": 0, "latent_samples_per_group": 0,
             "progress": False}
TINY = {"name": "tiny", "base": TINY_BASE,
        "space": {"lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-2, "log": True},
                  "groupdro_eta": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
                  "latent_dim": {"choices": [8, 16]}},
        "pruner": {"name": "none"}}
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_space(folder: Path, name: str = "tiny", **changes) -> Path:
    data = json.loads(json.dumps(TINY))
    data["name"] = name
    for key, value in changes.items():
        if key == "base":
            data["base"].update(value)
        else:
            data[key] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def space_with(**space) -> dict:
    data = json.loads(json.dumps(TINY))
    data["space"] = space
    return data


# =============================================================================== search spaces
def test_shipped_search_files_validate_and_groupdro_matches_the_issue():
    files = sorted(SEARCH_DIR.glob("*.yaml"))
    assert files
    for path in files:
        for smoke in (False, True):
            space = SearchSpace.load(path, smoke=smoke)
            assert space.monitor.startswith("val_")
            build_sampler(space), build_pruner(space)
    dims = SearchSpace.load("groupdro").dimensions
    assert (dims["lr"].low, dims["lr"].high, dims["lr"].log) == (1e-4, 1e-2, True)
    assert (dims["groupdro_eta"].low, dims["groupdro_eta"].high, dims["groupdro_eta"].log) == (1e-3, 1.0, True)
    assert (dims["groupdro_gamma"].low, dims["groupdro_gamma"].high, dims["groupdro_gamma"].log) == (0.0, 0.95, False)
    for key in ("lambda_fit", "lambda_sep"):
        assert (dims[key].low, dims[key].high, dims[key].log) == (1e-4, 1.0, True)
    assert dims["latent_dim"].choices == (64, 128, 256)
    assert isinstance(build_pruner(SearchSpace.load("groupdro")), optuna.pruners.MedianPruner)
    assert isinstance(build_pruner(SearchSpace.load("anchors")), optuna.pruners.SuccessiveHalvingPruner)
    assert len(SearchSpace.load("anchors").grid()["sep_method"]) == 2


@pytest.mark.parametrize("data, message", [
    (space_with(lrr={"type": "float", "low": 1e-4, "high": 1e-2}), r"unknown key 'lrr'.*did you mean 'lr'\?"),
    ({**TINY, "base": {**TINY_BASE, "groupdro_eat": 0.1}}, r"unknown key 'groupdro_eat'.*did you mean 'groupdro_eta'\?"),
    (space_with(lr={"type": "float", "low": 1e-2, "high": 1e-3}), r"low \(0.01\) must be below high \(0.001\)"),
    (space_with(lr={"type": "float", "low": 1e-3, "high": 1e-3}), r"must be below high"),
    (space_with(lambda_fit={"type": "float", "low": 0.0, "high": 1.0, "log": True}), r"log-uniform range needs low > 0"),
    (space_with(lr={"type": "float", "low": 0.0, "high": 1e-2}), r"low 0.0 is not a valid Config value.*'lr'"),
    (space_with(groupdro_gamma={"type": "float", "low": 0.5, "high": 1.5}), r"high 1.5 is not a valid Config value"),
    (space_with(groupdro_update_mode={"choices": ["exp", "expo"]}),
     r"choice 'expo' is not a valid Config value.*allowed: exp, softmax, exp_smooth"),
    (space_with(latent_dim={"type": "float", "low": 8, "high": 64}), r"integer Config key; use type: int"),
    (space_with(latent_dim={"type": "int", "low": 8.5, "high": 64}), r"needs integer low"),
    (space_with(latent_dim={"type": "int", "low": 8, "high": 64, "step": 5}), r"step 5 must be >= 1 and divide"),
    (space_with(lr={"type": "float", "lo": 1e-4, "high": 1e-2}), r"unknown field 'lo'.*did you mean 'low'\?"),
    (space_with(lr={"type": "float", "low": 1e-4}), r"needs 'high'"),
    (space_with(lr={"type": "uniform", "low": 1e-4, "high": 1e-2}), r"type must be one of float, int, categorical"),
    (space_with(seed={"choices": [0, 1]}), r"searches 'seed'.*not a hyperparameter"),
    ({**TINY, "base": {**TINY_BASE, "monitor": "test_worst_group_acc", "allow_test_selection": True}},
     r"selects on the validation split only"),
    ({**TINY, "base": {**TINY_BASE, "lr": 1e-3}}, r"'lr' is both fixed in base and searched"),
    ({**TINY, "base": {**TINY_BASE, "output_dir": "x"}}, r"base sets 'output_dir'"),
    ({**TINY, "sampler": {"name": "grid"}}, r"grid sampler needs discrete dimensions; 'lr', 'groupdro_eta'"),
    ({**TINY, "sampler": "tpee"}, r"sampler 'tpee' is unknown.*did you mean 'tpe'\?"),
    ({**TINY, "spaces": {}}, r"unknown top-level key 'spaces'.*did you mean 'space'\?"),
    ({**TINY, "space": {}}, r"searches nothing"),
])
def test_invalid_search_spaces_fail_with_a_clear_message(data, message):
    with pytest.raises(SweepError, match=message):
        SearchSpace.from_dict(data, source="test")


def test_overrides_fix_keys_and_sampler_pruner_options_are_checked():
    space = SearchSpace.from_dict(TINY, overrides={"latent_dim": "16", "epochs": 1})
    assert "latent_dim" not in space.dimensions and space.base["latent_dim"] == 16 and space.base["epochs"] == 1
    with pytest.raises(SweepError, match=r"unknown key 'latnt_dim' in overrides \(-p\); did you mean 'latent_dim'\?"):
        SearchSpace.from_dict(TINY, overrides={"latnt_dim": 8})
    with pytest.raises(SweepError, match=r"pruner median has no option\(s\) \['warmup'\]"):
        build_pruner(SearchSpace.from_dict({**TINY, "pruner": {"name": "median", "warmup": 2}}))
    assert SearchSpace.from_dict({**TINY, "base": {**TINY_BASE, "monitor": "val_loss"}}).direction == "minimize"


def test_an_invalid_space_fails_before_any_study_or_trial(tmp_path, capsys):
    bad = write_space(tmp_path, "bad", space={"lrr": {"type": "float", "low": 1e-4, "high": 1e-2}})
    code = main(["sweep", "-f", str(bad), "--trials", "2", "--sweeps-dir", str(tmp_path / "sweeps")])
    assert code == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists(), "no storage or run directory was created"


# =============================================================================== one worker, in process
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    space = SearchSpace.load(write_space(folder))
    return run_sweep(space, trials=3, sweeps_dir=folder / "sweeps", seed=0)


def test_each_trial_is_a_normal_run_directory_linked_to_its_trial(tiny_sweep):
    trials = tiny_sweep.study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert tiny_sweep.storage == f"sqlite:///{tiny_sweep.folder / 'optuna.db'}" and (tiny_sweep.folder / "optuna.db").exists()
    for trial in trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir == (tiny_sweep.runs_dir / f"trial_{trial.number:04d}").resolve()
        config = Config.load([run_dir / "config.yaml"])
        assert config.run_name == f"trial_{trial.number:04d}"
        assert config == tiny_sweep.space.config(trial.params, run_name=run_dir.name, output_dir=str(tiny_sweep.runs_dir))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["sweep_trial"] == trial.number and summary["sweep_study"] == "tiny"
        assert json.loads((run_dir / "sweep.json").read_text())["trial"] == trial.number
        history = read_jsonl(run_dir / "history.jsonl")
        # reported every epoch: the validation monitor, and the objective is the selected checkpoint's validation value
        assert trial.intermediate_values == {r["epoch"]: r["val"]["worst_group_acc"] for r in history}
        assert summary["selection_split"] == "val"
        assert trial.value == summary["monitor_value"] == summary["val"]["worst_group_acc"]
        assert trial.value == max(r["val"]["worst_group_acc"] for r in history)
    table = load_summaries(find_runs(tiny_sweep.runs_dir))
    assert sorted(table["sweep_trial"]) == [0, 1, 2], "tdro's run tables read sweep runs"


def test_top_trials_best_yaml_and_rerun_over_seeds(tiny_sweep, tmp_path):
    top = tiny_sweep.top_trials(2)
    assert list(top["rank"]) == [1, 2] and list(top["value"]) == sorted(top["value"], reverse=True)
    assert top["value"].iloc[0] == tiny_sweep.study.best_value
    assert not any(c.startswith("test") for c in top.columns), "the top-trials table never shows test"
    best = tiny_sweep.best_trial()
    path = tiny_sweep.write_best_config()
    assert path == tiny_sweep.folder / "best.yaml"
    trial_config = Config.load([Path(best.user_attrs["run_dir"]) / "config.yaml"])
    assert Config.load([path]).result_hash() == trial_config.result_hash(), "-f best.yaml reproduces the best trial"
    assert Config.load([path]).run_name is None
    table = tiny_sweep.rerun_best(seeds=[0, 1], output_dir=tmp_path / "best")
    assert list(table["seed"]) == [0, 1, "mean", "std"]
    for seed in (0, 1):
        run_dir = tmp_path / "best" / f"seed_{seed}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert Config.load([run_dir / "config.yaml"]).seed == seed
        row = table[table["seed"] == seed].iloc[0]
        assert row["test.worst_group_acc"] == summary["test"]["worst_group_acc"]
        assert row["val.worst_group_acc"] == summary["monitor_value"]
    assert table.loc[2, "test.acc"] == pytest.approx(table.loc[:1, "test.acc"].mean())
    stamp = (tmp_path / "best" / "seed_0" / "summary.json").stat().st_mtime_ns
    again = tiny_sweep.rerun_best(seeds=[0, 1], output_dir=tmp_path / "best")
    assert (tmp_path / "best" / "seed_0" / "summary.json").stat().st_mtime_ns == stamp, "finished re-runs are reused"
    assert again.equals(table)


def test_a_seed_makes_a_single_worker_sweep_reproducible(tiny_sweep, tmp_path):
    again = run_sweep(tiny_sweep.space, trials=2, sweeps_dir=tmp_path, seed=0)
    first = tiny_sweep.study.get_trials()[:2]
    assert [t.params for t in again.study.get_trials()] == [t.params for t in first]
    assert [t.value for t in again.study.get_trials()] == pytest.approx([t.value for t in first])


def test_pruned_trials_stop_training_and_keep_their_records(tmp_path):
    space = SearchSpace.load(write_space(tmp_path))
    sweep = create_sweep(space, "pruned", sweeps_dir=tmp_path / "sweeps")
    sweep.optimize(2, pruner=optuna.pruners.ThresholdPruner(lower=1.01))  # accuracy < 1.01 always: pruned at epoch 1
    for trial in sweep.study.get_trials():
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert list(trial.intermediate_values) == [1]  # epochs count from 1
        run_dir = Path(trial.user_attrs["run_dir"])
        assert len(read_jsonl(run_dir / "history.jsonl")) == 1, "training stopped after the pruned epoch (of 2)"
        assert not (run_dir / "summary.json").exists()
        assert json.loads((run_dir / "sweep.json").read_text())["state"] == "pruned"
    assert len(sweep.top_trials()) == 0
    with pytest.raises(SweepError, match="no complete trial"):
        sweep.write_best_config()
    for make in (plots.plot_history, plots.plot_importances, plots.plot_intermediate_values):
        make(sweep)  # nothing to rank, but the figures still render
    assert "fewer than 2 complete trials (this study has 0)" in plots.param_importances(sweep)[1]


def test_grid_sampler_enumerates_a_discrete_space(tmp_path):
    path = write_space(tmp_path, "grid", sampler={"name": "grid"},
                       space={"latent_dim": {"choices": [8, 16]}, "groupdro_eta": {"type": "float", "low": 0.1,
                                                                                   "high": 0.2, "step": 0.1}},
                       base={"epochs": 1})
    sweep = run_sweep(path, trials=6, sweeps_dir=tmp_path / "sweeps", seed=0)
    assert sorted((t.params["latent_dim"], t.params["groupdro_eta"]) for t in sweep.study.get_trials()) == \
        [(8, 0.1), (8, 0.2), (16, 0.1), (16, 0.2)], "the grid is run once and the study stops"


def test_importances_fall_back_when_undefined():
    study = optuna.create_study(direction="maximize")
    assert plots.param_importances(study)[0] is None
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    importances, message = plots.param_importances(study)
    assert importances is None and "fewer than 2 complete trials (this study has 1)" in message
    plots.plot_importances(study)
    flat = optuna.create_study(direction="maximize")
    flat.optimize(lambda t: 0.5 + 0 * t.suggest_float("x", 0, 1), n_trials=2)
    assert "same value" in plots.param_importances(flat)[1]
    varied = optuna.create_study(direction="maximize")
    varied.optimize(lambda t: t.suggest_float("x", 0, 1) + 0.1 * t.suggest_float("y", 0, 1), n_trials=4)
    importances, _ = plots.param_importances(varied)
    assert set(importances) == {"x", "y"}


def test_cli_default_storage_runs_reports_and_attaches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path)
    assert main(["sweep", "-f", str(path), "--trials", "2", "--seed", "1", "--study", "cli", "-p", "epochs", "1"]) == 0
    out = capsys.readouterr().out
    folder = Path("outputs/sweeps/cli")
    assert (folder / "optuna.db").exists() and "top 2 trials" in out and "trials: 2 complete" in out
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["trial_0000", "trial_0001"]
    assert Config.load([folder / "best.yaml"]).epochs == 1
    assert main(["sweep", "--study", "cli", "--trials", "0", "--top", "1"]) == 0, "attach: the space is on the study"
    assert "top 1 trials" in capsys.readouterr().out
    assert main(["sweep", "-f", str(path), "--study", "cli", "--trials", "0"]) == 2, "another space for the same study"
    assert "was created with another search space (differs in: epochs)" in capsys.readouterr().err
    assert main(["sweep", "--study", "nothing", "--trials", "0"]) == 2
    assert "no study 'nothing'" in capsys.readouterr().err


# =============================================================================== PostgreSQL: workers
def worker(space: Path, url: str, study: str, trials: int, sweeps_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tdro", "sweep", "-f", str(space), "--storage", url, "--study", study,
               "--trials", str(trials), "--sweeps-dir", str(sweeps_dir), *extra]
    return subprocess.Popen(command, cwd=ROOT, env=WORKER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return out


@pytest.mark.slow
def test_two_worker_processes_share_one_postgres_study(postgres_url, tmp_path):
    space = write_space(tmp_path, "shared")
    sweeps = tmp_path / "sweeps"
    workers = [worker(space, postgres_url, "two_workers", 3, sweeps) for _ in range(2)]
    for process in workers:
        finish(process)
    sweep = attach("two_workers", postgres_url, sweeps)
    trials = sweep.study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6)), "every trial recorded once: none lost, none twice"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == 6 and sorted(p.name for p in (sweeps / "two_workers" / "runs").iterdir()) == \
        [f"trial_{n:04d}" for n in range(6)]
    per_worker = {}
    for trial, run_dir in zip(trials, run_dirs):
        assert Config.load([run_dir / "config.yaml"]).run_name == f"trial_{trial.number:04d}"
        assert json.loads((run_dir / "summary.json").read_text())["sweep_trial"] == trial.number
        per_worker.setdefault(trial.user_attrs["pid"], []).append(trial.number)
    assert sorted(len(v) for v in per_worker.values()) == [3, 3], f"each worker ran its 3 trials: {per_worker}"
    assert {p.pid for p in workers} == set(per_worker)


@pytest.mark.slow
def test_a_killed_worker_leaves_a_failed_trial_and_a_new_worker_continues(postgres_url, tmp_path):
    space = write_space(tmp_path, "killed", base={"epochs": 25})
    sweeps = tmp_path / "sweeps"
    heartbeat = ["--heartbeat-interval", "1", "--grace-period", "2"]
    first = worker(space, postgres_url, "killed", 1, sweeps, *heartbeat)
    history = sweeps / "killed" / "runs" / "trial_0000" / "history.jsonl"
    deadline = time.time() + 120
    while not (history.exists() and history.read_text().count("\n") >= 1):
        assert first.poll() is None, first.communicate()[0]
        assert time.time() < deadline, "the first worker never finished an epoch"
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)  # mid-trial: one epoch of 25 recorded
    first.communicate(timeout=30)
    sweep = attach("killed", postgres_url, sweeps)
    assert [t.state for t in sweep.study.get_trials()] == [optuna.trial.TrialState.RUNNING], "nobody knows yet"
    time.sleep(3.5)  # > grace period: the heartbeat is stale
    finish(worker(space, postgres_url, "killed", 1, sweeps, *heartbeat))
    killed, retry = sweep.study.get_trials()
    assert killed.state == optuna.trial.TrialState.FAIL, "marked failed through its stale heartbeat"
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.number == 1
    assert retry.params == killed.params and retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["failed_trial"] == 0
    assert not (Path(killed.user_attrs["run_dir"]) / "summary.json").exists()
    record = json.loads((Path(killed.user_attrs["run_dir"]) / "sweep.json").read_text())
    assert record["state"] == "failed" and record["retried_by"] == 1, "the record follows the storage, not 'running'"
    assert json.loads((Path(retry.user_attrs["run_dir"]) / "summary.json").read_text())["sweep_trial"] == 1
    assert len(read_jsonl(Path(retry.user_attrs["run_dir"]) / "history.jsonl")) == 25


# =============================================================================== notebook
@pytest.mark.slow
def test_sweep_notebook_runs_then_attaches_with_static_figures(tmp_path, monkeypatch):
    import papermill
    from jupyter_client.kernelspec import find_kernel_specs

    if "tdro" not in find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "tdro"], check=True)
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = ROOT / "notebooks" / "sweep.ipynb"
    assert all(not c.get("outputs") for c in json.loads(notebook.read_text())["cells"]), "committed without outputs"
    common = {"storage": f"sqlite:///{tmp_path / 'nb.db'}", "study_name": "nb", "sweeps_dir": str(tmp_path / "sweeps")}
    runs = {"run": {"search_file": "groupdro", "trials": 3, "smoke": True, **common},
            "attach": {"search_file": "", "trials": 0, **common}}
    for label, parameters in runs.items():
        output = tmp_path / f"{label}.ipynb"
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="tdro",
                                   cwd=str(tmp_path), progress_bar=False)
        cells = json.loads(output.read_text())["cells"]
        outputs = [o for c in cells for o in c.get("outputs", [])]
        text = "".join("".join(o.get("text", "")) for o in outputs)
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 3, label
        assert "trials by state: {'COMPLETE': 3}" in text
        assert "importances" in text and "best.yaml" in text
        tables = ["".join(o["data"]["text/html"]) for o in outputs if "text/html" in o.get("data", {})]
        assert any("param.lr" in t and "val.worst_group_acc" in t for t in tables), "the top-trials table"
    assert len(list((tmp_path / "sweeps" / "nb" / "runs").iterdir())) == 3, "attaching trained nothing"
