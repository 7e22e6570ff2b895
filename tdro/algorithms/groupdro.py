"""GroupDRO (Sagawa et al. 2020): weights q over the Grouper's units up-weight the worst ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses, Grouper
from tdro.keys import key
from tdro.objectives.groupdro import GroupDRO as GroupWeights, group_mean_losses

if TYPE_CHECKING:
    from tdro.config import Config

# Keys that only shape q, which the max and logsumexp objectives do not use.
Q_KEYS = ("groupdro_update_mode", "groupdro_gamma", "groupdro_init", "groupdro_min_group_weight",
          "groupdro_adjustment", "groupdro_warmup_epochs", "groupdro_update_timing")


@dataclass
class GroupDROKeys:
    groupdro_eta: float = key(0.01, "GroupDRO step size eta", low=0.0, low_open=True)
    groupdro_gamma: float = key(0.9, "exp_smooth smoothing: larger = smoother, 0 = plain exp", low=0.0, high=1.0)
    groupdro_warmup_epochs: int = key(2, "epochs with q held at its initial value (at most epochs)", low=0)
    groupdro_update_mode: str = key("exp_smooth", "q update rule", choices=("exp", "softmax", "exp_smooth"))
    groupdro_objective: str = key("weighted", "robust loss", choices=("weighted", "max", "logsumexp"))
    groupdro_init: str = key("uniform", "initial q", choices=("uniform", "proportional"))
    groupdro_min_group_weight: float = key(0.0, "exact floor on every group weight", low=0.0, high=1.0)
    groupdro_adjustment: float = key(0.0, "generalisation adjustment C in l_g + C/sqrt(n_g)", low=0.0)
    groupdro_update_timing: str = key("after_step", "update q after the optimiser step (reference) or before the "
                                                    "loss (Sagawa et al.)", choices=("after_step", "before_loss"))


def build_group_weights(config: Config, grouper: Grouper) -> GroupWeights:
    """GroupDRO's q over the Grouper's units, from the groupdro_* keys."""
    return GroupWeights(
        grouper.num_units, eta=config.groupdro_eta, update_mode=config.groupdro_update_mode,
        objective=config.groupdro_objective, gamma=config.groupdro_gamma, init=config.groupdro_init,
        group_sizes=grouper.train_counts.clamp(min=1).tolist(), min_group_weight=config.groupdro_min_group_weight,
        adjustment=config.groupdro_adjustment, warmup_epochs=config.groupdro_warmup_epochs)


@ALGORITHMS.register("groupdro")
class GroupDRO(Algorithm):
    """The robust objective over the units' mean losses; q moves by multiplicative weights each step."""

    Keys = GroupDROKeys
    reads = ("groupdro_cells",)

    def __init__(self, config: Config, grouper: Grouper) -> None:
        super().__init__(config, grouper)
        self.q = build_group_weights(config, grouper)
        self.update_before_loss = config.groupdro_update_timing == "before_loss"

    def unit_losses(self, batch: BatchLosses) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses GroupDRO weighs (overridden by Regret-DRO) and which units are present."""
        return group_mean_losses(batch.per_sample, batch.unit_ids, self.grouper.num_units)

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        losses, present = self.unit_losses(batch)
        self._last = (losses.detach(), present)
        if self.update_before_loss:
            self.q.update(*self._last, batch.epoch)
        return self.q.loss(losses, present)

    def after_step(self, batch: BatchLosses) -> None:
        if not self.update_before_loss:
            self.q.update(*self._last, batch.epoch)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.grouper.names, self.q.q.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return self.q.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q.load_state_dict(state)
