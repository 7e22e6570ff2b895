"""Plain latent L2, the reference's "any regulariser" control: ERM + λ · mean(z²) over every latent entry.

The reference's form (train_nhanes.py / train_fedheart.py: ``loss + latent_l2 * z.pow(2).mean()``), i.e.
λ · (1/N) Σ_i ‖z_i‖² / k; its control arm used λ = 0.1 (run_mechanism_controls.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses
from tdro.keys import key


@dataclass
class LatentL2Keys:
    latent_l2_lambda: float = key(0.1, "weight of the mean squared latent entry (0.1 in the reference's control)",
                                  low=0.0)


@ALGORITHMS.register("latent_l2")
class LatentL2(Algorithm):
    """Shrink the latents toward the origin: a penalty with no class or group structure."""

    Keys = LatentL2Keys

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        return super().loss(batch) + self.config.latent_l2_lambda * batch.latents.square().mean()
