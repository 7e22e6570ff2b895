"""One typed, validated Config holding every knob, with the seed's parameter names."""
from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from tdro.algorithms import ALGORITHMS, algorithm_key_blocks, algorithm_key_owners
from tdro.atomic import replace_atomically
from tdro.keys import ConfigError, key


LR_SCHEDULER_ALIASES = {"StepLR": "step", "CosineAnnealingLR": "cosine", "reduce_on_plateau": "plateau",
                        "ReduceLROnPlateau": "plateau", "linear_decay": "linear"}
MONITORS = ("val_worst_group_acc", "val_acc", "val_balanced_acc", "val_loss", "val_worst_group_loss",
            "val_macro_f1", "test_worst_group_acc", "test_acc", "test_balanced_acc", "test_loss",
            "test_worst_group_loss", "test_macro_f1")
# Keys that do not change what a run computes; left out of the config hash.
NON_RESULT_KEYS = ("run_name", "output_dir", "progress", "log_interval", "tensorboard", "device",
                   "latent_samples_per_group", "threads", "num_workers", "pin_memory")
SEED_MAX = 2**32 - 1  # NumPy's legacy seed and the split seeds take 32 bits
CLASS_IDS = (0, 9)  # digits and mnist_usps both have the ten classes 0..9
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Data keys that only one dataset reads (the others ignore them).
DATASET_KEYS = {
    "digits": ("digits_groups", "digits_sizes", "digits_majority"),
    "mnist_usps": ("mnist_usps_layout", "mnist_usps_pool", "usps_source", "mnist_size", "usps_size", "mnist_majority",
                   "usps_majority", "mnist28_size", "mnist32_size", "mnist28_majority", "mnist32_majority",
                   "mnist_total_size", "usps_total_size"),
    "heart": ("feature_mask", "impute_missing", "n_folds", "fold_index"),
    "textcaps": ("textcaps_source", "textcaps_groups", "textcaps_num_classes", "textcaps_class_names",
                 "include_combined_group", "spurious_correlation", "spurious_majority_frac", "spurious_group_classes",
                 "textcaps_image_dir", "image_size", "text_max_len", "feature_cache", "feature_cache_dir",
                 "feature_backbone_weights", "image_cache", "image_cache_size", "augment", "augment_min_scale"),
}
# mnist_usps keys read by only some layouts.
LAYOUT_KEYS = {"mnist_size": ("skewed",), "mnist_majority": ("skewed",), "usps_size": ("skewed", "skewed3"),
               "usps_majority": ("skewed", "skewed3"), "mnist28_size": ("skewed3",), "mnist32_size": ("skewed3",),
               "mnist28_majority": ("skewed3",), "mnist32_majority": ("skewed3",), "mnist_total_size": ("balanced",),
               "usps_total_size": ("balanced",)}
# GroupDRO keys that only shape the group weights q, which the max and logsumexp objectives do not use.
Q_KEYS = ("groupdro_update_mode", "groupdro_gamma", "groupdro_init", "groupdro_min_group_weight",
          "groupdro_adjustment", "groupdro_warmup_epochs", "groupdro_update_timing")
# The seed's GroupDRO keys: set while another algorithm runs they only warn (the seed's YAML sets them with
# GroupDRO off); every other algorithm's key set for an algorithm that does not read it is an error.
LEGACY_KEY_PREFIX = "groupdro_"
_WARNED: set[str] = set()


@dataclass
class Config(*algorithm_key_blocks()):
    """Every knob of a tdro run; defaults are the seed's "Current Settings" where it gives them."""

    # --- run ---
    run_name: str | None = key(None, "label of the run, one folder name; the run directory is <output_dir>/<run_name or generated id>")
    output_dir: str = key("outputs/runs", "folder that holds run directories (not empty)")
    seed: int = key(0, "seed for initialisation and batch order (Python, NumPy, torch)", low=0, high=SEED_MAX)
    device: str = key("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps; availability is checked when training starts")
    bf16: bool = key(False, "bf16 autocast for forward passes on CUDA")
    threads: int = key(1, "torch CPU threads for this run (torch.set_num_threads); 0 = torch's default (all cores). "
                          "1 is never catastrophically slow on a shared machine; raise it for a lone CPU run on many cores",
                       low=0, high=1024)
    deterministic: bool = key(False, "use deterministic torch algorithms")
    progress: bool = key(True, "a line per epoch, and one progress bar over the run on a terminal or in a notebook; false: quiet (studies)")
    log_interval: int = key(50, "steps between records in steps.jsonl", low=1)
    tensorboard: bool = key(False, "also write TensorBoard events under the original tag names")
    max_nonfinite_steps: int = key(5, "non-finite losses in a row that stop the run", low=1)
    latent_samples_per_group: int = key(200, "validation latents per group projected to 2-D each epoch for plots; 0 = off", low=0)

    # --- data keys ---
    dataset: str = key("digits", "dataset name", choices=("digits", "mnist_usps", "heart", "textcaps"))
    data_root: str | None = key(None, "folder holding the dataset's official files")
    download: bool = key(False, "download missing official files (never needed for digits)")
    data_split_seed: int = key(0, "seed of the train/val/test partition, independent of seed", low=0, high=SEED_MAX)
    val_frac: float = key(0.15, "fraction of training data carved out for validation", low=0.0, high=1.0, low_open=True, high_open=True)
    test_frac: float = key(0.2, "fraction held out for test where the source has no test split", low=0.0, high=1.0, low_open=True,
                           high_open=True)
    batching: str = key("proportional", "per-batch group quotas", choices=("proportional", "balanced"))
    majority_frac: float = key(0.8, "fraction of a skewed group's training samples from its majority classes", low=0.0, high=1.0)
    group_max_train_samples: list | dict | None = key(None, "per-group cap on training samples (list by position or mapping by name; null = no cap)")
    only_groups: list | None = key(None, "train and evaluate only these groups (by name); null = all; stage runs of regret_dro use it")
    # digits (scikit-learn 8x8 digits; one group per view)
    digits_groups: list = key(["image", "coarse"], "one group per view: image (8x8, cnn), coarse (4x4 pooled, 16-d), masked (checkerboard, 32-d), flat (64-d)")
    digits_sizes: list = key([600, 150], "training samples per digits group", items=(1, None))
    # class ids 0..9 are checked by the digits builder
    digits_majority: list = key([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], "majority classes per digits group ([] = balanced)",
                                items=(None, None), nested=True)
    # mnist_usps (official MNIST IDX, USPS LIBSVM or usps.h5)
    mnist_usps_layout: str = key("skewed", "skewed (mnist, usps), skewed3 (mnist28, usps, mnist32) or balanced per-class subsets",
                                 choices=("skewed", "skewed3", "balanced"))
    mnist_usps_pool: bool = key(True, "pool whichever official splits are present, then re-split; false = official train splits only (reference)")
    usps_source: str = key("auto", "USPS files: libsvm (usps.bz2, usps.t.bz2), h5 (usps.h5), auto = the one with more splits present",
                           choices=("auto", "libsvm", "h5"))
    mnist_size: int = key(3000, "skewed: MNIST training samples", low=1)
    usps_size: int = key(1000, "skewed, skewed3: USPS training samples", low=1)
    mnist_majority: list = key([0, 1, 2, 3, 4], "skewed: MNIST majority classes", items=CLASS_IDS)
    usps_majority: list | None = key(None, "skewed/skewed3: USPS majority classes (null = [5..9] for skewed, [4, 5, 6] for skewed3)",
                                     items=CLASS_IDS)
    mnist28_size: int = key(2000, "skewed3: MNIST-28 training samples", low=1)
    mnist32_size: int = key(2000, "skewed3: MNIST-32 (zero-padded) training samples", low=1)
    mnist28_majority: list = key([0, 1, 2, 3], "skewed3: MNIST-28 majority classes", items=CLASS_IDS)
    mnist32_majority: list = key([7, 8, 9], "skewed3: MNIST-32 majority classes", items=CLASS_IDS)
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
    feature_cache_dir: str = key("outputs/cache", "folder of the feature cache and of the decoded-image cache")
    feature_backbone_weights: str = key("imagenet", "feature cache backbone: imagenet (torch hub cache, never downloaded), random (seeded), or a .pth path")
    # input pipeline for image fine-tuning (num_workers and pin_memory serve every dataset; batches do not depend on them)
    image_cache: bool = key(False, "textcaps: decode each image once into a uint8 memory map of side image_cache_size under "
                                   "feature_cache_dir; training reads it at memory speed (for fine-tuning)")
    image_cache_size: int | None = key(None, "textcaps: side of the cached images, at least image_size (null = image_size, "
                                             "or image_size x 8/7 with augment: 256 for 224)", low=8)
    augment: bool = key(False, "textcaps: random resized crop + horizontal flip of training images on the training device, "
                               "seeded by seed and step (evaluation is never augmented)")
    augment_min_scale: float = key(0.25, "textcaps: smallest crop area of augment, as a fraction of the image", low=0.0,
                                   high=1.0, low_open=True)
    num_workers: int = key(0, "worker processes that prepare training batches while the model computes; 0 = in the "
                              "training thread", low=0, high=64)
    pin_memory: bool | None = key(None, "page-locked training batches for faster copies to CUDA (null = when the device "
                                        "is CUDA; true needs CUDA)")
    # --- end data keys ---

    # --- model ---
    latent_dim: int = key(64, "shared latent dimension k, at most 8192 (each class's anchor holds a k x k factor)",
                          low=1, high=8192)
    head_hidden: int = key(128, "hidden units of the MLP head; 0 = linear head", low=0)
    head_dropout: float = key(0.3, "dropout of the MLP head (below 1: 1 drops every unit)", low=0.0, high=1.0, high_open=True)
    groups: list | None = key(None, "per-group encoder overrides: [{name?, encoder, options...}]")
    visual_encoder: str | None = key(None, "encoder for every image group (shortcut for groups)")
    text_encoder: str | None = key(None, "encoder for every text group (shortcut for groups)")
    common_encoder: bool = key(False, "one shared encoder for all groups (shared-encoder baseline)")

    # --- anchors ---
    anchor_eps: float = key(1e-4, "ridge epsilon in S = L L^T + eps I; >= 1e-10 so S's float64 Cholesky factor exists at the norm clip", low=1e-10)
    anchor_covariance: str = key("full", "anchor covariance: full (S = L L^T + eps I, a k x k factor per class), "
                                         "lowrank (S = U U^T + diag(d) + eps I, U of k x anchor_rank) or diagonal",
                                 choices=("full", "lowrank", "diagonal"))
    anchor_rank: int = key(16, "lowrank anchors: rank r of U (1..latent_dim)", low=1)
    anchor_targets: str = key("learned", "learned anchors, or random_fixed: random means and covariances drawn once "
                                         "from the run's seed and never trained (a fixed-target control)",
                              choices=("learned", "random_fixed"))
    sep_samples_per_class: int = key(16, "J: samples per anchor for the classifier separation loss", low=1)
    sep_method: str = key("classifier", "separation loss", choices=("classifier", "w2_margin"))
    sep_margin: float = key(2.0, "hinge margin on squared W2 for w2_margin", low=0.0)
    lambda_fit: float = key(1e-3, "weight of the anchor fit loss", low=0.0)
    lambda_sep: float = key(1e-3, "weight of the anchor separation loss", low=0.0)
    per_group_fit: bool = key(False, "batch moments per (group, class) instead of pooled over groups")

    # --- algorithm (its own keys are declared by the algorithm's module: tdro/algorithms/) ---
    algorithm: str | None = key(None, "training objective: " + ", ".join(ALGORITHMS.names()) + " (null = groupdro if "
                                      "groupdro_enabled, else erm)", choices=ALGORITHMS.names())
    groupdro_enabled: bool | None = key(None, "the seed's switch: true means algorithm groupdro, false any other "
                                              "(null = follow algorithm)")
    groupdro_cells: str = key("group", "what a group is for the group-weighting algorithms: whole groups, or "
                                       "(group, class) cells as Sagawa et al.'s groups", choices=("group", "group_class"))

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
    eval_batch_size: int | None = key(None, "samples per evaluation batch; null = by device: 128 on CPU (as fast "
                                            "as larger batches there, in less memory), 1024 otherwise", low=1)
    epochs: int = key(10, "training epochs, at most 100000", low=1, high=100_000)
    freeze_backbone_epochs: int = key(0, "epochs with backbone parameters frozen (at most epochs)", low=0)

    # --- learning-rate schedule (per epoch) ---
    lr_scheduler: str = key("none", "LR schedule", choices=("none", "linear", "step", "cosine", "plateau"))
    lr_start: float | None = key(None, "linear schedule: LR at the first epoch (seed option A); > 0, as each epoch's "
                                       "LR factor is that epoch's LR / lr_start", low=0.0, low_open=True)
    lr_end: float | None = key(None, "linear schedule: LR at the last epoch", low=0.0)
    lr_step_size: int = key(15, "StepLR: epochs between decays", low=1)
    lr_gamma: float = key(0.1, "StepLR: decay factor", low=0.0, high=1.0, low_open=True)
    T_max: int | None = key(None, "cosine: period in epochs (default epochs)", low=1)
    eta_min: float = key(0.0, "cosine: LR floor relative to lr (0..lr): each parameter group falls from its base LR "
                              "(lr_backbone, lr_new or lr) to base LR x eta_min / lr at T_max and stays there, so eta_min "
                              "is the final LR only of a group whose base LR is lr", low=0.0)
    plateau_factor: float = key(0.5, "plateau: decay factor", low=0.0, high=1.0, low_open=True)
    plateau_patience: int = key(5, "plateau: epochs without improvement before decaying", low=0)
    lr_warmup_epochs: int = key(0, "epochs of linear LR warm-up before the schedule (at most epochs)", low=0)

    # --- selection ---
    monitor: str = key("val_worst_group_acc", "metric for best checkpoint and early stopping", choices=MONITORS)
    early_stopping_patience: int = key(0, "epochs without improvement of monitor before stopping; 0 = off", low=0)
    allow_test_selection: bool = key(False, "permit a test_* monitor (labelled in every record)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f, getattr(self, f.name)))
        self._resolve_schedule()
        self._resolve_algorithm()
        self._check_paths()
        self._check_conflicts()
        self._check_epoch_counts()

    def _resolve_schedule(self) -> None:
        self.lr_scheduler = LR_SCHEDULER_ALIASES.get(self.lr_scheduler, self.lr_scheduler)
        if self.lr_scheduler == "none" and self.lr_start is not None and self.lr_end is not None:
            self.lr_scheduler = "linear"

    def _resolve_algorithm(self) -> None:
        """``groupdro_enabled`` (the seed's switch) and ``algorithm`` agree; then the algorithm checks its keys."""
        enabled, chosen = self.groupdro_enabled, self.algorithm
        if enabled is True and chosen not in (None, "groupdro"):
            raise ConfigError(f"groupdro_enabled is true but algorithm is {chosen!r}; groupdro_enabled: true means "
                              "algorithm: groupdro: remove one of the two keys")
        if enabled is False and chosen == "groupdro":
            raise ConfigError("groupdro_enabled is false but algorithm is 'groupdro'; remove one of the two keys")
        self.algorithm = chosen or ("groupdro" if enabled else "erm")
        self.groupdro_enabled = self.algorithm == "groupdro"
        algorithm = ALGORITHMS.get(self.algorithm)
        reads = set(algorithm.key_names())
        defaults = _defaults()
        foreign = [f"{name!r} (read by {', '.join(owners)})" for name, owners in algorithm_key_owners().items()
                   if name not in reads and not name.startswith(LEGACY_KEY_PREFIX)
                   and getattr(self, name) != defaults[name]]
        if foreign:
            raise ConfigError(f"algorithm {self.algorithm!r} does not read key(s) {', '.join(foreign)}; remove them "
                              "or choose the algorithm that reads them")
        algorithm.check(self)

    def _check_paths(self) -> None:
        """output_dir is a folder; run_name is one folder name inside it, never a path out of it."""
        if not self.output_dir.strip():
            raise ConfigError(f"key 'output_dir' has value {self.output_dir!r}; allowed: a folder path such as outputs/runs "
                              "(an empty path would put runs in the current folder)")
        name = self.run_name
        if name is not None and not is_folder_name(name):
            raise ConfigError(f"key 'run_name' has value {name!r}; a run_name is one folder name inside output_dir "
                              "(not empty, not '.' or '..', no '/' or '\\'); use output_dir to choose the folder")

    def _check_epoch_counts(self) -> None:
        """Epoch-valued keys that would outlast the run (and so never end) are errors."""
        counts = {"freeze_backbone_epochs": self.freeze_backbone_epochs, "lr_warmup_epochs": self.lr_warmup_epochs}
        if "groupdro_warmup_epochs" in ALGORITHMS.get(self.algorithm).key_names():
            counts["groupdro_warmup_epochs"] = self.groupdro_warmup_epochs
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, value in counts.items():
            if value > self.epochs and value != defaults[name]:  # an unset default warm-up just covers the run
                raise ConfigError(f"key {name!r} has value {value} but epochs is {self.epochs}; "
                                  f"allowed: 0..epochs (raise epochs or lower {name})")

    def _check_conflicts(self) -> None:
        if self.anchor_covariance == "lowrank" and self.anchor_rank > self.latent_dim:
            raise ConfigError(f"key 'anchor_rank' has value {self.anchor_rank} but latent_dim is {self.latent_dim}; "
                              f"allowed: 1..latent_dim (1..{self.latent_dim}) for anchor_covariance 'lowrank'")
        has_linear_keys = self.lr_start is not None or self.lr_end is not None
        if self.lr_scheduler == "linear" and (self.lr_start is None or self.lr_end is None):
            raise ConfigError("lr_scheduler 'linear' needs both lr_start and lr_end "
                              f"(got lr_start={self.lr_start}, lr_end={self.lr_end})")
        if self.lr_scheduler not in ("linear", "none") and has_linear_keys:
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r} conflicts with lr_start/lr_end "
                              f"(got lr_start={self.lr_start}, lr_end={self.lr_end}); remove them or use the linear schedule")
        if self.lr_scheduler == "none" and has_linear_keys:
            raise ConfigError(f"lr_start and lr_end must be set together (got lr_start={self.lr_start}, lr_end={self.lr_end})")
        if self.lr_scheduler == "cosine" and self.eta_min > self.lr:
            raise ConfigError(f"key 'eta_min' has value {self.eta_min} but lr is {self.lr}; allowed: 0..lr "
                              "(the cosine schedule ends each parameter group at its base LR x eta_min / lr)")
        if self.monitor.startswith("test_") and not self.allow_test_selection:
            raise ConfigError(f"monitor {self.monitor!r} selects on the test split; set allow_test_selection: true "
                              "to permit it, or use a val_* monitor")
        if self.groups is not None:
            for i, entry in enumerate(self.groups):
                if not isinstance(entry, dict) or not isinstance(entry.get("encoder", ""), str):
                    raise ConfigError(f"groups[{i}] must be a mapping like {{name: mnist, encoder: cnn}}; got {entry!r}")

    # --- keys without effect ---
    def inactive_key_warnings(self) -> list[str]:
        """One message per key set to a non-default value that has no effect in this setting."""
        defaults = _defaults()
        messages = []
        for names, reason in self._inactive_keys():
            for name in names:
                value = getattr(self, name)
                if value != defaults[name]:
                    messages.append(f"key {name!r} is set to {value!r} but has no effect: {reason}")
        return messages

    def _inactive_keys(self) -> list[tuple[tuple[str, ...], str]]:
        """(keys, why they have no effect) for every rule that applies to this config."""
        rules: list[tuple[tuple[str, ...], str]] = []
        reads = ALGORITHMS.get(self.algorithm).key_names()
        for name, owners in algorithm_key_owners().items():
            if name not in reads:
                rules.append(((name,), f"only algorithm {' or '.join(map(repr, owners))} reads it "
                                       f"(algorithm is {self.algorithm!r})"))
        if "groupdro_objective" in reads and self.groupdro_objective != "weighted":
            rules.append((Q_KEYS, f"groupdro_objective {self.groupdro_objective!r} does not use the group weights q "
                                  "(they are only recorded)"))
            if self.groupdro_objective == "max":
                rules.append((("groupdro_eta",), "groupdro_objective 'max' takes the largest group loss; "
                                                 "eta enters only q and logsumexp"))
        elif "groupdro_update_mode" in reads and self.groupdro_update_mode != "exp_smooth":
            rules.append((("groupdro_gamma",), "only groupdro_update_mode 'exp_smooth' reads it "
                                               f"(groupdro_update_mode is {self.groupdro_update_mode!r})"))
        if self.lambda_sep == 0:
            rules.append((("sep_method", "sep_margin", "sep_samples_per_class"), "lambda_sep is 0 (no separation loss)"))
        elif self.sep_method == "classifier":
            rules.append((("sep_margin",), "only sep_method 'w2_margin' reads it (sep_method is 'classifier')"))
        else:
            rules.append((("sep_samples_per_class",), "only sep_method 'classifier' reads it (sep_method is 'w2_margin')"))
        if self.lambda_fit == 0:
            rules.append((("per_group_fit",), "lambda_fit is 0 (no fit loss)"))
        if self.lambda_fit == 0 and self.lambda_sep == 0:
            rules.append((("anchor_targets",), "lambda_fit and lambda_sep are 0 (no anchor loss)"))
        elif self.anchor_targets == "random_fixed" and self.lambda_sep > 0 and self.sep_method == "w2_margin":
            rules.append((("lambda_sep", "sep_margin"), "sep_method 'w2_margin' moves only the anchors, which "
                                                        "anchor_targets 'random_fixed' holds fixed"))
        if self.anchor_covariance != "lowrank":
            rules.append((("anchor_rank",), "only anchor_covariance 'lowrank' reads it "
                                            f"(anchor_covariance is {self.anchor_covariance!r})"))
        if self.head_hidden == 0:
            rules.append((("head_dropout",), "head_hidden is 0 (a linear head has no dropout)"))
        if self.optimizer != "sgd":
            rules.append((("momentum", "nesterov"), f"only optimizer 'sgd' reads it (optimizer is {self.optimizer!r})"))
        for scheduler, names in (("step", ("lr_step_size", "lr_gamma")), ("cosine", ("T_max", "eta_min")),
                                 ("plateau", ("plateau_factor", "plateau_patience"))):
            if self.lr_scheduler != scheduler:
                rules.append((names, f"only lr_scheduler {scheduler!r} reads it (lr_scheduler is {self.lr_scheduler!r})"))
        if self.lr_scheduler == "linear":
            rules.append((("lr",), "the linear schedule starts at lr_start"))
        elif self.lr_scheduler != "cosine" and self.lr_backbone is not None and self.lr_new is not None:
            rules.append((("lr",), "lr_backbone and lr_new set every parameter group's LR"))
        if self.allow_test_selection and not self.monitor.startswith("test_"):
            rules.append((("allow_test_selection",), f"monitor {self.monitor!r} is not a test_* metric"))
        rules += self._inactive_data_keys()
        return rules

    def _inactive_data_keys(self) -> list[tuple[tuple[str, ...], str]]:
        """Data keys that the chosen dataset (and its layout or mode) does not read."""
        rules = [(names, f"only dataset {owner!r} reads it (dataset is {self.dataset!r})")
                 for owner, names in DATASET_KEYS.items() if owner != self.dataset]
        if self.dataset == "digits":
            rules.append((("data_root", "download"), "dataset 'digits' is embedded (scikit-learn)"))
        draws_majority = self.dataset == "digits" or self.dataset == "mnist_usps" and self.mnist_usps_layout != "balanced"
        if not draws_majority:
            rules.append((("majority_frac",), "only digits and the skewed mnist_usps layouts draw majority classes"))
        if self.dataset == "mnist_usps":
            rules += [((name,), f"only mnist_usps_layout {' or '.join(layouts)} reads it "
                                f"(mnist_usps_layout is {self.mnist_usps_layout!r})")
                      for name, layouts in LAYOUT_KEYS.items() if self.mnist_usps_layout not in layouts]
        if self.dataset == "textcaps" or self.dataset == "heart" and self.n_folds is not None:
            rules.append((("test_frac",), "the test split is the official val split (textcaps) or a fold (heart)"))
        if self.dataset == "heart" and self.n_folds is None:
            rules.append((("fold_index",), "n_folds is null (one test_frac hold-out)"))
        if self.dataset == "textcaps":
            if not self.spurious_correlation:
                rules.append((("spurious_majority_frac", "spurious_group_classes"), "spurious_correlation is false"))
            if self.textcaps_class_names is not None:
                rules.append((("textcaps_num_classes",), "textcaps_class_names lists the classes"))
            if not self.feature_cache:
                rules.append((("feature_backbone_weights",), "feature_cache is false"))
                if not self.image_cache:
                    rules.append((("feature_cache_dir",), "feature_cache and image_cache are false"))
            else:
                rules.append((("image_cache", "image_cache_size", "augment", "augment_min_scale"),
                              "feature_cache is true (the visual group reads features, not images)"))
            if not self.image_cache:
                rules.append((("image_cache_size",), "image_cache is false"))
            if not self.augment:
                rules.append((("augment_min_scale",), "augment is false"))
            if self.textcaps_source != "local":
                rules.append((("textcaps_image_dir",), f"textcaps_source is {self.textcaps_source!r}"))
        return rules

    # --- construction and serialisation ---
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "Config":
        """Build from a mapping; unknown keys fail with the closest valid key."""
        _check_key_names(values, source)
        return cls(**dict(values))

    @classmethod
    def load(cls, files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None) -> "Config":
        """Merge YAML files in order, then overrides (values or 'key=value' strings already split)."""
        merged: dict[str, Any] = {}
        for path in files:
            merged.update(read_yaml_mapping(path))
        merged.update(coerce_overrides(overrides or {}))
        config = cls.from_dict(merged, source="parameters")
        for message in config.inactive_key_warnings():
            _warn_once(message)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Every key: Config's own in their order, then the algorithms' keys."""
        values = dataclasses.asdict(self)
        return {name: values[name] for name in _key_order()}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file in the same folder, fsync, rename): a kill leaves the old file or the new one."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        replace_atomically(path, lambda handle: handle.write(text))

    def replace(self, **changes: Any) -> "Config":
        """A copy with changes (``merge_changes``: a new algorithm or groupdro_enabled alone lets the other follow)."""
        return Config.from_dict(merge_changes(self.to_dict(), changes))

    def result_hash(self) -> str:
        """Hash of every key that changes results, to find a finished run again."""
        relevant = {k: v for k, v in self.to_dict().items() if k not in NON_RESULT_KEYS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def merge_changes(values: Mapping[str, Any], *changes: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` updated by each mapping of ``changes`` in turn, as studies layer base, setting and arm.

    ``algorithm`` and ``groupdro_enabled`` name the same choice: a layer that sets one of them alone
    drops the other from what came before (a resolved ``algorithm: erm`` then ``groupdro_enabled: true``
    means GroupDRO, not a conflict); only one layer setting both so that they disagree is an error.
    """
    merged = dict(values)
    for layer in changes:
        for name, other in (("algorithm", "groupdro_enabled"), ("groupdro_enabled", "algorithm")):
            if name in layer and other not in layer:
                merged.pop(other, None)
        merged.update(layer)
    return merged


class _RefusedYaml(yaml.YAMLError):
    """YAML that parses but is refused in a parameter file (an alias, a repeated key)."""


class _ParameterLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (no alias bomb) and repeated keys (PyYAML would keep the last)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        """Compose as SafeLoader does, but stop at the first alias."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RefusedYaml(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: parameter files may "
                               "not use anchors and aliases (they can expand without bound); write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        """Construct as SafeLoader does, after checking that no scalar key appears twice."""
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if name in lines:
                raise _RefusedYaml(f"key {name!r} appears twice (lines {lines[name]} and {line}); keep one")
            lines[name] = line
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read one YAML parameter file: UTF-8 text holding a non-empty mapping of known keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"parameter file {path} cannot be read: {err.strerror}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"parameter file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          "a parameter file is YAML text such as 'lr: 1.0e-3'") from err
    try:
        values = yaml.load(text, Loader=_ParameterLoader)
    except _RefusedYaml as err:
        raise ConfigError(f"parameter file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"parameter file {path} is not valid YAML: {err}") from err
    if values is None:
        raise ConfigError(f"parameter file {path} is empty (no key: value lines); an empty file would silently mean "
                          "every default: add keys or leave the file out")
    if not isinstance(values, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping of key: value, got {type(values).__name__}")
    _check_key_names(values, str(path))
    return values


def is_folder_name(name: Any) -> bool:
    """Whether ``name`` names one folder inside another (run_name, study names): no path out of it."""
    return isinstance(name, str) and name.strip() not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _check_key_names(values: Mapping[Any, Any], source: str) -> None:
    """Every key is a string naming a Config key; else an error naming each bad key and the closest valid one."""
    problems = [f"key {k!r} ({type(k).__name__}) in {source} is not a key name; keys are names such as 'lr' "
                "(quote a key that YAML reads as a number or boolean)" for k in values if not isinstance(k, str)]
    problems += [_unknown_key_message(k, source) for k in values if isinstance(k, str) and k not in Config.keys()]
    if problems:
        raise ConfigError("; ".join(problems))


def _warn_once(message: str) -> None:
    """Print a config warning to stderr, once per process per message."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"tdro: warning: {message}", file=sys.stderr)


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
        return yaml.load(text, Loader=_ParameterLoader) if text.strip() else text
    except _RefusedYaml as err:
        raise ConfigError(f"override value {text!r}: {err}") from err
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
def _key_order() -> list[str]:
    """Config's own keys first (as declared), then each algorithm's."""
    own = [name for name in Config.__annotations__]
    return own + [f.name for f in dataclasses.fields(Config) if f.name not in own]


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Config)


@functools.cache
def _defaults() -> dict[str, Any]:
    """Each key's default value."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(Config)}


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
    if f.name == "device" and not DEVICE_PATTERN.fullmatch(value):
        raise ConfigError(f"key 'device' has value {value!r}; allowed: auto, cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
    if meta["items"] is not None and isinstance(value, list):
        _check_items(f.name, value, meta["items"], meta["nested"])
    return value


def _check_items(name: str, value: list, bounds: tuple[int | None, int | None], nested: bool) -> None:
    """Elements of a list key are integers within ``bounds`` (or lists of them when ``nested``)."""
    low, high = bounds
    span = {(False, False): f" {low}..{high}", (False, True): f" >= {low}", (True, False): f" <= {high}",
            (True, True): ""}[(low is None, high is None)]
    allowed = f"a list of {'lists of ' if nested else ''}integers{span}"
    for i, element in enumerate(value):
        if nested and not isinstance(element, list):
            raise ConfigError(f"key {name!r} has value {value!r}; allowed: {allowed}; element [{i}] is {element!r}")
        for where, x in ([(f"[{i}][{j}]", x) for j, x in enumerate(element)] if nested else [(f"[{i}]", element)]):
            if (isinstance(x, bool) or not isinstance(x, int) or (low is not None and x < low)
                    or (high is not None and x > high)):
                raise ConfigError(f"key {name!r} has value {value!r}; allowed: {allowed}; element {where} is {x!r}")


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
    too_high = high is not None and (value >= high if meta["high_open"] else value > high)
    if too_low or too_high:
        lower = "" if low is None else (f"> {low}" if meta["low_open"] else f">= {low}")
        upper = "" if high is None else (f"< {high}" if meta["high_open"] else f"<= {high}")
        allowed = " and ".join(part for part in (lower, upper) if part)
        raise ConfigError(f"key {name!r} has value {value!r}; allowed: {allowed}")
