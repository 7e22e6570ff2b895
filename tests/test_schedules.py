"""Learning rate of every parameter group at every epoch against the closed forms."""
import math

import pytest
import torch

from tdro.config import Config
from tdro.training.optim import create_optimizer
from tdro.training.schedules import EpochSchedule


def learning_rates(config: Config) -> list[dict[str, float]]:
    params = {"backbone": [torch.nn.Parameter(torch.zeros(1))], "new": [torch.nn.Parameter(torch.zeros(1))]}
    optimizer = create_optimizer(config, params)
    schedule = EpochSchedule(config)
    rates = []
    for epoch in range(config.epochs):
        factor = schedule.factor(epoch)
        rates.append({g["name"]: g["base_lr"] * factor for g in optimizer.param_groups})
    return rates


def test_constant_by_default_with_differential_rates():
    rates = learning_rates(Config(epochs=3, lr=1e-3, lr_backbone=1e-4))
    assert rates == [{"backbone": 1e-4, "new": 1e-3}] * 3


def test_linear_decay_seed_option_a():
    E = 5
    rates = learning_rates(Config(epochs=E, lr_start=1e-3, lr_end=1e-5, lr_backbone=1e-4))
    for e, r in enumerate(rates):
        t = e / (E - 1)
        expected_new = (1 - t) * 1e-3 + t * 1e-5
        assert r["new"] == pytest.approx(expected_new, rel=1e-12)
        assert r["backbone"] == pytest.approx(1e-4 * expected_new / 1e-3, rel=1e-12)
    assert rates[0]["new"] == pytest.approx(1e-3) and rates[-1]["new"] == pytest.approx(1e-5)


def test_step_lr():
    rates = learning_rates(Config(epochs=7, lr=1e-2, lr_scheduler="StepLR", lr_step_size=3, lr_gamma=0.1))
    assert [r["new"] for r in rates] == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-4])


def test_cosine_matches_torch_cosine_annealing():
    config = Config(epochs=6, lr=1e-2, lr_scheduler="CosineAnnealingLR", T_max=4, eta_min=1e-4)
    ours = [r["new"] for r in learning_rates(config)]
    closed = [1e-4 + (1e-2 - 1e-4) * (1 + math.cos(math.pi * min(e, 4) / 4)) / 2 for e in range(6)]
    assert ours == pytest.approx(closed, rel=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4, eta_min=1e-4)
    torch_rates = []
    for _ in range(5):
        torch_rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert ours[:5] == pytest.approx(torch_rates, rel=1e-9)


def test_warmup_then_schedule():
    rates = [r["new"] for r in learning_rates(Config(epochs=5, lr=1e-3, lr_warmup_epochs=2,
                                                     lr_scheduler="step", lr_step_size=2, lr_gamma=0.5))]
    assert rates == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 5e-4])


def test_plateau_decays_after_patience_without_improvement():
    schedule = EpochSchedule(Config(lr_scheduler="plateau", plateau_patience=1, plateau_factor=0.5))
    factors = []
    for value in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]:
        factors.append(schedule.factor(0))
        schedule.observe(value, higher_is_better=True)
    assert factors == [1, 1, 1, 1, 0.5, 0.5, 0.5]
    assert schedule.factor(0) == 0.25


@pytest.mark.parametrize("name, cls, extra", [
    ("adam", torch.optim.Adam, {}),
    ("adamw", torch.optim.AdamW, {}),
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "nesterov": True}),
])
def test_optimizers_are_built_by_name_with_their_options(name, cls, extra):
    config = Config(optimizer=name, lr=1e-2, weight_decay=1e-3, **extra)
    params = {"backbone": [], "new": [torch.nn.Parameter(torch.zeros(2))]}
    optimizer = create_optimizer(config, params)
    assert type(optimizer).__bases__ == (cls,)  # torch's optimiser without its compiler-importing wrappers
    (group,) = optimizer.param_groups
    assert group["fused"] is True  # one pass per parameter on CPU
    assert group["name"] == "new" and group["lr"] == 1e-2 and group["weight_decay"] == 1e-3
    for key, value in extra.items():
        assert group[key] == value
