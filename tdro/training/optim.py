"""Optimisers with backbone/new parameter groups, built by name from the Config."""
from __future__ import annotations

import torch
from torch import nn

from tdro.config import Config
from tdro.registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")


@OPTIMIZERS.register("adam")
def adam(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups, lr=config.lr, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups, lr=config.lr, weight_decay=config.weight_decay,
                           momentum=config.momentum, nesterov=config.nesterov)


def base_learning_rates(config: Config) -> dict[str, float]:
    """LR of each parameter group before scheduling: lr_backbone / lr_new, each defaulting to lr (lr_start when linear)."""
    default = config.lr_start if config.lr_scheduler == "linear" else config.lr
    return {"backbone": config.lr_backbone if config.lr_backbone is not None else default,
            "new": config.lr_new if config.lr_new is not None else default}


def create_optimizer(config: Config, parameter_groups: dict[str, list[nn.Parameter]]) -> torch.optim.Optimizer:
    """One optimiser over the non-empty parameter groups, each named and at its base LR."""
    base = base_learning_rates(config)
    groups = [{"params": params, "lr": base[name], "name": name, "base_lr": base[name]}
              for name, params in parameter_groups.items() if params]
    return OPTIMIZERS.get(config.optimizer)(groups, config)
