"""Loss reweighting (SubpopBench's ReWeight): fixed unit weights w_u ∝ 1/n_u undo the imbalance of the training set.

The batch loss is the self-normalised Σ_i w_u(i) ℓ_i / Σ_i w_u(i), as torch's class-weighted
cross-entropy (the reference's ``class_weight: auto``) and JTT here: with proportional batches every unit
then weighs about equally in each batch and the loss stays on ERM's scale. SubpopBench's mean_i(w_u(i) ℓ_i)
(w summing to the number of units) is that up to a constant factor, set by the group sizes, that rescales the LR.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses, Grouper
from tdro.keys import ConfigError

if TYPE_CHECKING:
    from tdro.config import Config


@ALGORITHMS.register("reweight")
class Reweight(Algorithm):
    """Σ_i w_u(i) ℓ_i / Σ_i w_u(i), w_u ∝ 1/n_u over the Grouper's units (groups or (group, class) cells)."""

    reads = ("groupdro_cells",)

    def __init__(self, config: Config, grouper: Grouper) -> None:
        super().__init__(config, grouper)
        counts = grouper.train_counts.double()
        inverse = torch.where(counts > 0, 1 / counts, 0.0)  # a unit without training samples is in no batch
        self.unit_weights = inverse / inverse.sum()

    @classmethod
    def check(cls, config: Config) -> None:
        if config.batching == "balanced":
            raise ConfigError("key 'batching' has value 'balanced', but algorithm 'reweight' then corrects the "
                              "group imbalance twice (balanced batches hold every group equally, and 1/n_u weights "
                              "favour the small groups again); allowed: batching: proportional, or use algorithm: "
                              "resample")

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        weights = self.unit_weights.to(batch.per_sample)[batch.unit_ids]
        return (weights * batch.per_sample).sum() / weights.sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.grouper.names, self.unit_weights.tolist()))
