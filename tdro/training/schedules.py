"""Per-epoch learning-rate schedules: one factor per epoch, applied to every parameter group in proportion."""
from __future__ import annotations

import math

from tdro.config import Config


class EpochSchedule:
    """LR factor of epoch e (0-based) relative to each group's base LR; plateau keeps state."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.plateau_factor = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad_epochs = 0

    def factor(self, epoch: int) -> float:
        c = self.config
        warmup = c.lr_warmup_epochs
        if epoch < warmup:
            return (epoch + 1) / (warmup + 1)
        e = epoch - warmup
        span = max(c.epochs - warmup, 1)
        kind = c.lr_scheduler
        if kind == "none":
            return 1.0
        if kind == "linear":
            t = e / (span - 1) if span > 1 else 0.0
            return ((1 - t) * c.lr_start + t * c.lr_end) / c.lr_start
        if kind == "step":
            return c.lr_gamma ** (e // c.lr_step_size)
        if kind == "cosine":
            period = c.T_max or span
            cosine = 0.5 * (1 + math.cos(math.pi * min(e, period) / period))
            return (c.eta_min + (c.lr - c.eta_min) * cosine) / c.lr
        return self.plateau_factor

    def observe(self, value: float, higher_is_better: bool) -> None:
        """Feed the monitored metric after an epoch; only the plateau schedule reacts."""
        if self.config.lr_scheduler != "plateau":
            return
        improved = self.plateau_best is None or (value > self.plateau_best if higher_is_better else value < self.plateau_best)
        if improved:
            self.plateau_best, self.plateau_bad_epochs = value, 0
            return
        self.plateau_bad_epochs += 1
        if self.plateau_bad_epochs > self.config.plateau_patience:
            self.plateau_factor *= self.config.plateau_factor
            self.plateau_bad_epochs = 0

    def state_dict(self) -> dict:
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best,
                "plateau_bad_epochs": self.plateau_bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad_epochs = state["plateau_bad_epochs"]
