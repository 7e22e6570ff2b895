"""One learnable Gaussian N(m_c, S_c) per class in the latent space: the target of the fit loss.

There is exactly one distribution per class. The fit loss, the separation samples and
``sample()`` all use S_c = L̃_c L̃_cᵀ + εI (full) or diag(softplus(ρ_c) + ε) (diagonal); the
reference drew from three different ones (reference-method.md §8.1, bug 2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tdro.registry import unknown_choice_message

COVARIANCES = ("full", "diagonal")
TARGETS = ("learned", "random_fixed")
FACTOR_NORM_RANGE = (1e-3, 10.0)  # Frobenius-norm bounds of L̃_c, as in the reference's normalize_L


class GaussianAnchors(nn.Module):
    """Per-class Gaussian anchors with full (factored) or diagonal covariance.

    Means start at N(0, mean_init_std²) per coordinate (default 0.1, as the reference's EMBED
    anchors), not at 0: the reference put every class mean at the origin, so all anchors started
    on top of each other. The covariance starts at init_scale²·I + εI in both modes (full:
    L = init_scale·I; diagonal: softplus(ρ) = init_scale²). The draw uses torch's global RNG,
    which the trainer seeds.

    ``targets="random_fixed"`` (a control) draws the covariance at random too, with the same
    expectation init_scale²·I: full L = init_scale·A/√k with A standard normal (k×k), so L Lᵀ is
    a scaled Wishart draw; diagonal variances are init_scale²·χ²_k/k, the law of that draw's
    diagonal. The tensors are then buffers: kept in the state_dict, never trained.
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
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("latent_dim", latent_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if covariance not in COVARIANCES:
            raise ValueError(unknown_choice_message("anchor covariance", covariance, list(COVARIANCES)))
        if targets not in TARGETS:
            raise ValueError(unknown_choice_message("anchor targets", targets, list(TARGETS)))
        numbers = (("eps", eps, True), ("init_scale", init_scale, True), ("mean_init_std", mean_init_std, False))
        for name, value, positive in numbers:
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.eps = float(eps)
        self.covariance_type = covariance
        self.targets = targets
        fixed = targets == "random_fixed"
        tensors = {"means": torch.randn(num_classes, latent_dim) * mean_init_std}
        if covariance == "full" and fixed:
            tensors["L"] = torch.randn(num_classes, latent_dim, latent_dim) * (init_scale / math.sqrt(latent_dim))
        elif covariance == "full":
            tensors["L"] = init_scale * torch.eye(latent_dim).repeat(num_classes, 1, 1)
        elif fixed:
            half = torch.tensor(latent_dim / 2)
            variance = init_scale**2 * torch.distributions.Gamma(half, half).sample((num_classes, latent_dim))
            tensors["raw_scale"] = variance + torch.log(-torch.expm1(-variance))  # softplus⁻¹, stable for small v
        else:
            raw = math.log(math.expm1(init_scale**2))  # softplus⁻¹(init_scale²)
            tensors["raw_scale"] = torch.full((num_classes, latent_dim), raw)
        for name, tensor in tensors.items():
            if fixed:
                self.register_buffer(name, tensor)
            else:
                setattr(self, name, nn.Parameter(tensor))

    @property
    def diagonal(self) -> bool:
        """Whether S_c is diagonal (closed-form losses apply)."""
        return self.covariance_type == "diagonal"

    def factor_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, s) with L̃_c = s_c·L_c, so losses can scale small products instead of the (C,k,k) tensor.

        While no norm is clipped, s ≡ 1 has zero gradient; it is then returned as a constant, which
        keeps the norm out of the backward pass (one read-back of C norms decides).
        """
        if self.diagonal:
            raise ValueError("factor() needs covariance='full'; diagonal anchors have variance()")
        low, high = FACTOR_NORM_RANGE
        norm = torch.linalg.matrix_norm(self.L.detach())
        if bool(((norm >= low) & (norm <= high)).all()):
            return self.L, torch.ones_like(norm)
        norm = torch.linalg.matrix_norm(self.L).clamp_min(torch.finfo(self.L.dtype).tiny)
        return self.L, norm.clamp(low, high) / norm

    def factor(self) -> torch.Tensor:
        """L̃ (C,k,k): L rescaled per class so its Frobenius norm lies in [1e-3, 10] (keeps S bounded)."""
        raw, scale = self.factor_parts()
        return raw * scale[:, None, None]

    def variance(self) -> torch.Tensor:
        """Per-dimension variances (C,k), the diagonal of S (the whole of S for diagonal anchors)."""
        if self.diagonal:
            return F.softplus(self.raw_scale) + self.eps
        return self.factor().square().sum(-1) + self.eps

    def covariance(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S (C,k,k) = L̃L̃ᵀ + εI or diag(v): the one covariance every loss and sample uses.

        ``dtype`` (e.g. float64) forms the product in that precision, from the parameters' values.
        """
        if self.diagonal:
            return torch.diag_embed(self.variance().to(dtype))
        factor = self.factor().to(dtype)
        eye = torch.eye(self.latent_dim, dtype=factor.dtype, device=factor.device)
        return factor @ factor.transpose(-1, -2) + self.eps * eye

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(C, n, k) reparameterised draws from exactly N(m_c, S_c), so gradients reach m and S."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        shape = (self.num_classes, n, self.latent_dim)
        means = self.means[:, None, :]
        noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
        if self.diagonal:
            return means + noise * self.variance().sqrt()[:, None, :]
        ridge_noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
        raw, scale = self.factor_parts()
        return means + (noise @ raw.transpose(-1, -2)) * scale[:, None, None] + math.sqrt(self.eps) * ridge_noise
