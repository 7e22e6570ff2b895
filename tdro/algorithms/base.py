"""The algorithm interface: a training objective over a batch's per-sample losses, with hooks and state.

An algorithm is one small class registered by name in ``ALGORITHMS``. It may declare its own
config keys in a nested ``Keys`` dataclass (flat names such as ``cvar_alpha``); Config collects
them from the registry, so choices, ranges and "did you mean" come from one place.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from tdro.keys import ConfigError
from tdro.registry import Registry

if TYPE_CHECKING:
    from tdro.config import Config
    from tdro.data.base import GroupedDataset
    from tdro.models.multigroup import MultiGroupModel

UNITS = ("group", "group_class")


class Grouper:
    """What a group is, defined once: dataset groups, or (group, class) cells named ``group/class``.

    The group-weighting algorithms weigh its units, balanced samplers and DFR balance them, and
    ``names`` label their records; ``sample_ids`` numbers every training sample once (group order).
    """

    def __init__(self, dataset: GroupedDataset, by: str = "group") -> None:
        if by not in UNITS:
            raise ConfigError(f"key 'groupdro_cells' has value {by!r}; allowed: {', '.join(UNITS)}")
        self.by = by
        self.group_names = list(dataset.groups)
        self.class_names = list(dataset.class_names)
        self.num_classes = len(self.class_names)
        train_labels = [group.train.y for group in dataset.groups.values()]
        sizes = [len(y) for y in train_labels]
        self.group_offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        self.num_train_samples = sum(sizes)
        if by == "group":
            self.names = self.group_names
            self.train_counts = torch.tensor(sizes)
        else:
            self.names = [f"{g}/{c}" for g in self.group_names for c in self.class_names]
            self.train_counts = torch.cat([torch.bincount(y, minlength=self.num_classes) for y in train_labels])

    @property
    def num_units(self) -> int:
        return len(self.names)

    def unit_ids(self, group_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's unit: its group, or its (group, class) cell."""
        return group_ids if self.by == "group" else group_ids * self.num_classes + labels

    def sample_ids(self, group_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A training sample's number over all groups: its group's offset + its position in the group's train split."""
        return self.group_offsets.to(index.device)[group_ids] + index


@dataclass
class BatchLosses:
    """What an algorithm sees of one training batch (samples of every group, concatenated in group order)."""

    per_sample: torch.Tensor      # (N,) cross-entropy of each sample, differentiable
    logits: torch.Tensor          # (N, C)
    latents: torch.Tensor         # (N, k)
    labels: torch.Tensor          # (N,)
    group_ids: torch.Tensor       # (N,) dataset group index
    unit_ids: torch.Tensor        # (N,) Grouper unit (group or cell)
    sample_ids: torch.Tensor      # (N,) Grouper.sample_ids of the training samples
    epoch: int


class Algorithm:
    """ERM's shape: the mean per-sample loss. Subclasses override ``loss`` and, if they need them, the hooks.

    ``reads`` lists keys declared by other algorithms that this one reads too; ``batching`` is
    the sampler it needs (None = the config's). Its state for an exact resume is
    ``state_dict()``; a step that turns out non-finite is undone by ``load_state_dict``.
    ``distributed`` says how it runs over several processes (torchrun): "exact" when its loss and
    hooks only read ``BatchLosses`` (the trainer gathers the global batch, so every rank sees the
    single-process tensors), "unsupported" (refused there) for one that keeps per-process data.
    """

    Keys: ClassVar[type | None] = None
    reads: ClassVar[tuple[str, ...]] = ()
    batching: ClassVar[str | None] = None
    distributed: ClassVar[str] = "exact"

    def __init__(self, config: Config, grouper: Grouper) -> None:
        self.config = config
        self.grouper = grouper

    @classmethod
    def key_names(cls) -> tuple[str, ...]:
        """Every algorithm key it reads: its own ``Keys`` and ``reads``."""
        own = tuple(f.name for f in dataclasses.fields(cls.Keys)) if cls.Keys is not None else ()
        return own + cls.reads

    @classmethod
    def check(cls, config: Config) -> None:
        """Config-only conflicts of its keys (a ConfigError naming the key); called by Config."""

    @classmethod
    def stages(cls, config: Config) -> dict[str, Config]:
        """Runs that must be finished before this one trains (two-stage methods), by stage name."""
        return {}

    def check_dataset(self, dataset: GroupedDataset) -> None:
        """Raise a ConfigError for data the algorithm cannot use; called before anything is written."""

    def prepare(self, stage_runs: dict[str, Path], dataset: GroupedDataset, model: MultiGroupModel,
                device: torch.device) -> GroupedDataset:
        """Use the finished stage runs (load weights, choose samples); returns the dataset to train on."""
        return dataset

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        """The training loss of a batch, before the anchor regulariser is added."""
        return batch.per_sample.mean()

    def after_step(self, batch: BatchLosses) -> None:
        """Called after each applied optimiser step."""

    def weights(self) -> dict[str, float] | None:
        """Current weights over the Grouper's units, recorded as ``q`` (None = the algorithm has none)."""
        return None

    def summary(self) -> dict[str, Any]:
        """What the run's summary.json should say about this algorithm (e.g. which samples it used)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm")


def stage_config(config: Config, algorithm: str, **changes: Any) -> Config:
    """The config of a stage run: ``config`` under another algorithm, this algorithm's own keys at their
    defaults (the stage does not read them), no run_name (stage runs are found by hash), plus ``changes``."""
    own = ALGORITHMS.get(config.algorithm).Keys
    defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                for f in dataclasses.fields(own)} if own is not None else {}
    return config.replace(algorithm=algorithm, run_name=None, **{**defaults, **changes})

