"""A study as data: a base config, optional settings, named arms (with the seed's expected impact where
it has one), seeds and optional folds. Phases (``params/phases``) and experiments
(``params/experiments``) are both written in it and read by ``load_study``::

    name: heart
    title: "..."
    description: ...              # what is compared and why
    data: ...                     # experiments: where the data came from (printed in the report)
    selection: ...                # experiments: how hyperparameters were chosen (validation only)
    previous: phase1_quick_wins   # phases: the phase whose chosen config this one starts from
    base: {dataset: heart, ...}   # every run starts from this config
    adds: {}                      # phases: applied on top of the starting config
    seeds: 10                     # 0 .. seeds-1 (or a list)
    folds: 5                      # fold_index 0 .. folds-1 (with n_folds in base); null = no folds
    baseline: {label: ..., expected: ...}   # phases: the arm named "baseline" (no changes) ...
    reference: per_group_erm      # ... or the arm every other arm is paired against
    settings: [{name: uncapped, label: ..., changes: {}}, ...]
    arms: [{name: ..., label: ..., changes: {...}, expected: "+5-10%", risk: Low}, ...]
    smoke: {epochs: 2, ...}       # what ``smoke=True`` puts on top
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdro.config import Config, merge_changes
from tdro.studies.runner import StudyError

SPEC_KEYS = {"name", "title", "description", "data", "selection", "previous", "base", "adds", "seeds", "folds",
             "baseline", "reference", "settings", "arms", "smoke"}
ENTRY_KEYS = {"name", "label", "changes", "expected", "risk"}
BASELINE = "baseline"


@dataclass(frozen=True)
class Arm:
    """An arm or a setting: a name, a label for tables, config changes and the seed's expected impact."""

    name: str
    label: str
    changes: dict = field(default_factory=dict)
    expected: str = ""
    risk: str = ""


@dataclass
class StudySpec:
    """A study file, checked: every arm (the reference among them), settings, seeds and folds."""

    name: str
    title: str
    description: str
    base: dict
    arms: list[Arm]
    reference: str
    settings: list[Arm]
    seeds: list[int]
    folds: int | None = None
    adds: dict = field(default_factory=dict)
    previous: str | None = None
    data: str = ""
    selection: str = ""
    smoke: dict = field(default_factory=dict)
    path: Path | None = None

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise StudyError(f"study {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def setting(self, name: str) -> Arm:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise StudyError(f"study {self.name!r} has no setting {name!r}; settings: "
                         f"{', '.join(s.name for s in self.settings)}")

    @property
    def baseline(self) -> Arm:
        """The reference arm."""
        return self.arm(self.reference)


def seed_list(seeds: int | list[int] | tuple[int, ...], error: type[Exception] = StudyError) -> list[int]:
    """A seed count n (seeds 0..n-1) or an explicit list, checked."""
    if isinstance(seeds, bool):
        raise error(f"seeds must be a count or a list of seeds, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise error(f"seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise error(f"seeds must be a non-empty list of distinct seeds, got {seeds}")
    return seeds


def check_config_keys(values: Mapping[str, Any], where: str, error: type[Exception] = StudyError) -> None:
    """Every key is a Config key (else the closest one is suggested)."""
    for name in values:
        if name not in Config.keys():
            close = difflib.get_close_matches(name, Config.keys(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise error(f"{where}: unknown config key {name!r}{hint}")


def _entries(data: Any, where: str, error: type[Exception], reserved: set[str] = frozenset()) -> list[Arm]:
    if not isinstance(data, list) or not data:
        raise error(f"{where} must be a non-empty list of {{name, label, changes}}")
    entries, names = [], set(reserved)
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item:
            raise error(f"{where}[{i}] must be a mapping with a name")
        bad = set(item) - ENTRY_KEYS
        if bad:
            raise error(f"{where}[{i}]: unknown keys {sorted(bad)}; allowed: {sorted(ENTRY_KEYS)}")
        if item["name"] in names:
            raise error(f"{where}[{i}]: name {item['name']!r} is used twice"
                        + (f" (or is the reserved {BASELINE!r})" if item["name"] in reserved else ""))
        names.add(item["name"])
        changes = dict(item.get("changes") or {})
        check_config_keys(changes, f"{where}[{i}] ({item['name']})", error)
        entries.append(Arm(str(item["name"]), str(item.get("label", item["name"])), changes,
                           str(item.get("expected", "") or ""), str(item.get("risk", "") or "")))
    return entries


def load_study(path: str | Path, error: type[Exception] = StudyError) -> StudySpec:
    """Read and check a study file: keys, names, config keys, the reference arm, no test-set selection."""
    path = Path(path)
    if not path.is_file():
        raise error(f"study file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise error(f"study file {path} must hold a mapping")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise error(f"study file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    for key in ("name", "arms"):
        if key not in data:
            raise error(f"study file {path} needs {key!r}")
    if "baseline" in data and "reference" in data:
        raise error(f"study file {path}: give either `baseline:` (an arm named {BASELINE!r} with no changes) "
                    f"or `reference:` (the arm others are paired against), not both")
    base, adds, smoke = (dict(data.get(k) or {}) for k in ("base", "adds", "smoke"))
    for key, values in (("base", base), ("adds", adds), ("smoke", smoke)):
        check_config_keys(values, f"{path} {key}", error)
    if "reference" in data:
        arms, reference = _entries(data["arms"], f"{path} arms", error), str(data["reference"])
    else:
        baseline = data.get("baseline") or {}
        if not isinstance(baseline, dict) or set(baseline) - {"label", "expected", "risk"}:
            raise error(f"{path} baseline must be a mapping of label, expected and risk")
        first = Arm(BASELINE, str(baseline.get("label", BASELINE)), {}, str(baseline.get("expected", "") or ""),
                    str(baseline.get("risk", "") or ""))
        arms, reference = [first, *_entries(data["arms"], f"{path} arms", error, {BASELINE})], BASELINE
    settings = _entries(data.get("settings") or [{"name": "default", "label": "default"}], f"{path} settings", error)
    folds = data.get("folds")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 1):
        raise error(f"{path}: folds must be a positive count or null, got {folds!r}")
    spec = StudySpec(str(data["name"]), str(data.get("title", data["name"])), str(data.get("description", "")).strip(),
                     base, arms, reference, settings, seed_list(data.get("seeds", 1), error), folds, adds,
                     data.get("previous"), str(data.get("data", "")).strip(), str(data.get("selection", "")).strip(),
                     smoke, path)
    if reference not in {a.name for a in arms}:
        raise error(f"{path}: reference {reference!r} is not an arm; arms: {', '.join(a.name for a in arms)}")
    for arm in arms:
        if arm.name != reference and not arm.changes:
            raise error(f"{path} arm {arm.name!r} changes nothing; give it `changes:`")
    for setting in settings:
        for arm in arms:
            values = merge_changes(base, adds, setting.changes, arm.changes)
            monitor = values.get("monitor", Config().monitor)
            if str(monitor).startswith("test_") or values.get("allow_test_selection"):
                raise error(f"{path}: {setting.name}/{arm.name} selects on the test split (monitor {monitor!r}); "
                            f"studies select on validation only")
    return spec
