"""GroupDRO (Sagawa et al.): weights q on the simplex up-weight the groups with the largest losses."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tdro.registry import unknown_choice_message

UPDATE_MODES = ("exp", "softmax", "exp_smooth")
OBJECTIVES = ("weighted", "max", "logsumexp")
INITS = ("uniform", "proportional")


def group_mean_losses(
    per_sample_loss: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss per group (G,) by one scatter, and which groups have samples (absent groups get 0)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
    if per_sample_loss.dim() != 1 or group_ids.shape != per_sample_loss.shape:
        raise ValueError(
            "per_sample_loss and group_ids must both have shape (N,), got "
            f"{tuple(per_sample_loss.shape)} and {tuple(group_ids.shape)}"
        )
    counts = torch.bincount(group_ids, minlength=num_groups)
    sums = per_sample_loss.new_zeros(num_groups).index_add(0, group_ids, per_sample_loss)
    return sums / counts.clamp_min(1).to(per_sample_loss.dtype), counts > 0


def _number(
    name: str, value: object, low: float, high: float = math.inf, low_open: bool = False, why: str = ""
) -> float:
    """A finite real in [low, high] (or (low, high]), else a ValueError naming it and the range."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"{name} must be a finite number in {interval}{why}, got {value!r}")
    return float(value)


class GroupDRO:
    """Group weights q and the robust objective over the groups present in a batch.

    State is log-space weights q_raw (updated by multiplicative weights, never overflowing);
    q = f + (1 − G·f)·q_raw, so a floor f = ``min_group_weight`` is exact and q stays on the
    simplex. Updates (``update_mode``, ℓ' = ℓ + adjustment/√n_g, Sagawa et al.'s generalisation
    adjustment):

    * ``exp``: q ← normalise(q ⊙ exp(ηℓ'));
    * ``softmax``: q ← softmax(ηℓ') (stateless);
    * ``exp_smooth``: q ← γ·q + (1 − γ)·normalise(q ⊙ exp(ηℓ')). Larger γ = more smoothing,
      γ = 0 = plain ``exp`` (the seed's meaning). The reference code used the opposite
      convention, q ← (1 − γ)·q + γ·q_mwu.

    Only present groups (with finite losses) are updated, within their current total mass:
    absent groups keep their weight. ``update`` leaves q at its initial value while
    epoch < ``warmup_epochs``. State lives on the device of the losses it is given.
    """

    def __init__(
        self,
        num_groups: int,
        eta: float = 0.01,
        update_mode: str = "exp",
        objective: str = "weighted",
        gamma: float = 0.9,
        init: str = "uniform",
        group_sizes: Sequence[float] | torch.Tensor | None = None,
        min_group_weight: float = 0.0,
        adjustment: float = 0.0,
        warmup_epochs: int = 0,
    ) -> None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        if update_mode not in UPDATE_MODES:
            raise ValueError(unknown_choice_message("groupdro update_mode", update_mode, list(UPDATE_MODES)))
        if objective not in OBJECTIVES:
            raise ValueError(unknown_choice_message("groupdro objective", objective, list(OBJECTIVES)))
        if init not in INITS:
            raise ValueError(unknown_choice_message("groupdro init", init, list(INITS)))
        self.eta = _number("eta", eta, 0.0, low_open=True)
        self.gamma = _number("gamma", gamma, 0.0, 1.0)
        self.min_group_weight = _number(
            "min_group_weight", min_group_weight, 0.0, 1.0 / num_groups, why=" (num_groups × floor ≤ 1)"
        )
        self.adjustment = _number("adjustment", adjustment, 0.0)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.num_groups = num_groups
        self.update_mode = update_mode
        self.objective = objective
        self.warmup_epochs = warmup_epochs
        sizes = None
        if group_sizes is not None:
            try:
                sizes = torch.as_tensor(group_sizes, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                sizes = torch.zeros(0)
            if sizes.shape != (num_groups,) or not bool(torch.isfinite(sizes).all() and (sizes > 0).all()):
                raise ValueError(f"group_sizes must be {num_groups} positive numbers, got {group_sizes!r}")
        for needs, what in ((init == "proportional", "init='proportional'"), (self.adjustment > 0, "adjustment > 0")):
            if needs and sizes is None:
                raise ValueError(f"{what} needs group_sizes (training samples per group), got None")
        if init == "proportional":
            self._log_weights = torch.log(sizes / sizes.sum())
        else:
            self._log_weights = torch.full((num_groups,), -math.log(num_groups))
        self._shift = self.adjustment / sizes.sqrt() if self.adjustment > 0 else torch.zeros(num_groups)

    def _check(self, group_losses: torch.Tensor, present: torch.Tensor) -> None:
        """Shapes must match the number of groups; state follows the losses' device."""
        if group_losses.shape != (self.num_groups,) or present.shape != (self.num_groups,):
            raise ValueError(
                f"group_losses and present must have shape ({self.num_groups},), got "
                f"{tuple(group_losses.shape)} and {tuple(present.shape)}"
            )
        if self._log_weights.device != group_losses.device:
            self._log_weights = self._log_weights.to(group_losses.device)
            self._shift = self._shift.to(group_losses.device)

    @property
    def q(self) -> torch.Tensor:
        """Current group weights (G,) on the simplex, each ≥ min_group_weight."""
        floor = self.min_group_weight
        mix = max(0.0, 1.0 - self.num_groups * floor)
        return floor + mix * torch.softmax(self._log_weights, 0)

    def loss(self, group_losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The robust objective over present groups, differentiable wrt every present group's loss."""
        self._check(group_losses, present)
        present = present.bool()
        if self.objective == "weighted":
            weights = torch.where(present, self.q.to(group_losses.dtype), 0.0)
            weights = weights / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
            return (weights * torch.where(present, group_losses, 0.0)).sum()
        masked = torch.where(present, group_losses, -math.inf)
        if self.objective == "max":
            value = masked.amax()
        else:
            value = torch.logsumexp(self.eta * masked, 0) / self.eta
        return torch.where(present.any(), value, 0.0)

    def update(self, group_losses: torch.Tensor, present: torch.Tensor, epoch: int) -> None:
        """One weight update from detached group losses (no-op during warm-up epochs, counted from 0)."""
        self._check(group_losses, present)
        if epoch < self.warmup_epochs:
            return
        log_weights = self._log_weights
        losses = group_losses.detach().to(log_weights.dtype)
        present = present.bool() & torch.isfinite(losses)
        scores = self.eta * (losses + self._shift)
        if self.update_mode != "softmax":
            scores = log_weights + scores
        scores = torch.where(present, scores, -math.inf)
        present_mass = torch.logsumexp(torch.where(present, log_weights, -math.inf), 0)
        updated = scores - torch.logsumexp(scores, 0) + present_mass
        if self.update_mode == "exp_smooth":
            keep = math.log(self.gamma) if self.gamma > 0 else -math.inf
            move = math.log1p(-self.gamma) if self.gamma < 1 else -math.inf
            updated = torch.logaddexp(log_weights + keep, updated + move)
        updated = torch.where(present, updated, log_weights)
        self._log_weights = updated - torch.logsumexp(updated, 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only, so checkpoints load with torch.load(weights_only=True)."""
        return {"log_weights": self._log_weights.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the weights saved by ``state_dict`` (on the device they are next used on)."""
        log_weights = state.get("log_weights") if isinstance(state, dict) else None
        if not isinstance(log_weights, torch.Tensor) or log_weights.shape != (self.num_groups,):
            raise ValueError(
                f"GroupDRO state must hold 'log_weights' of shape ({self.num_groups},), got {state!r}"
            )
        self._log_weights = log_weights.detach().to(self._log_weights.device, torch.float32).clone()
