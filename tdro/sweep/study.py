"""Optuna studies of tdro runs: storage, samplers, pruners, the objective, workers and the results.

One trial = one normal tdro run (``tdro.training.trainer.train``) in
``<sweeps_dir>/<study>/runs/trial_<number>``: its ``config.yaml`` carries ``run_name: trial_<number>``,
``sweep.json`` links it to the study and trial, and ``summary.json`` gains ``sweep_study`` and
``sweep_trial``; the trial stores the run directory as its user attribute ``run_dir``. The objective
is the validation ``monitor`` of the selected checkpoint (never test); each epoch's validation value
is reported to Optuna so a pruner can stop the run.

Storage: by default an SQLite file ``<sweeps_dir>/<study>/optuna.db`` (one machine, nothing to set
up); a PostgreSQL (or any SQLAlchemy) URL shares one study between workers on many machines; a path
ending in ``.journal`` uses Optuna's journal file. SQL storages record heartbeats: a worker killed
mid-trial leaves a trial whose heartbeat stops, and the next worker to ask for a trial marks it
FAIL and (``max_retry``) queues a retry with the same parameters; the killed trial's ``sweep.json``
(which its worker could not update) is then marked failed from the storage's state
(``reconcile_records``, run whenever a study is created, attached or optimized).

Study names and worker options are checked before anything is created: a study name is one folder
name (``check_study_name``), counts and times are in range (``check_sweep_options``).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tdro.config import Config, is_folder_name
from tdro.sweep.space import SearchSpace, SweepError, load_search_space

DEFAULT_SWEEPS_DIR = "outputs/sweeps"
SPACE_ATTR = "tdro_search_space"
FINGERPRINT_ATTR = "tdro_search_fingerprint"
SCHEMA_ATTEMPTS = 5  # tries to open an SQL storage whose tables another worker is creating right now
VAL_METRICS = ("acc", "worst_group_acc", "balanced_acc", "macro_f1", "loss", "worst_group_loss")


def _optuna():
    import optuna

    return optuna


# ============================================================================================ storage
def check_study_name(name: Any, what: str = "study name") -> str:
    """The study name, refused unless it is one folder name: it names ``<sweeps_dir>/<study>``."""
    if not is_folder_name(name):
        raise SweepError(f"{what} {name!r} must be one folder name (no '/', '\\', '..' or absolute path): the study's "
                         "runs and tables go to <sweeps_dir>/<study>; choose a plain name such as 'groupdro_lr'")
    return name


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sweep_options(trials: int = 0, timeout: float | None = None, max_trials: int | None = None,
                        seed: int | None = None, heartbeat_interval: int | None = 60, grace_period: int | None = None,
                        max_retry: int = 1) -> None:
    """Refuse impossible worker options before any study, storage or folder is made."""
    problems = []
    if not _integer(trials) or trials < 0:
        problems.append(f"trials (--trials) must be an integer >= 0 (0: only report); got {trials!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        problems.append(f"timeout (--timeout) must be a finite number of seconds > 0, or unset; got {timeout!r}")
    if max_trials is not None and (not _integer(max_trials) or max_trials < 1):
        problems.append(f"max_trials (--max-trials) must be an integer >= 1, or unset; got {max_trials!r}")
    if seed is not None and (not _integer(seed) or not 0 <= seed < 2 ** 32):
        problems.append(f"seed (--seed) must be an integer in 0..{2 ** 32 - 1}, or unset; got {seed!r}")
    if heartbeat_interval is not None and (not _integer(heartbeat_interval) or heartbeat_interval < 0):
        problems.append(f"heartbeat_interval (--heartbeat-interval) must be an integer >= 0 (0: off); "
                        f"got {heartbeat_interval!r}")
    elif grace_period is not None:
        if not _integer(grace_period) or grace_period < 1:
            problems.append(f"grace_period (--grace-period) must be an integer >= 1, or unset; got {grace_period!r}")
        elif heartbeat_interval and grace_period <= heartbeat_interval:
            problems.append(f"grace_period (--grace-period) {grace_period} must exceed heartbeat_interval "
                            f"(--heartbeat-interval) {heartbeat_interval}, or a live worker's trial is failed "
                            "between two of its heartbeats")
    if not _integer(max_retry) or max_retry < 0:
        problems.append(f"max_retry (--max-retry) must be an integer >= 0; got {max_retry!r}")
    if problems:
        raise SweepError("; ".join(problems))


def default_storage(study: str, sweeps_dir: str | Path = DEFAULT_SWEEPS_DIR) -> str:
    """The SQLite URL of a study on this machine: ``<sweeps_dir>/<study>/optuna.db``."""
    return f"sqlite:///{Path(sweeps_dir) / check_study_name(study)}/optuna.db"


def describe_storage(url: str) -> str:
    """The storage URL without its password (for logs and records)."""
    if url.endswith(".journal") or url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: leave it (it is reported as an error elsewhere)
        return url


def sqlalchemy_url(url: str) -> str:
    """A plain ``postgresql://`` (or ``postgres://``) URL with tdro's driver, psycopg2, made explicit.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which tdro does not depend on; a URL that
    names its driver (``postgresql+psycopg://``) is left as it is.
    """
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def open_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None,
                 max_retry: int = 1):
    """An Optuna storage for a URL.

    - ``sqlite:///path.db``, ``postgresql://user:pass@host:port/db`` (or any SQLAlchemy URL): an
      ``RDBStorage`` with heartbeats every ``heartbeat_interval`` seconds (None = off); a running
      trial without a heartbeat for ``grace_period`` seconds (default 2 × interval) is failed by
      the next worker that asks for a trial, and re-queued with the same parameters up to
      ``max_retry`` times (0 = only marked failed).
    - ``journal:PATH`` or a path ending in ``.journal``: Optuna's journal file (works on NFS; no
      heartbeats, so a killed worker's trial stays RUNNING).
    """
    optuna = _optuna()
    if max_retry < 0:
        raise SweepError(f"max_retry must be >= 0; got {max_retry}")
    if url.startswith("journal:") or url.endswith(".journal"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise SweepError(f"storage {url!r} is neither an SQLAlchemy URL (sqlite:///path.db, "
                         "postgresql://user@host:port/db) nor a journal file (journal:PATH or *.journal)")
    url = sqlalchemy_url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith("postgresql"):
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = (optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
                    if heartbeat_interval and max_retry > 0 else None)
        from sqlalchemy.exc import IntegrityError, ProgrammingError

        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval or None,
                    grace_period=grace_period if heartbeat_interval else None,
                    heartbeat_stale_trial_callback=callback)
            except ImportError as err:
                raise SweepError(f"storage {describe_storage(url)} needs a database driver that is not installed "
                                 f"(PostgreSQL: pip install psycopg2-binary): {err}") from err
            except (IntegrityError, ProgrammingError) as err:
                # Workers starting together on an empty database race to create Optuna's tables and
                # schema version row; the loser finds them in place on its next attempt.
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise SweepError(f"cannot set up Optuna's tables in {describe_storage(url)}: {err}") from err
                time.sleep(0.2 + random.random())
            except Exception as err:  # connection refused, bad credentials, unknown database, ...
                if "already exists" in str(err) and attempt < SCHEMA_ATTEMPTS - 1:  # SQLite's form of the race
                    time.sleep(0.2 + random.random())
                    continue
                raise SweepError(f"cannot open storage {describe_storage(url)}: {type(err).__name__}: {err}") from err


# ============================================================================================ sampler, pruner
def _with_options(cls, options: Mapping[str, Any], what: str):
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SweepError(f"{what} has no option(s) {unknown}; options: {', '.join(allowed)}")
    return cls(**options)


def build_sampler(space: SearchSpace, name: Any = None, seed: int | None = None):
    """The Optuna sampler of a space (``name``/``seed`` override the file's ``sampler``; a sampler object is used as is)."""
    optuna = _optuna()
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    settings = dict(space.sampler)
    if name is not None and name != settings["name"]:
        settings = {"name": name}
    if seed is not None:
        settings["seed"] = seed
    name = settings.pop("name")
    if name == "tpe":
        return _with_options(optuna.samplers.TPESampler, settings, "sampler tpe")
    if name == "random":
        return _with_options(optuna.samplers.RandomSampler, settings, "sampler random")
    if name == "grid":
        return _with_options(optuna.samplers.GridSampler, {"search_space": space.grid(), **settings}, "sampler grid")
    raise SweepError(f"sampler {name!r} is unknown; allowed: tpe, random, grid")


def build_pruner(space: SearchSpace | None = None, name: Any = None):
    """The Optuna pruner of a space (``name`` overrides the file's ``pruner`` and drops its options; a pruner
    object is used as is)."""
    optuna = _optuna()
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    settings = dict(space.pruner) if space is not None else {"name": "median"}
    if name is not None and name != settings["name"]:
        settings = {"name": name}
    name = settings.pop("name")
    classes = {"median": optuna.pruners.MedianPruner, "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
               "hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}
    if name not in classes:
        raise SweepError(f"pruner {name!r} is unknown; allowed: {', '.join(classes)}")
    return _with_options(classes[name], settings, f"pruner {name}")


# ============================================================================================ objective
def trial_run_name(number: int) -> str:
    return f"trial_{number:04d}"


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    from tdro.runs import write_json_atomic

    write_json_atomic(path, dict(data))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class Objective:
    """``objective(trial)``: train one run for the trial's parameters and return its validation monitor."""

    def __init__(self, space: SearchSpace, runs_dir: str | Path, study_name: str, storage: str,
                 train: Callable | None = None) -> None:
        self.space = space
        self.runs_dir = Path(runs_dir)
        self.study_name = study_name
        self.storage = describe_storage(storage)
        self._train = train

    def __call__(self, trial) -> float:
        optuna = _optuna()
        from tdro.training.trainer import train

        train = self._train or train
        reconcile_records(trial.study)  # trials Optuna failed for a stale heartbeat as it started this one
        params = self.space.suggest(trial)
        run_dir = self.runs_dir / trial_run_name(trial.number)
        config = self.space.config(params, run_name=run_dir.name, output_dir=str(self.runs_dir))
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"{run_dir} already holds a run, so trial {trial.number} of study {self.study_name!r} "
                                  "cannot write there: a study of this name was deleted or made in another storage; "
                                  "use another study name or sweeps folder, or move the old runs away")
        retry_of = _retried_trial_number(trial)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("config_hash", config.result_hash())
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        record = {"study": self.study_name, "trial": trial.number, "storage": self.storage, "params": params,
                  "monitor": config.monitor, "direction": self.space.direction, "host": socket.gethostname(),
                  "pid": os.getpid(), "retry_of": retry_of, "state": "running", "started": _now()}
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "sweep.json", record)
        reported: dict[int, float] = {}

        def on_epoch(epoch_record: dict) -> None:
            value = _finite(epoch_record["monitor"]["value"])
            if value is None:
                return
            step = int(epoch_record["epoch"])
            trial.report(value, step)
            reported[step] = value
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {step} with {config.monitor} = {value:.4f}")

        try:
            result = train(config, run_dir, on_epoch)
        except optuna.TrialPruned:
            _write_json(run_dir / "sweep.json", {**record, "state": "pruned", "intermediate": reported,
                                                  "finished": _now()})
            raise
        except BaseException as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:1000])
            _write_json(run_dir / "sweep.json", {**record, "state": "failed", "error": f"{type(err).__name__}: {err}",
                                                  "finished": _now()})
            raise
        summary = result.summary
        value = _finite(summary.get("monitor_value"))
        summary.update(sweep_study=self.study_name, sweep_trial=trial.number)
        _write_json(run_dir / "summary.json", summary)
        for metric in VAL_METRICS:
            metric_value = _finite(summary.get("val", {}).get(metric))
            if metric_value is not None:
                trial.set_user_attr(f"val_{metric}", metric_value)
        trial.set_user_attr("selected_epoch", summary.get("selected_epoch"))
        trial.set_user_attr("epochs_run", summary.get("epochs_run"))
        if value is None:
            message = f"trial {trial.number}: {config.monitor} never had a finite value"
            _write_json(run_dir / "sweep.json", {**record, "state": "failed", "error": message, "finished": _now()})
            raise SweepError(message)
        _write_json(run_dir / "sweep.json", {**record, "state": "complete", "value": value, "intermediate": reported,
                                              "finished": _now()})
        return value


def reconcile_records(study) -> list[int]:
    """Mark ``sweep.json`` failed where the storage failed a trial whose record still says running.

    A worker killed mid-trial cannot update its record; the next worker fails the trial through its
    stale heartbeat. Returns the numbers of the records changed (on this machine; others are skipped).
    """
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    retried_by = {int(t.system_attrs["failed_trial"]): t.number for t in trials if "failed_trial" in t.system_attrs}
    changed = []
    for trial in trials:
        if trial.state != optuna.trial.TrialState.FAIL or "run_dir" not in trial.user_attrs:
            continue
        path = Path(trial.user_attrs["run_dir"]) / "sweep.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # a run on another machine, or a record never written
            continue
        if record.get("state") != "running":
            continue
        finished = trial.datetime_complete.astimezone(timezone.utc).isoformat(timespec="seconds") \
            if trial.datetime_complete else _now()
        _write_json(path, {**record, "state": "failed", "finished": finished, "retried_by": retried_by.get(trial.number),
                           "error": "the worker stopped sending heartbeats (killed, or its machine lost) and Optuna "
                                    "marked the trial failed"})
        changed.append(trial.number)
    return changed


def _retried_trial_number(trial) -> int | None:
    """The number of the trial this one retries (a worker killed mid-trial), else None."""
    try:
        attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    except Exception:  # storages without system attributes
        return None
    value = attrs.get("failed_trial")
    return int(value) if value is not None else None


# ============================================================================================ study
@dataclass
class Sweep:
    """A study with its search space and folders: run it, read its trials, and finish it."""

    study: Any
    space: SearchSpace
    storage: str
    sweeps_dir: Path

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def folder(self) -> Path:
        """``<sweeps_dir>/<study>``: runs/, best.yaml, best/, tables."""
        return self.sweeps_dir / self.name

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    # --- running ---
    def optimize(self, trials: int, sampler: Any = None, seed: int | None = None, pruner: Any = None,
                 timeout: float | None = None, max_trials: int | None = None) -> "Sweep":
        """Run ``trials`` trials in this process (one worker).

        ``sampler`` / ``pruner``: a name (overriding the search file's) or an Optuna object; ``seed`` seeds
        the sampler; ``timeout`` (seconds) stops starting new trials; ``max_trials`` stops once the study
        holds that many complete, pruned or running trials (counted over all workers, best effort).
        """
        optuna = _optuna()
        check_sweep_options(trials, timeout, max_trials, seed)
        if trials == 0:
            return self
        if seed is not None and not self.storage.startswith("sqlite:///"):
            warnings.warn(f"sampler seed {seed} with a shared storage: every worker started with this seed proposes the "
                          "same parameters; give each worker its own seed (or none)", stacklevel=2)
        self.study.sampler = build_sampler(self.space, sampler, seed)
        self.study.pruner = build_pruner(self.space, pruner)
        callbacks = []
        if max_trials is not None:
            counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
            callbacks.append(optuna.study.MaxTrialsCallback(max_trials, states=counted))
        from tdro.training.trainer import NonFiniteLossError

        objective = Objective(self.space, self.runs_dir, self.name, self.storage)
        # A diverging or invalid combination fails its trial; the sweep goes on.
        self.study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=callbacks,
                            catch=(NonFiniteLossError, SweepError, ValueError, ArithmeticError))
        reconcile_records(self.study)
        return self

    # --- reading ---
    def trials_table(self) -> pd.DataFrame:
        """One row per trial: number, state, value, parameters, validation metrics, epochs, run directory."""
        rows = []
        for trial in self.study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            duration = (trial.datetime_complete - trial.datetime_start).total_seconds() \
                if trial.datetime_complete and trial.datetime_start else None
            row = {"number": trial.number, "state": trial.state.name, "value": trial.value}
            row.update({f"param.{k}": v for k, v in trial.params.items()})
            row.update({f"val.{m}": attrs.get(f"val_{m}") for m in VAL_METRICS})
            row.update({"epochs_reported": len(trial.intermediate_values), "selected_epoch": attrs.get("selected_epoch"),
                        "seconds": duration, "retry_of": attrs.get("retry_of"), "host": attrs.get("host"),
                        "run_dir": attrs.get("run_dir"), "error": attrs.get("error")})
            rows.append(row)
        columns = ["number", "state", "value"]
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)

    def top_trials(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` best complete trials by the objective (validation only; test stays unseen)."""
        table = self.trials_table()
        if not len(table):
            return table
        done = table[table["state"] == "COMPLETE"]
        ascending = self.space.direction == "minimize"
        done = done.sort_values(["value", "number"], ascending=[ascending, True], kind="stable").head(k)
        done = done.drop(columns=[c for c in ("error",) if c in done.columns])
        done.insert(0, "rank", range(1, len(done) + 1))
        return done.reset_index(drop=True)

    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in self.study.get_trials(deepcopy=False):
            counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        return counts

    def best_trial(self):
        """The best complete trial; SweepError when there is none."""
        try:
            return self.study.best_trial
        except ValueError as err:
            raise SweepError(f"study {self.name!r} has no complete trial yet ({self.state_counts() or 'no trials'})") from err

    def best_config(self) -> Config:
        """The best trial's Config with the run-only keys back at their defaults (usable for new runs)."""
        trial = self.best_trial()
        return self.space.config(trial.params)

    def best_values(self) -> dict:
        """Base keys plus the best parameters: the content of best.yaml."""
        return {**self.space.base, **self.best_trial().params}

    def write_best_config(self, path: str | Path | None = None) -> Path:
        """Write the best configuration as a YAML for ``python -m tdro train -f``; returns its path."""
        trial = self.best_trial()
        path = Path(path) if path is not None else self.folder / "best.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# Best trial of sweep study {self.name!r}: trial {trial.number}, {self.space.monitor} = "
                  f"{trial.value:.6g} (validation).\n# Search space {self.space.name!r}; "
                  f"run: python -m tdro train -f {path}\n")
        values = self.best_values()
        self.space.config(trial.params)  # still a valid Config
        path.write_text(header + yaml.safe_dump(values, sort_keys=False))
        return path

    def rerun_best(self, seeds: Sequence[int] = (0, 1, 2), output_dir: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> pd.DataFrame:
        """Train the best config once per seed and evaluate each on test once (idempotent).

        Runs go to ``<sweeps_dir>/<study>/best/seed_<s>`` through ``tdro.studies.run_study`` (a
        finished run with the same config is reused and an unfinished one is resumed). Returns one row per seed (validation monitor and test
        metrics of the selected checkpoint) plus ``mean`` and ``std`` rows.
        """
        from tdro.runs import load_run
        from tdro.studies.runner import PlannedRun, run_study

        root = Path(output_dir) if output_dir is not None else self.folder / "best"
        trial = self.best_trial()
        runs = [PlannedRun(self.space.config(trial.params, seed=int(seed), run_name=f"seed_{seed}", output_dir=str(root),
                                             **dict(overrides or {})), {"study": self.name, "seed": int(seed)})
                for seed in seeds]
        if log:
            log(f"best config (trial {trial.number}), seeds {list(seeds)}: runs in {root}")
        runs_table = run_study(runs, root, log=log)
        failed = runs_table[runs_table["status"] == "failed"]
        if len(failed):
            raise SweepError("re-runs of the best config failed: " + "; ".join(
                f"seed {r.seed}: {r.error}" for r in failed.itertuples()))
        rows = []
        for seed, run_dir in zip(runs_table["seed"], runs_table["run_dir"]):
            summary = load_run(run_dir).summary
            row = {"seed": int(seed), "run_dir": str(run_dir), "selected_epoch": summary["selected_epoch"],
                   f"val.{self.space.monitor.removeprefix('val_')}": summary["monitor_value"]}
            row.update({f"test.{m}": summary["test"].get(m) for m in VAL_METRICS})
            rows.append(row)
        table = pd.DataFrame(rows).astype({"seed": object, "selected_epoch": object})
        numeric = [c for c in table.columns if c.startswith(("val.", "test."))]
        stats = pd.DataFrame([{"seed": "mean", "run_dir": "", "selected_epoch": "", **table[numeric].mean().to_dict()},
                              {"seed": "std", "run_dir": "", "selected_epoch": "",
                               **table[numeric].std(ddof=1).to_dict()}])
        result = pd.concat([table, stats], ignore_index=True)
        root.mkdir(parents=True, exist_ok=True)
        result.to_csv(root / "rerun.csv", index=False)
        return result

    def run_dirs(self) -> list[Path]:
        """Run directories of this study's trials that exist on this machine."""
        dirs = [Path(t.user_attrs["run_dir"]) for t in self.study.get_trials(deepcopy=False) if "run_dir" in t.user_attrs]
        return [d for d in dirs if (d / "config.yaml").exists()]


def _check_space_matches(study, space: SearchSpace) -> None:
    """Store the space on a new study; refuse a worker whose space differs from the study's."""
    fingerprint = space.fingerprint()
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, json.loads(json.dumps(space.to_dict(), default=str)))
        study.set_user_attr(FINGERPRINT_ATTR, fingerprint)
        return
    if stored != fingerprint:
        differences = [key for key in sorted(set(stored["base"]) | set(fingerprint["base"]))
                       if stored["base"].get(key) != fingerprint["base"].get(key)]
        differences += [f"space.{key}" for key in sorted(set(stored["space"]) | set(fingerprint["space"]))
                        if stored["space"].get(key) != fingerprint["space"].get(key)]
        raise SweepError(f"study {study.study_name!r} was created with another search space (differs in: "
                         f"{', '.join(differences)}); use the same search file and -p values as the other workers, "
                         "or another study name (--study NAME; study_name in the sweep notebook)")


def create_sweep(space: SearchSpace, study_name: str | None = None, storage: str | None = None,
                 sweeps_dir: str | Path = DEFAULT_SWEEPS_DIR, heartbeat_interval: int | None = 60,
                 grace_period: int | None = None, max_retry: int = 1) -> Sweep:
    """Create the study, or join it when it exists (another worker): same name, storage and search space."""
    optuna = _optuna()
    study_name = check_study_name(study_name) if study_name is not None else \
        check_study_name(space.name, f"study name (the name of search space {space.name!r})")
    check_sweep_options(heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
    storage = storage or default_storage(study_name, sweeps_dir)
    backend = open_storage(storage, heartbeat_interval, grace_period, max_retry)
    study = optuna.create_study(storage=backend, study_name=study_name, direction=space.direction,
                                load_if_exists=True)
    if study.direction.name.lower() != space.direction:
        raise SweepError(f"study {study_name!r} in {describe_storage(storage)} {study.direction.name.lower()}s, but "
                         f"monitor {space.monitor!r} needs {space.direction}; use another study name")
    _check_space_matches(study, space)
    reconcile_records(study)
    return Sweep(study, space, storage, Path(sweeps_dir))


def attach(study_name: str, storage: str | None = None, sweeps_dir: str | Path = DEFAULT_SWEEPS_DIR,
           heartbeat_interval: int | None = 60, grace_period: int | None = None, max_retry: int = 1) -> Sweep:
    """Open an existing study with the search space stored on it (no search file needed)."""
    optuna = _optuna()
    check_study_name(study_name)
    check_sweep_options(heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
    storage = storage or default_storage(study_name, sweeps_dir)
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        raise SweepError(f"no study {study_name!r}: {storage.removeprefix('sqlite:///')} does not exist "
                         "(run the sweep first, or pass its --storage)")
    backend = open_storage(storage, heartbeat_interval, grace_period, max_retry)
    try:
        study = optuna.load_study(study_name=study_name, storage=backend)
    except KeyError as err:
        names = [s.study_name for s in optuna.get_all_study_summaries(backend)]
        raise SweepError(f"no study {study_name!r} in {describe_storage(storage)}; studies: "
                         f"{', '.join(names) or 'none'}") from err
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        raise SweepError(f"study {study_name!r} was not made by tdro sweep (it has no stored search space)")
    space = SearchSpace.from_dict({k: v for k, v in stored.items()}, source=f"study {study_name!r}")
    reconcile_records(study)
    return Sweep(study, space, storage, Path(sweeps_dir))


def open_sweep(search_file: str | Path, study_name: str = "", storage: str = "",
               sweeps_dir: str | Path = DEFAULT_SWEEPS_DIR, fixed: Mapping[str, Any] | None = None,
               smoke: bool = False) -> Sweep:
    """The sweep notebook's study: created or joined from ``search_file`` with the ``fixed`` Config keys, or,
    with an empty ``search_file``, attached by ``study_name`` (empty strings mean the defaults)."""
    if search_file:
        return create_sweep(load_search_space(search_file, fixed, smoke=smoke), study_name or None, storage or None,
                            sweeps_dir)
    if fixed or smoke:
        raise SweepError(f"fixed {dict(fixed or {})!r} and smoke {smoke!r} shape a new study's search space, but "
                         "search_file is empty (attach to study_name); give search_file too, or drop them")
    if not study_name:
        raise SweepError("search_file and study_name are both empty: give a search file (a name in params/search/) "
                         "or the study_name to attach to")
    return attach(study_name, storage or None, sweeps_dir)


def run_sweep(space: SearchSpace | str | Path, trials: int, study_name: str | None = None,
              storage: str | None = None, sweeps_dir: str | Path = DEFAULT_SWEEPS_DIR,
              overrides: Mapping[str, Any] | None = None, smoke: bool = False, sampler: str | None = None,
              seed: int | None = None, pruner: str | None = None, timeout: float | None = None,
              max_trials: int | None = None, heartbeat_interval: int | None = 60, grace_period: int | None = None,
              max_retry: int = 1) -> Sweep:
    """Validate the space, create or join the study, and run ``trials`` trials in this process.

    Several processes (or machines, with a shared ``storage``) calling this with the same study name
    and search space work on one study; ``trials`` counts this worker's trials. Every option is checked
    before the study or any folder is made.
    """
    check_sweep_options(trials, timeout, max_trials, seed, heartbeat_interval, grace_period, max_retry)
    if study_name is not None:
        check_study_name(study_name)
    if not isinstance(space, SearchSpace):
        space = SearchSpace.load(space, overrides, smoke)
    elif overrides or smoke:
        raise SweepError("overrides and smoke apply when loading a search file; pass the file path instead")
    sweep = create_sweep(space, study_name, storage, sweeps_dir, heartbeat_interval, grace_period, max_retry)
    return sweep.optimize(trials, sampler, seed, pruner, timeout, max_trials)
