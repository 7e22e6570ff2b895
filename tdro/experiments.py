"""Result experiments on real data: a base config, settings × arms, seeds × folds, and their tables.

An experiment is data (``params/experiments/<name>.yaml``)::

    name: heart
    title: "..."
    description: ...              # what is compared and why
    data: ...                     # where the data came from (printed in the report)
    selection: ...                # how hyperparameters were chosen (validation only)
    base: {dataset: heart, ...}   # every run starts from this config
    seeds: 10                     # 0 .. seeds-1 (or a list)
    folds: 5                      # fold_index 0 .. folds-1 (with n_folds in base); null = no folds
    reference: per_group_erm      # the arm every other arm is paired against
    settings: [{name: uncapped, label: ..., changes: {}}, ...]
    arms: [{name: per_group_erm, label: ..., changes: {...}}, ...]
    smoke: {epochs: 2, ...}       # what ``smoke=True`` puts on top (one seed, one fold, few epochs)

``plan_experiment`` makes one Config per (setting, arm, seed, fold); ``run_experiment`` trains
what is missing through ``tdro.studies.run_study`` (a finished run with the same
``Config.result_hash()`` is reused, an interrupted one resumed), here, on local worker processes or
on a Dask cluster; ``ExperimentResult`` loads the summaries (the selected **validation** checkpoint's
test metrics) and builds the tables: mean ± std per arm, per-group accuracies, the paired
difference of each arm to the reference with a t confidence interval (pairs = same seed and
fold), GroupDRO weights over training, parameter counts, wall times and the checkpoint of each
number. A run selected on test is refused, so no reported number comes from test-set selection.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tdro.config import Config, merge_changes, named_params_file
from tdro.phases import _check_config_keys, seed_list
from tdro.studies.runner import PlannedRun as StudyRun, run_study
from tdro.studies.tables import markdown_table, paired_difference

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = ROOT / "params" / "experiments"
SPEC_KEYS = {"name", "title", "description", "data", "selection", "base", "seeds", "folds", "reference",
             "settings", "arms", "smoke"}
ENTRY_KEYS = {"name", "label", "changes"}
# Keys an experiment run always gets (they change no result; see Config.NON_RESULT_KEYS).
RUN_DEFAULTS = {"progress": False, "latent_samples_per_group": 0}
HEADLINE = (("worst_group_acc", "worst-group acc"), ("acc", "acc"), ("macro_f1", "macro-F1"),
            ("worst_group_loss", "worst-group loss"))


class ExperimentError(ValueError):
    """An experiment file or request that cannot be used; the message says what and how to fix it."""


# ============================================================================================ spec
@dataclass(frozen=True)
class Entry:
    """A setting or an arm: a name, a label for tables, and config changes."""

    name: str
    label: str
    changes: dict = field(default_factory=dict)


@dataclass
class ExperimentSpec:
    name: str
    title: str
    description: str
    data: str
    selection: str
    base: dict
    seeds: list[int]
    folds: int | None
    reference: str
    settings: list[Entry]
    arms: list[Entry]
    smoke: dict
    path: Path | None = None

    def arm(self, name: str) -> Entry:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ExperimentError(f"experiment {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def setting(self, name: str) -> Entry:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise ExperimentError(f"experiment {self.name!r} has no setting {name!r}; settings: "
                              f"{', '.join(s.name for s in self.settings)}")


def experiment_path(name_or_path: str | Path) -> Path:
    """``params/experiments/<name>.yaml`` for a name, or the given path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() or path.exists() else ROOT / path
    return named_params_file(EXPERIMENTS_DIR, str(name_or_path), "experiment", "experiments", ExperimentError)


def _entries(data: Any, where: str) -> list[Entry]:
    if not isinstance(data, list) or not data:
        raise ExperimentError(f"{where} must be a non-empty list of {{name, label, changes}}")
    entries, names = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item:
            raise ExperimentError(f"{where}[{i}] must be a mapping with a name")
        bad = set(item) - ENTRY_KEYS
        if bad:
            raise ExperimentError(f"{where}[{i}]: unknown keys {sorted(bad)}; allowed: {sorted(ENTRY_KEYS)}")
        if item["name"] in names:
            raise ExperimentError(f"{where}[{i}]: name {item['name']!r} is used twice")
        names.add(item["name"])
        changes = dict(item.get("changes") or {})
        _check_config_keys(changes, f"{where}[{i}] ({item['name']})")
        entries.append(Entry(str(item["name"]), str(item.get("label", item["name"])), changes))
    return entries


def load_experiment(name_or_path: str | Path) -> ExperimentSpec:
    """Read and check an experiment file (keys, names, config keys, the reference arm, no test selection)."""
    path = experiment_path(name_or_path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ExperimentError(f"experiment file {path} must hold a mapping")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ExperimentError(f"experiment file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for key in ("name", "base", "arms", "reference"):
        if key not in data:
            raise ExperimentError(f"experiment file {path} needs {key!r}")
    base = dict(data["base"] or {})
    _check_config_keys(base, f"{path} base")
    smoke = dict(data.get("smoke") or {})
    _check_config_keys(smoke, f"{path} smoke")
    arms = _entries(data["arms"], f"{path} arms")
    settings = _entries(data.get("settings") or [{"name": "default", "label": "default"}], f"{path} settings")
    folds = data.get("folds")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 1):
        raise ExperimentError(f"{path}: folds must be a positive count or null, got {folds!r}")
    spec = ExperimentSpec(str(data["name"]), str(data.get("title", data["name"])),
                          str(data.get("description", "")).strip(), str(data.get("data", "")).strip(),
                          str(data.get("selection", "")).strip(), base, seed_list(data.get("seeds", 1)), folds,
                          str(data["reference"]), settings, arms, smoke, path)
    spec.arm(spec.reference)
    for setting in settings:
        for arm in arms:
            values = merge_changes(base, setting.changes, arm.changes)
            monitor = values.get("monitor", Config().monitor)
            if str(monitor).startswith("test_") or values.get("allow_test_selection"):
                raise ExperimentError(f"{path}: {setting.name}/{arm.name} selects on the test split "
                                      f"(monitor {monitor!r}); experiments select on validation only")
    return spec


# ============================================================================================ plan
@dataclass
class PlannedRun:
    setting: str
    arm: str
    seed: int
    fold: int | None
    config: Config

    @property
    def key(self) -> tuple:
        return (self.setting, self.arm, self.seed, self.fold)


@dataclass
class ExperimentPlan:
    spec: ExperimentSpec
    seeds: list[int]
    folds: list[int | None]
    smoke: bool
    output_dir: Path          # root searched for finished runs
    experiment_dir: Path      # <output_dir>/<name>[-smoke]: runs/, runner_log.jsonl
    runs: list[PlannedRun]

    def table(self) -> pd.DataFrame:
        """One row per planned run: setting, arm, seed, fold, run name, config hash."""
        return pd.DataFrame([{"setting": r.setting, "arm": r.arm, "seed": r.seed, "fold": r.fold,
                              "run_name": r.config.run_name, "config_hash": r.config.result_hash()} for r in self.runs])

    def arms_table(self) -> pd.DataFrame:
        """One row per (setting, arm) with its changes to the base config."""
        rows = []
        for setting in self.spec.settings:
            for arm in self.spec.arms:
                changes = {**setting.changes, **arm.changes}
                rows.append({"setting": setting.name, "arm": arm.name, "label": arm.label,
                             "changes": ", ".join(f"{k}={v}" for k, v in changes.items()) or "(base)",
                             "runs": sum(1 for r in self.runs if r.setting == setting.name and r.arm == arm.name)})
        return pd.DataFrame(rows)


def resolve_data_root(value: str | None) -> str | None:
    """A relative ``data_root`` in an experiment file is relative to the repository root (not the cwd)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (ROOT / path).resolve())


def run_name(setting: str, arm: str, seed: int, fold: int | None, config: Config) -> str:
    fold_part = "" if fold is None else f"-fold{fold}"
    return f"{setting}-{arm}{fold_part}-seed{seed}-{config.result_hash()[:8]}"


def plan_experiment(spec: ExperimentSpec | str | Path, seeds: int | Sequence[int] | None = None,
                    folds: int | Sequence[int] | None = None, smoke: bool = False,
                    output_dir: str | Path = "outputs/experiments", overrides: Mapping[str, Any] | None = None,
                    settings: Sequence[str] | None = None, arms: Sequence[str] | None = None) -> ExperimentPlan:
    """One Config per (setting, arm, seed, fold).

    ``seeds`` / ``folds``: a count (the first n) or a list; None = the file's. ``smoke``: one seed,
    one fold (unless given) and the file's ``smoke`` changes on top. ``overrides`` go on top of
    everything (e.g. ``data_root``). ``settings`` / ``arms`` restrict the plan to those names.
    """
    spec = spec if isinstance(spec, ExperimentSpec) else load_experiment(spec)
    if seeds is None or seeds == 0:
        seeds = 1 if smoke else spec.seeds
    seeds = seed_list(seeds)
    if spec.folds is None:
        if folds not in (None, 0, 1, [None]):
            raise ExperimentError(f"experiment {spec.name!r} has no folds (folds: null); got folds={folds!r}")
        fold_list: list[int | None] = [None]
    else:
        if folds is None or folds == 0:
            folds = 1 if smoke else spec.folds
        fold_list = list(range(folds)) if isinstance(folds, int) else [int(f) for f in folds]
        bad = [f for f in fold_list if not 0 <= f < spec.folds]
        if bad or not fold_list:
            raise ExperimentError(f"folds {fold_list} must lie in 0..{spec.folds - 1}")
    output_dir = Path(output_dir)
    experiment_dir = output_dir / (spec.name + ("-smoke" if smoke else ""))
    overrides = dict(overrides or {})
    _check_config_keys(overrides, "overrides")
    chosen_settings = [spec.setting(s) for s in settings] if settings else spec.settings
    chosen_arms = [spec.arm(a) for a in arms] if arms else spec.arms
    runs = []
    for setting in chosen_settings:
        for arm in chosen_arms:
            values = merge_changes(spec.base, setting.changes, arm.changes, spec.smoke if smoke else {}, overrides)
            values = {**values, **RUN_DEFAULTS, "output_dir": str(experiment_dir / "runs")}
            values["data_root"] = resolve_data_root(values.get("data_root"))
            if spec.folds is not None:
                values["n_folds"] = spec.folds
            for fold in fold_list:
                for seed in seeds:
                    run_values = {**values, "seed": seed}
                    if fold is not None:
                        run_values["fold_index"] = fold
                    config = Config.from_dict(run_values)
                    if config.monitor.startswith("test_"):
                        raise ExperimentError(f"{setting.name}/{arm.name}: monitor {config.monitor!r} selects on test")
                    config = config.replace(run_name=run_name(setting.name, arm.name, seed, fold, config))
                    runs.append(PlannedRun(setting.name, arm.name, seed, fold, config))
    return ExperimentPlan(spec, seeds, fold_list, smoke, output_dir, experiment_dir, runs)


# ============================================================================================ running
def run_experiment(plan: ExperimentPlan, workers: int = 1, threads_per_worker: int | None = 1,
                   log: Callable[[str], None] | None = print, scheduler: str | None = None) -> "ExperimentResult":
    """Train what is missing of a plan (``tdro.studies.run_study``: reuse finished runs, resume interrupted ones).

    ``workers`` > 1 trains on a local Dask cluster of that many processes, ``scheduler`` on an
    existing Dask cluster; every run gets ``threads_per_worker`` torch threads (the models are small,
    so one thread per process beats intra-op threads that fight over shared cores). Each invocation
    is appended to ``<experiment_dir>/runner_log.jsonl`` (start, elapsed, how many runs were trained).
    """
    started, started_at = time.time(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = [StudyRun(r.config, {"study": plan.spec.name, "setting": r.setting, "arm": r.arm, "seed": r.seed,
                                  "fold": r.fold}) for r in plan.runs]
    table = run_study(runs, plan.output_dir, workers, threads_per_worker, scheduler, log=log)
    failed = table[table["status"] == "failed"]
    if len(failed):
        raise ExperimentError("runs failed: " + "; ".join(f"{r.setting}/{r.arm} fold {r.fold} seed {r.seed}: {r.error}"
                                                          for r in failed.itertuples()))
    elapsed = time.time() - started
    plan.experiment_dir.mkdir(parents=True, exist_ok=True)
    entry = {"started": started_at, "elapsed_seconds": elapsed, "planned": len(plan.runs),
             "trained": int((table["status"] != "reused").sum()), "workers": workers,
             "threads_per_worker": threads_per_worker, "scheduler": scheduler, "cpus": os.cpu_count(),
             "seeds": plan.seeds, "folds": plan.folds, "smoke": plan.smoke}
    with open(plan.experiment_dir / "runner_log.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    table["run_dir"] = table["run_dir"].map(Path)
    return ExperimentResult(plan, table.drop(columns=["study", "error", "worker", "seconds"]), elapsed)


# ============================================================================================ results
def _summary_row(run_dir: Path) -> dict:
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary.get("test_selection") or summary.get("selection_split") != "val":
        raise ExperimentError(f"{run_dir} selected its checkpoint on {summary.get('selection_split')!r}; "
                              "experiment tables only report validation-selected checkpoints")
    test, val = summary["test"], summary["val"]
    row = {f"{m}": test[m] for m, _ in HEADLINE}
    row.update({f"val_{m}": val[m] for m, _ in HEADLINE})
    row.update({f"group_acc.{g}": v for g, v in test["group_acc"].items()})
    row.update({f"val_group_acc.{g}": v for g, v in val["group_acc"].items()})
    row.update(worst_group=test["worst_group"], selected_epoch=summary["selected_epoch"],
               epochs_run=summary["epochs_run"], checkpoint=summary.get("selected_checkpoint", "best.pt"),
               monitor=summary["monitor"], selection_split=summary["selection_split"],
               wall_seconds=summary["wall_seconds"] + sum(s["wall_seconds"] for s in summary.get("stage_runs", {}).values()),
               parameter_count=summary["parameter_count"],
               train_sizes=json.dumps({g: s["train"] for g, s in summary["group_sizes"].items()}))
    return row


def _base_block(spec: ExperimentSpec) -> str:
    """The experiment file's ``base:`` block as written (with its comments), else the values as YAML."""
    if spec.path is not None and spec.path.is_file():
        lines, inside = [], False
        for line in spec.path.read_text().splitlines():
            if line.startswith("base:"):
                inside = True
            elif inside and line and not line.startswith((" ", "#")):
                break
            if inside:
                lines.append(line)
        if lines:
            return "\n".join(lines).rstrip()
    return yaml.safe_dump({"base": spec.base}, sort_keys=False).strip()


def _mean_std(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    values = values.astype(float).dropna()
    if not len(values):
        return "—"
    mean = scale * values.mean()
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 run)"
    return f"{mean:.{digits}f} ± {scale * values.std(ddof=1):.{digits}f}"


@dataclass
class ExperimentResult:
    """The runs of a plan and their tables (test metrics of the validation-selected checkpoint)."""

    plan: ExperimentPlan
    runs: pd.DataFrame        # setting, arm, seed, fold, run_dir, status, config_hash
    elapsed_seconds: float = math.nan
    _metrics: pd.DataFrame | None = None

    @property
    def spec(self) -> ExperimentSpec:
        return self.plan.spec

    def labels(self) -> dict[str, str]:
        return {a.name: a.label for a in self.spec.arms}

    def metrics(self) -> pd.DataFrame:
        """One row per run: setting, arm, seed, fold, test headline metrics, per-group test accuracy,
        the same on val, selected epoch and checkpoint, wall seconds, parameter count."""
        if self._metrics is None:
            rows = [{**r, **_summary_row(r["run_dir"])} for r in self.runs.to_dict("records")]
            self._metrics = pd.DataFrame(rows)
        return self._metrics

    def groups(self) -> list[str]:
        return [c.split(".", 1)[1] for c in self.metrics().columns if c.startswith("group_acc.")]

    def _arm_order(self, table: pd.DataFrame) -> list[str]:
        present = set(table["arm"])
        return [a.name for a in self.spec.arms if a.name in present]

    def summary_table(self, setting: str) -> pd.DataFrame:
        """Per arm: headline test metrics (%, loss in nats) as mean ± std over all seed×fold runs."""
        m = self.metrics()
        m = m[m["setting"] == setting]
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm]
            row = {"arm": self.labels()[arm], "runs": len(runs)}
            for metric, title in HEADLINE:
                if metric.endswith("loss"):
                    row[title] = _mean_std(runs[metric], 1.0, 3)
                else:
                    row[f"{title} %"] = _mean_std(runs[metric])
            row["val worst-group acc %"] = _mean_std(runs["val_worst_group_acc"])
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def group_table(self, setting: str) -> pd.DataFrame:
        """Per arm: test accuracy of each group (%) as mean ± std, and how often each group was the worst."""
        m = self.metrics()
        m = m[m["setting"] == setting]
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm]
            row = {"arm": self.labels()[arm]}
            for g in self.groups():
                row[f"{g} %"] = _mean_std(runs[f"group_acc.{g}"])
            counts = runs["worst_group"].value_counts()
            row["worst group (runs)"] = ", ".join(f"{g} {n}" for g, n in counts.items())
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def paired_table(self, setting: str, confidence: float = 0.95) -> pd.DataFrame:
        """Per arm: mean paired difference to the reference arm (same seed and fold) in percentage points
        with its t confidence interval, for worst-group accuracy, accuracy and macro-F1 (and loss)."""
        m = self.metrics()
        m = m[m["setting"] == setting].copy()
        m["pair"] = list(zip(m["seed"], m["fold"].astype(object).where(m["fold"].notna(), -1)))
        base = m[m["arm"] == self.spec.reference].set_index("pair")
        level = f"{confidence:.0%}"
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm].set_index("pair")
            row = {"arm": self.labels()[arm]}
            if arm == self.spec.reference:
                row.update({"pairs": len(runs)}, **{f"Δ {t} [{level} CI]": "(reference)" for _, t in HEADLINE})
                rows.append(row)
                continue
            pairs = runs.index.intersection(base.index)
            row["pairs"] = len(pairs)
            for metric, title in HEADLINE:
                diff, low, high = paired_difference(runs.loc[pairs, metric], base.loc[pairs, metric], confidence)
                if metric.endswith("loss"):
                    text = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
                else:
                    text = f"{100 * diff:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"
                row[f"Δ {title} [{level} CI]"] = text if not math.isnan(low) else text.split(" [")[0] + " (1 pair: no CI)"
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def paired_numbers(self, setting: str, metric: str = "worst_group_acc", confidence: float = 0.95) -> pd.DataFrame:
        """Numeric paired differences to the reference (index arm): diff, ci_low, ci_high, pairs."""
        m = self.metrics()
        m = m[m["setting"] == setting].copy()
        m["pair"] = list(zip(m["seed"], m["fold"].astype(object).where(m["fold"].notna(), -1)))
        base = m[m["arm"] == self.spec.reference].set_index("pair")
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm].set_index("pair")
            pairs = runs.index.intersection(base.index)
            diff, low, high = paired_difference(runs.loc[pairs, metric], base.loc[pairs, metric], confidence)
            rows.append({"arm": arm, "label": self.labels()[arm], "diff": diff, "ci_low": low, "ci_high": high,
                         "pairs": len(pairs)})
        return pd.DataFrame(rows).set_index("arm")

    def cost_table(self, setting: str | None = None) -> pd.DataFrame:
        """Per (setting,) arm: parameter count, wall seconds per run (mean, max) and summed, epochs run and
        selected epoch (mean), and the checkpoint the numbers come from."""
        m = self.metrics()
        if setting is not None:
            m = m[m["setting"] == setting]
        rows = []
        for (s, arm), runs in m.groupby(["setting", "arm"], sort=False):
            rows.append({"setting": s, "arm": self.labels()[arm],
                         "parameters": ", ".join(str(v) for v in sorted(set(runs["parameter_count"]))),
                         "wall s/run (mean)": round(float(runs["wall_seconds"].mean()), 2),
                         "wall s/run (max)": round(float(runs["wall_seconds"].max()), 2),
                         "wall s (sum)": round(float(runs["wall_seconds"].sum()), 1),
                         "epochs run (mean)": round(float(runs["epochs_run"].mean()), 1),
                         "selected epoch (mean)": round(float(runs["selected_epoch"].mean()), 1),
                         "checkpoint": ", ".join(sorted(set(runs["checkpoint"]))) + " by " +
                                       ", ".join(sorted(set(runs["monitor"])))})
        return pd.DataFrame(rows).set_index(["setting", "arm"])

    def q_table(self, setting: str | None = None) -> pd.DataFrame:
        """GroupDRO weights at the end of each epoch, long: setting, arm, seed, fold, epoch, group, q."""
        from tdro.runs import load_run

        parts = []
        runs = self.runs if setting is None else self.runs[self.runs["setting"] == setting]
        for r in runs.to_dict("records"):
            history = load_run(r["run_dir"]).history
            q_columns = [c for c in history.columns if c.startswith("q.")]
            if not q_columns:
                continue
            long = history[["epoch", *q_columns]].melt(id_vars="epoch", var_name="group", value_name="q")
            long["group"] = long["group"].str[2:]
            parts.append(long.dropna().assign(setting=r["setting"], arm=r["arm"], seed=r["seed"], fold=r["fold"]))
        if not parts:
            return pd.DataFrame(columns=["setting", "arm", "seed", "fold", "epoch", "group", "q"])
        return pd.concat(parts, ignore_index=True)

    def final_q_table(self, setting: str) -> pd.DataFrame:
        """Per GroupDRO arm: the weight of each group at the selected epoch's end, mean ± std over runs."""
        q = self.q_table(setting)
        if q.empty:
            return pd.DataFrame()
        m = self.metrics()[["setting", "arm", "seed", "fold", "selected_epoch"]]
        q = q.merge(m, on=["setting", "arm", "seed", "fold"])
        q = q[q["epoch"] == q["selected_epoch"]]
        rows = []
        for arm, part in q.groupby("arm", sort=False):
            row = {"arm": self.labels()[arm]}
            for g, values in part.groupby("group", sort=False)["q"]:
                row[f"q {g}"] = f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def plot_q(self, setting: str):
        """GroupDRO weight per group over epochs, mean over seed×fold runs (band: ± one std), one panel per arm."""
        import matplotlib.pyplot as plt

        q = self.q_table(setting)
        arms = [a for a in self._arm_order(q)] if not q.empty else []
        fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(5.2 * max(len(arms), 1), 3.4),
                                 constrained_layout=True, squeeze=False)
        if not arms:
            axes[0, 0].text(0.5, 0.5, "no GroupDRO arm", ha="center", va="center")
            axes[0, 0].set_axis_off()
            return fig
        for ax, arm in zip(axes[0], arms):
            part = q[q["arm"] == arm]
            for group, values in part.groupby("group", sort=False):
                stats = values.groupby("epoch")["q"].agg(["mean", "std"]).fillna(0.0)
                ax.plot(stats.index + 1, stats["mean"], label=group)
                ax.fill_between(stats.index + 1, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
            runs = part.groupby(["seed", "fold"], dropna=False).ngroups
            ax.set(title=f"{self.labels()[arm]} ({runs} runs)", xlabel="epoch", ylabel="q (end of epoch)", ylim=(0, 1))
            ax.legend(fontsize=8)
        fig.suptitle(f"GroupDRO weights over training — {setting}")
        return fig

    def plot_paired(self, setting: str, metric: str = "worst_group_acc"):
        """Paired difference to the reference arm with its 95 % CI, one bar per arm."""
        import matplotlib.pyplot as plt

        table = self.paired_numbers(setting, metric)
        table = table[table.index != self.spec.reference]
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(table)), constrained_layout=True)
        y = np.arange(len(table))
        lows = 100 * (table["diff"] - table["ci_low"]).fillna(0)
        highs = 100 * (table["ci_high"] - table["diff"]).fillna(0)
        ax.errorbar(100 * table["diff"], y, xerr=[lows, highs], fmt="o", capsize=3)
        ax.axvline(0, color="0.5", lw=1)
        ax.set_yticks(y, table["label"])
        ax.invert_yaxis()
        ref = self.labels()[self.spec.reference]
        ax.set(xlabel=f"Δ test {metric.replace('_', ' ')} vs {ref} (pp, 95 % CI)", title=setting)
        return fig

    def wall_time(self) -> dict:
        """Per-run wall seconds (mean, min, max), their sum, and the runner invocations' elapsed times."""
        m = self.metrics()
        log_path = self.plan.experiment_dir / "runner_log.jsonl"
        invocations = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] \
            if log_path.is_file() else []
        return {"runs": len(m), "per_run_mean_s": float(m["wall_seconds"].mean()),
                "per_run_min_s": float(m["wall_seconds"].min()), "per_run_max_s": float(m["wall_seconds"].max()),
                "sum_s": float(m["wall_seconds"].sum()), "invocations": invocations}

    def markdown(self, command: str = "", notes: Iterable[str] = ()) -> str:
        """The report as Markdown: where the data came from, how hyperparameters were chosen, every table."""
        spec, plan = self.spec, self.plan
        timing = self.wall_time()
        trained = [i for i in timing["invocations"] if i["trained"] > 0 and i.get("seeds") == plan.seeds
                   and i.get("folds") == plan.folds]
        lines = [f"# {spec.title}", ""]
        if plan.smoke:
            lines += ["**SMOKE RUN** (one seed, one fold, few epochs): the numbers below say nothing about the "
                      "methods; they only show the pipeline works.", ""]
        lines += [spec.description, "", "## Data", "", spec.data, "",
                  "## Protocol", "",
                  f"- Seeds {plan.seeds} (initialisation and batch order); "
                  + (f"folds {plan.folds} of {spec.folds} (stratified per group; the split)" if spec.folds else "one split")
                  + f"; {len(self.runs)} runs in all.",
                  "- Every number is a **test** metric of the checkpoint with the best **validation** "
                  "worst-group accuracy (`best.pt`, monitor `val_worst_group_acc`); test is evaluated once, "
                  "after training. No run in these tables selected on test (checked when loading).",
                  "- Mean ± std over all seed×fold runs. Paired differences: arm − reference on the same "
                  "(seed, fold), mean with a 95 % t confidence interval over the pairs "
                  "(folds share training data, so the interval is somewhat optimistic).",
                  "", "## Hyperparameters (chosen on validation only)", "", spec.selection, "",
                  "```yaml", _base_block(spec), "```", ""]
        outside = [p for p in self.runs["run_dir"] if plan.experiment_dir.resolve() not in Path(p).resolve().parents]
        if outside:
            lines += [f"{len(outside)} run(s) were reused from elsewhere under {plan.output_dir} with the identical "
                      "resolved config (the hyperparameter check's runs of the chosen values): "
                      + ", ".join(f"`{p}`" for p in outside[:6]) + ("" if len(outside) <= 6 else ", ..."), ""]
        lines += ["Arms and settings:", "", markdown_table(self.plan.arms_table().drop(columns="runs"), index=False), ""]
        for setting in spec.settings:
            if setting.name not in set(self.runs["setting"]):
                continue
            lines += [f"## Setting: {setting.label}", "",
                      "### Test metrics (mean ± std over seed×fold runs; accuracies in %)", "",
                      markdown_table(self.summary_table(setting.name)), "",
                      "### Per-group test accuracy (%)", "", markdown_table(self.group_table(setting.name)), "",
                      f"### Paired difference to \"{self.labels()[spec.reference]}\"", "",
                      markdown_table(self.paired_table(setting.name)), ""]
            q = self.final_q_table(setting.name)
            if not q.empty:
                lines += ["### GroupDRO weights at the selected epoch (mean ± std over runs)", "", markdown_table(q), ""]
        lines += ["## Cost and checkpoints", "", markdown_table(self.cost_table()), "",
                  f"Per run: mean {timing['per_run_mean_s']:.2f} s (min {timing['per_run_min_s']:.2f}, "
                  f"max {timing['per_run_max_s']:.2f}); summed over the {timing['runs']} runs: "
                  f"{timing['sum_s']:.0f} s ({timing['sum_s'] / 60:.1f} min of training time; run wall time "
                  "excludes building the dataset)."]
        for inv in trained:
            lines.append(f"Runner invocation {inv['started']}: trained {inv['trained']} of {inv['planned']} runs in "
                         f"{inv['elapsed_seconds']:.0f} s elapsed ({inv['elapsed_seconds'] / 60:.1f} min) with "
                         f"{inv['workers']} worker process(es) × {inv['threads_per_worker']} torch thread(s) "
                         f"on {inv['cpus']} CPUs.")
        lines += [""]
        if notes:
            lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
        if command:
            lines += ["## Regenerate", "", "```bash", command, "```", ""]
        return "\n".join(lines)


def compare_on_validation(spec: ExperimentSpec | str | Path, arm: str, candidates: Mapping[str, Mapping[str, Any]],
                          seeds: int | Sequence[int] = 1, folds: int | Sequence[int] | None = None,
                          setting: str | None = None, output_dir: str | Path = "outputs/experiments/selection",
                          workers: int = 1, log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Hyperparameter check on **validation only**: each candidate's changes on one arm, mean ± std of the
    validation metrics over the given seeds and folds. Test metrics are not returned."""
    spec = spec if isinstance(spec, ExperimentSpec) else load_experiment(spec)
    rows = []
    for label, changes in candidates.items():
        plan = plan_experiment(spec, seeds, folds, output_dir=output_dir, overrides=dict(changes),
                               settings=[setting] if setting else [spec.settings[0].name], arms=[arm])
        result = run_experiment(plan, workers=workers, log=log)
        m = result.metrics()
        rows.append({"candidate": label, "changes": dict(changes), "runs": len(m),
                     "val_worst_group_acc": m["val_worst_group_acc"].mean(),
                     "val_worst_group_acc_std": m["val_worst_group_acc"].std(ddof=1),
                     "val_acc": m["val_acc"].mean(), "val_worst_group_loss": m["val_worst_group_loss"].mean(),
                     "selected_epoch": m["selected_epoch"].mean(), "wall_seconds": m["wall_seconds"].mean()})
    return pd.DataFrame(rows).set_index("candidate")
