"""CVaR-DRO, χ²-DRO, reweight and resample: the math against float64 hand computations and independent solvers
(Rockafellar-Uryasev for CVaR, scipy SLSQP for the χ² best response), float32, edge cases, bad keys, CLI, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from algorithm_runs import assert_exact_resume, cli_one_epoch, small_config
from tdro.algorithms import BatchLosses, Grouper
from tdro.algorithms.chi2_dro import Chi2DRO, chi2_best_response
from tdro.algorithms.cvar_dro import cvar
from tdro.algorithms.reweight import Reweight
from tdro.config import Config, ConfigError
from tdro.data.base import Group, GroupedDataset, Split
from tdro.training.trainer import Trainer

DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-6)]


def batch(losses, dtype=torch.float64, units=None) -> BatchLosses:
    per_sample = torch.tensor(losses, dtype=dtype, requires_grad=True)
    n = len(losses)
    units = torch.zeros(n, dtype=torch.long) if units is None else torch.tensor(units)
    return BatchLosses(per_sample, torch.zeros(n, 2), torch.zeros(n, 8), torch.zeros(n, dtype=torch.long), units,
                       units, torch.arange(n), epoch=0)


def loss_and_gradient(algorithm_loss, losses, dtype):
    b = batch(losses, dtype)
    loss = algorithm_loss(b.per_sample)
    loss.backward()
    assert loss.dtype == dtype
    return loss.item(), b.per_sample.grad.double().numpy()


# --- CVaR ---
def rockafellar_uryasev(losses, alpha: float) -> float:
    """CVaR_α = min_t t + mean((ℓ − t)_+) / α, whose minimum is at one of the losses (float64)."""
    v = np.asarray(losses, dtype=np.float64)
    return min(t + np.maximum(v - t, 0).mean() / alpha for t in v)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("losses, alpha, expected, gradient", [
    # m = αN = 1.2: all of the largest and 0.2 of the next
    ([3.0, 1.0, 2.0, 5.0], 0.3, (5 + 0.2 * 3) / 1.2, [0.2 / 1.2, 0, 0, 1 / 1.2]),
    ([3.0, 1.0, 2.0, 5.0], 1.0, 11 / 4, [0.25] * 4),        # α = 1: the mean
    ([3.0, 1.0, 2.0, 5.0], 0.2, 5.0, [0, 0, 0, 1]),          # αN < 1: the max
    ([3.0, 1.0, 2.0, 5.0], 0.5, 4.0, [0.5, 0, 0, 0.5]),      # m an integer: no boundary sample
    ([-1.0, 4.0, 0.5], 0.5, (4 + 0.5 * 0.5) / 1.5, [0, 1 / 1.5, 0.5 / 1.5]),
])
def test_cvar_is_the_mean_of_the_worst_alpha_fraction(losses, alpha, expected, gradient, dtype, tol):
    loss, grad = loss_and_gradient(lambda v: cvar(v, alpha), losses, dtype)
    assert loss == pytest.approx(expected, rel=tol)
    assert loss == pytest.approx(rockafellar_uryasev(losses, alpha), rel=tol)
    np.testing.assert_allclose(grad, gradient, rtol=tol, atol=tol)


def test_cvar_matches_rockafellar_uryasev_on_random_losses_and_splits_ties_by_total_weight():
    rng = np.random.default_rng(0)
    for n, alpha in [(7, 0.1), (64, 0.1), (64, 0.37), (33, 0.999), (10, 0.7)]:
        losses = rng.exponential(size=n).tolist()
        loss, grad = loss_and_gradient(lambda v: cvar(v, alpha), losses, torch.float64)
        assert loss == pytest.approx(rockafellar_uryasev(losses, alpha), rel=1e-12)
        assert grad.sum() == pytest.approx(1.0) and grad.max() <= 1 / (alpha * n) + 1e-12
    # three tied worst losses share the mass m = 2 (which of them gets it is arbitrary; the loss is not)
    loss, grad = loss_and_gradient(lambda v: cvar(v, 0.4), [2.0, 2.0, 1.0, 2.0, 0.0], torch.float64)
    assert loss == 2.0 and grad[[0, 1, 3]].sum() == pytest.approx(1.0) and grad[[2, 4]].tolist() == [0, 0]


def test_cvar_key_range_and_foreign_key_errors():
    assert Config(algorithm="cvar_dro").cvar_alpha == 0.1
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=r"key 'cvar_alpha' has value .*allowed: > 0.0 and <= 1.0"):
            Config(algorithm="cvar_dro", cvar_alpha=bad)
    with pytest.raises(ConfigError, match=r"algorithm 'erm' does not read key\(s\) 'cvar_alpha' \(read by cvar_dro\)"):
        Config(algorithm="erm", cvar_alpha=0.5)
    with pytest.raises(ConfigError, match=r"does not read key\(s\) 'chi2_rho'"):
        Config(algorithm="cvar_dro", chi2_rho=0.5)


# --- χ² ---
def divergence(q) -> float:
    """(1/2N) Σ (N q_i − 1)²."""
    q = np.asarray(q, dtype=np.float64)
    return 0.5 * np.mean((len(q) * q - 1) ** 2)


def slsqp_best_response(losses, rho: float) -> np.ndarray:
    """max q·ℓ over the simplex with divergence(q) <= ρ, by scipy's SLSQP from the uniform weights."""
    v = np.asarray(losses, dtype=np.float64)
    n = len(v)
    result = minimize(lambda q: -q @ v, np.full(n, 1 / n), jac=lambda q: -v, method="SLSQP", bounds=[(0, 1)] * n,
                      constraints=[{"type": "eq", "fun": lambda q: q.sum() - 1, "jac": lambda q: np.ones(n)},
                                   {"type": "ineq", "fun": lambda q: rho - divergence(q),
                                    "jac": lambda q: -(n * q - 1)}],
                      options={"ftol": 1e-12, "maxiter": 1000})
    q = result.x  # on exact ties SLSQP may stop short of its ftol ("positive directional derivative"): check it
    assert abs(q.sum() - 1) < 1e-9 and q.min() > -1e-9 and divergence(q) < rho + 1e-7, result.message
    return q


CHI2_CASES = {
    "random": (np.random.default_rng(1).exponential(size=12).tolist(), 0.5),
    "random, most mass on a few": (np.random.default_rng(2).exponential(size=12).tolist(), 3.0),
    "random, full support": (np.random.default_rng(3).uniform(1, 2, size=12).tolist(), 0.05),
    "ties": ([1.0, 3.0, 2.0, 3.0, 1.0, 2.0, 0.0, 3.0], 0.4),
    "ties at the max, tight ball": ([3.0, 3.0, 1.0, 0.0], 0.3),
    "negative and positive": ([-2.0, 0.5, 1.5, -0.3, 4.0, 0.0], 1.0),
}


@pytest.mark.parametrize("case", sorted(CHI2_CASES))
def test_chi2_best_response_matches_slsqp(case):
    losses, rho = CHI2_CASES[case]
    q = chi2_best_response(torch.tensor(losses, dtype=torch.float64), rho)
    assert q.dtype == torch.float64
    q = q.numpy()
    reference = slsqp_best_response(losses, rho)
    assert (q >= 0).all() and q.sum() == pytest.approx(1.0, abs=1e-12)
    assert divergence(q) == pytest.approx(rho, rel=1e-9)  # the ball's constraint is active
    assert q @ losses == pytest.approx(reference @ losses, rel=1e-7)
    np.testing.assert_allclose(q, reference, atol=1e-7)  # unique: a linear objective on a strictly convex set


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_chi2_loss_is_q_star_weighted_and_its_gradient_is_q_star(dtype, tol):
    losses, rho = CHI2_CASES["random"]
    dro = Chi2DRO(Config(algorithm="chi2_dro", chi2_rho=rho), Grouper(fake_dataset()))
    b = batch(losses, dtype)
    loss = dro.loss(b)
    loss.backward()
    reference = slsqp_best_response(losses, rho)
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx(reference @ losses, rel=max(tol, 1e-7))
    np.testing.assert_allclose(b.per_sample.grad.double().numpy(), reference, atol=max(tol, 1e-7))


def test_chi2_edge_cases_against_closed_forms():
    v = [0.3, 1.1, 0.7, 2.0, 1.6]
    n, mean, var = 5, np.mean(v), np.var(v)
    # tiny ρ: every weight positive, and the value is the variance expansion mean + sqrt(2ρ var) exactly
    for rho in (1e-10, 1e-3):
        q = chi2_best_response(torch.tensor(v, dtype=torch.float64), rho).numpy()
        assert q @ v == pytest.approx(mean + np.sqrt(2 * rho * var), rel=1e-12)
        np.testing.assert_allclose(q, 1 / n + (np.array(v) - mean) / (n * np.sqrt(var / (2 * rho))), rtol=1e-10)
    # large ρ: (N − 1)/2 holds the point mass on the worst sample, and beyond that nothing changes
    for rho in ((n - 1) / 2, 10.0, 1e6):
        assert chi2_best_response(torch.tensor(v), rho).tolist() == [0, 0, 0, 1, 0]
    # just below (N − 1)/2: almost all the mass on the worst sample
    q = chi2_best_response(torch.tensor(v, dtype=torch.float64), (n - 1) / 2 - 1e-3).numpy()
    assert 0.99 < q[3] < 1 and divergence(q) == pytest.approx((n - 1) / 2 - 1e-3, rel=1e-12)
    np.testing.assert_allclose(q, slsqp_best_response(v, (n - 1) / 2 - 1e-3), atol=1e-7)
    # all equal: the uniform weights, whatever ρ
    for rho in (1e-6, 1.0, 100.0):
        assert chi2_best_response(torch.full((6,), 0.7), rho).tolist() == [1 / 6] * 6
    # k tied maxima: uniform over them once ρ >= (N/k − 1)/2 (here 1/2)
    assert chi2_best_response(torch.tensor([3.0, 3.0, 1.0, 0.0]), 0.5).tolist() == [0.5, 0.5, 0, 0]
    assert chi2_best_response(torch.tensor([3.0, 3.0, 1.0, 0.0]), 0.6).tolist() == [0.5, 0.5, 0, 0]
    # one sample
    assert chi2_best_response(torch.tensor([2.5]), 1.0).tolist() == [1.0]


def test_chi2_key_range():
    assert Config(algorithm="chi2_dro").chi2_rho == 1.0
    for bad in (-1, 0):
        with pytest.raises(ConfigError, match=r"key 'chi2_rho' has value .*allowed: > 0.0"):
            Config(algorithm="chi2_dro", chi2_rho=bad)


# --- reweight ---
def fake_dataset() -> GroupedDataset:
    """Train sizes a: 6 (classes 0,1 as 4:2), b: 2 (class 0 only), c: 3 (1:2)."""
    def split(labels):
        return Split(torch.zeros(len(labels), 2), torch.tensor(labels))
    labels = {"a": [0, 0, 0, 0, 1, 1], "b": [0, 0], "c": [0, 1, 1]}
    groups = {name: Group(name, "tabular", "mlp_tabular", {"input_dim": 2}, {}, split(y), split([0, 1]),
                          split([0, 1])) for name, y in labels.items()}
    return GroupedDataset("fake", groups, ["0", "1"])


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("cells, counts, names", [
    ("group", [6, 2, 3], ["a", "b", "c"]),
    ("group_class", [4, 2, 2, 0, 1, 2], ["a/0", "a/1", "b/0", "b/1", "c/0", "c/1"]),
])
def test_reweight_is_the_inverse_count_weighted_mean(cells, counts, names, dtype, tol):
    config = Config(algorithm="reweight", groupdro_cells=cells)
    algorithm = Reweight(config, Grouper(fake_dataset(), cells))
    inverse = np.array([1 / c if c else 0.0 for c in counts])
    w = inverse / inverse.sum()  # an empty cell (b/1) gets weight 0
    assert list(algorithm.weights()) == names
    np.testing.assert_allclose(list(algorithm.weights().values()), w, rtol=1e-12)
    losses = [0.5, 2.0, 1.0, 3.0, 0.25]
    units = [0, 0, 1, 2, 2] if cells == "group" else [0, 1, 2, 4, 5]  # unit 0 twice, unit 3 (empty) absent
    b = batch(losses, dtype, units)
    loss = algorithm.loss(b)
    loss.backward()
    sample_w = w[units]
    assert loss.dtype == dtype
    assert loss.item() == pytest.approx((sample_w * losses).sum() / sample_w.sum(), rel=tol)
    np.testing.assert_allclose(b.per_sample.grad.double().numpy(), sample_w / sample_w.sum(), rtol=tol)


def test_reweight_refuses_balanced_batches():
    with pytest.raises(ConfigError, match="key 'batching' has value 'balanced'.*algorithm: resample"):
        Config(algorithm="reweight", batching="balanced")


# --- resample ---
def test_resample_batches_are_group_balanced_whatever_the_batching_key(tmp_path):
    # digits: image 600, coarse 150 training samples; batch 64
    assert Trainer(small_config(tmp_path)).batches.quotas == {"image": 51, "coarse": 13}
    for batching in ("proportional", "balanced"):
        trainer = Trainer(small_config(tmp_path, algorithm="resample", batching=batching))
        assert trainer.batches.quotas == {"image": 32, "coarse": 32}
        first = next(iter(trainer.batches))
        assert [len(entry[1]) for entry in first.values()] == [32, 32]
    uneven = Trainer(small_config(tmp_path, algorithm="resample", batch_size=65))
    assert uneven.batches.quotas == {"image": 33, "coarse": 32}  # the remainder goes to the largest group


# --- runs (on fewer digits samples than the default 600 + 150, for speed) ---
FEWER = {"digits_sizes": [200, 60]}
RUNS = {"cvar_dro": {"cvar_alpha": 0.5, **FEWER}, "chi2_dro": {"chi2_rho": 0.5, **FEWER},
        "reweight": {"groupdro_cells": "group_class", **FEWER}, "resample": FEWER}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_one_epoch_cli_run(tmp_path, name):
    summary = cli_one_epoch(tmp_path, algorithm=name, **RUNS[name])
    assert summary["algorithm"] == name and summary["epochs_run"] == 1
    history = [json.loads(line) for line in (tmp_path / "cli" / "one" / "history.jsonl").read_text().splitlines()]
    q = history[-1]["q"]
    if name == "reweight":
        assert len(q) == 20 and list(q)[:2] == ["image/0", "image/1"]
        assert sum(q.values()) == pytest.approx(1.0)
    else:
        assert q is None


@pytest.mark.parametrize("name", sorted(RUNS))
def test_exact_resume(tmp_path, name):
    assert_exact_resume(tmp_path, epochs=2, algorithm=name, **RUNS[name])
