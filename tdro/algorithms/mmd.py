"""MMD as in DomainBed: ERM + λ · mean over group pairs of MMD² with a mixture of Gaussian kernels.

k(x, y) = Σ_γ exp(−γ‖x − y‖²). MMD²(X, Y) = mean k(X, X) + mean k(Y, Y) − 2 mean k(X, Y), the biased
(V-statistic) estimator that DomainBed uses: the means include the i = j terms, so a group of one sample
is defined. One N×N kernel over the batch serves every pair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from tdro.algorithms.base import ALGORITHMS
from tdro.algorithms.coral import PairwiseAlignment, pair_mean
from tdro.keys import ConfigError, key

if TYPE_CHECKING:
    from tdro.config import Config

DOMAINBED_GAMMAS = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]


@dataclass
class MMDKeys:
    mmd_lambda: float = key(1.0, "weight of the MMD penalty (DomainBed's mmd_gamma, default 1)", low=0.0)
    mmd_gammas: list = key(DOMAINBED_GAMMAS, "kernel bandwidths γ of Σ_γ exp(-γ‖x-y‖²), positive "
                                             "(DomainBed's seven)")


def mmd_penalty(latents: torch.Tensor, group_ids: torch.Tensor, num_groups: int,
                gammas: Sequence[float]) -> torch.Tensor:
    """Mean over pairs of present groups of the biased MMD² between their latents."""
    counts = torch.bincount(group_ids, minlength=num_groups)
    averages = F.one_hot(group_ids, num_groups).to(latents.dtype) / counts.clamp(min=1)  # (N, G)
    distances = torch.cdist(latents, latents, compute_mode="donot_use_mm_for_euclid_dist").square()
    kernel = torch.exp(-latents.new_tensor(gammas)[:, None, None] * distances).sum(0)
    between = averages.T @ kernel @ averages  # (G, G): mean kernel value between two groups
    i, j = torch.triu_indices(num_groups, num_groups, 1, device=latents.device)
    return pair_mean(between[i, i] + between[j, j] - 2 * between[i, j], (counts[i] > 0) & (counts[j] > 0))


@ALGORITHMS.register("mmd")
class MMD(PairwiseAlignment):
    """Match the groups' latent distributions in a multi-bandwidth Gaussian RKHS."""

    Keys = MMDKeys

    @classmethod
    def check(cls, config: Config) -> None:
        gammas = config.mmd_gammas
        allowed = "allowed: a non-empty list of positive numbers such as [0.1, 1.0, 10.0]"
        if not gammas:
            raise ConfigError(f"key 'mmd_gammas' has value {gammas!r}; {allowed}")
        for index, gamma in enumerate(gammas):
            number = isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
            if not number or not math.isfinite(gamma) or gamma <= 0:
                hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)" if isinstance(gamma, str) else ""
                raise ConfigError(f"key 'mmd_gammas' has value {gammas!r}; {allowed}; element [{index}] is "
                                  f"{gamma!r}{hint}")

    def weight(self) -> float:
        return self.config.mmd_lambda

    def penalty(self, latents: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return mmd_penalty(latents, group_ids, len(self.grouper.group_names), self.config.mmd_gammas)
