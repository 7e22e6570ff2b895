"""CVaR-DRO (Levy et al. 2020; SubpopBench's CVaRDRO): minimise the mean of each batch's worst α-fraction of losses."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses
from tdro.keys import key


@dataclass
class CVaRDROKeys:
    # SubpopBench's default (joint_dro_alpha 0.1; its sweep draws 10^U(-2, 0)).
    cvar_alpha: float = key(0.1, "alpha: fraction of each batch's samples, the worst, whose mean loss is minimised "
                                 "(1 = ERM)", low=0.0, high=1.0, low_open=True)


def cvar(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR_α exactly: with m = αN, (sum of the floor(m) largest + (m − floor(m)) × the next largest) / m."""
    ranked = losses.sort(descending=True).values
    m = alpha * len(ranked)
    share = (m - torch.arange(len(ranked), dtype=ranked.dtype, device=ranked.device)).clamp(0.0, 1.0)
    return (share * ranked).sum() / m


@ALGORITHMS.register("cvar_dro")
class CVaRDRO(Algorithm):
    """No group labels: the gradient reaches only the selected (worst) samples, the boundary one in part."""

    Keys = CVaRDROKeys

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        return cvar(batch.per_sample, self.config.cvar_alpha)
