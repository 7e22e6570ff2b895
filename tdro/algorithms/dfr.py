"""DFR, Deep Feature Reweighting (Kirichenko et al. 2023), the DFR^Val_Tr variant: retrain only the head of an
ERM model on a group-balanced part of the validation split.

Stage 1 (``features``) is ERM (``dfr_stage_epochs`` epochs, null = ``epochs``); its selected checkpoint is
loaded, every encoder is frozen (and held in eval mode, so features are fixed: no dropout, no BatchNorm
statistics), the head is re-initialised, and this run's ``epochs`` retrain it. Each unit's validation
samples (a group, or a (group, class) cell by ``groupdro_cells``) are split, seeded by ``data_split_seed``,
into a retraining part (``dfr_retrain_frac``) and a selection part (the rest); every unit's retraining
part is cut to the smallest unit's count and becomes the train split, the selection part the val split
(model selection and early stopping), test stays as it is.

Deviations from Kirichenko et al., who fit an l1-regularised logistic regression on standardised
features and average the weights of several balanced draws: the head (linear or MLP, by head_hidden) is
trained by the run's optimiser and weight_decay (l2) on one balanced draw, for ``epochs`` epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, stage_config
from tdro.data.base import Group, GroupedDataset, Split
from tdro.data.splits import split_rng
from tdro.keys import ConfigError, key
from tdro.training.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from tdro.config import Config
    from tdro.models.multigroup import MultiGroupModel


@dataclass
class DFRKeys:
    dfr_retrain_frac: float = key(0.5, "fraction of each unit's validation samples that retrains the head (the rest "
                                       "selects the checkpoint); Kirichenko et al. use half", low=0.0, high=1.0,
                                  low_open=True, high_open=True)
    dfr_stage_epochs: int | None = key(None, "epochs of the ERM run whose features DFR reuses (null = epochs)",
                                       low=1, high=100_000)


def _eval_mode(module: torch.nn.Module, inputs: Any) -> None:
    """Forward pre-hook: a frozen encoder computes its features in eval mode even while the head trains."""
    module.eval()


@ALGORITHMS.register("dfr")
class DFR(Algorithm):
    """ERM of a fresh head on frozen stage-1 features, over a unit-balanced half of validation."""

    Keys = DFRKeys
    reads = ("groupdro_cells",)

    @classmethod
    def check(cls, config: Config) -> None:
        if config.lambda_fit or config.lambda_sep:
            raise ConfigError(f"algorithm 'dfr' retrains only the head on frozen features, so the anchor losses "
                              f"(lambda_fit={config.lambda_fit}, lambda_sep={config.lambda_sep}) have nothing to "
                              f"train; set lambda_fit: 0 and lambda_sep: 0")
        if config.freeze_backbone_epochs:
            raise ConfigError(f"key 'freeze_backbone_epochs' has value {config.freeze_backbone_epochs} but algorithm "
                              f"'dfr' freezes every encoder while it retrains the head (the trainer would unfreeze "
                              f"backbones after that many epochs); allowed: 0")
        stage_epochs = config.dfr_stage_epochs or config.epochs
        if config.lr_warmup_epochs > stage_epochs:
            raise ConfigError(f"key 'lr_warmup_epochs' has value {config.lr_warmup_epochs} but dfr_stage_epochs is "
                              f"{stage_epochs}; allowed: at most the feature run's epochs (lower lr_warmup_epochs "
                              f"or raise dfr_stage_epochs)")

    @classmethod
    def stages(cls, config: Config) -> dict[str, Config]:
        # groupdro_cells does not change an ERM run: fixing it lets runs that differ only there share the stage
        return {"features": stage_config(config, "erm", epochs=config.dfr_stage_epochs or config.epochs,
                                         groupdro_cells="group")}

    def val_units(self, dataset: GroupedDataset) -> dict[str, tuple[str, torch.Tensor]]:
        """Each Grouper unit's validation samples, by unit name: (its group, positions in that group's val split)."""
        per_group = 1 if self.grouper.by == "group" else self.grouper.num_classes
        units = {}
        for g, (name, group) in enumerate(dataset.groups.items()):
            y = group.val.y.cpu()
            unit_ids = self.grouper.unit_ids(torch.full_like(y, g), y)
            for u in range(g * per_group, (g + 1) * per_group):
                units[self.grouper.names[u]] = (name, torch.nonzero(unit_ids == u).flatten())
        return units

    def check_dataset(self, dataset: GroupedDataset) -> None:
        """Every unit needs one validation sample to retrain on and one to select with."""
        short = {unit: len(positions) for unit, (_, positions) in self.val_units(dataset).items() if len(positions) < 2}
        if short:
            remedy = "raise val_frac" + (", or use groupdro_cells: group" if self.grouper.by == "group_class" else "")
            listed = ", ".join(f"{unit!r} ({count})" for unit, count in short.items())
            raise ConfigError(f"algorithm 'dfr' splits every unit's validation samples into a retraining and a "
                              f"selection part, so each unit (groupdro_cells: {self.grouper.by}) needs at least 2; "
                              f"validation samples of {listed}: {remedy}")

    def split_validation(self, dataset: GroupedDataset) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per group, val positions of (the balanced retraining part, the selection part); records per-unit counts."""
        units = self.val_units(dataset)
        retrain, select = {}, {}
        for unit, (_, positions) in units.items():
            order = positions[torch.from_numpy(split_rng(self.config.data_split_seed, "dfr", unit)
                                               .permutation(len(positions)))]
            cut = min(max(round(self.config.dfr_retrain_frac * len(order)), 1), len(order) - 1)
            retrain[unit], select[unit] = order[:cut], order[cut:]
        smallest = min(len(part) for part in retrain.values())
        self.unit_counts = {unit: {"val": len(positions), "retrain": smallest, "select": len(select[unit])}
                            for unit, (_, positions) in units.items()}
        parts = {}
        for name in dataset.groups:
            mine = [unit for unit, (owner, _) in units.items() if owner == name]
            parts[name] = (torch.cat([retrain[unit][:smallest] for unit in mine]).sort().values,
                           torch.cat([select[unit] for unit in mine]).sort().values)
        return parts

    def prepare(self, stage_runs: dict[str, Path], dataset: GroupedDataset, model: MultiGroupModel,
                device: torch.device) -> GroupedDataset:
        """Stage-1 weights, frozen encoders, a fresh head; train = balanced retraining part, val = selection part."""
        self.stage_run = stage_runs["features"]
        checkpoints = self.stage_run / "checkpoints"
        self.checkpoint = "best.pt" if (checkpoints / "best.pt").exists() else "last.pt"
        model.load_state_dict(load_checkpoint(checkpoints / self.checkpoint, device)["model"])
        for encoder in dict.fromkeys(model.encoders.values()):  # a common encoder once
            encoder.requires_grad_(False)
            encoder.register_forward_pre_hook(_eval_mode)
        model.anchors.requires_grad_(False)
        for layer in model.head.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        groups = {}
        for name, (retrain, select) in self.split_validation(dataset).items():
            group = dataset.groups[name]
            groups[name] = Group(name, group.kind, group.encoder, dict(group.input_info), dict(group.encoder_options),
                                 group.val.subset(retrain), group.val.subset(select), group.test)
        self.source_ids = {name: {"retrain": source_ids(group.train), "select": source_ids(group.val)}
                           for name, group in groups.items()}
        return GroupedDataset(dataset.name, groups, list(dataset.class_names), dict(dataset.info))

    def summary(self) -> dict[str, Any]:
        return {"stage_run": self.stage_run.relative_to(self.config.output_dir).as_posix(),
                "stage_checkpoint": self.checkpoint, "dfr_retrain_frac": self.config.dfr_retrain_frac,
                "units": self.unit_counts, "source_ids": self.source_ids}


def source_ids(split: Split) -> list[int] | None:
    """A split's source ids (Split.index) for the records; None where the dataset gives none."""
    return None if split.index is None else split.index.tolist()
