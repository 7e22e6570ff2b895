"""Run a study's planned runs: reuse finished ones, resume interrupted ones, train the rest, here or on Dask.

One reuse rule for phases, experiments and a sweep's re-run of its best config: a run is found by its
resolved config's ``Config.result_hash()`` anywhere under the study's root, and it is finished when
its ``summary.json`` exists. A new run directory gets ``study.json`` (its labels: study, setting, arm,
seed, fold).

Execution (``run_study``): in this process (one worker, no scheduler), on a local Dask cluster of
``workers`` processes, or on an existing Dask cluster (``scheduler="tcp://host:8786"``) whose workers
may sit on many machines sharing the output folder. A worker killed mid-run loses its task to another
worker, which resumes the run from ``last.pt``; the run directory's lock keeps one writer per run. A
run that cannot start (bad data, a missing file) fails alone, its error in the results table.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tdro.config import Config, ConfigError

METADATA_FILE = "study.json"
RESULT_COLUMNS = ["run_dir", "status", "error", "config_hash", "worker", "seconds"]


class StudyError(ValueError):
    """A study request that cannot be run; the message says what and how to fix it."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study: its resolved config and the labels it is tabulated by (arm, seed, ...)."""

    config: Config
    labels: dict = field(default_factory=dict)


# ============================================================================================ finding runs
def run_hash(run_dir: Path) -> str | None:
    """The result hash of a run directory's config.yaml under today's Config (keys added since then take
    their defaults); a config that no longer loads falls back to the hash in summary.json, else None."""
    try:
        return Config.load([run_dir / "config.yaml"]).result_hash()
    except (ConfigError, OSError) as err:
        summary = run_dir / "summary.json"
        try:
            value = json.loads(summary.read_text()).get("config_hash") if summary.is_file() else None
        except json.JSONDecodeError:
            value = None
        if value is None:
            warnings.warn(f"skipping {run_dir}: its config.yaml does not load ({err})", stacklevel=2)
        return value


def index_runs(root: str | Path) -> dict[str, list[Path]]:
    """{result hash: run directories} of every run under root (any depth)."""
    root = Path(root)
    index: dict[str, list[Path]] = {}
    if not root.is_dir():
        return index
    for config_path in sorted(root.rglob("config.yaml")):
        value = run_hash(config_path.parent)
        if value is not None:
            index.setdefault(value, []).append(config_path.parent)
    return index


def find_run(root: str | Path, config: Config, index: Mapping[str, list[Path]] | None = None) -> tuple[Path | None, bool]:
    """(run directory, finished) of a run of ``config`` under root: a finished one first, else an unfinished one."""
    index = index_runs(root) if index is None else index
    candidates = index.get(config.result_hash(), [])
    finished = [p for p in candidates if (p / "summary.json").is_file()]
    if finished:
        return finished[0], True
    return (candidates[0], False) if candidates else (None, False)


# ============================================================================================ one run
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), looked up once in the parent: a forked child must not load libraries."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None).prctl


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit at once if the parent is already gone."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _subprocess(arguments: list[str]) -> None:
    _prctl()
    result = subprocess.run([sys.executable, "-m", "tdro", *arguments], capture_output=True, text=True,
                            preexec_fn=functools.partial(die_with_parent, os.getpid()))
    if result.returncode != 0:
        raise RuntimeError(f"`python -m tdro {' '.join(arguments)}` failed (exit {result.returncode}):\n"
                           f"{result.stderr[-3000:]}")


def ensure_run(config: Config, root: str | Path, labels: Mapping[str, Any] | None = None, isolate: bool = False,
               index: dict[str, list[Path]] | None = None) -> tuple[Path, str]:
    """Make sure a finished run of ``config`` exists under root: reuse it, resume it, or train it.

    Returns (run directory, "reused" | "resumed" | "trained"). ``isolate`` trains in a child process
    (``python -m tdro train``), so each run's peak memory is its own.
    """
    from tdro.training.trainer import resume, train

    index = index_runs(root) if index is None else index
    planned = Path(config.output_dir) / str(config.run_name)
    if (planned / "config.yaml").exists() and planned not in index.get(config.result_hash(), []):
        if run_hash(planned) != config.result_hash():
            raise StudyError(f"{planned} holds a run whose config differs from the one planned under that name; "
                             "move it away")
        index.setdefault(config.result_hash(), []).append(planned)  # started by a worker since the index was made
    found, finished = find_run(root, config, index)
    if finished:
        return found, "reused"
    if found is not None:
        if isolate:
            _subprocess(["train", "--resume", str(found)])
        else:
            resume(found)
        return found, "resumed"
    run_dir = planned
    run_dir.mkdir(parents=True, exist_ok=True)
    if labels:
        (run_dir / METADATA_FILE).write_text(json.dumps(dict(labels), indent=2) + "\n")
    if isolate:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            config.save(path)
            _subprocess(["train", "-f", str(path)])
    else:
        train(config, run_dir)
    index.setdefault(config.result_hash(), []).append(run_dir)
    return run_dir, "trained"


def _run_task(config_values: dict, root: str, labels: dict, candidates: list[str], isolate: bool) -> dict:
    """Ensure one run (its candidate directories passed in, so no folder scan per run); errors become a row."""
    started = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    config = Config.from_dict(config_values)
    index = {config.result_hash(): [Path(p) for p in candidates]}
    planned = str(Path(config.output_dir) / str(config.run_name))
    try:
        run_dir, status = ensure_run(config, root, labels, isolate, index)
        return {"run_dir": str(run_dir), "status": status, "error": "", "worker": worker,
                "seconds": time.time() - started}
    except Exception as err:  # noqa: BLE001 - the study goes on; the error is this run's result
        return {"run_dir": planned, "status": "failed", "error": f"{type(err).__name__}: {err}", "worker": worker,
                "seconds": time.time() - started}


# ============================================================================================ Dask
def _worker_index(name: Any) -> int | None:
    try:
        return int(name)
    except (TypeError, ValueError):
        return None


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object


class WorkerSetup(WorkerPlugin):
    """Each Dask worker: one GPU per worker on a multi-GPU machine; on a local cluster, die with this process."""

    name = "tdro-worker-setup"

    def __init__(self, die_with_client: bool) -> None:
        self.die_with_client = die_with_client

    def setup(self, worker) -> None:
        if self.die_with_client:
            die_with_parent(os.getppid())
        index = _worker_index(worker.name)
        import torch

        if index is not None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
            torch.cuda.set_device(index % torch.cuda.device_count())


def _dask_results(tasks: dict[str, tuple], workers: int, scheduler: str | None,
                  log: Callable[[str], None] | None) -> dict[str, dict]:
    import logging

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler is None:
        _prctl()
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
    try:
        with Client(cluster if cluster is not None else scheduler, set_as_default=False) as client:
            client.register_plugin(WorkerSetup(die_with_client=cluster is not None))
            futures = {client.submit(_run_task, *arguments, key=f"tdro-run-{digest}", pure=False): digest
                       for digest, arguments in tasks.items()}
            results = {}
            for i, future in enumerate(as_completed(futures, loop=client.loop), start=1):
                digest = futures[future]
                try:
                    results[digest] = future.result()
                except Exception as err:  # noqa: BLE001 - e.g. KilledWorker: the run failed, the study goes on
                    config = Config.from_dict(tasks[digest][0])
                    results[digest] = {"run_dir": str(Path(config.output_dir) / str(config.run_name)),
                                       "status": "failed", "error": f"{type(err).__name__}: {err}", "worker": "",
                                       "seconds": float("nan")}
                if log is not None:
                    log(f"[{i}/{len(tasks)}] {_describe(tasks[digest][2])}: {results[digest]['status']}")
            return results
    finally:
        if cluster is not None:
            cluster.close()


def _describe(labels: Mapping[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in labels.items() if k != "study" and v is not None)


# ============================================================================================ study
def check_workers(workers: int, threads: int | None, scheduler: str | None) -> None:
    """Refuse a local worker count or thread setting that cannot work, before anything runs."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise StudyError(f"workers must be a whole number ≥ 1, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise StudyError(f"threads must be a whole number ≥ 0 (0 = torch's default), got {threads!r}")
    if scheduler is not None and not (isinstance(scheduler, str) and "://" in scheduler):
        raise StudyError(f"scheduler must be a Dask scheduler address such as tcp://host:8786, got {scheduler!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if scheduler is None and workers > 1 and (threads or 1) * workers > cores:
        raise StudyError(f"workers × threads = {workers} × {threads or 1} exceeds this machine's {cores} cores; "
                         f"lower workers or threads (threads 1 is the default)")


def run_study(runs: Sequence[PlannedRun], root: str | Path, workers: int = 1, threads: int | None = None,
              scheduler: str | None = None, isolate: bool = False,
              log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Train what is missing of ``runs`` (idempotent) and return one row per planned run.

    Rows: the run's labels, then run_dir, status ("reused", "resumed", "trained" or "failed"), error,
    config_hash, worker and seconds. ``threads`` sets every run's torch threads (default: the runs'
    ``threads`` key). ``workers`` > 1 starts a local Dask cluster of that many processes;
    ``scheduler`` uses an existing Dask cluster instead (every worker must see ``root``).
    """
    check_workers(workers, threads, scheduler)
    root = Path(root)
    index = index_runs(root)
    results: dict[str, dict] = {}
    tasks: dict[str, tuple] = {}
    for run in runs:
        config = run.config if threads is None else run.config.replace(threads=threads)
        digest = config.result_hash()
        if digest in results or digest in tasks:
            continue
        candidates = index.get(digest, [])
        finished = [p for p in candidates if (p / "summary.json").is_file()]
        if finished:
            results[digest] = {"run_dir": str(finished[0]), "status": "reused", "error": "", "worker": "",
                               "seconds": 0.0}
        else:
            tasks[digest] = (config.to_dict(), str(root), dict(run.labels), [str(p) for p in candidates], isolate)
    if log is not None:
        where = scheduler or (f"{workers} local worker processes" if workers > 1 else "this process")
        log(f"{len(runs)} runs planned, {len(results)} reused, {len(tasks)} to train on {where}")
    if tasks and scheduler is None and workers == 1:
        for i, (digest, arguments) in enumerate(tasks.items(), start=1):
            results[digest] = _run_task(*arguments)
            if log is not None:
                log(f"[{i}/{len(tasks)}] {_describe(arguments[2])}: {results[digest]['status']}")
    elif tasks:
        results.update(_dask_results(tasks, workers, scheduler, log))
    rows = []
    for run in runs:
        digest = run.config.result_hash()
        rows.append({**run.labels, **results[digest], "config_hash": digest})
    label_columns = list(dict.fromkeys(k for run in runs for k in run.labels))
    return pd.DataFrame(rows, columns=[*label_columns, *RESULT_COLUMNS])
