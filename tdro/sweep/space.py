"""Search spaces as data (``params/search/*.yaml``), checked against the Config before any trial runs.

A search file::

    name: groupdro                   # default study name
    description: ...
    base: {dataset: digits, groupdro_enabled: true, epochs: 10}   # fixed Config keys
    space:                           # searched Config keys
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      groupdro_gamma: {type: float, low: 0.0, high: 0.95}
      groupdro_warmup_epochs: {type: int, low: 0, high: 3}        # step: 1 by default
      latent_dim: {choices: [64, 128, 256]}                       # type: categorical
    sampler: {name: tpe, seed: null}  # tpe | random | grid, plus the sampler's own options
    pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 2}  # median | successive_halving | hyperband | none
    smoke: {base: {epochs: 2}, space: {latent_dim: {choices: [8, 16]}}}   # applied with smoke=True

Every check runs in ``SearchSpace.from_dict`` (so before a study is touched): unknown Config keys
(the Config's "did you mean" message), impossible ranges (low ≥ high, a log range with low ≤ 0, a
step that does not fit), each range end and each categorical choice against the Config (type,
range, allowed values), a test-split ``monitor`` (a sweep selects on validation only), keys the
sweep sets itself (``run_name``, ``output_dir``), and, for the grid sampler, dimensions that are
not discrete.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from tdro.config import NON_RESULT_KEYS, Config, ConfigError, merge_changes, named_params_file

SEARCH_DIR = Path(__file__).resolve().parents[2] / "params" / "search"
FILE_KEYS = ("name", "description", "base", "space", "sampler", "pruner", "smoke")
DIMENSION_KEYS = ("type", "low", "high", "log", "step", "choices")
KINDS = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
# Keys a trial sets itself, or that would make the search meaningless.
SWEEP_OWNED_KEYS = ("run_name", "output_dir")
NOT_SEARCHABLE = {
    "run_name": "the sweep names each trial's run directory trial_<number>",
    "output_dir": "the sweep puts trial runs under <sweeps_dir>/<study>/runs",
    "monitor": "the objective is the monitor; fix it in base",
    "allow_test_selection": "a sweep selects on the validation split only",
    "seed": "the training seed is not a hyperparameter; re-run the best config over seeds instead (rerun_best)",
}


class SweepError(ConfigError):
    """A search file, search space or sweep request that cannot be used; the message says what and how to fix it."""


@dataclass(frozen=True)
class Dimension:
    """One searched Config key: a float or int range (optionally log-scaled or stepped) or a list of choices."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value of this key for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    @property
    def discrete(self) -> bool:
        return self.kind in ("categorical", "int") or self.step is not None

    def grid_values(self) -> list:
        """Every value of a discrete dimension (for the grid sampler)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise SweepError(f"search space key {self.name!r} is a continuous range; the grid sampler needs "
                             f"'choices' or a 'step' for it")
        count = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(count + 1)]

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(repr, self.choices)) + "}"
        scale = "log-uniform" if self.log else "uniform"
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.kind} {scale} [{self.low}, {self.high}]{step}"


@dataclass
class SearchSpace:
    """A validated search space: fixed Config values, searched dimensions, sampler and pruner settings."""

    name: str
    base: dict
    dimensions: dict[str, Dimension]
    sampler: dict = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    description: str = ""
    path: Path | None = None

    # --- construction ---
    @classmethod
    def load(cls, path: str | Path, overrides: Mapping[str, Any] | None = None, smoke: bool = False) -> "SearchSpace":
        """Read a search file; ``overrides`` fix Config keys (a searched key given here is no longer searched)."""
        path = search_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise SweepError(f"search file {path} is not valid YAML: {err}") from err
        return cls.from_dict(data, source=str(path), overrides=overrides, smoke=smoke, path=path)

    @classmethod
    def from_dict(cls, data: Any, source: str = "search space", overrides: Mapping[str, Any] | None = None,
                  smoke: bool = False, path: Path | None = None) -> "SearchSpace":
        if not isinstance(data, dict):
            raise SweepError(f"{source} must hold a mapping with at least 'space'; got {type(data).__name__}")
        _check_names(data, FILE_KEYS, f"{source}", "top-level key")
        data = copy.deepcopy(data)
        base = _mapping(data.get("base"), f"{source} base")
        space = _mapping(data.get("space"), f"{source} space")
        if smoke:
            smoke_part = _mapping(data.get("smoke"), f"{source} smoke")
            _check_names(smoke_part, ("base", "space"), f"{source} smoke", "key")
            base.update(_mapping(smoke_part.get("base"), f"{source} smoke base"))
            space.update(_mapping(smoke_part.get("space"), f"{source} smoke space"))
        if overrides:
            from tdro.config import coerce_overrides

            fixed = coerce_overrides(overrides)
            _check_config_keys(fixed, "overrides (-p)")
            base.update(fixed)
            for key in fixed:
                space.pop(key, None)  # fixing a searched key removes it from the search
        if not space:
            raise SweepError(f"{source} searches nothing; give 'space' at least one Config key")
        _check_config_keys(base, f"{source} base")
        _check_config_keys(space, f"{source} space")
        both = sorted(set(base) & set(space))
        if both:
            raise SweepError(f"{source}: {', '.join(map(repr, both))} is both fixed in base and searched in space; "
                             "remove it from one of them")
        for key in SWEEP_OWNED_KEYS:
            if key in base:
                raise SweepError(f"{source} base sets {key!r}; {NOT_SEARCHABLE[key]}")
        for key in space:
            if key in NOT_SEARCHABLE:
                raise SweepError(f"{source} space searches {key!r}; {NOT_SEARCHABLE[key]}")
        base_config = _config(base, f"{source} base")
        if base_config.monitor.startswith("test_"):
            raise SweepError(f"{source} base has monitor {base_config.monitor!r}; a sweep selects on the validation "
                             "split only (use a val_* monitor; test is evaluated once after the sweep)")
        dimensions = {key: _dimension(key, spec, base, source) for key, spec in space.items()}
        sampler = _named(data.get("sampler"), "tpe", SAMPLERS, f"{source} sampler")
        pruner = _named(data.get("pruner"), "median", PRUNERS, f"{source} pruner")
        name = str(data.get("name") or (path.stem if path else "sweep"))
        result = cls(name, base, dimensions, sampler, pruner, str(data.get("description") or "").strip(), path)
        if sampler["name"] == "grid":
            result.grid()  # every dimension must be discrete
        return result

    # --- use ---
    @property
    def monitor(self) -> str:
        return self.base_config().monitor

    @property
    def direction(self) -> str:
        """'maximize', or 'minimize' for a monitor that ends with 'loss'."""
        return "minimize" if self.monitor.endswith("loss") else "maximize"

    def base_config(self) -> Config:
        return Config.from_dict(self.base)

    def config(self, params: Mapping[str, Any], **changes: Any) -> Config:
        """The Config of one trial: base, then the trial's parameters, then ``changes``."""
        unknown = sorted(set(params) - set(self.dimensions))
        if unknown:
            raise SweepError(f"parameters {unknown} are not in the search space {sorted(self.dimensions)}")
        return Config.from_dict(merge_changes(self.base, params, changes), source=f"search space {self.name}")

    def suggest(self, trial) -> dict:
        """Every searched key's value for an Optuna trial, in the file's order."""
        return {name: dim.suggest(trial) for name, dim in self.dimensions.items()}

    def grid(self) -> dict[str, list]:
        """The grid sampler's search space; every dimension must be discrete."""
        continuous = [d.name for d in self.dimensions.values() if not d.discrete]
        if continuous:
            raise SweepError(f"the grid sampler needs discrete dimensions; {', '.join(map(repr, continuous))} "
                             "are continuous ranges: give them 'choices' or a 'step'")
        return {name: dim.grid_values() for name, dim in self.dimensions.items()}

    def to_dict(self) -> dict:
        """The resolved space (after smoke and overrides) as plain data: stored on the study."""
        return {"name": self.name, "base": dict(self.base),
                "space": {name: dim.to_dict() for name, dim in self.dimensions.items()},
                "sampler": dict(self.sampler), "pruner": dict(self.pruner)}

    def fingerprint(self) -> dict:
        """What every worker of one study must agree on: base keys that change results, and the space."""
        base = {k: v for k, v in self.base.items() if k not in NON_RESULT_KEYS}
        return json.loads(json.dumps({"base": base, "space": self.to_dict()["space"]}, sort_keys=True, default=str))

    def table(self) -> "Any":
        """The dimensions as a small pandas table (key, distribution)."""
        import pandas as pd

        return pd.DataFrame([{"key": name, "distribution": dim.describe()} for name, dim in self.dimensions.items()])


def search_path(name_or_path: str | Path) -> Path:
    """A search file path, or ``params/search/<name>.yaml`` for a bare name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SweepError(f"search file {path} does not exist")
        return path
    return named_params_file(SEARCH_DIR, str(name_or_path), "search space", "search spaces", SweepError)


def load_search_space(path: str | Path, overrides: Mapping[str, Any] | None = None, smoke: bool = False) -> SearchSpace:
    """``SearchSpace.load``: read and validate a search file."""
    return SearchSpace.load(path, overrides, smoke)


# ------------------------------------------------------------------------------------------ checks
def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping; got {value!r}")
    return dict(value)


def _check_names(values: Mapping, allowed: tuple, where: str, what: str) -> None:
    for name in values:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SweepError(f"{where}: unknown {what} {name!r}{hint} (allowed: {', '.join(allowed)})")


def _check_config_keys(values: Mapping, source: str) -> None:
    """Unknown Config keys fail with the Config's own 'did you mean' message."""
    unknown = {k: None for k in values if k not in Config.keys()}
    if unknown:
        try:
            Config.from_dict(unknown, source=source)
        except ConfigError as err:
            raise SweepError(str(err)) from None


def _config(values: Mapping, where: str) -> Config:
    try:
        return Config.from_dict(values, source=where)
    except ConfigError as err:
        raise SweepError(f"{where}: {err}") from None


def _number(value: Any, key: str, what: str, source: str) -> float | int:
    """A number from YAML (PyYAML reads '1e-3' as text)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SweepError(f"{source} space key {key!r}: {what} must be a finite number; got {value!r}")
    return value


def _accepts_float(key: str) -> bool:
    hint = typing.get_type_hints(Config)[key]
    args = typing.get_args(hint) or (hint,)
    return float in args


def _dimension(key: str, spec: Any, base: Mapping, source: str) -> Dimension:
    where = f"{source} space key {key!r}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise SweepError(f"{where} must be a mapping like {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}} "
                         f"or {{choices: [...]}}; got {spec!r}")
    _check_names(spec, DIMENSION_KEYS, where, "field")
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind not in KINDS:
        raise SweepError(f"{where}: type must be one of {', '.join(KINDS)}; got {kind!r}")

    def check(value: Any, label: str) -> None:
        try:
            Config.from_dict({**base, key: value})
        except ConfigError as err:
            raise SweepError(f"{where}: {label} {value!r} is not a valid Config value: {err}") from None

    if kind == "categorical":
        extra = sorted(set(spec) - {"type", "choices"})
        if extra:
            raise SweepError(f"{where}: a categorical dimension takes only 'choices'; remove {extra}")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SweepError(f"{where}: choices must be a non-empty list; got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise SweepError(f"{where}: choice {choice!r} is not a scalar (Optuna's categorical choices are "
                                 "null, booleans, numbers or strings)")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SweepError(f"{where}: choices {choices!r} repeat a value")
        for choice in choices:
            check(choice, "choice")
        return Dimension(key, "categorical", choices=tuple(choices))

    if "choices" in spec:
        raise SweepError(f"{where}: 'choices' belongs to type categorical, not {kind}")
    for required in ("low", "high"):
        if required not in spec:
            raise SweepError(f"{where}: a {kind} range needs {required!r}")
    low = _number(spec["low"], key, "low", source)
    high = _number(spec["high"], key, "high", source)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SweepError(f"{where}: log must be true or false; got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, key, "step", source)
    if low >= high:
        raise SweepError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise SweepError(f"{where}: a log-uniform range needs low > 0; got low={low}")
    if log and step is not None:
        raise SweepError(f"{where}: log and step cannot be combined (Optuna samples log ranges continuously)")
    if kind == "int":
        for label, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and not float(value).is_integer():
                raise SweepError(f"{where}: an int range needs integer {label}; got {value!r}")
        low, high = int(low), int(high)
        step = None if step is None else int(step)
        if step is not None and (step < 1 or (high - low) % step):
            raise SweepError(f"{where}: step {step} must be >= 1 and divide high - low ({high - low})")
    else:
        if not _accepts_float(key):
            raise SweepError(f"{where}: {key!r} is an integer Config key; use type: int (or choices)")
        low, high = float(low), float(high)
        if step is not None:
            step = float(step)
            count = (high - low) / step
            if step <= 0 or abs(count - round(count)) > 1e-9:
                raise SweepError(f"{where}: step {step} must be > 0 and divide high - low ({high - low})")
    check(low, "low")
    check(high, "high")
    return Dimension(key, kind, low, high, log, step)


def _named(value: Any, default: str, allowed: tuple, where: str) -> dict:
    """A sampler or pruner setting: a name or {name: ..., option: ...}."""
    if value is None:
        value = {"name": default}
    elif isinstance(value, str):
        value = {"name": value}
    elif not isinstance(value, dict):
        raise SweepError(f"{where} must be a name or a mapping with 'name'; got {value!r}")
    value = dict(value)
    value.setdefault("name", default)
    if value["name"] not in allowed:
        close = difflib.get_close_matches(str(value["name"]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SweepError(f"{where} {value['name']!r} is unknown; allowed: {', '.join(allowed)}{hint}")
    return value
