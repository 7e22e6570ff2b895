"""One encoder per group into a shared latent space, one shared head, one Gaussian anchor per class."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import ENCODERS, create_encoder, validate_encoder_options
from tdro.models.heads import create_head
from tdro.registry import unknown_choice_message

EncoderSpec = tuple[str, dict[str, Any]]


class MultiGroupModel(nn.Module):
    """Per-group encoders (possibly one shared instance) feeding one head and one set of anchors."""

    def __init__(self, encoders: Mapping[str, nn.Module], head: nn.Module, anchors: nn.Module) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("encoders must map at least one group name to an encoder, got none")
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.anchors = anchors

    @property
    def group_names(self) -> list[str]:
        """Group names in the order the model was built with."""
        return list(self.encoders)

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Latents (B_g, k) per group, in the order of ``inputs``; groups may be a subset."""
        latents = {}
        for name, x in inputs.items():
            if name not in self.encoders:
                raise ValueError(unknown_choice_message("group", name, self.group_names))
            latents[name] = self.encoders[name](x)
        return latents

    def forward(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Latents and class logits per group (the losses need both)."""
        latents = self.encode(inputs)
        return latents, {name: self.head(z) for name, z in latents.items()}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Split parameters for differential learning rates: pretrained backbones vs everything new.

        Every parameter appears exactly once, also when several groups share one encoder.
        """
        backbone_ids = {
            id(p)
            for encoder in self.encoders.values()
            if getattr(encoder, "backbone", None) is not None
            for p in encoder.backbone.parameters()
        }
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "new": []}
        for p in self.parameters():  # nn.Module.parameters() de-duplicates shared modules
            groups["backbone" if id(p) in backbone_ids else "new"].append(p)
        return groups

    def parameter_count(self) -> int:
        """Number of distinct scalar parameters (a shared encoder counts once)."""
        return sum(p.numel() for p in self.parameters())


def resolve_encoder_specs(config: Any, dataset: Any) -> dict[str, EncoderSpec]:
    """Each group's (encoder name, options): the dataset's defaults overridden by ``config.groups``.

    Entries with a ``name`` override that group; entries without names map by position and must
    then be exactly as many as the dataset's groups. An entry's ``encoder`` (default: the group's)
    and every other key (an encoder option) are validated here, so nothing is silently ignored.
    When an entry changes a group's encoder, the dataset's default options (meant for the default
    encoder) are dropped.
    """
    groups = dataset.groups
    names = list(groups)
    specs: dict[str, EncoderSpec] = {n: (g.encoder, dict(g.encoder_options)) for n, g in groups.items()}
    for key, kind in (("visual_encoder", "image"), ("text_encoder", "text")):
        encoder = getattr(config, key, None)
        if encoder is None:
            continue
        kinds = [g.name for g in groups.values() if g.kind == kind]
        if not kinds:
            raise ValueError(f"key {key!r} is {encoder!r} but dataset {dataset.name!r} has no {kind} group "
                             f"(its groups: {', '.join(f'{g.name} ({g.kind})' for g in groups.values())})")
        ENCODERS.get(encoder)
        for name in kinds:
            specs[name] = (encoder, {} if encoder != specs[name][0] else specs[name][1])
    entries = list(config.groups or [])
    if not entries:
        return specs
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"groups[{i}] must be a mapping with 'encoder' and options, got {entry!r}")
    named = ["name" in entry for entry in entries]
    if any(named) and not all(named):
        raise ValueError("groups: either every entry has a 'name' or none has (then they map by position)")
    if all(named):
        targets = []
        for entry in entries:
            if entry["name"] not in groups:
                raise ValueError("groups: " + unknown_choice_message("group", entry["name"], names))
            if entry["name"] in targets:
                raise ValueError(f"groups: group {entry['name']!r} appears more than once")
            targets.append(entry["name"])
    else:
        if len(entries) != len(names):
            raise ValueError(
                f"groups has {len(entries)} entries without names, but the dataset has {len(names)} groups "
                f"({', '.join(names)}); give one entry per group or name the entries"
            )
        targets = names
    for target, entry in zip(targets, entries):
        default_encoder, default_options = specs[target]
        options = {k: v for k, v in entry.items() if k not in ("name", "encoder")}
        encoder = entry.get("encoder", default_encoder)
        if encoder == default_encoder:
            options = {**default_options, **options}
        validate_encoder_options(encoder, options)
        specs[target] = (encoder, options)
    return specs


def build_model(config: Any, dataset: Any) -> MultiGroupModel:
    """Build the model a config asks for on a dataset's groups and classes."""
    specs = resolve_encoder_specs(config, dataset)
    names = list(specs)
    if config.common_encoder:
        first = names[0]
        for name in names[1:]:
            if dataset.groups[name].input_info != dataset.groups[first].input_info:
                raise ValueError(
                    f"common_encoder needs every group to have the same input_info, but {first!r} has "
                    f"{dataset.groups[first].input_info} and {name!r} has {dataset.groups[name].input_info}"
                )
            if specs[name] != specs[first]:
                raise ValueError(
                    f"common_encoder builds one encoder, but groups {first!r} and {name!r} resolve to "
                    f"different encoder specs: {specs[first]} vs {specs[name]}"
                )
        encoder_name, options = specs[first]
        shared = create_encoder(encoder_name, config.latent_dim, dataset.groups[first].input_info, **options)
        encoders = {name: shared for name in names}
    else:
        encoders = {
            name: create_encoder(encoder_name, config.latent_dim, dataset.groups[name].input_info, **options)
            for name, (encoder_name, options) in specs.items()
        }
    num_classes = len(dataset.class_names)
    head = create_head(config.latent_dim, num_classes, config.head_hidden, config.head_dropout)
    rank = config.anchor_rank if config.anchor_covariance == "lowrank" else None
    anchors = GaussianAnchors(num_classes, config.latent_dim, config.anchor_eps, config.anchor_covariance,
                              targets=config.anchor_targets, rank=rank)
    return MultiGroupModel(encoders, head, anchors)
