"""Tables over any folder of runs (``python -m tdro collect``): one per metric, grouped by the config keys
that differ between the runs, with mean ± std and a 95 % t interval over the repeats (seeds, folds).

Like DomainBed's collect_results: point it at a study, a sweep or ``outputs/`` and get the table a
paper needs, as Markdown, CSV or LaTeX, or as pandas from Python (``collect(root)``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tdro.config import NON_RESULT_KEYS
from tdro.studies.tables import markdown_table

# keys that repeat a configuration (averaged over) or only say where it was written (never grouped by)
REPEAT_KEYS = ("seed", "fold_index")
PLACE_KEYS = ("run_name", "output_dir", "data_root", *NON_RESULT_KEYS)
DEFAULT_METRICS = ("test.worst_group_acc", "test.acc", "test.macro_f1", "val.worst_group_acc", "val.acc")
FORMATS = ("md", "csv", "tex")


class CollectError(ValueError):
    """A collect request that cannot be served; the message says what and how to fix it."""


@dataclass
class Collected:
    """The finished runs under a folder (one row each) and one summary table per metric."""

    runs: pd.DataFrame          # run_id, config.<grouping keys>, the metrics
    group_keys: list[str]       # config keys that differ between runs (the table's index)
    tables: dict[str, pd.DataFrame]

    def markdown(self, digits: int = 2) -> str:
        """Every table as Markdown, headed by its metric."""
        return "\n\n".join(f"### {metric}\n\n{markdown_table(format_table(table, digits))}"
                           for metric, table in self.tables.items())

    def write(self, folder: str | Path, formats: Sequence[str] = FORMATS, digits: int = 2) -> list[Path]:
        """Write ``<metric>.{md,csv,tex}`` per table into folder; returns the paths."""
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise CollectError(f"unknown format(s) {bad}; allowed: {', '.join(FORMATS)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for metric, table in self.tables.items():
            stem = metric.replace("/", "_")
            shown = format_table(table, digits)
            writers = {"md": lambda p: p.write_text(markdown_table(shown) + "\n"),
                       "csv": lambda p: table.to_csv(p),
                       "tex": lambda p: p.write_text(shown.to_latex(escape=True))}
            for fmt in formats:
                path = folder / f"{stem}.{fmt}"
                writers[fmt](path)
                paths.append(path)
        return paths


def summarise(values: pd.Series, confidence: float = 0.95) -> dict:
    """n, mean, std and the t interval of the mean (NaN bounds below two values)."""
    from scipy import stats

    values = values.dropna().astype(float)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def format_table(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """A summary table as display strings: ``mean ± std`` and ``[low, high]``."""
    def number(value: float) -> str:
        return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    shown = pd.DataFrame(index=table.index)
    shown["n"] = table["n"].astype(int)
    shown["mean ± std"] = [f"{number(m)} ± {number(s)}" for m, s in zip(table["mean"], table["std"])]
    shown["95 % CI"] = [f"[{number(lo)}, {number(hi)}]" for lo, hi in zip(table["ci_low"], table["ci_high"])]
    return shown


def collect(root: str | Path, metrics: Sequence[str] = DEFAULT_METRICS, confidence: float = 0.95) -> Collected:
    """Summarise every finished run under root by the config keys that differ (repeats: seeds, folds)."""
    from tdro.runs import find_runs, load_summaries

    root = Path(root)
    if not root.is_dir():
        raise CollectError(f"{root} is not a folder; give a folder that holds run directories (e.g. outputs/runs)")
    run_dirs = [d for d in find_runs(root) if (d / "summary.json").is_file()]
    if not run_dirs:
        raise CollectError(f"no finished run (a directory with summary.json) under {root}")
    table = load_summaries(run_dirs)
    config_columns = [c for c in table.columns if c.startswith("config.")]
    group_keys = [c.removeprefix("config.") for c in config_columns
                  if c.removeprefix("config.") not in (*REPEAT_KEYS, *PLACE_KEYS)
                  and table[c].astype(str).nunique() > 1]
    unknown = [m for m in metrics if m not in table.columns]
    if unknown:
        known = sorted(c for c in table.columns if c.startswith(("val.", "test.")))
        raise CollectError(f"unknown metric(s) {unknown}; the runs under {root} have: {', '.join(known)}")
    runs = table[["run_id", *[f"config.{k}" for k in group_keys], *metrics]].copy()
    keys = [f"config.{k}" for k in group_keys]
    for column in keys:  # lists and mappings group by their text
        runs[column] = runs[column].map(lambda v: v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
    tables = {}
    for metric in metrics:
        if keys:
            rows = {name if isinstance(name, tuple) else (name,): summarise(part[metric], confidence)
                    for name, part in runs.groupby(keys, dropna=False, sort=True)}
            index = pd.MultiIndex.from_tuples(list(rows), names=group_keys) if len(keys) > 1 else \
                pd.Index([k[0] for k in rows], name=group_keys[0])
            tables[metric] = pd.DataFrame(list(rows.values()), index=index)
        else:
            tables[metric] = pd.DataFrame([summarise(runs[metric], confidence)], index=pd.Index(["all runs"], name="runs"))
    return Collected(runs.reset_index(drop=True), group_keys, tables)
