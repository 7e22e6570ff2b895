"""Run records: crash-safe JSONL/JSON writers and loaders of one or many run directories into pandas.

A run directory (``outputs/runs/<run_id>/``) holds ``config.yaml``, ``history.jsonl`` (one record
per epoch), ``steps.jsonl`` (every ``log_interval`` steps) and, once finished, ``summary.json``.
Epochs are numbered from 1 in every record (epoch e = after e passes over the training data).
A run that is still going or was killed loads too: only a truncated final JSONL line is ignored.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from tdro.atomic import replace_atomically

if TYPE_CHECKING:  # pandas costs 0.3–0.4 s to import; training writes records without it
    import pandas as pd

SUMMARY_METRICS = ("acc", "worst_group_acc", "balanced_acc", "loss", "worst_group_loss", "worst_group", "macro_f1")


# --- writing ---

def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line, flushed and fsynced; a truncated last line left by a kill is dropped first."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "a+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                handle.seek(0)
                handle.truncate(handle.read().rfind(b"\n") + 1)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> None:
    """Replace a JSONL file by ``records`` (``replace_atomically``): a kill keeps the old file whole."""
    replace_atomically(path, lambda handle: handle.writelines(json.dumps(record) + "\n" for record in records))


class RunDirectoryInUseError(OSError):
    """Another process holds the run directory's lock: two writers would interleave its records."""


def lock_run_directory(run_dir: str | Path) -> TextIO:
    """Take the exclusive OS lock on ``<run_dir>/.lock`` (released when the handle closes or the process dies).

    Returns the open handle; keep it while writing the run. A second writer, in this process or
    another, gets RunDirectoryInUseError naming the holder's pid.
    """
    path = Path(run_dir) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunDirectoryInUseError(
            f"run directory {path.parent} is being written by another process (pid {holder}); one run directory "
            f"takes one writer, or their records would interleave. Wait for that process to end (or stop it), "
            f"then resume with `python -m tdro train --resume {path.parent}`") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON (``replace_atomically``): readers see the old or the new file, never half."""
    replace_atomically(path, lambda handle: handle.write(json.dumps(obj, indent=2) + "\n"))


# --- reading ---

def read_summary(path: str | Path) -> dict:
    """A run's summary.json; a cut or corrupt one is an error naming the file and how to write it again."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is cut or corrupt ({error}); the run's checkpoints are intact: write it again "
                         f"with `python -m tdro train --resume {path.parent}` (it evaluates the selected "
                         f"checkpoint, trains nothing more)") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path} holds a JSON {type(summary).__name__}, not a run summary; write it again with "
                         f"`python -m tdro train --resume {path.parent}`")
    return summary


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete records of a JSONL file.

    A record is complete once its newline is written, so a final line without one (a run killed
    mid-write) is ignored, as ``append_jsonl`` does; a malformed complete line is an error naming
    the file and line.
    """
    path = Path(path)
    *complete, _unterminated = path.read_text(errors="replace").split("\n")  # a cut may split a character
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error})") from None
    return records


@dataclass
class Run:
    """One run directory's records: config and summary dicts, history and steps as flat tables."""

    path: Path
    config: dict
    summary: dict
    history: pd.DataFrame
    steps: pd.DataFrame

    @property
    def run_id(self) -> str:
        """The run directory's name."""
        return self.path.name

    @property
    def finished(self) -> bool:
        """Whether summary.json exists (the run ended and evaluated its selected checkpoint)."""
        return bool(self.summary)


def _flat(records: list[dict]) -> pd.DataFrame:
    """Records as one row each, nested keys joined with dots (``val.group_acc.mnist``)."""
    import pandas as pd
    return pd.json_normalize(records, sep=".") if records else pd.DataFrame()


def _read_optional_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, none when it does not exist yet."""
    return read_jsonl(path) if path.is_file() else []


def load_run(run_dir: str | Path) -> Run:
    """Load a run directory; summary is {} and the tables hold the complete records while a run is unfinished."""
    path = Path(run_dir)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.yaml")
    config = yaml.safe_load(config_path.read_text()) or {}
    summary_path = path / "summary.json"
    summary = read_summary(summary_path) if summary_path.is_file() else {}
    return Run(path, config, summary, _flat(_read_optional_jsonl(path / "history.jsonl")),
               _flat(_read_optional_jsonl(path / "steps.jsonl")))


def find_runs(root: str | Path = "outputs/runs") -> list[Path]:
    """Run directories (those holding config.yaml) under root, at any depth, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run root {root} does not exist")
    return sorted(p.parent for p in root.rglob("config.yaml"))


def _runs(run_dirs: Iterable[str | Path | Run]) -> list[Run]:
    """Loaded runs from directories (or already loaded runs)."""
    return [r if isinstance(r, Run) else load_run(r) for r in run_dirs]


def load_histories(run_dirs: Iterable[str | Path | Run]) -> pd.DataFrame:
    """Every run's per-epoch history in one wide table (one row per run and epoch) with a run_id column."""
    import pandas as pd
    tables = [run.history.assign(run_id=run.run_id) for run in _runs(run_dirs) if len(run.history)]
    if not tables:
        return pd.DataFrame(columns=["run_id", "epoch"])
    table = pd.concat(tables, ignore_index=True)
    return table[["run_id"] + [c for c in table.columns if c != "run_id"]]


def load_summaries(run_dirs: Iterable[str | Path | Run], config_keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run: run_id, finished, epochs recorded, ``config.<key>`` columns and the summary's scalars.

    ``config_keys`` defaults to dataset, seed and every key whose value differs between the runs.
    Summary columns are the scalar entries (``selected_epoch``, ``wall_seconds``, ...) plus
    ``val.<m>`` / ``test.<m>`` for the headline metrics and per-group accuracies, and
    ``diagnostics.<name>`` for the run's diagnostics (``tdro.training.diagnostics.summarize``).
    """
    import pandas as pd
    runs = _runs(run_dirs)
    if config_keys is None:
        seen: dict[str, set[str]] = {}
        for run in runs:
            for key, value in run.config.items():
                seen.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
        varying = [k for k, values in seen.items() if len(values) > 1 or any(k not in r.config for r in runs)]
        always = [k for k in ("dataset", "seed") if k in seen]
        config_keys = always + [k for k in varying if k not in always]
    config_keys = list(config_keys)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run_id": run.run_id, "finished": run.finished, "epochs": len(run.history)}
        row.update({f"config.{k}": run.config.get(k) for k in config_keys})
        for key, value in run.summary.items():
            if key in ("val", "test") and isinstance(value, dict):
                row.update({f"{key}.{m}": value.get(m) for m in SUMMARY_METRICS})
                row.update({f"{key}.group_acc.{g}": v for g, v in (value.get("group_acc") or {}).items()})
            elif key == "diagnostics" and isinstance(value, dict):
                row.update({f"{key}.{name}": v for name, v in value.items()})
            elif value is None or isinstance(value, (str, int, float, bool)):
                row[key] = value
        rows.append(row)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["run_id", "finished", "epochs"])


def _q_long(table: pd.DataFrame, run_id: str, source: str) -> pd.DataFrame:
    """The ``q.<group>`` columns of a flat table as long rows (run_id, source, step, epoch, group, q)."""
    import pandas as pd
    q_columns = [c for c in table.columns if c.startswith("q.")]
    if not q_columns:
        return pd.DataFrame()
    ids = table.reindex(columns=["step", "epoch"])
    wide = pd.concat([ids, table[q_columns].rename(columns=lambda c: c[2:])], axis=1)
    long = wide.melt(id_vars=["step", "epoch"], var_name="group", value_name="q").dropna(subset=["q"])
    return long.assign(run_id=run_id, source=source)


def q_trajectories(run_dirs: Iterable[str | Path | Run]) -> pd.DataFrame:
    """GroupDRO weights over time, long: run_id, source ("step" or "epoch"), step, epoch, group, q.

    Rows come from steps.jsonl (every log_interval steps; ``source="step"``) and history.jsonl
    (end of each epoch; ``source="epoch"``, step missing); runs without GroupDRO contribute none.
    """
    import pandas as pd
    columns = ["run_id", "source", "step", "epoch", "group", "q"]
    parts = [_q_long(table, run.run_id, source)
             for run in _runs(run_dirs) for table, source in ((run.steps, "step"), (run.history, "epoch"))]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=columns)
    table = pd.concat(parts, ignore_index=True)[columns]
    table["step"] = table["step"].astype("Int64")
    table["epoch"] = table["epoch"].astype("Int64")
    return table.sort_values(["run_id", "source", "epoch", "step", "group"], kind="stable", ignore_index=True)
