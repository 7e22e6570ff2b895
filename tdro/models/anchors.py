"""One learnable Gaussian N(m_c, S_c) per class in the latent space: the target of the fit loss.

There is exactly one distribution per class. The fit loss, the separation samples and
``sample()`` all use S_c = L̃_c L̃_cᵀ + εI (full), Ũ_c Ũ_cᵀ + diag(d_c) + εI with Ũ_c of k × r
(low-rank) or diag(softplus(ρ_c) + ε) (diagonal); the reference drew from three different ones
(reference-method.md §8.1, bug 2).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tdro.registry import unknown_choice_message

COVARIANCES = ("full", "lowrank", "diagonal")
TARGETS = ("learned", "random_fixed")
FACTOR_NORM_RANGE = (1e-3, 10.0)  # Frobenius-norm bounds of L̃_c (Ũ_c), as in the reference's normalize_L


class FactorParts(NamedTuple):
    """The normalised factor L̃ = s·L (or Ũ = s·U) in pieces, computed once per step for every term."""

    raw: torch.Tensor  # L (C,k,k) or U (C,k,r), the stored tensor
    scale: torch.Tensor | None  # (C,) s; None while no norm is clipped (s ≡ 1, no gradient)
    norm_sq: torch.Tensor  # (C,) ‖L̃_c‖²_F = tr L̃_cL̃_cᵀ, with gradient

    def factor(self) -> torch.Tensor:
        """L̃ (or Ũ) as one tensor."""
        return self.raw if self.scale is None else self.raw * self.scale[:, None, None]


class _SquaredNorms(torch.autograd.Function):
    """‖F_c‖²_F per class with a one-pass backward 2g·F (autograd's F*F makes three passes over (C,k,k))."""

    @staticmethod
    def forward(ctx, factor):  # noqa: D102 (autograd.Function protocol)
        ctx.save_for_backward(factor)
        return torch.linalg.vector_norm(factor.flatten(1), dim=1).square()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (factor,) = ctx.saved_tensors
        return factor * (2 * grad).view(-1, *[1] * (factor.dim() - 1))


class GaussianAnchors(nn.Module):
    """Per-class Gaussian anchors with full (factored), low-rank-plus-diagonal or diagonal covariance.

    Means start at N(0, mean_init_std²) per coordinate (default 0.1, as the reference's EMBED
    anchors), not at 0: the reference put every class mean at the origin, so all anchors started
    on top of each other. The covariance starts at init_scale²·I + εI (full: L = init_scale·I;
    diagonal: softplus(ρ) = init_scale²; low-rank: in expectation, half of it in d, softplus(ρ) =
    init_scale²/2, and half in U with entries N(0, init_scale²/(2r)): U = 0 would have no gradient).
    The draw uses torch's global RNG, which the trainer seeds.

    ``targets="random_fixed"`` (a control) draws the covariance at random too, with the same
    expectation init_scale²·I: full L = init_scale·A/√k with A standard normal (k×k), so L Lᵀ is
    a scaled Wishart draw; diagonal variances are init_scale²·χ²_k/k, the law of that draw's
    diagonal; low-rank U as at init and d = (init_scale²/2)·χ²_k/k. The tensors are then buffers:
    kept in the state_dict, never trained.
    """

    def __init__(
        self,
        num_classes: int,
        latent_dim: int,
        eps: float = 1e-4,
        covariance: str = "full",
        init_scale: float = 0.05,
        mean_init_std: float = 0.1,
        targets: str = "learned",
        rank: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if covariance not in COVARIANCES:
            raise ValueError(unknown_choice_message("anchor covariance", covariance, list(COVARIANCES)))
        if targets not in TARGETS:
            raise ValueError(unknown_choice_message("anchor targets", targets, list(TARGETS)))
        if covariance == "lowrank":
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= latent_dim:
                raise ValueError(f"rank must be an integer in 1..latent_dim ({latent_dim}) for covariance='lowrank', "
                                 f"got {rank!r}")
        elif rank is not None:
            raise ValueError(f"rank={rank!r} is only read by covariance='lowrank' (covariance is {covariance!r})")
        numbers = (("eps", eps, True), ("init_scale", init_scale, True), ("mean_init_std", mean_init_std, False))
        for name, value, positive in numbers:
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.eps = float(eps)
        self.covariance_type = covariance
        self.rank = rank
        self.targets = targets
        fixed = targets == "random_fixed"
        tensors = {"means": torch.randn(num_classes, latent_dim) * mean_init_std}
        variance = init_scale**2 / 2 if covariance == "lowrank" else init_scale**2
        if covariance == "full" and fixed:
            tensors["L"] = torch.randn(num_classes, latent_dim, latent_dim) * (init_scale / math.sqrt(latent_dim))
        elif covariance == "full":
            tensors["L"] = init_scale * torch.eye(latent_dim).repeat(num_classes, 1, 1)
        elif covariance == "lowrank":
            tensors["U"] = torch.randn(num_classes, latent_dim, rank) * math.sqrt(variance / rank)
        if covariance != "full" and fixed:
            half = torch.tensor(latent_dim / 2)
            draw = variance * torch.distributions.Gamma(half, half).sample((num_classes, latent_dim))
            tensors["raw_scale"] = draw + torch.log(-torch.expm1(-draw))  # softplus⁻¹, stable for small v
        elif covariance != "full":
            tensors["raw_scale"] = torch.full((num_classes, latent_dim), math.log(math.expm1(variance)))
        for name, tensor in tensors.items():
            if fixed:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, nn.Parameter(tensor))

    @property
    def diagonal(self) -> bool:
        """Whether S_c is diagonal (closed-form losses apply)."""
        return self.covariance_type == "diagonal"

    @property
    def lowrank(self) -> bool:
        """Whether S_c = ŨŨᵀ + diag(d) + εI with Ũ of k × rank."""
        return self.covariance_type == "lowrank"

    def factor_parts(self) -> FactorParts:
        """L̃ (full) or Ũ (low-rank) as s·raw with its squared norms, so losses scale small products only.

        One pass over the factor gives the norms for the clip and for tr S. While no norm is
        clipped, s ≡ 1 has zero gradient and is left out (``scale`` None), which keeps it out of
        the backward pass (one read-back of C norms decides). Compute it once per step and hand it
        to every term (``AnchorLoss`` does).
        """
        if self.diagonal:
            raise ValueError("factor() needs covariance='full' or 'lowrank'; diagonal anchors have variance()")
        raw = self.U if self.lowrank else self.L
        norm_sq = _SquaredNorms.apply(raw)
        low, high = FACTOR_NORM_RANGE
        squares = norm_sq.detach()
        if bool(((squares >= low**2) & (squares <= high**2)).all()):
            return FactorParts(raw, None, norm_sq)
        norm = norm_sq.clamp_min(torch.finfo(raw.dtype).tiny).sqrt()
        clipped = norm.clamp(low, high)
        return FactorParts(raw, clipped / norm, clipped.square())

    def factor(self) -> torch.Tensor:
        """L̃ (C,k,k) or Ũ (C,k,r): rescaled per class so its Frobenius norm lies in [1e-3, 10] (keeps S bounded)."""
        return self.factor_parts().factor()

    def diagonal_part(self) -> torch.Tensor:
        """d (C,k) = softplus(ρ) of low-rank anchors, without ε."""
        if not self.lowrank:
            raise ValueError(f"diagonal_part() needs covariance='lowrank', got {self.covariance_type!r}")
        return F.softplus(self.raw_scale)

    def variance(self) -> torch.Tensor:
        """Per-dimension variances (C,k), the diagonal of S (the whole of S for diagonal anchors)."""
        if self.diagonal:
            return F.softplus(self.raw_scale) + self.eps
        variance = self.factor().square().sum(-1) + self.eps
        return variance + self.diagonal_part() if self.lowrank else variance

    def covariance(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S (C,k,k) = L̃L̃ᵀ + εI, ŨŨᵀ + diag(d) + εI or diag(v): the one covariance every loss and sample uses.

        ``dtype`` (e.g. float64) forms the product in that precision, from the parameters' values.
        """
        if self.diagonal:
            return torch.diag_embed(self.variance().to(dtype))
        factor = self.factor().to(dtype)
        ridge = torch.full((self.latent_dim,), self.eps, dtype=factor.dtype, device=factor.device)
        if self.lowrank:
            ridge = ridge + self.diagonal_part().to(dtype)
        return factor @ factor.transpose(-1, -2) + torch.diag_embed(ridge.expand(self.num_classes, -1))

    def sample(self, n: int, generator: torch.Generator | None = None,
               parts: FactorParts | None = None) -> torch.Tensor:
        """(C, n, k) reparameterised draws from exactly N(m_c, S_c), so gradients reach m and S.

        ``parts``: this step's ``factor_parts()``, if the caller has it already.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        shape = (self.num_classes, n, self.latent_dim)
        means = self.means[:, None, :]
        if self.diagonal:
            noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
            return means + noise * self.variance().sqrt()[:, None, :]
        parts = parts if parts is not None else self.factor_parts()
        factor_shape = (self.num_classes, n, parts.raw.shape[-1])
        noise = torch.randn(factor_shape, generator=generator, dtype=means.dtype, device=means.device)
        ridge_noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
        if parts.scale is None:
            draws = torch.baddbmm(means.expand(shape), noise, parts.raw.transpose(-1, -2))
        else:
            draws = means + (noise @ parts.raw.transpose(-1, -2)) * parts.scale[:, None, None]
        if self.lowrank:
            return draws + ridge_noise * (self.diagonal_part() + self.eps).sqrt()[:, None, :]
        return draws.add(ridge_noise, alpha=math.sqrt(self.eps))
