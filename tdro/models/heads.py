"""The classification head shared by every group, so all groups are read in one latent space."""
from __future__ import annotations

from torch import nn

from tdro.models.encoders import _dropout, _positive_int


def create_head(latent_dim: int, num_classes: int, hidden: int = 0, dropout: float = 0.3) -> nn.Module:
    """Linear head when hidden == 0 (as the method asks), else Linear→ReLU→Dropout→Linear."""
    _positive_int("latent_dim", latent_dim)
    _positive_int("num_classes", num_classes)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"hidden must be a non-negative integer (0 = linear head), got {hidden!r}")
    dropout = _dropout("dropout", dropout)
    if hidden == 0:
        return nn.Linear(latent_dim, num_classes)
    return nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
