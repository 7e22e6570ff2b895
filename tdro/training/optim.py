"""Optimisers with backbone/new parameter groups, built by name from the Config.

Two start-up and step costs of ``torch.optim`` are avoided here:

* the fused kernels (one pass per parameter) are chosen wherever torch has them for every
  parameter's device: on CPU the default per-tensor Adam makes about ten passes and costs 5–8×
  more (14 ms against 1.7 ms per step for the two CNN encoders of ``bench/step_overhead.py``);
* ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are wrapped in
  ``torch._dynamo.disable`` and ``step`` in a grad-mode wrapper that places graph breaks; each
  imports the compiler on first call (1.3–2.5 s of every run's start-up). tdro never compiles the
  optimiser, so the optimisers built here call those methods undecorated (the wrappers only
  matter inside ``torch.compile``), ``step`` under the grad mode torch's wrapper sets.
  ``tests/test_import_light.py`` checks that no compiler is imported and the steps are torch's.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from tdro.config import Config
from tdro.registry import Registry

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
_UNCOMPILED_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def _uncompiled(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``base`` with its compiler-importing wrappers left out (see the module docstring)."""
    methods = {name: inspect.unwrap(getattr(base, name)) for name in _UNCOMPILED_METHODS}
    undecorated_step = inspect.unwrap(base.step)

    def step(self: torch.optim.Optimizer, closure: Any = None) -> Any:
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return undecorated_step(self, closure)

    return type(base.__name__, (base,), {**methods, "step": step, "__module__": __name__, "__doc__": base.__doc__})


Adam, AdamW, SGD = (_uncompiled(base) for base in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))


def kernel_options(param_groups: Iterable[dict[str, Any]]) -> dict[str, bool]:
    """``{"fused": True}`` when torch has a fused kernel for every parameter (floating point, supported device)."""
    devices = _get_fused_kernels_supported_devices()
    params = [p for group in param_groups for p in group["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)
    return {"fused": True} if fused else {}


@OPTIMIZERS.register("adam")
def adam(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return Adam(param_groups, lr=config.lr, weight_decay=config.weight_decay, **kernel_options(param_groups))


@OPTIMIZERS.register("adamw")
def adamw(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay, **kernel_options(param_groups))


@OPTIMIZERS.register("sgd")
def sgd(param_groups: list[dict], config: Config) -> torch.optim.Optimizer:
    return SGD(param_groups, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
               nesterov=config.nesterov, **kernel_options(param_groups))


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
