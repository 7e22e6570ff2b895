"""Low-rank-plus-diagonal anchors S = ŨŨᵀ + diag(d) + εI: one distribution for fit, separation and sample().

Checked against the full form where the two coincide (d constant: L = [U 0], ε_full = ε + d), against
a float64 scipy reference (``scipy.linalg.sqrtm``) in float32 and float64 on hard spectra, by
gradcheck on both routes of the fit (n×n and k×k), and for their configuration keys.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from tdro.config import Config, ConfigError
from tdro.models.anchors import GaussianAnchors
from tdro.objectives.anchor_losses import AnchorLoss, fit_loss, w2_margin_separation_loss
from tdro.objectives.gaussian import class_moments, lowrank_bures_wasserstein_sq

EPS = 1e-4


def sqrtm_w2(m1: np.ndarray, S1: np.ndarray, m2: np.ndarray, S2: np.ndarray) -> float:
    """‖Δm‖² + tr S1 + tr S2 − 2 tr (R S1 R)^½, R = sqrtm(S2), in float64 (S2 the positive definite anchor).

    tr (R S1 R)^½ = Σ √eig: R S1 R is singular (S1 a batch covariance of rank n − 1), where sqrtm
    itself is only √eps-accurate (1e-6 relative here); eigenvalues at round-off level count as 0.
    """
    root = np.real(scipy.linalg.sqrtm(S2))
    inner = root @ S1 @ root
    eigenvalues = scipy.linalg.eigvalsh((inner + inner.T) / 2)
    cross = np.sqrt(eigenvalues[eigenvalues > len(inner) * np.finfo(float).eps * eigenvalues.max()]).sum()
    return float(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross)


def softplus_inverse(v: np.ndarray) -> np.ndarray:
    return v + np.log(-np.expm1(-v))


def lowrank_anchors(U: np.ndarray, d: np.ndarray, means: np.ndarray, eps: float, dtype: torch.dtype) -> GaussianAnchors:
    """Anchors with Ũ = U (norms in range), diagonal d and the given means."""
    num_classes, k, rank = U.shape
    anchors = GaussianAnchors(num_classes, k, eps=eps, covariance="lowrank", rank=rank).to(dtype)
    with torch.no_grad():
        anchors.U.copy_(torch.tensor(U))
        anchors.raw_scale.copy_(torch.tensor(softplus_inverse(d)))
        anchors.means.copy_(torch.tensor(means))
    return anchors


def covariances(U: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
    return U @ U.transpose(0, 2, 1) + np.stack([np.diag(row + eps) for row in d])


def spread_U(rng: np.random.Generator, k: int, spectrum: np.ndarray) -> np.ndarray:
    """U = Q[:, :r]·diag(spectrum) with Q random orthogonal: singular values exactly ``spectrum``."""
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return q[:, : len(spectrum)] * spectrum


def random_case(seed: int, classes: int = 3, k: int = 6, rank: int = 2):
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(classes, k, rank)) * 0.4
    d = rng.uniform(0.05, 0.5, size=(classes, k))
    means = rng.normal(size=(classes, k))
    return rng, U, d, means


def grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


@pytest.mark.parametrize("per_group", [False, True])
def test_lowrank_equals_full_where_they_coincide(per_group):
    """d ≡ c: ŨŨᵀ + cI + εI is the full anchor with L = [U 0] and ε + c; every term and gradient agrees."""
    rng, U, _, means = random_case(0, classes=4, k=6, rank=2)
    c = 0.3
    lowrank = lowrank_anchors(U, np.full((4, 6), c), means, EPS, torch.float64)
    full = GaussianAnchors(4, 6, eps=EPS + c).double()
    with torch.no_grad():
        full.L.copy_(torch.tensor(np.concatenate([U, np.zeros((4, 6, 4))], axis=2)))
        full.means.copy_(torch.tensor(means))
    torch.testing.assert_close(lowrank.covariance(), full.covariance(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lowrank.variance(), full.variance(), rtol=1e-12, atol=1e-12)
    gram_batch = (torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0]), torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1]))
    kxk_batch = (torch.arange(40) % 2, torch.arange(40) // 20)  # 20 samples per class > k = 6: the k×k route
    for labels, groups in (gram_batch, kxk_batch):
        latents = torch.tensor(rng.normal(size=(len(labels), 6)), requires_grad=True)
        low = fit_loss(latents, labels, groups, lowrank, per_group)
        high = fit_loss(latents, labels, groups, full, per_group)
        torch.testing.assert_close(low, high, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads(low, [latents, lowrank.means]), grads(high, [latents, full.means])):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(w2_margin_separation_loss(lowrank, 50.0), w2_margin_separation_loss(full, 50.0),
                               rtol=1e-10, atol=1e-12)


def test_lowrank_samples_follow_the_covariance_every_loss_uses():
    _, U, d, means = random_case(1, classes=2, k=4, rank=2)
    anchors = lowrank_anchors(U, d, means, 0.05, torch.float64)
    n = 200_000
    with torch.no_grad():
        samples = anchors.sample(n, generator=torch.Generator().manual_seed(1)).numpy()
        want = anchors.covariance().numpy()
    for c in range(2):
        scale = np.sqrt(np.diag(want[c]))
        np.testing.assert_allclose(samples[c].mean(0), means[c], atol=5 * scale.max() / math.sqrt(n))
        np.testing.assert_allclose(np.cov(samples[c], rowvar=False), want[c], atol=0.02 * np.outer(scale, scale).max())
    np.testing.assert_allclose(want, covariances(U, d, 0.05), rtol=1e-12)


def test_lowrank_samples_are_reparameterised_and_the_clip_bounds_U():
    anchors = GaussianAnchors(2, 5, covariance="lowrank", rank=2)
    anchors.sample(4).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in (anchors.means, anchors.U, anchors.raw_scale))
    with torch.no_grad():
        anchors.U.mul_(1e4)
    norms = torch.linalg.matrix_norm(anchors.factor()).detach()
    torch.testing.assert_close(norms, torch.tensor([10.0, 10.0]))
    covariance = anchors.covariance().detach()
    factor = anchors.factor().detach()
    torch.testing.assert_close(covariance, factor @ factor.mT + torch.diag_embed(anchors.variance().detach()
                                                                                 - factor.square().sum(-1)))


def test_lowrank_initial_covariance_is_init_scale_squared_identity_in_expectation():
    torch.manual_seed(0)
    anchors = GaussianAnchors(4000, 4, eps=1e-4, covariance="lowrank", rank=2)
    mean_covariance = anchors.covariance().detach().mean(0)
    torch.testing.assert_close(mean_covariance, (0.05**2 + 1e-4) * torch.eye(4), atol=0.05 * 0.05**2, rtol=0)
    torch.testing.assert_close(anchors.diagonal_part().detach(), torch.full((4000, 4), 0.05**2 / 2))
    fixed = GaussianAnchors(4000, 4, covariance="lowrank", rank=2, targets="random_fixed")
    assert not list(fixed.parameters())
    torch.testing.assert_close(fixed.covariance().mean(0), (0.05**2 + 1e-4) * torch.eye(4), atol=0.05 * 0.05**2, rtol=0)


def hard_case(k: int, per_class: int, kind: str, seed: int):
    """Three classes drawn from spread low-rank anchors (rank 8), each fitted against its own anchor."""
    rng = np.random.default_rng(seed)
    rank = min(8, k)
    spectrum = {"geometric": np.geomspace(3.0, 3e-3, rank), "at_clip": np.r_[7.0, 7.0, np.full(rank - 2, 0.05)]}[kind]
    U = np.stack([spread_U(rng, k, spectrum) for _ in range(3)])
    if kind == "at_clip":
        U *= 0.999 * 10.0 / np.linalg.norm(U, axis=(1, 2), keepdims=True)
    d = np.stack([rng.permutation(np.geomspace(1e-1, 1e-5, k)) for _ in range(3)])
    means = rng.normal(size=(3, k)) * 0.1
    S = covariances(U, d, EPS)
    latents = np.concatenate([rng.multivariate_normal(means[c] + 0.05, S[c], size=per_class, method="eigh")
                              for c in range(3)])
    labels = np.repeat(np.arange(3), per_class)
    want = np.mean([sqrtm_w2(latents[labels == c].mean(0), np.atleast_2d(np.cov(latents[labels == c], rowvar=False)),
                             means[c], S[c]) for c in range(3)])
    return U, d, means, latents, labels, want


@pytest.mark.parametrize("k, per_class", [(16, 13), (64, 13), (256, 13), (8, 40)],
                         ids=["16-gram", "64-gram", "256-gram", "8-kxk"])
@pytest.mark.parametrize("kind", ["geometric", "at_clip"])
def test_lowrank_fit_matches_sqrtm_reference_in_float32_and_float64(k, per_class, kind):
    U, d, means, latents, labels, want = hard_case(k, per_class, kind, seed=k + per_class)
    results = {}
    for dtype in (torch.float32, torch.float64):
        anchors = lowrank_anchors(U, d, means, EPS, dtype)
        z = torch.tensor(latents, dtype=dtype, requires_grad=True)
        loss = fit_loss(z, torch.tensor(labels), None, anchors)
        tensors = [anchors.means, anchors.U, anchors.raw_scale, z]
        flat = np.concatenate([g.detach().double().reshape(-1).numpy() for g in grads(loss, tensors)])
        results[dtype] = loss.item(), flat
    assert results[torch.float64][0] == pytest.approx(want, rel=1e-6)
    assert results[torch.float32][0] == pytest.approx(want, rel=1e-3)
    g32, g64 = results[torch.float32][1], results[torch.float64][1]
    assert np.isfinite(g32).all() and g32 @ g64 / (np.linalg.norm(g32) * np.linalg.norm(g64)) > 0.99


@pytest.mark.parametrize("counts, k", [([2, 3, 4], 4), ([3, 8, 5], 2)], ids=["gram", "kxk"])
def test_lowrank_fit_gradcheck_wrt_latents_means_factor_and_diagonal(counts, k):
    rng = np.random.default_rng(7)
    labels = torch.tensor(np.repeat(np.arange(len(counts)), counts))
    inputs = [torch.tensor(a, requires_grad=True) for a in (rng.normal(size=(sum(counts), k)),
                                                           rng.normal(size=(len(counts), k)),
                                                           rng.normal(size=(len(counts), k, 2)) * 0.5,
                                                           rng.uniform(0.1, 1.0, size=(len(counts), k)))]

    def fit(z, m, U, d):
        moments = class_moments(z, labels, len(counts))
        return lowrank_bures_wasserstein_sq(moments, m, U, EPS, anchor_diagonal=d)

    assert torch.autograd.gradcheck(fit, inputs)


def test_anchor_loss_runs_both_terms_with_lowrank_anchors():
    torch.manual_seed(0)
    anchors = GaussianAnchors(3, 8, covariance="lowrank", rank=3)
    head = torch.nn.Linear(8, 3)
    latents = torch.randn(12, 8, requires_grad=True)
    parts = AnchorLoss(1.0, 1.0)(latents, torch.arange(12) % 3, torch.zeros(12, dtype=torch.long), anchors, head)
    parts["total"].backward()
    assert set(parts) == {"fit", "sep", "total"} and torch.isfinite(parts["total"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (anchors.means, anchors.U, anchors.raw_scale))


@pytest.mark.parametrize("kwargs, words", [
    ({"covariance": "lowrank"}, ["rank", "None", "1..latent_dim (3)"]),
    ({"covariance": "lowrank", "rank": 0}, ["rank", "0", "1..latent_dim (3)"]),
    ({"covariance": "lowrank", "rank": 4}, ["rank", "4", "1..latent_dim (3)"]),
    ({"covariance": "full", "rank": 2}, ["rank=2", "lowrank", "'full'"]),
])
def test_invalid_rank_names_argument_value_and_allowed_values(kwargs, words):
    with pytest.raises(ValueError) as error:
        GaussianAnchors(2, 3, **kwargs)
    for word in words:
        assert word in str(error.value)


def test_config_rank_keys():
    config = Config(anchor_covariance="lowrank", anchor_rank=4, latent_dim=8)
    assert config.anchor_rank == 4
    with pytest.raises(ConfigError, match=r"key 'anchor_rank' has value 9 but latent_dim is 8; allowed: 1\.\.latent_dim"):
        Config(anchor_covariance="lowrank", anchor_rank=9, latent_dim=8)
    with pytest.raises(ConfigError, match="key 'anchor_rank' has value 0; allowed: >= 1"):
        Config(anchor_covariance="lowrank", anchor_rank=0)
    warnings_ = Config(anchor_rank=4).inactive_key_warnings()
    assert "key 'anchor_rank' is set to 4 but has no effect: only anchor_covariance 'lowrank' reads it " \
           "(anchor_covariance is 'full')" in warnings_
    assert not [w for w in config.inactive_key_warnings() if "anchor_rank" in w]
    Config(anchor_covariance="full", anchor_rank=100, latent_dim=8)  # not read, so not checked against latent_dim


def test_build_model_gives_lowrank_anchors_their_rank():
    from tdro.data.base import Group, GroupedDataset, Split
    from tdro.models.multigroup import build_model

    split = Split(torch.zeros(2, 4), torch.tensor([0, 1]))
    group = Group("tab", "tabular", "mlp_tabular", {"input_dim": 4}, {}, split, split, split)
    dataset = GroupedDataset("toy", {"tab": group}, ["a", "b"])
    model = build_model(Config(anchor_covariance="lowrank", anchor_rank=3, latent_dim=8), dataset)
    assert model.anchors.U.shape == (2, 8, 3) and model.anchors.lowrank
