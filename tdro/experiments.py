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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tdro.config import Config, merge_changes, named_params_file
from tdro.studies.runner import PlannedRun as StudyRun, StudyError, run_study
from tdro.studies.spec import StudySpec, check_config_keys, load_study, seed_list
from tdro.studies.results import StudyResult
from tdro.studies.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = ROOT / "params" / "experiments"
# Keys an experiment run always gets (they change no result; see Config.NON_RESULT_KEYS).
RUN_DEFAULTS = {"progress": False, "latent_samples_per_group": 0}


class ExperimentError(StudyError):
    """An experiment file or request that cannot be used; the message says what and how to fix it."""


# ============================================================================================ spec
ExperimentSpec = StudySpec


def experiment_path(name_or_path: str | Path) -> Path:
    """``params/experiments/<name>.yaml`` for a name, or the given path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_absolute() or path.exists() else ROOT / path
    return named_params_file(EXPERIMENTS_DIR, str(name_or_path), "experiment", "experiments", ExperimentError)


def load_experiment(name_or_path: str | Path) -> ExperimentSpec:
    """Read and check an experiment file (``tdro.studies.spec``: keys, names, the reference arm, no test selection)."""
    return load_study(experiment_path(name_or_path), ExperimentError)


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
    seeds = seed_list(seeds, ExperimentError)
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
    check_config_keys(overrides, "overrides", ExperimentError)
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


class ExperimentResult(StudyResult):
    """The runs of a plan and their tables (``StudyResult``), its wall time and its Markdown report."""

    def __init__(self, plan: ExperimentPlan, runs: pd.DataFrame, elapsed_seconds: float = math.nan) -> None:
        super().__init__(plan.spec, runs)
        self.plan = plan
        self.elapsed_seconds = elapsed_seconds

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
            lines += ["### Diagnostics (validation; `—`: the arm has no anchors / no q)", "",
                      "W₂ of each group's class-conditional latents to the class anchor and between the groups of a "
                      "class, at the selected epoch; the largest distance of GroupDRO's q from its start (below 0.01: "
                      "GroupDRO never acted); runs whose selected epoch lies inside a warm-up.", "",
                      markdown_table(self.diagnostics_table(setting.name)), ""]
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
