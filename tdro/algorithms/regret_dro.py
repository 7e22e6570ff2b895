"""Regret-DRO (the reference's ``use_regret``): GroupDRO on each unit's excess loss ℓ_g − R*_g.

R*_g is the best loss unit g can reach: given (``optimal_losses``), or the validation loss, at its
selected epoch, of an ERM run trained on group g alone (one stage run per group). Weighing the
excess instead of the loss keeps q off groups that are hard for every model (label noise, tiny n).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tdro.algorithms.base import ALGORITHMS, BatchLosses, Grouper, stage_config
from tdro.algorithms.groupdro import GroupDRO, GroupDROKeys
from tdro.keys import ConfigError, key

if TYPE_CHECKING:
    from tdro.config import Config
    from tdro.data.base import GroupedDataset
    from tdro.models.multigroup import MultiGroupModel


@dataclass
class RegretDROKeys:
    optimal_losses: list | None = key(None, "R*: best achievable loss per Grouper unit, in unit order (null = each "
                                            "group's val loss from an ERM stage run on that group alone)")
    regret_clamp: bool = key(False, "clamp the excess loss at 0 (the reference before 2026-09-20); false = signed")


@ALGORITHMS.register("regret_dro")
class RegretDRO(GroupDRO):
    """GroupDRO whose unit losses are the excess over R*; R* comes from the config or from stage runs."""

    Keys = RegretDROKeys
    reads = GroupDRO.key_names()

    def __init__(self, config: Config, grouper: Grouper) -> None:
        super().__init__(config, grouper)
        given = config.optimal_losses
        self.optimal = None if given is None else torch.tensor(given, dtype=torch.float64)
        self.sources = None if given is None else ["given"] * len(given)

    @classmethod
    def check(cls, config: Config) -> None:
        values = config.optimal_losses
        if values is None:
            if config.groupdro_cells == "group_class":
                raise ConfigError("algorithm 'regret_dro' with groupdro_cells 'group_class' needs optimal_losses: "
                                  "stage runs give one loss per group, not per (group, class) cell; give "
                                  "optimal_losses, one per cell in group/class order")
            return
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
               or v < 0]
        if bad:
            raise ConfigError(f"key 'optimal_losses' has value {values!r}; allowed: finite numbers >= 0 (a unit's best "
                              f"cross-entropy), one per unit; not allowed: {', '.join(map(repr, bad))}")

    @classmethod
    def stages(cls, config: Config) -> dict[str, Config]:
        """One ERM run per group on that group alone, with its encoder as in this run (groups pinned by name)."""
        if config.optimal_losses is not None:
            return {}
        from tdro.data import build_dataset
        from tdro.models.multigroup import resolve_encoder_specs

        specs = resolve_encoder_specs(config, build_dataset(config))
        unread = {f.name: f.default for f in dataclasses.fields(GroupDROKeys)}  # erm reads none: reuse across them
        return {name: stage_config(config, "erm", only_groups=[name], visual_encoder=None, text_encoder=None,
                                   groups=[{"name": name, "encoder": encoder, **options}], **unread)
                for name, (encoder, options) in specs.items()}

    def check_dataset(self, dataset: GroupedDataset) -> None:
        names = self.grouper.names
        given = self.config.optimal_losses
        if given is not None and len(given) != len(names):
            raise ConfigError(f"key 'optimal_losses' has {len(given)} value(s) but groupdro_cells "
                              f"{self.config.groupdro_cells!r} gives {len(names)} units: {', '.join(names)}; "
                              "give one R* per unit, in that order")
        empty = [name for name, group in dataset.groups.items() if not len(group.val)]
        if given is None and empty:
            raise ConfigError(f"group(s) {', '.join(empty)} have no validation samples, so their stage runs cannot "
                              "measure R*; give optimal_losses or raise val_frac")

    def prepare(self, stage_runs: dict[str, Path], dataset: GroupedDataset, model: MultiGroupModel,
                device: torch.device) -> GroupedDataset:
        """R*_g = the val loss of group g's stage run at its selected epoch (recomputed the same on resume)."""
        if self.optimal is None:
            from tdro.runs import read_summary

            values = []
            for name in self.grouper.names:
                summary_path = stage_runs[name] / "summary.json"
                loss = read_summary(summary_path)["val"]["group_loss"][name]
                if loss is None or not math.isfinite(loss):
                    raise ConfigError(f"{summary_path} gives group {name!r} val loss {loss!r}; R* must be finite: "
                                      "give optimal_losses")
                values.append(loss)
            self.optimal = torch.tensor(values, dtype=torch.float64)
            self.sources = [Path(stage_runs[n]).relative_to(self.config.output_dir).as_posix()
                            for n in self.grouper.names]
        self.optimal = self.optimal.to(device)
        return dataset

    def unit_losses(self, batch: BatchLosses) -> tuple[torch.Tensor, torch.Tensor]:
        losses, present = super().unit_losses(batch)
        excess = losses - self.optimal.to(losses)
        return (excess.clamp_min(0.0) if self.config.regret_clamp else excess), present

    def summary(self) -> dict[str, Any]:
        return {"optimal_losses": {name: {"loss": value, "from": source} for name, value, source
                                   in zip(self.grouper.names, self.optimal.tolist(), self.sources)},
                "regret_clamp": self.config.regret_clamp}
