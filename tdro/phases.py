"""Hyperparameter phases of the seed's plan: a base config plus named arms, run over seeds, with a
measured-impact table beside the seed's "Expected Impact" column.

A phase is data (``params/phases/<name>.yaml``)::

    name: phase1_quick_wins
    title: "Phase 1: Quick Wins"
    description: ...
    previous: null                # the phase whose chosen config this one starts from
    base: {batch_size: 32, ...}   # the starting config when no previous choice is given
    adds: {}                      # applied on top of the starting config (either one)
    baseline: {label: ..., expected: ...}
    arms:
      - {name: batch_64, label: "Batch 32→64", changes: {batch_size: 64}, expected: "+5-10% ...", risk: Low}

``plan_phase`` resolves it for one dataset: it drops what does not apply there (a text encoder on a
dataset without a text group, a class count the dataset does not have, differential learning rates
for a model without backbone parameters) with the reason, marks an arm with nothing left as not
applicable, scales epoch counts (``epochs_scale``; ``smoke`` shrinks everything) and makes one
Config per (arm, seed). ``run_phase`` runs them through ``tdro.studies.run_study`` (the one reuse
rule: a finished run with the same ``Config.result_hash()`` anywhere under the output folder is
reused, an unfinished one is resumed; here, on local worker processes or on a Dask cluster).
``PhaseResult`` gives the runs, the measured-impact table and the chosen config for the next phase.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tdro.config import Config, merge_changes, named_params_file, read_yaml_mapping
from tdro.studies.runner import PlannedRun, StudyError, run_study
from tdro.studies.spec import BASELINE, Arm, StudySpec, load_study
from tdro.studies.spec import seed_list as study_seed_list
from tdro.studies.results import StudyResult, format_impact

PHASES_DIR = Path(__file__).resolve().parents[1] / "params" / "phases"
PHASE_NAMES = ("phase1_quick_wins", "phase2_architecture", "phase3_finetuning")
# Keys counted in epochs: epochs_scale multiplies them (a value >= 1 stays >= 1; 0 and null stay).
EPOCH_KEYS = ("epochs", "groupdro_warmup_epochs", "lr_warmup_epochs", "freeze_backbone_epochs", "lr_step_size", "T_max")
# smoke: tiny runs for tests and dry runs (10 epochs -> 1, 50 -> 2; few samples; small inputs)
SMOKE_EPOCHS_SCALE = 0.04
SMOKE_TRAIN_CAP = 120
SMOKE_OVERRIDES = {"latent_samples_per_group": 50, "image_size": 32, "text_max_len": 64, "log_interval": 1}
# Keys of the dataset (a change rebuilds it for the applicability checks): Config fields from
# `dataset` up to the model block.
DATA_KEYS = tuple(Config.keys()[Config.keys().index("dataset"):Config.keys().index("latent_dim")])
BACKBONE_KEYS = ("lr_backbone", "lr_new", "freeze_backbone_epochs")


class PhaseError(StudyError):
    """A phase file or phase request that cannot be used; the message says what and how to fix it."""


# ============================================================================================ spec
PhaseSpec = StudySpec


def phase_path(name_or_path: str | Path) -> Path:
    """``params/phases/<name>.yaml`` for a phase name, or the given path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return named_params_file(PHASES_DIR, str(name_or_path), "phase", "phases", PhaseError)


def load_phase(name_or_path: str | Path) -> PhaseSpec:
    """Read and check a phase file (``tdro.studies.spec``: its baseline first, then the arms)."""
    return load_study(phase_path(name_or_path), PhaseError)


# ============================================================================================ applicability
@dataclass
class DatasetFacts:
    """What the applicability checks need to know about a dataset: its groups and classes."""

    name: str
    groups: dict[str, tuple[str, str]]  # group name -> (kind, default encoder)
    class_names: list[str]

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.groups.values()}

    def describe(self) -> str:
        return ", ".join(f"{name} ({kind})" for name, (kind, _) in self.groups.items())


_DATASETS: dict[str, Any] = {}


def _data_key(config: Config) -> str:
    values = config.to_dict()
    return json.dumps({k: values[k] for k in DATA_KEYS}, sort_keys=True, default=str)


def build_phase_dataset(config: Config):
    """The dataset of a config, built once per distinct set of data keys (cached for this process)."""
    key = _data_key(config)
    if key not in _DATASETS:
        from tdro.data import build_dataset

        _DATASETS[key] = build_dataset(config)
    return _DATASETS[key]


def dataset_facts(config: Config) -> DatasetFacts:
    dataset = build_phase_dataset(config)
    return DatasetFacts(dataset.name if hasattr(dataset, "name") else config.dataset,
                        {name: (g.kind, g.encoder) for name, g in dataset.groups.items()}, list(dataset.class_names))


def backbone_parameter_count(config: Config) -> int:
    """Scalar parameters under the encoders' pretrained backbones (lr_backbone applies to these)."""
    from tdro.models.multigroup import build_model

    model = build_model(config, build_phase_dataset(config))
    return sum(p.numel() for p in model.parameter_groups()["backbone"])


def key_reasons(values: Mapping[str, Any], keys: Iterable[str], facts: DatasetFacts) -> dict[str, str]:
    """Why each of ``keys`` (set in ``values``) does not apply to the dataset; keys that apply are absent.

    Dataset-level rules only (encoder shortcuts without a group of that kind, textcaps keys on another
    dataset); class counts and backbones need the arm's own dataset and model (see ``resolve_arm``).
    """
    reasons = {}
    for key in keys:
        value = values.get(key)
        if key in ("text_encoder", "visual_encoder") and value is not None:
            kind = "text" if key == "text_encoder" else "image"
            if kind not in facts.kinds():
                reasons[key] = (f"{key}={value}: dataset {facts.name} has no {kind} group "
                                f"(its groups: {facts.describe()})")
        elif key.startswith("textcaps_") and facts.name != "textcaps":
            reasons[key] = (f"{key}={value}: only the textcaps dataset reads it; {facts.name} has its fixed "
                            f"{len(facts.class_names)} classes")
    return reasons


def _differs_from_default(key: str, value: Any) -> bool:
    return Config().to_dict()[key] != value


def resolve_values(start: Mapping[str, Any], changes: Mapping[str, Any]) -> tuple[dict, dict[str, str]]:
    """Merge ``changes`` into ``start``, keeping only the changes that apply to the dataset.

    Returns (merged values, {dropped key: reason}). The checks: ``key_reasons`` on the dataset of
    the merged values; a ``textcaps_num_classes`` above the classes the train split has; backbone keys
    (``lr_backbone``, ``lr_new`` equal to ``lr``, ``freeze_backbone_epochs``) for a model without
    backbone parameters.
    """
    values = dict(start)
    merged = merge_changes(values, changes)
    facts = dataset_facts(Config.from_dict(merged))
    dropped = key_reasons(merged, changes, facts)
    kept = {k: v for k, v in changes.items() if k not in dropped}
    merged = merge_changes(values, kept)
    if "textcaps_num_classes" in kept and kept["textcaps_num_classes"] is not None:
        facts = dataset_facts(Config.from_dict(merged))
        wanted = kept["textcaps_num_classes"]
        if len(facts.class_names) < wanted:
            dropped["textcaps_num_classes"] = (f"textcaps_num_classes={wanted}: the {facts.name} train split has only "
                                               f"{len(facts.class_names)} classes")
            kept.pop("textcaps_num_classes")
            merged = merge_changes(values, kept)
    backbone_keys = [k for k in BACKBONE_KEYS if k in kept]
    if backbone_keys:
        config = Config.from_dict(merged)
        if backbone_parameter_count(config) == 0:
            encoders = ", ".join(f"{g}={enc}" for g, (enc, _) in _encoders(config).items())
            for key in backbone_keys:
                if key == "lr_new" and kept[key] not in (None, config.lr):
                    continue  # a different LR for every parameter still changes the run
                dropped[key] = (f"{key}={kept[key]}: no encoder has pretrained backbone parameters ({encoders}), "
                                f"so there is nothing to train at a separate rate")
                kept.pop(key)
            merged = merge_changes(values, kept)
    return merged, dropped


def _encoders(config: Config) -> dict[str, tuple[str, dict]]:
    from tdro.models.multigroup import resolve_encoder_specs

    return resolve_encoder_specs(config, build_phase_dataset(config))


def scale_epochs(values: Mapping[str, Any], scale: float) -> dict:
    """Epoch-valued keys (``EPOCH_KEYS``) multiplied by ``scale``; a value >= 1 stays >= 1."""
    if scale <= 0:
        raise PhaseError(f"epochs_scale must be > 0, got {scale}")
    defaults = Config().to_dict()
    scaled = dict(values)
    for key in EPOCH_KEYS:
        value = values.get(key, defaults[key])
        if value is None or value == 0 or scale == 1:
            continue
        scaled[key] = max(1, int(round(value * scale)))
    return scaled


# ============================================================================================ plan
@dataclass
class ArmPlan:
    """One arm resolved for a dataset: whether it applies (and why not), what was dropped, its configs."""

    arm: Arm
    applicable: bool
    reason: str                  # why the arm does not apply ("" when it does)
    notes: list[str]             # dropped parts of an applicable arm
    values: dict                 # resolved config values before epoch scaling (what chosen.yaml holds)
    configs: dict[int, Config]   # seed -> Config to train (scaled, output folder and run name set)

    @property
    def name(self) -> str:
        return self.arm.name


@dataclass
class PhasePlan:
    spec: PhaseSpec
    dataset: str
    seeds: list[int]
    epochs_scale: float
    smoke: bool
    output_dir: Path             # root searched for finished runs
    phase_dir: Path              # <output_dir>/<phase name>: runs/, impact.csv, chosen.yaml
    start_from: Path | None
    base_notes: list[str]
    arms: list[ArmPlan]

    def arm(self, name: str) -> ArmPlan:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise PhaseError(f"phase {self.spec.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def describe(self) -> str:
        """A Markdown paragraph: what runs, from which start, and what was dropped from the start."""
        start = f"`{self.start_from}`" if self.start_from else f"the base of `{self.spec.path or self.spec.name}`"
        lines = [f"**{self.spec.title}** on `{self.dataset}`: seeds {self.seeds}, epochs × {self.epochs_scale:g}"
                 f"{' (smoke: tiny runs)' if self.smoke else ''}, starting from {start}; runs under "
                 f"`{self.phase_dir / 'runs'}`.", "", self.spec.description]
        if self.base_notes:
            lines += ["", "Not applicable to this dataset, so left out of the starting config:"]
            lines += [f"- {note.split(': ', 1)[1]}" for note in self.base_notes]
        return "\n".join(lines)

    def table(self) -> pd.DataFrame:
        """One row per arm: label, whether it applies, the changes, the reason or notes, expected impact."""
        rows = []
        for plan in self.arms:
            rows.append({
                "arm": plan.name, "label": plan.arm.label, "applicable": plan.applicable,
                "changes": ", ".join(f"{k}={v}" for k, v in plan.arm.changes.items()) or "(starting config)",
                "runs": len(plan.configs), "epochs": next(iter(plan.configs.values())).epochs if plan.configs else None,
                "reason": plan.reason, "notes": "; ".join(plan.notes),
                "expected": plan.arm.expected, "risk": plan.arm.risk,
            })
        table = pd.DataFrame(rows)
        table["epochs"] = table["epochs"].astype("Int64")
        return table


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """A seed count (0..n-1) or an explicit list of distinct seeds."""
    return study_seed_list(seeds, PhaseError)


def run_name(arm: str, seed: int, config: Config) -> str:
    return f"{arm}-seed{seed}-{config.result_hash()[:8]}"


def plan_phase(spec: PhaseSpec | str | Path, dataset: str = "digits", seeds: int | Sequence[int] = 3,
               epochs_scale: float = 1.0, smoke: bool = False, output_dir: str | Path = "outputs/phases",
               start_from: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> PhasePlan:
    """Resolve a phase for a dataset: baseline and arms with applicability, and one Config per (arm, seed).

    ``start_from`` is a YAML config (the previous phase's ``chosen.yaml``); without it the phase's
    ``base`` is the start. ``adds``, then ``dataset`` and ``overrides`` (e.g. ``data_root``) go on top.
    """
    spec = spec if isinstance(spec, PhaseSpec) else load_phase(spec)
    seeds = seed_list(seeds)
    start_from = Path(start_from) if start_from else None
    if start_from is not None:
        start = read_yaml_mapping(start_from)
        for key in ("run_name", "output_dir", "seed"):
            start.pop(key, None)
    else:
        start = dict(spec.base)
    requested = {**merge_changes(start, spec.adds, dict(overrides or {})), "dataset": dataset}
    Config.from_dict(requested)  # a wrong value fails here, before any dataset is built
    # the starting config: keep what applies to this dataset (e.g. no text encoder on digits)
    base_values, dropped = resolve_values({"dataset": dataset}, {k: v for k, v in requested.items() if k != "dataset"})
    base_notes = [f"dropped from the starting config: {reason}" for key, reason in dropped.items()
                  if _differs_from_default(key, requested[key])]
    scale = epochs_scale * (SMOKE_EPOCHS_SCALE if smoke else 1.0)
    output_dir = Path(output_dir)
    phase_dir = output_dir / spec.name
    base_hash = Config.from_dict(base_values).result_hash()
    cap = None
    if smoke:
        cap = [SMOKE_TRAIN_CAP] * len(dataset_facts(Config.from_dict(base_values)).groups)

    arms = []
    for arm in spec.arms:
        values, dropped = resolve_values(base_values, arm.changes)
        reasons = list(dropped.values())
        applicable = arm.name == BASELINE or Config.from_dict(values).result_hash() != base_hash
        reason = "" if applicable else ("; ".join(reasons) or "no change from the baseline on this dataset")
        configs = {}
        if applicable:
            run_values = scale_epochs(values, scale)
            if smoke:
                run_values.update(SMOKE_OVERRIDES, group_max_train_samples=cap)
            for seed in seeds:
                config = Config.from_dict({**run_values, "seed": seed, "progress": False,
                                           "output_dir": str(phase_dir / "runs")})
                configs[seed] = config.replace(run_name=run_name(arm.name, seed, config))
        notes = reasons if applicable else []
        if configs and arm.name != BASELINE and arms and arms[0].configs:
            first = seeds[0]
            if configs[first].result_hash() == arms[0].configs[first].result_hash():
                notes = [*notes, f"after epochs × {scale:g} this arm's runs are the baseline's (identical configs)"]
        arms.append(ArmPlan(arm, applicable, reason, notes, values, configs))
    return PhasePlan(spec, dataset, seeds, epochs_scale, smoke, output_dir, phase_dir, start_from, base_notes, arms)


# ============================================================================================ runs
def run_phase(plan: PhasePlan, isolate: bool = False, log: Callable[[str], None] | None = print,
              workers: int = 1, threads: int | None = None, scheduler: str | None = None) -> "PhaseResult":
    """Train what is missing of a plan (idempotent, ``tdro.studies.run_study``) and return the result."""
    runs = [PlannedRun(config, {"study": plan.spec.name, "setting": "default", "arm": arm.name, "seed": seed,
                                "fold": None})
            for arm in plan.arms if arm.applicable for seed, config in arm.configs.items()]
    table = run_study(runs, plan.output_dir, workers, threads, scheduler, isolate, log)
    failed = table[table["status"] == "failed"]
    if len(failed):
        raise PhaseError("runs failed: " + "; ".join(f"{r.arm} seed {r.seed}: {r.error}" for r in failed.itertuples()))
    return PhaseResult(plan, table[["setting", "arm", "seed", "fold", "run_dir", "status", "config_hash"]])


# ============================================================================================ result
class PhaseResult(StudyResult):
    """The runs of a plan (``StudyResult``'s tables) and what to make of them: the chosen config."""

    def __init__(self, plan: PhasePlan, runs: pd.DataFrame) -> None:
        super().__init__(plan.spec, runs)
        self.plan = plan

    def impact_table(self, confidence: float = 0.95) -> pd.DataFrame:
        """The impact table with this dataset's applicability (arms that do not apply keep their reason)."""
        return super().impact_table(arms=self.plan.table(), confidence=confidence)

    def formatted_impact(self, confidence: float = 0.95) -> pd.DataFrame:
        return format_impact(self.impact_table(confidence), confidence)

    def best_arm(self, metric: str = "val_worst_group_acc") -> str:
        """The applicable arm with the best mean validation metric over seeds (never chosen on test)."""
        if not metric.startswith("val_"):
            raise PhaseError(f"choose on a validation metric (val_worst_group_acc, val_acc), not {metric!r}")
        means = self.metrics().groupby("arm")[metric].mean()
        return str(means.idxmax())

    def chosen_values(self, arm: str | None = None) -> dict:
        """Config values of an arm (default: ``best_arm()``) before epoch scaling and smoke shrinking."""
        arm = arm or self.best_arm()
        values = Config.from_dict(self.plan.arm(arm).values).to_dict()
        for key in ("run_name", "output_dir", "seed", "progress"):
            values.pop(key, None)
        return values

    def save_chosen(self, path: str | Path | None = None, arm: str | None = None) -> Path:
        """Write the chosen config as YAML (default ``<phase_dir>/chosen.yaml``): the next phase's ``start_from``."""
        arm = arm or self.best_arm()
        path = Path(path) if path else self.plan.phase_dir / "chosen.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = (f"# {self.plan.spec.title}: chosen arm {arm!r} ({self.plan.arm(arm).arm.label}) on "
                  f"{self.plan.dataset}, by mean validation worst-group accuracy over seeds {self.plan.seeds}.\n"
                  f"# Start the next phase from it: -p start_from {path}\n")
        path.write_text(header + yaml.safe_dump(self.chosen_values(arm), sort_keys=False))
        return path

    def save_impact(self, path: str | Path | None = None) -> Path:
        """Write the numeric impact table as CSV (default ``<phase_dir>/impact.csv``)."""
        path = Path(path) if path else self.plan.phase_dir / "impact.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.impact_table().to_csv(path)
        return path
