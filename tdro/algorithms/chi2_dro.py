"""χ²-DRO (Levy et al. 2020, the constrained χ² ball with reg 0): the worst-case reweighting of each batch.

q* = argmax Σ q_i ℓ_i over the simplex with D(q) = (1/2N) Σ (N q_i − 1)² ≤ ρ, the convention of
fast-dro's ``RobustLoss`` (D is half Pearson's χ²-divergence of q from the uniform 1/N). q* is a best
response to the detached losses, in float64: q_i ∝ (ℓ_i − η)_+, and D rises with η, so D at every kink
η = ℓ_j gives q*'s support, on which D = ρ has a closed-form η (exact: no bisection tolerance). The
loss Σ q*_i ℓ_i is differentiated through ℓ only, as fast-dro's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses
from tdro.keys import key


@dataclass
class Chi2DROKeys:
    # Levy et al.'s final χ² runs (fast-dro hyperparameters/mnist_final_cs.yaml: size 1.0, reg 0). In a batch of
    # N, one sample's weight is at most (1 + sqrt(2ρ(N − 1))) / N (0.19 at N = 64, ρ = 1); ρ >= (N − 1)/2 allows 1.
    chi2_rho: float = key(1.0, "rho: radius of the chi-square ball (1/2N) sum_i (N q_i - 1)^2 <= rho around the "
                               "uniform weights of a batch's N samples (near 0 = ERM)", low=0.0, low_open=True)


def chi2_best_response(losses: torch.Tensor, rho: float) -> torch.Tensor:
    """q* (float64, on the losses' device): the weights in the χ² ball of radius ρ that maximise Σ q_i ℓ_i."""
    v = losses.detach().to("cpu", torch.float64)
    n = len(v)
    top = v == v.max()
    if rho >= (n / top.sum().item() - 1) / 2:  # the uniform weights on the largest losses fit in the ball
        return (top.double() / top.sum()).to(losses.device)
    excess = (v[None, :] - v[:, None]).clamp_min(0.0)  # row j: (ℓ_i − ℓ_j)_+ ∝ q at the kink η = ℓ_j
    kink_divergence = 0.5 * (n * (excess**2).sum(1) / excess.sum(1) ** 2 - 1)
    feasible = ~top & (kink_divergence <= rho)
    support = v > v[feasible].max() if feasible.any() else torch.ones_like(top)
    # on k samples of mean μ, variance σ², q_i = (ℓ_i − η) / k(μ − η), and D = ρ at η = μ − σ / sqrt(k(2ρ+1)/N − 1)
    k, kept = int(support.sum()), v[support]
    eta = kept.mean() - (kept.var(correction=0) / (k * (2 * rho + 1) / n - 1)).sqrt()
    q = (v - eta).clamp_min(0.0)
    return (q / q.sum()).to(losses.device)


@ALGORITHMS.register("chi2_dro")
class Chi2DRO(Algorithm):
    """Σ q*_i ℓ_i, q* the best response in the χ² ball: no group labels; up-weights the batch's hard samples."""

    Keys = Chi2DROKeys

    def loss(self, batch: BatchLosses) -> torch.Tensor:
        q = chi2_best_response(batch.per_sample, self.config.chi2_rho)
        return (q.to(batch.per_sample.dtype) * batch.per_sample).sum()
