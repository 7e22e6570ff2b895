"""GaussianAnchors: one distribution (samples follow covariance()), factor normalisation, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdro.models.anchors import GaussianAnchors


def _randomise(anchors: GaussianAnchors, seed: int) -> None:
    """Non-trivial parameters, so the sample test cannot pass by symmetry alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        anchors.means.copy_(torch.randn(anchors.means.shape, generator=g))
        if anchors.diagonal:
            anchors.raw_scale.copy_(torch.randn(anchors.raw_scale.shape, generator=g))
        else:
            anchors.L.copy_(torch.randn(anchors.L.shape, generator=g) * 0.5)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_samples_follow_mean_and_covariance(covariance):
    anchors = GaussianAnchors(2, 3, eps=0.05, covariance=covariance).double()
    _randomise(anchors, 0)
    n = 200_000
    with torch.no_grad():
        samples = anchors.sample(n, generator=torch.Generator().manual_seed(1)).numpy()
        want_cov = anchors.covariance().numpy()
        want_mean = anchors.means.numpy()
    assert samples.shape == (2, n, 3)
    for c in range(2):
        scale = np.sqrt(np.diag(want_cov[c]))
        # standard errors are ~ scale/√n (mean) and ~ √2/√n relative (covariance)
        np.testing.assert_allclose(samples[c].mean(0), want_mean[c], atol=5 * scale.max() / math.sqrt(n))
        empirical = np.cov(samples[c], rowvar=False)
        np.testing.assert_allclose(empirical, want_cov[c], atol=0.02 * np.outer(scale, scale).max())


def test_full_covariance_is_factor_outer_product_plus_ridge_including_the_ridge_in_samples():
    """A sampler without the √ε term (the reference's separation samples) misses εI entirely."""
    anchors = GaussianAnchors(1, 2, eps=0.5, init_scale=0.01).double()
    with torch.no_grad():
        samples = anchors.sample(100_000, generator=torch.Generator().manual_seed(2))[0].numpy()
    np.testing.assert_allclose(np.cov(samples, rowvar=False), (0.01**2 + 0.5) * np.eye(2), atol=0.02)
    factor = anchors.factor().detach()
    torch.testing.assert_close(anchors.covariance(), factor @ factor.mT + 0.5 * torch.eye(2, dtype=torch.float64))


def test_factor_norm_is_clipped_into_range_without_mutating_the_parameter():
    anchors = GaussianAnchors(3, 4)
    with torch.no_grad():
        anchors.L.copy_(torch.stack([torch.eye(4) * 20.0, torch.eye(4) * 1e-6, torch.eye(4) * 0.3]))
    before = anchors.L.detach().clone()
    norms = torch.linalg.matrix_norm(anchors.factor()).detach()
    torch.testing.assert_close(norms, torch.tensor([10.0, 1e-3, 0.6]))
    torch.testing.assert_close(anchors.L.detach(), before)


def test_factor_gradient_is_identity_in_range_and_radial_free_when_clipped():
    """Clipping projects onto the norm sphere: no gradient along L itself; in range L̃ = L exactly."""
    anchors = GaussianAnchors(2, 3).double()
    target = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        anchors.L.copy_(torch.stack([torch.eye(3) * 0.5, torch.eye(3) * 30.0]).double() + 0.1 * target)
    ((anchors.factor() - target) ** 2).sum().backward()
    grad, L = anchors.L.grad, anchors.L.detach()
    torch.testing.assert_close(grad[0], 2 * (L[0] - target[0]))
    assert abs((grad[1] * L[1]).sum().item()) < 1e-10 * grad[1].norm().item() * L[1].norm().item()
    assert grad[1].norm() > 1e-3
    raw, scale, norm_sq, *_ = anchors.factor_parts()
    torch.testing.assert_close(raw * scale[:, None, None], anchors.factor())
    torch.testing.assert_close(norm_sq, torch.linalg.matrix_norm(anchors.factor()).square())


def test_initial_covariance_agrees_between_modes_and_means_are_spread():
    torch.manual_seed(0)
    full = GaussianAnchors(10, 8, eps=1e-4)
    diagonal = GaussianAnchors(10, 8, eps=1e-4, covariance="diagonal")
    want = (0.05**2 + 1e-4) * torch.eye(8).repeat(10, 1, 1)
    torch.testing.assert_close(full.covariance().detach(), want)
    torch.testing.assert_close(diagonal.covariance().detach(), want)
    torch.testing.assert_close(full.variance().detach(), want.diagonal(dim1=1, dim2=2))
    assert torch.pdist(full.means.detach()).min() > 0.05  # not all anchors on top of each other
    assert 0.05 < full.means.std().item() < 0.2


def test_samples_are_reparameterised():
    anchors = GaussianAnchors(2, 3)
    anchors.sample(4).square().sum().backward()
    assert anchors.means.grad.abs().sum() > 0 and anchors.L.grad.abs().sum() > 0


def test_factor_is_full_only():
    with pytest.raises(ValueError, match="full"):
        GaussianAnchors(2, 3, covariance="diagonal").factor()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"latent_dim": 0}, ["latent_dim", "0"]),
        ({"num_classes": 0}, ["num_classes", "0"]),
        ({"eps": 0.0}, ["eps", "0.0", "> 0"]),
        ({"eps": -1e-4}, ["eps", "-0.0001", "> 0"]),
        ({"covariance": "diag"}, ["covariance", "'diag'", "full", "diagonal"]),
        ({"init_scale": 0}, ["init_scale", "> 0"]),
        ({"mean_init_std": -1.0}, ["mean_init_std", "-1.0", ">= 0"]),
    ],
)
def test_invalid_arguments_name_argument_value_and_allowed_values(kwargs, words):
    arguments = {"num_classes": 2, "latent_dim": 3, **kwargs}
    with pytest.raises(ValueError) as error:
        GaussianAnchors(**arguments)
    for word in words:
        assert word in str(error.value)


def test_sample_rejects_bad_count():
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        GaussianAnchors(2, 3).sample(0)
