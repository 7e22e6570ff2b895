"""Encoders, heads, Gaussian anchors and the multi-group model; torchvision is imported only when needed."""
from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import ENCODERS, create_encoder
from tdro.models.heads import create_head
from tdro.models.multigroup import MultiGroupModel, build_model, resolve_encoder_specs

__all__ = [
    "ENCODERS",
    "GaussianAnchors",
    "MultiGroupModel",
    "build_model",
    "create_encoder",
    "create_head",
    "resolve_encoder_specs",
]
