"""Deep CORAL (Sun & Saenko 2016) as DomainBed's CORAL: ERM + λ · mean gap of group latent means and covariances.

Penalty (DomainBed ``AbstractMMD.mmd``, kernel "mean_cov"), over pairs i < j of groups present in the batch:
mean over dims of (μ_i − μ_j)² + mean over entries of (C_i − C_j)², C the unbiased (n − 1) covariance. A
group with one sample has no covariance: its pairs keep the mean term and drop the covariance term (each
term is averaged over the pairs that have it), where DomainBed would divide by n − 1 = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses
from tdro.keys import ConfigError, key

if TYPE_CHECKING:
    from tdro.data.base import GroupedDataset


@dataclass
class CORALKeys:
    coral_lambda: float = key(1.0, "weight of the CORAL penalty (DomainBed's mmd_gamma, default 1)", low=0.0)


def pair_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` holds; 0 when it holds nowhere."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def group_moments(latents: torch.Tensor, group_ids: torch.Tensor,
                  num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group counts (G,), means (G, k) and unbiased covariances (G, k, k); 0 for groups without them."""
    counts = torch.bincount(group_ids, minlength=num_groups)
    one_hot = F.one_hot(group_ids, num_groups).to(latents.dtype).T  # (G, N)
    means = one_hot @ latents / counts.clamp(min=1)[:, None]
    centred = latents - means[group_ids]
    covariances = (one_hot[:, :, None] * centred).transpose(1, 2) @ centred
    return counts, means, covariances / (counts - 1).clamp(min=1)[:, None, None]


def coral_penalty(latents: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean over present group pairs of the mean gap, plus mean over pairs with n ≥ 2 of the covariance gap."""
    counts, means, covariances = group_moments(latents, group_ids, num_groups)
    i, j = torch.triu_indices(num_groups, num_groups, 1, device=latents.device)
    mean_gap = (means[i] - means[j]).square().mean(-1)
    covariance_gap = (covariances[i] - covariances[j]).square().mean((-2, -1))
    return (pair_mean(mean_gap, (counts[i] > 0) & (counts[j] > 0))
            + pair_mean(covariance_gap, (counts[i] > 1) & (counts[j] > 1)))


class PairwiseAlignment(Algorithm):
    """ERM + weight · a penalty between the groups' latents (DomainBed's AbstractMMD); a weight of 0 skips it."""

    def weight(self) -> float:
        raise NotImplementedError

    def penalty(self, latents: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_dataset(self, dataset: GroupedDataset) -> None:
        if len(dataset.groups) < 2:
            raise ConfigError(f"algorithm {self.config.algorithm!r} aligns groups with each other, but dataset "
                              f"{dataset.name!r} has one group ({', '.join(dataset.groups)}); use algorithm erm")

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        erm = super().loss(batch)
        weight = self.weight()
        return erm + weight * self.penalty(batch.latents, batch.group_ids) if weight else erm


@ALGORITHMS.register("coral")
class CORAL(PairwiseAlignment):
    """Match each group's latent mean and covariance to every other group's."""

    Keys = CORALKeys

    def weight(self) -> float:
        return self.config.coral_lambda

    def penalty(self, latents: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return coral_penalty(latents, group_ids, len(self.grouper.group_names))
