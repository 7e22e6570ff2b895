"""JTT, Just Train Twice (Liu et al. 2021): up-weight the training samples that a briefly trained ERM model gets wrong.

Stage 1 (``identify``) is ERM for ``jtt_epochs`` epochs; its final model's misclassified training
samples are the error set. Stage 2 is this run, from its own fresh initialisation, with per-sample
weights w_i = jtt_upweight on the error set and 1 elsewhere, and the batch loss Σ w_i ℓ_i / Σ w_i.
This stands in for JTT's upsampling of the error set by jtt_upweight: over the whole training set it is
exactly the mean loss of the upsampled set (each error-set sample repeated λ times), and each batch
estimates it, without changing the epoch length or the group quotas.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses, stage_config
from tdro.keys import ConfigError, key
from tdro.training.checkpoint import load_checkpoint
from tdro.training.evaluation import collect_latents

if TYPE_CHECKING:
    from tdro.config import Config
    from tdro.data.base import GroupedDataset
    from tdro.models.multigroup import MultiGroupModel


@dataclass
class JTTKeys:
    # Liu et al. tune T per dataset (CelebA 1, MultiNLI and CivilComments 2, Waterbirds 60 of 300 epochs): a short
    # run that has fit the majority but not yet memorised the minority; 2 is that regime for tdro's few-epoch runs.
    jtt_epochs: int = key(2, "T: epochs of the ERM identification run whose final model picks the error set",
                          low=1, high=100_000)
    # 20 is the geometric middle of Liu et al.'s grid {5, 20, 50, 100}.
    jtt_upweight: float = key(20.0, "lambda_up: weight of an error-set sample relative to the others (1 = ERM)",
                              low=1.0)


def upweighted_mean(per_sample: torch.Tensor, in_error_set: torch.Tensor, upweight: float) -> torch.Tensor:
    """Σ w_i ℓ_i / Σ w_i with w_i = upweight where ``in_error_set``, else 1."""
    weights = 1.0 + (upweight - 1.0) * in_error_set.to(per_sample.dtype)
    return (weights * per_sample).sum() / weights.sum()


@ALGORITHMS.register("jtt")
class JTT(Algorithm):
    """ERM with the stage-1 error set up-weighted by jtt_upweight."""

    Keys = JTTKeys

    @classmethod
    def check(cls, config: Config) -> None:
        """Epoch-valued keys also shape the T-epoch identification run, so none may outlast it."""
        counts = {"freeze_backbone_epochs": config.freeze_backbone_epochs, "lr_warmup_epochs": config.lr_warmup_epochs}
        if config.lr_scheduler == "step":
            counts["lr_step_size"] = config.lr_step_size
        if config.lr_scheduler == "cosine" and config.T_max is not None:
            counts["T_max"] = config.T_max
        for name, value in counts.items():
            if value > config.jtt_epochs:
                raise ConfigError(f"key {name!r} has value {value} but jtt_epochs is {config.jtt_epochs}; the "
                                  f"identification run trains jtt_epochs epochs under the same schedule keys, so "
                                  f"allowed: at most jtt_epochs (lower {name} or raise jtt_epochs)")

    @classmethod
    def stages(cls, config: Config) -> dict[str, Config]:
        # groupdro_cells does not change an ERM run: fixing it lets runs that differ only there share the stage
        return {"identify": stage_config(config, "erm", epochs=config.jtt_epochs, early_stopping_patience=0,
                                         groupdro_cells="group")}

    def prepare(self, stage_runs: dict[str, Path], dataset: GroupedDataset, model: MultiGroupModel,
                device: torch.device) -> GroupedDataset:
        """The error set: training samples the identification run's final model misclassifies (deterministic)."""
        self.stage_run = stage_runs["identify"]
        identifier = copy.deepcopy(model)
        identifier.load_state_dict(load_checkpoint(self.stage_run / "checkpoints" / "last.pt", device)["model"])
        collected = collect_latents(identifier, dataset, "train", device, self.config.eval_batch_size)
        identifier.eval()
        with torch.no_grad():
            logits = identifier.head(torch.from_numpy(collected["latents"]).to(device))
        # groups in order, each train split in stored order: position = Grouper.sample_ids
        self.error_set = logits.argmax(1) != torch.from_numpy(collected["labels"]).to(device)
        sizes = list(dataset.sizes("train").values())
        self.error_counts = {name: int(part.sum()) for name, part in zip(dataset.groups, self.error_set.split(sizes))}
        return dataset

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        return upweighted_mean(batch.per_sample, self.error_set[batch.sample_ids], self.config.jtt_upweight)

    def summary(self) -> dict[str, Any]:
        return {"stage_run": self.stage_run.relative_to(self.config.output_dir).as_posix(),
                "jtt_epochs": self.config.jtt_epochs, "jtt_upweight": self.config.jtt_upweight,
                "error_set_size": self.error_counts, "error_set_total": sum(self.error_counts.values()),
                "train_samples": len(self.error_set)}
