"""Gaussian distances, anchor losses and GroupDRO: the objectives the trainer combines."""
from tdro.objectives.anchor_losses import (
    SEPARATION_METHODS,
    AnchorLoss,
    classifier_separation_loss,
    fit_loss,
    w2_margin_separation_loss,
)
from tdro.objectives.gaussian import (
    ClassMoments,
    bures_wasserstein_sq,
    class_moments,
    diagonal_bures_wasserstein_sq,
    diagonal_moments_bures_wasserstein_sq,
    factored_bures_wasserstein_sq,
    lowrank_bures_wasserstein_sq,
)
from tdro.objectives.groupdro import INITS, OBJECTIVES, UPDATE_MODES, GroupDRO, group_mean_losses

__all__ = [
    "INITS",
    "OBJECTIVES",
    "SEPARATION_METHODS",
    "UPDATE_MODES",
    "AnchorLoss",
    "ClassMoments",
    "GroupDRO",
    "bures_wasserstein_sq",
    "class_moments",
    "classifier_separation_loss",
    "diagonal_bures_wasserstein_sq",
    "diagonal_moments_bures_wasserstein_sq",
    "factored_bures_wasserstein_sq",
    "fit_loss",
    "group_mean_losses",
    "lowrank_bures_wasserstein_sq",
    "w2_margin_separation_loss",
]
