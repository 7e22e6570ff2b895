"""One typed, validated Config holding every knob, with the seed's parameter names."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A config key, value or file that cannot be used; the message says which and how to fix it."""


def key(default: Any, doc: str, *, choices: Iterable[Any] | None = None, low: float | None = None,
        high: float | None = None, low_open: bool = False) -> Any:
    """Declare a config key: its default, a one-line meaning, and the allowed values or range."""
    metadata = {"doc": doc, "choices": None if choices is None else tuple(choices), "low": low,
                "high": high, "low_open": low_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata)


LR_SCHEDULER_ALIASES = {"StepLR": "step", "CosineAnnealingLR": "cosine", "reduce_on_plateau": "plateau",
                        "ReduceLROnPlateau": "plateau", "linear_decay": "linear"}
MONITORS = ("val_worst_group_acc", "val_acc", "val_balanced_acc", "val_loss", "val_worst_group_loss",
            "val_macro_f1", "test_worst_group_acc", "test_acc", "test_balanced_acc", "test_loss",
            "test_worst_group_loss", "test_macro_f1")
# Keys that do not change what a run computes; left out of the config hash.
NON_RESULT_KEYS = ("run_name", "output_dir", "progress", "log_interval", "tensorboard", "device",
                   "latent_samples_per_group")


@dataclass
class Config:
    """Every knob of a tdro run; defaults are the seed's "Current Settings" where it gives them."""

    # --- run ---
    run_name: str | None = key(None, "label of the run; the run directory is <output_dir>/<run_name or generated id>")
    output_dir: str = key("outputs/runs", "folder that holds run directories")
    seed: int = key(0, "seed for initialisation and batch order (Python, NumPy, torch)")
    device: str = key("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    bf16: bool = key(False, "bf16 autocast for forward passes on CUDA")
    deterministic: bool = key(False, "use deterministic torch algorithms")
    progress: bool = key(True, "show tqdm progress bars")
    log_interval: int = key(50, "steps between records in steps.jsonl", low=1)
    tensorboard: bool = key(False, "also write TensorBoard events under the original tag names")
    max_nonfinite_steps: int = key(5, "non-finite losses in a row that stop the run", low=1)
    latent_samples_per_group: int = key(200, "validation latents per group projected to 2-D each epoch for plots; 0 = off", low=0)

    # --- data keys ---
    dataset: str = key("digits", "dataset name", choices=("digits", "mnist_usps", "heart", "textcaps"))
    data_root: str | None = key(None, "folder holding the dataset's official files")
    download: bool = key(False, "download missing official files (never needed for digits)")
    data_split_seed: int = key(0, "seed of the train/val/test partition, independent of seed")
    val_frac: float = key(0.15, "fraction of training data carved out for validation", low=0.0, high=1.0, low_open=True)
    test_frac: float = key(0.2, "fraction held out for test where the source has no test split", low=0.0, high=1.0, low_open=True)
    batching: str = key("proportional", "per-batch group quotas", choices=("proportional", "balanced"))
    majority_frac: float = key(0.8, "fraction of a skewed group's training samples from its majority classes", low=0.0, high=1.0)
    group_max_train_samples: list | dict | None = key(None, "per-group cap on training samples (list by position or mapping by name; null = no cap)")
    # digits (scikit-learn 8x8 digits; one group per view)
    digits_groups: list = key(["image", "coarse"], "one group per view: image (8x8, cnn), coarse (4x4 pooled, 16-d), masked (checkerboard, 32-d), flat (64-d)")
    digits_sizes: list = key([600, 150], "training samples per digits group")
    digits_majority: list = key([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "majority classes per digits group ([] = balanced)")
    # mnist_usps (official MNIST IDX, USPS LIBSVM or usps.h5)
    mnist_usps_layout: str = key("skewed", "skewed (mnist, usps), skewed3 (mnist28, usps, mnist32) or balanced per-class subsets",
                                 choices=("skewed", "skewed3", "balanced"))
    mnist_usps_pool: bool = key(True, "pool whichever official splits are present, then re-split; false = official train splits only (reference)")
    usps_source: str = key("auto", "USPS files: libsvm (usps.bz2, usps.t.bz2), h5 (usps.h5), auto = the one with more splits present",
                           choices=("auto", "libsvm", "h5"))
    mnist_size: int = key(3000, "skewed: MNIST training samples", low=1)
    usps_size: int = key(1000, "skewed, skewed3: USPS training samples", low=1)
    mnist_majority: list = key([0, 1, 2, 3, 4], "skewed: MNIST majority classes")
    usps_majority: list | None = key(None, "skewed/skewed3: USPS majority classes (null = [5..9] for skewed, [4, 5, 6] for skewed3)")
    mnist28_size: int = key(2000, "skewed3: MNIST-28 training samples", low=1)
    mnist32_size: int = key(2000, "skewed3: MNIST-32 (zero-padded) training samples", low=1)
    mnist28_majority: list = key([0, 1, 2, 3], "skewed3: MNIST-28 majority classes")
    mnist32_majority: list = key([7, 8, 9], "skewed3: MNIST-32 majority classes")
    mnist_total_size: int = key(2000, "balanced: MNIST samples over all splits (total/10 per class)", low=10)
    usps_total_size: int = key(2000, "balanced: USPS samples over all splits (total/10 per class)", low=10)
    # heart (UCI Heart Disease, four hospitals)
    feature_mask: str | list = key("hetagg", "heart columns per hospital: hetagg (reference paper masks), all, or a list of 4 index lists (null = all 13)")
    impute_missing: bool = key(True, "heart: fill missing values with the site's training median (false = drop incomplete rows)")
    n_folds: int | None = key(None, "heart: stratified K-fold per site (test = fold fold_index); null = one test_frac hold-out", low=2)
    fold_index: int = key(0, "heart: which of the n_folds folds is the test fold", low=0)
    # textcaps (TextCaps annotations + images, or lmms-lab/TextCaps through the optional datasets package)
    textcaps_source: str = key("local", "local official files under data_root, or huggingface (lmms-lab/TextCaps; needs datasets and network)",
                               choices=("local", "huggingface"))
    textcaps_groups: list = key(["visual", "text"], "TextCaps groups: visual (image), text (caption), combined (both)")
    textcaps_num_classes: int | None = key(10, "keep the K most frequent first image_classes of the train split (null = all)", low=1)
    textcaps_class_names: list | None = key(None, "explicit class list (overrides textcaps_num_classes)")
    include_combined_group: bool = key(False, "add the combined (image + caption) group")
    spurious_correlation: bool = key(False, "train split: each image goes to one group, correlated with its class")
    spurious_majority_frac: float = key(0.8, "spurious mode: probability an image goes to its class's majority group", low=0.0, high=1.0)
    spurious_group_classes: dict | list | None = key(None, "spurious mode: classes per group (by name or position); null = contiguous class blocks")
    textcaps_image_dir: str | None = key(None, "folder that image_path entries are relative to (null = <root>/images, else <root>)")
    image_size: int = key(224, "textcaps: images are resized to image_size x image_size", low=8)
    text_max_len: int = key(128, "textcaps: captions are truncated or padded to this many characters", low=1)
    feature_cache: bool = key(False, "textcaps: visual group reads cached frozen ResNet-18 features (512-d) instead of images")
    feature_cache_dir: str = key("outputs/cache", "folder of the feature cache")
    feature_backbone_weights: str = key("imagenet", "feature cache backbone: imagenet (torch hub cache, never downloaded), random (seeded), or a .pth path")
    # --- end data keys ---

    # --- model ---
    latent_dim: int = key(64, "shared latent dimension k", low=1)
    head_hidden: int = key(128, "hidden units of the MLP head; 0 = linear head", low=0)
    head_dropout: float = key(0.3, "dropout of the MLP head", low=0.0, high=1.0)
    groups: list | None = key(None, "per-group encoder overrides: [{name?, encoder, options...}]")
    visual_encoder: str | None = key(None, "encoder for every image group (shortcut for groups)")
    text_encoder: str | None = key(None, "encoder for every text group (shortcut for groups)")
    common_encoder: bool = key(False, "one shared encoder for all groups (shared-encoder baseline)")

    # --- anchors ---
    anchor_eps: float = key(1e-4, "ridge epsilon in S = L L^T + eps I", low=0.0, low_open=True)
    anchor_covariance: str = key("full", "anchor covariance", choices=("full", "diagonal"))
    sep_samples_per_class: int = key(16, "J: samples per anchor for the classifier separation loss", low=1)
    sep_method: str = key("classifier", "separation loss", choices=("classifier", "w2_margin"))
    sep_margin: float = key(2.0, "hinge margin on squared W2 for w2_margin", low=0.0)
    lambda_fit: float = key(1e-3, "weight of the anchor fit loss", low=0.0)
    lambda_sep: float = key(1e-3, "weight of the anchor separation loss", low=0.0)
    per_group_fit: bool = key(False, "batch moments per (group, class) instead of pooled over groups")

    # --- GroupDRO ---
    groupdro_enabled: bool = key(False, "reweight per-group losses with GroupDRO (else ERM)")
    groupdro_eta: float = key(0.01, "GroupDRO step size eta", low=0.0, low_open=True)
    groupdro_gamma: float = key(0.9, "exp_smooth smoothing: larger = smoother, 0 = plain exp", low=0.0, high=1.0)
    groupdro_warmup_epochs: int = key(2, "epochs with q held at its initial value", low=0)
    groupdro_update_mode: str = key("exp_smooth", "q update rule", choices=("exp", "softmax", "exp_smooth"))
    groupdro_objective: str = key("weighted", "robust loss", choices=("weighted", "max", "logsumexp"))
    groupdro_init: str = key("uniform", "initial q", choices=("uniform", "proportional"))
    groupdro_min_group_weight: float = key(0.0, "exact floor on every group weight", low=0.0, high=1.0)
    groupdro_adjustment: float = key(0.0, "generalisation adjustment C in l_g + C/sqrt(n_g)", low=0.0)
    groupdro_cells: str = key("group", "what GroupDRO weights: whole groups, or (group, class) cells as Sagawa et al.'s groups",
                              choices=("group", "group_class"))
    groupdro_update_timing: str = key("after_step", "update q after the optimiser step (reference) or before the loss (Sagawa et al.)",
                                      choices=("after_step", "before_loss"))

    # --- optimisation ---
    optimizer: str = key("adam", "optimiser", choices=("adam", "adamw", "sgd"))
    lr: float = key(1e-3, "base learning rate", low=0.0, low_open=True)
    lr_backbone: float | None = key(None, "learning rate of pretrained backbones (default lr)", low=0.0)
    lr_new: float | None = key(None, "learning rate of new layers, head and anchors (default lr)", low=0.0)
    weight_decay: float = key(1e-4, "weight decay", low=0.0)
    momentum: float = key(0.9, "SGD momentum", low=0.0, high=1.0)
    nesterov: bool = key(False, "SGD Nesterov momentum")
    grad_clip: float = key(1.0, "gradient-norm clip; 0 = off", low=0.0)
    batch_size: int = key(32, "samples per batch over all groups", low=1)
    eval_batch_size: int = key(512, "samples per evaluation batch", low=1)
    epochs: int = key(10, "training epochs", low=1)
    freeze_backbone_epochs: int = key(0, "epochs with backbone parameters frozen", low=0)

    # --- learning-rate schedule (per epoch) ---
    lr_scheduler: str = key("none", "LR schedule", choices=("none", "linear", "step", "cosine", "plateau"))
    lr_start: float | None = key(None, "linear schedule: LR at the first epoch (seed option A)", low=0.0)
    lr_end: float | None = key(None, "linear schedule: LR at the last epoch", low=0.0)
    lr_step_size: int = key(15, "StepLR: epochs between decays", low=1)
    lr_gamma: float = key(0.1, "StepLR: decay factor", low=0.0, high=1.0, low_open=True)
    T_max: int | None = key(None, "cosine: period in epochs (default epochs)", low=1)
    eta_min: float = key(0.0, "cosine: final LR", low=0.0)
    plateau_factor: float = key(0.5, "plateau: decay factor", low=0.0, high=1.0, low_open=True)
    plateau_patience: int = key(5, "plateau: epochs without improvement before decaying", low=0)
    lr_warmup_epochs: int = key(0, "epochs of linear LR warm-up before the schedule", low=0)

    # --- selection ---
    monitor: str = key("val_worst_group_acc", "metric for best checkpoint and early stopping", choices=MONITORS)
    early_stopping_patience: int = key(0, "epochs without improvement of monitor before stopping; 0 = off", low=0)
    allow_test_selection: bool = key(False, "permit a test_* monitor (labelled in every record)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f, getattr(self, f.name)))
        self._resolve_schedule()
        self._check_conflicts()

    def _resolve_schedule(self) -> None:
        self.lr_scheduler = LR_SCHEDULER_ALIASES.get(self.lr_scheduler, self.lr_scheduler)
        if self.lr_scheduler == "none" and self.lr_start is not None and self.lr_end is not None:
            self.lr_scheduler = "linear"

    def _check_conflicts(self) -> None:
        has_linear_keys = self.lr_start is not None or self.lr_end is not None
        if self.lr_scheduler == "linear" and (self.lr_start is None or self.lr_end is None):
            raise ConfigError("lr_scheduler 'linear' needs both lr_start and lr_end "
                              f"(got lr_start={self.lr_start}, lr_end={self.lr_end})")
        if self.lr_scheduler not in ("linear", "none") and has_linear_keys:
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r} conflicts with lr_start/lr_end "
                              f"(got lr_start={self.lr_start}, lr_end={self.lr_end}); remove them or use the linear schedule")
        if self.lr_scheduler == "none" and has_linear_keys:
            raise ConfigError(f"lr_start and lr_end must be set together (got lr_start={self.lr_start}, lr_end={self.lr_end})")
        if self.monitor.startswith("test_") and not self.allow_test_selection:
            raise ConfigError(f"monitor {self.monitor!r} selects on the test split; set allow_test_selection: true "
                              "to permit it, or use a val_* monitor")
        if self.groups is not None:
            for i, entry in enumerate(self.groups):
                if not isinstance(entry, dict) or not isinstance(entry.get("encoder", ""), str):
                    raise ConfigError(f"groups[{i}] must be a mapping like {{name: mnist, encoder: cnn}}; got {entry!r}")

    # --- construction and serialisation ---
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "Config":
        """Build from a mapping; unknown keys fail with the closest valid key."""
        unknown = [k for k in values if k not in cls.keys()]
        if unknown:
            raise ConfigError("; ".join(_unknown_key_message(k, source) for k in unknown))
        return cls(**dict(values))

    @classmethod
    def load(cls, files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None) -> "Config":
        """Merge YAML files in order, then overrides (values or 'key=value' strings already split)."""
        merged: dict[str, Any] = {}
        for path in files:
            merged.update(read_yaml_mapping(path))
        merged.update(coerce_overrides(overrides or {}))
        return cls.from_dict(merged, source="parameters")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> "Config":
        return Config.from_dict({**self.to_dict(), **changes})

    def result_hash(self) -> str:
        """Hash of every key that changes results, to find a finished run again."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in NON_RESULT_KEYS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read one YAML parameter file; it must be a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"parameter file {path} is not valid YAML: {err}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping of key: value, got {type(values).__name__}")
    unknown = [k for k in values if k not in Config.keys()]
    if unknown:
        raise ConfigError("; ".join(_unknown_key_message(k, str(path)) for k in unknown))
    return values


def named_params_file(folder: Path, name: str, what: str, plural: str, error: type[Exception] = ConfigError) -> Path:
    """``<folder>/<name>.yaml`` for a bare name such as ``groupdro``; else an error listing the names there."""
    candidate = folder / f"{name}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise error(f"no {what} {name!r} in {folder}; {plural}: {', '.join(known) or 'none'}")
    return candidate


def coerce_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Parse string values of overrides as YAML scalars (so 'lr=3e-4' and '-p groups [...]' work)."""
    parsed = {}
    for name, value in overrides.items():
        parsed[name] = _parse_scalar(value) if isinstance(value, str) else value
    return parsed


def _parse_scalar(text: str) -> Any:
    """A command-line value as YAML ('3e-4', 'true', '[64, 128]'); text that is not YAML stays text."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """Turn ['lr=1e-3', 'epochs=5'] into an overrides mapping."""
    result = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        name, value = item.split("=", 1)
        result[name.strip()] = value
    return result


def _unknown_key_message(name: str, source: str) -> str:
    close = difflib.get_close_matches(name, Config.keys(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; see tdro.config.Config for the valid keys"
    return f"unknown key {name!r} in {source}{hint}"


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _allowed_types(name: str) -> tuple[tuple[type, ...], bool]:
    hint = _type_hints()[name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        concrete = tuple(typing.get_origin(a) or a for a in args if a is not type(None))
        return concrete, type(None) in args
    return (typing.get_origin(hint) or hint,), False


def _check_value(f: dataclasses.Field, value: Any) -> Any:
    allowed, optional = _allowed_types(f.name)
    meta = f.metadata
    if value is None:
        if optional:
            return None
        raise ConfigError(f"key {f.name!r} must not be empty (null); {meta['doc']}")
    value = _coerce(f.name, value, allowed)
    choices = meta["choices"]
    if choices is not None and f.name == "lr_scheduler":
        choices = choices + tuple(LR_SCHEDULER_ALIASES)
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"key {f.name!r} has value {value!r}; allowed: {', '.join(map(str, choices))}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_range(f.name, value, meta)
    return value


def _coerce(name: str, value: Any, allowed: tuple[type, ...]) -> Any:
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif float in allowed and isinstance(value, (int, float)):
        return float(value)
    elif int in allowed and isinstance(value, int):
        return value
    elif int in allowed and isinstance(value, float) and value.is_integer():
        return int(value)
    elif float in allowed and isinstance(value, str) and _is_float_text(value):
        return float(value)
    elif isinstance(value, allowed):
        return value
    expected = " or ".join(t.__name__ for t in allowed)
    raise ConfigError(f"key {name!r} has value {value!r} of type {type(value).__name__}; expected {expected}")


def _is_float_text(text: str) -> bool:
    """YAML 1.1 reads '1e-3' as a string; accept it where a float is expected."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_range(name: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta["low"], meta["high"]
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"key {name!r} has value {value!r}; it must be finite")
    too_low = low is not None and (value <= low if meta["low_open"] else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lower = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
        upper = "" if high is None else f"<= {high}"
        allowed = " and ".join(part for part in (lower, upper) if part)
        raise ConfigError(f"key {name!r} has value {value!r}; allowed: {allowed}")
