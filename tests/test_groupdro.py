"""GroupDRO against numpy hand computations; q stays on the simplex under hostile updates."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import scipy.special
import torch

from tdro.objectives.groupdro import GroupDRO, group_mean_losses

ALL = torch.ones(3, dtype=torch.bool)


def hand_update(q: np.ndarray, losses: np.ndarray, present: np.ndarray, mode: str, eta: float, gamma: float):
    """The SPEC §5 update on the present groups, within their current mass, in plain float64 numpy."""
    q = q.copy()
    mass = q[present].sum()
    if mode == "softmax":
        new = np.exp(eta * losses[present])
    else:
        new = q[present] * np.exp(eta * losses[present])
    new = mass * new / new.sum()
    if mode == "exp_smooth":
        new = gamma * q[present] + (1 - gamma) * new
    q[present] = new
    return q


@pytest.mark.parametrize("mode", ["exp", "softmax", "exp_smooth"])
def test_each_mode_matches_a_hand_computation(mode):
    rng = np.random.default_rng(0)
    dro = GroupDRO(3, eta=0.5, update_mode=mode, gamma=0.7)
    q = np.full(3, 1 / 3)
    for step in range(5):
        losses = rng.uniform(0, 3, size=3)
        dro.update(torch.tensor(losses, dtype=torch.float32), ALL, epoch=0)
        q = hand_update(q, losses, np.ones(3, bool), mode, 0.5, 0.7)
        np.testing.assert_allclose(dro.q.numpy(), q, rtol=1e-5)
    assert np.abs(q - 1 / 3).max() > 0.05  # the weights did move


def test_exp_smooth_gamma_follows_the_seed_convention():
    losses = torch.tensor([2.0, 0.0, 0.0])
    plain, unsmoothed, frozen = GroupDRO(3, eta=1.0), GroupDRO(3, 1.0, "exp_smooth", gamma=0.0), GroupDRO(
        3, 1.0, "exp_smooth", gamma=1.0
    )
    for dro in (plain, unsmoothed, frozen):
        dro.update(losses, ALL, epoch=0)
    torch.testing.assert_close(unsmoothed.q, plain.q)  # γ = 0: plain exp
    torch.testing.assert_close(frozen.q, torch.full((3,), 1 / 3))  # γ = 1: no movement
    strong, weak = GroupDRO(3, 1.0, "exp_smooth", gamma=0.9), GroupDRO(3, 1.0, "exp_smooth", gamma=0.1)
    strong.update(losses, ALL, epoch=0)
    weak.update(losses, ALL, epoch=0)
    assert 1 / 3 < strong.q[0] < weak.q[0] < plain.q[0]  # larger γ = more smoothing


@pytest.mark.parametrize("mode", ["exp", "softmax", "exp_smooth"])
def test_absent_groups_keep_their_weight(mode):
    rng = np.random.default_rng(1)
    dro = GroupDRO(4, eta=0.8, update_mode=mode, gamma=0.5, init="proportional", group_sizes=[10, 20, 30, 40])
    q = np.array([0.1, 0.2, 0.3, 0.4])
    for present in ([True, False, True, True], [False, True, True, False], [True, True, True, True]):
        losses = rng.uniform(0, 4, size=4)
        losses_in = torch.tensor(np.where(present, losses, np.nan), dtype=torch.float32)  # absent: any value
        before = dro.q.clone()
        dro.update(losses_in, torch.tensor(present), epoch=0)
        q = hand_update(q, losses, np.array(present), mode, 0.8, 0.5)
        np.testing.assert_allclose(dro.q.numpy(), q, rtol=1e-5)
        absent = ~torch.tensor(present)
        torch.testing.assert_close(dro.q[absent], before[absent])


def test_no_group_present_changes_nothing():
    dro = GroupDRO(3, eta=1.0)
    dro.update(torch.tensor([1.0, 5.0, 2.0]), ALL, epoch=0)
    before = dro.q.clone()
    dro.update(torch.tensor([9.0, 9.0, 9.0]), torch.zeros(3, dtype=torch.bool), epoch=0)
    torch.testing.assert_close(dro.q, before)


@pytest.mark.parametrize("mode, floor", [("exp", 0.0), ("softmax", 0.05), ("exp_smooth", 0.1)])
def test_q_stays_on_the_simplex_through_ten_thousand_hostile_updates(mode, floor):
    g = torch.Generator().manual_seed(2)
    groups, steps = 5, 10_000
    losses = torch.rand(steps, groups, generator=g) * 1e4
    losses[::7] = 1e4
    losses[::11, 0] = 0.0
    present = torch.rand(steps, groups, generator=g) < 0.6
    dro = GroupDRO(groups, eta=1.0, update_mode=mode, gamma=0.3, min_group_weight=floor)
    history = torch.empty(steps, groups)
    for step in range(steps):
        dro.update(losses[step], present[step], epoch=step)
        history[step] = dro.q
    assert torch.isfinite(history).all()
    assert (history.sum(1) - 1).abs().max() < 1e-6
    assert (history >= torch.tensor(floor, dtype=torch.float32)).all()
    assert history.max() > 0.99 - groups * floor  # the updates were extreme (near one-hot)


def test_floor_is_exact_and_applies_to_the_raw_weights():
    dro = GroupDRO(3, eta=1.0, min_group_weight=0.1)
    for _ in range(50):
        dro.update(torch.tensor([50.0, 0.0, 0.0]), ALL, epoch=0)
    q = dro.q
    assert q[1].item() == pytest.approx(0.1, abs=1e-7) and q[2].item() == pytest.approx(0.1, abs=1e-7)
    assert q[0].item() == pytest.approx(0.8, abs=1e-6)
    fresh, raw = GroupDRO(3, eta=0.4, min_group_weight=0.2), np.full(3, 1 / 3)
    losses = np.array([1.0, 2.0, 0.5])
    fresh.update(torch.tensor(losses, dtype=torch.float32), ALL, epoch=0)
    raw = hand_update(raw, losses, np.ones(3, bool), "exp", 0.4, 0.0)
    np.testing.assert_allclose(fresh.q.numpy(), 0.2 + (1 - 3 * 0.2) * raw, rtol=1e-6)


def test_adjustment_adds_c_over_root_group_size_to_the_losses():
    sizes, c = np.array([100.0, 25.0, 4.0]), 0.6
    dro = GroupDRO(3, eta=0.5, adjustment=c, group_sizes=sizes.tolist())
    losses = np.array([1.0, 1.0, 1.0])
    dro.update(torch.tensor(losses, dtype=torch.float32), ALL, epoch=0)
    want = hand_update(np.full(3, 1 / 3), losses + c / np.sqrt(sizes), np.ones(3, bool), "exp", 0.5, 0.0)
    np.testing.assert_allclose(dro.q.numpy(), want, rtol=1e-6)
    assert dro.q[2] > dro.q[1] > dro.q[0]  # equal losses: the smallest group gains


def test_warmup_keeps_the_initial_weights():
    dro = GroupDRO(2, eta=1.0, warmup_epochs=2, init="proportional", group_sizes=[30, 10])
    for epoch in (0, 1):
        dro.update(torch.tensor([0.0, 5.0]), torch.ones(2, dtype=torch.bool), epoch=epoch)
        torch.testing.assert_close(dro.q, torch.tensor([0.75, 0.25]))
    dro.update(torch.tensor([0.0, 5.0]), torch.ones(2, dtype=torch.bool), epoch=2)
    assert dro.q[1] > 0.25


def test_weighted_objective_renormalises_q_over_present_groups():
    dro = GroupDRO(3, init="proportional", group_sizes=[1, 2, 5])
    losses = torch.tensor([2.0, 3.0, 7.0], requires_grad=True)
    present = torch.tensor([True, True, False])
    value = dro.loss(losses, present)
    assert value.item() == pytest.approx((1 * 2.0 + 2 * 3.0) / 3)
    (grad,) = torch.autograd.grad(value, losses)
    torch.testing.assert_close(grad, torch.tensor([1 / 3, 2 / 3, 0.0]))


@pytest.mark.parametrize("objective", ["weighted", "max", "logsumexp"])
def test_objectives_give_gradient_to_the_worst_group(objective):
    dro = GroupDRO(3, eta=0.5, objective=objective)
    losses = torch.tensor([0.3, 2.5, 1.0], requires_grad=True)
    (grad,) = torch.autograd.grad(dro.loss(losses, ALL), losses)
    assert grad[1] > 0
    if objective != "weighted":  # weighted spreads the gradient by q (uniform here)
        assert grad.argmax() == 1
    if objective == "max":
        torch.testing.assert_close(grad, torch.tensor([0.0, 1.0, 0.0]))


def test_max_and_logsumexp_values_with_absent_groups_and_huge_losses():
    losses = torch.tensor([1e4, 9.9e3, 5e3, 2e4])
    present = torch.tensor([True, True, True, False])
    assert GroupDRO(4, objective="max").loss(losses, present).item() == 1e4
    eta = 1.0
    want = scipy.special.logsumexp(eta * np.array([1e4, 9.9e3, 5e3])) / eta
    got = GroupDRO(4, eta=eta, objective="logsumexp").loss(losses, present)
    assert math.isfinite(got.item()) and got.item() == pytest.approx(want, rel=1e-6)


def test_state_dict_round_trip_through_weights_only_load():
    dro = GroupDRO(3, eta=0.3, update_mode="exp_smooth")
    for losses in ([1.0, 2.0, 3.0], [0.5, 4.0, 1.0]):
        dro.update(torch.tensor(losses), ALL, epoch=0)
    buffer = io.BytesIO()
    torch.save(dro.state_dict(), buffer)
    buffer.seek(0)
    restored = GroupDRO(3, eta=0.3, update_mode="exp_smooth")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.q, dro.q)
    for d in (dro, restored):
        d.update(torch.tensor([3.0, 0.0, 1.0]), ALL, epoch=1)
    torch.testing.assert_close(restored.q, dro.q)
    with pytest.raises(ValueError, match="log_weights"):
        restored.load_state_dict({"log_weights": torch.zeros(2)})


def test_group_mean_losses_match_a_loop_and_mark_absent_groups():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0], requires_grad=True)
    group_ids = torch.tensor([0, 2, 0, 2, 2])
    losses, present = group_mean_losses(per_sample, group_ids, 4)
    torch.testing.assert_close(losses, torch.tensor([2.0, 0.0, 4.0, 0.0]), rtol=0, atol=1e-6)
    assert present.tolist() == [True, False, True, False]
    (grad,) = torch.autograd.grad(losses.sum(), per_sample)
    torch.testing.assert_close(grad, torch.tensor([0.5, 1 / 3, 0.5, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="num_groups"):
        group_mean_losses(per_sample, group_ids, 0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_groups": 0}, ["num_groups", "0"]),
        ({"update_mode": "mwu"}, ["update_mode", "'mwu'", "exp", "softmax", "exp_smooth"]),
        ({"objective": "worst"}, ["objective", "'worst'", "weighted", "max", "logsumexp"]),
        ({"init": "pi"}, ["init", "'pi'", "uniform", "proportional"]),
        ({"eta": 0.0}, ["eta", "0.0", "(0, inf)"]),
        ({"eta": -0.1}, ["eta", "-0.1"]),
        ({"gamma": 1.5}, ["gamma", "1.5", "[0, 1]"]),
        ({"gamma": -0.1}, ["gamma", "-0.1"]),
        ({"min_group_weight": -0.1}, ["min_group_weight", "-0.1"]),
        ({"min_group_weight": 0.5}, ["min_group_weight", "0.5", "[0, 0.333333]", "num_groups × floor ≤ 1"]),
        ({"init": "proportional"}, ["group_sizes", "proportional"]),
        ({"adjustment": 1.0}, ["group_sizes", "adjustment"]),
        ({"group_sizes": [1, 0, 2]}, ["group_sizes", "3 positive numbers", "[1, 0, 2]"]),
        ({"group_sizes": ["a", "b", "c"]}, ["group_sizes", "3 positive numbers"]),
        ({"warmup_epochs": -1}, ["warmup_epochs", "-1"]),
    ],
)
def test_invalid_arguments_name_argument_value_and_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as error:
        GroupDRO(**{"num_groups": 3, **kwargs})
    for word in words:
        assert word in str(error.value)
