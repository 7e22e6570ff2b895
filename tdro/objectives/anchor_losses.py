"""Anchor losses: pull each class's latents onto its Gaussian anchor (fit) and keep anchors apart (sep)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tdro.models.anchors import FactorParts, GaussianAnchors
from tdro.objectives.gaussian import (
    ClassMoments,
    anchor_rows,
    class_moments,
    diagonal_bures_wasserstein_sq,
    diagonal_moments_bures_wasserstein_sq,
    factored_bures_wasserstein_sq,
    gram_route,
    lowrank_bures_wasserstein_sq,
)
from tdro.registry import unknown_choice_message

SEPARATION_METHODS = ("classifier", "w2_margin")


def fit_moments(
    latents: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor | None, num_classes: int,
    per_group_fit: bool = False,
) -> ClassMoments:
    """The batch class moments the fit compares with the anchors: pooled, or per (group, class), in float32 or better."""
    if per_group_fit and group_ids is None:
        raise ValueError("per_group_fit=True needs group_ids, got None")
    with torch.autocast(latents.device.type, enabled=False):
        latents = latents.to(torch.promote_types(latents.dtype, torch.float32))
        return class_moments(latents, labels, num_classes, group_ids if per_group_fit else None)


def fit_factor_inputs(moments: ClassMoments, num_classes: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(X, rows) for ``GaussianAnchors.factor_parts``: the product X·F[rows] the fit needs (None, None when none)."""
    if moments.num == 0 or not gram_route(moments):
        return None, None
    return moments.centred, anchor_rows(moments, num_classes)


def fit_loss(
    latents: torch.Tensor,
    labels: torch.Tensor,
    group_ids: torch.Tensor | None,
    anchors: GaussianAnchors,
    per_group_fit: bool = False,
    parts: FactorParts | None = None,
    moments: ClassMoments | None = None,
) -> torch.Tensor:
    """Mean W₂² from each batch class Gaussian (n_c ≥ 2) to its anchor; 0 when no class qualifies.

    Pooled over groups by default (no group is pulled to the anchor on its own); with
    ``per_group_fit`` the moments are per (group, class) and the loss is averaged within each
    group, then over the groups present (reference-method.md §2.4). Computed in float32 or
    better with autocast off: a difference of traces and eigenvalue roots has no bf16 to spare.
    Only the classes in the batch are read from the anchors. ``moments`` (``fit_moments``) and
    ``parts`` (``anchors.factor_parts(*fit_factor_inputs(moments, C))``): this step's, if the
    caller has them already.
    """
    if moments is None:
        moments = fit_moments(latents, labels, group_ids, anchors.num_classes, per_group_fit)
    if moments.num == 0:
        return latents.new_zeros((), dtype=moments.centred.dtype)
    with torch.autocast(latents.device.type, enabled=False):
        if anchors.diagonal:
            distances = diagonal_moments_bures_wasserstein_sq(moments, anchors.means, anchors.variance())
        else:
            if parts is None:
                parts = anchors.factor_parts(*fit_factor_inputs(moments, anchors.num_classes))
            distances = lowrank_bures_wasserstein_sq(moments, anchors.means, parts.raw, anchors.eps, parts.scale,
                                                     parts.diagonal, parts.norm_sq, parts.batch_product)
    if not per_group_fit:
        return distances.mean()
    _, group_index, rows_per_group = torch.unique(moments.groups, return_inverse=True, return_counts=True)
    group_sums = distances.new_zeros(rows_per_group.shape).index_add(0, group_index, distances)
    return (group_sums / rows_per_group).mean()


def classifier_separation_loss(
    anchors: GaussianAnchors,
    head: nn.Module,
    samples_per_class: int,
    generator: torch.Generator | None = None,
    parts: FactorParts | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the head on J draws from each anchor, in one head call on all C·J samples.

    ``parts``: this step's ``anchors.factor_parts(noise=anchors.factor_noise(J))``, if the caller has it.
    """
    samples = anchors.sample(samples_per_class, generator=generator, parts=parts)
    logits = head(samples.reshape(-1, anchors.latent_dim))
    targets = torch.arange(anchors.num_classes, device=logits.device).repeat_interleave(samples_per_class)
    return F.cross_entropy(logits, targets)


def w2_margin_separation_loss(anchors: GaussianAnchors, margin: float) -> torch.Tensor:
    """Mean over class pairs i<j of max(0, margin − W₂²(anchor_i, anchor_j)), batched over pairs.

    Autocast is off here for the same reason as in ``fit_loss``.
    """
    means = anchors.means
    if anchors.num_classes < 2:
        return means.new_zeros(())
    i, j = torch.triu_indices(anchors.num_classes, anchors.num_classes, 1, device=means.device)
    with torch.autocast(means.device.type, enabled=False):
        if anchors.diagonal:
            variance = anchors.variance()
            distances = diagonal_bures_wasserstein_sq(means[i], variance[i], means[j], variance[j])
        else:
            covariance = anchors.covariance(torch.float64)  # S and its Cholesky factor in float64 (gaussian._precise)
            chol = torch.linalg.cholesky(covariance)  # positive definite (+εI with anchor_eps ≥ 1e-10)
            distances = factored_bures_wasserstein_sq(means[i], covariance[i], means[j], covariance[j], chol[j])
    return F.relu(margin - distances).mean()


class AnchorLoss:
    """λ_fit·fit + λ_sep·sep; a term whose λ is 0 is not computed at all (it could only add NaNs)."""

    def __init__(
        self,
        lambda_fit: float,
        lambda_sep: float,
        sep_method: str = "classifier",
        samples_per_class: int = 16,
        margin: float = 2.0,
        per_group_fit: bool = False,
    ) -> None:
        for name, value in (("lambda_fit", lambda_fit), ("lambda_sep", lambda_sep), ("margin", margin)):
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if sep_method not in SEPARATION_METHODS:
            raise ValueError(unknown_choice_message("sep_method", sep_method, list(SEPARATION_METHODS)))
        if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 1:
            raise ValueError(f"samples_per_class must be an integer >= 1, got {samples_per_class!r}")
        if not isinstance(per_group_fit, bool):
            raise ValueError(f"per_group_fit must be True or False, got {per_group_fit!r}")
        self.lambda_fit = float(lambda_fit)
        self.lambda_sep = float(lambda_sep)
        self.sep_method = sep_method
        self.samples_per_class = samples_per_class
        self.margin = float(margin)
        self.per_group_fit = per_group_fit

    def __call__(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor,
        group_ids: torch.Tensor | None,
        anchors: GaussianAnchors,
        head: nn.Module,
    ) -> dict[str, torch.Tensor]:
        """Unweighted ``"fit"`` / ``"sep"`` for the terms computed, and the weighted ``"total"``."""
        parts: dict[str, torch.Tensor] = {}
        classifier = bool(self.lambda_sep) and self.sep_method == "classifier"
        moments = None
        if self.lambda_fit:
            moments = fit_moments(latents, labels, group_ids, anchors.num_classes, self.per_group_fit)
        factor = None
        if not anchors.diagonal and (moments is not None or classifier):  # one op for both terms' products
            batch, rows = (None, None) if moments is None else fit_factor_inputs(moments, anchors.num_classes)
            noise = anchors.factor_noise(self.samples_per_class) if classifier else None
            factor = anchors.factor_parts(batch, rows, noise)
        total = latents.new_zeros(())
        if self.lambda_fit:
            parts["fit"] = fit_loss(latents, labels, group_ids, anchors, self.per_group_fit, factor, moments)
            total = self.lambda_fit * parts["fit"]
        if self.lambda_sep:
            if classifier:
                parts["sep"] = classifier_separation_loss(anchors, head, self.samples_per_class, parts=factor)
            else:
                parts["sep"] = w2_margin_separation_loss(anchors, self.margin)
            total = total + self.lambda_sep * parts["sep"]
        parts["total"] = total
        return parts
