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
    batch_product: torch.Tensor | None = None  # X·L[rows] (P,n,r) for the fit, unscaled (factor_parts(batch=…))
    noise_product: torch.Tensor | None = None  # Z·Lᵀ (C,J,k) for the samples, unscaled (factor_parts(noise=…))
    diagonal: torch.Tensor | None = None  # d = softplus(ρ) (C,k) of low-rank anchors, None for full ones

    def factor(self) -> torch.Tensor:
        """L̃ (or Ũ) as one tensor."""
        return self.raw if self.scale is None else self.raw * self.scale[:, None, None]


class _FactorProducts(torch.autograd.Function):
    """‖F_c‖²_F, X·F[rows] and Z·Fᵀ in one op whose backward writes F's one gradient in place.

    Autograd gives each product and the norm a (C,k,k) gradient of its own and adds them up: three
    large temporaries and two more passes over them every step. Here one buffer is accumulated in
    place (2.3× faster than autograd's at latent 256, 20 classes, 1 thread). ``batch``, ``rows``
    and ``noise`` may be None: that product is then None too (``rows`` None: all classes in order).
    """

    @staticmethod
    def forward(ctx, factor, batch, rows, noise):  # noqa: D102 (autograd.Function protocol)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(factor, batch, rows, noise)
        norm_sq = torch.linalg.vector_norm(factor.flatten(1), dim=1).square()
        selected = factor if rows is None else factor.index_select(0, rows)
        batch_product = None if batch is None else torch.bmm(batch, selected)
        noise_product = None if noise is None else torch.bmm(noise, factor.transpose(1, 2))
        return norm_sq, batch_product, noise_product

    @staticmethod
    def backward(ctx, d_norm_sq, d_batch_product, d_noise_product):  # noqa: D102
        factor, batch, rows, noise = ctx.saved_tensors
        d_batch = None
        if d_batch_product is not None and ctx.needs_input_grad[1]:
            selected = factor if rows is None else factor.index_select(0, rows)
            d_batch = torch.bmm(d_batch_product, selected.transpose(1, 2))
        if not ctx.needs_input_grad[0]:  # a fixed factor (targets="random_fixed"): a buffer
            return None, d_batch, None, None
        grad = None
        if d_noise_product is not None:
            grad = torch.bmm(d_noise_product.transpose(1, 2), noise)
        if d_norm_sq is not None:
            weight = (2 * d_norm_sq).view(-1, 1, 1)
            grad = factor * weight if grad is None else grad.addcmul_(factor, weight)
        if d_batch_product is not None:
            if rows is not None:
                grad = torch.zeros_like(factor) if grad is None else grad
                grad.index_add_(0, rows, torch.bmm(batch.transpose(1, 2), d_batch_product))
            elif grad is None:
                grad = torch.bmm(batch.transpose(1, 2), d_batch_product)
            else:
                grad.baddbmm_(batch.transpose(1, 2), d_batch_product)
        return grad, d_batch, None, None


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

    def factor_parts(self, batch: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None) -> FactorParts:
        """L̃ (full) or Ũ (low-rank) as s·raw with its squared norms and this step's products with it.

        One op reads the factor for everything a step needs from it: the norms (for the clip and
        tr S), ``batch``·raw[rows] (the fit's centred classes (P,n,k), ``rows`` (P,) the anchor of
        each row, None for all classes in order) and ``noise``·rawᵀ (the samples' noise
        ``factor_noise(J)``); its backward writes one gradient (``_FactorProducts``). While no norm
        is clipped, s ≡ 1 has zero gradient and is left out (``scale`` None), which keeps it out of
        the backward pass (one read-back of C norms decides). Compute it once per step and hand it
        to every term (``AnchorLoss`` does). Autocast is off: these products feed float64 eigenvalues.
        """
        if self.diagonal:
            raise ValueError("factor() needs covariance='full' or 'lowrank'; diagonal anchors have variance()")
        raw = self.U if self.lowrank else self.L
        with torch.autocast(raw.device.type, enabled=False):
            norm_sq, batch_product, noise_product = _FactorProducts.apply(raw, batch, rows, noise)
        diagonal = self.diagonal_part() if self.lowrank else None
        low, high = FACTOR_NORM_RANGE
        squares = norm_sq.detach()
        if bool(((squares >= low**2) & (squares <= high**2)).all()):
            return FactorParts(raw, None, norm_sq, batch_product, noise_product, diagonal)
        norm = norm_sq.clamp_min(torch.finfo(raw.dtype).tiny).sqrt()
        clipped = norm.clamp(low, high)
        return FactorParts(raw, clipped / norm, clipped.square(), batch_product, noise_product, diagonal)

    def factor_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(C, n, r) standard normal noise for n draws per class (r = k full, the rank low-rank), for ``factor_parts``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        width = self.rank if self.lowrank else self.latent_dim
        return torch.randn((self.num_classes, n, width), generator=generator, dtype=self.means.dtype,
                           device=self.means.device)

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

        ``parts``: this step's ``factor_parts(noise=self.factor_noise(n))``, if the caller has it already.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        shape = (self.num_classes, n, self.latent_dim)
        means = self.means[:, None, :]
        if self.diagonal:
            noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
            return means + noise * self.variance().sqrt()[:, None, :]
        if parts is None:
            parts = self.factor_parts(noise=self.factor_noise(n, generator))
        drawn = None if parts.noise_product is None else parts.noise_product.shape[1]
        if drawn != n:
            raise ValueError(f"parts carry noise for {drawn} draws per class but sample() asked for {n}: "
                             f"pass factor_parts(noise=anchors.factor_noise({n}))")
        ridge_noise = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
        spread = parts.noise_product if parts.scale is None else parts.noise_product * parts.scale[:, None, None]
        draws = means + spread
        if self.lowrank:
            return draws + ridge_noise * (parts.diagonal + self.eps).sqrt()[:, None, :]
        return draws.add(ridge_noise, alpha=math.sqrt(self.eps))
