"""The anchor terms in float32 (the dtype training runs in) against float64 references, on hard spectra.

Anchors whose spectrum spreads (one large direction, a few small ones, the rest at the ridge ε),
at init and at the Frobenius clip bound ‖L̃‖_F = 10, latent 16–256. Values are checked against a
numpy/scipy float64 formula (eigh-based principal roots) or a hand computation; gradient directions
against the float64 path, which is itself checked against central differences of the scipy formula.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from tdro.models.anchors import FACTOR_NORM_RANGE, GaussianAnchors
from tdro.objectives.anchor_losses import fit_loss, w2_margin_separation_loss
from tdro.objectives.gaussian import bures_wasserstein_sq

CLIP = 0.999 * FACTOR_NORM_RANGE[1]


def psd_eigenvalues(S: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, those at round-off level relative to the largest set to 0."""
    w = scipy.linalg.eigvalsh((S + S.T) / 2)
    return np.where(w > S.shape[-1] * np.finfo(float).eps * w.max(), w, 0.0)


def psd_root(S: np.ndarray) -> np.ndarray:
    w, v = scipy.linalg.eigh(S)
    w = np.where(w > S.shape[-1] * np.finfo(float).eps * w.max(), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def reference_w2(m1: np.ndarray, S1: np.ndarray, m2: np.ndarray, S2: np.ndarray) -> float:
    """‖Δm‖² + tr S1 + tr S2 − 2 tr (S1^½ S2 S1^½)^½ in float64 with symmetric eigen-roots."""
    root = psd_root(S1)
    inner = root @ S2 @ root
    cross = np.sqrt(psd_eigenvalues(inner)).sum()
    return float(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross)


def spread_factor(rng: np.random.Generator, k: int, spectrum: list[float], norm: float | None = None) -> np.ndarray:
    """L̃ = Q·diag(spectrum, 0, …) with Q random orthogonal; rescaled to Frobenius ``norm`` if given."""
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    diagonal = np.zeros(k)
    diagonal[: len(spectrum)] = spectrum
    factor = q * diagonal
    if norm is not None:
        factor *= norm / np.linalg.norm(factor)
    return factor


def spectra(k: int) -> dict[str, list[float]]:
    """The issue's spectrum, a geometric one over 4 decades, and one low-rank at the clip bound.

    "At the clip bound" is 0.999 × the bound: exactly on it the norm clip's gradient is one-sided,
    and float32 and float64 round the norm to different sides.
    """
    return {
        "issue": [9.9] + [0.3] * 10,
        "geometric": list(np.geomspace(6.0, 6e-4, min(k, 24))),
        "lowrank_at_clip": [7.0, 7.0, 0.05],
    }


def make_anchors(factors: np.ndarray, means: np.ndarray, eps: float, dtype: torch.dtype) -> GaussianAnchors:
    anchors = GaussianAnchors(factors.shape[0], factors.shape[1], eps=eps)
    with torch.no_grad():
        anchors.L.copy_(torch.tensor(factors))
        anchors.means.copy_(torch.tensor(means))
    return anchors.to(dtype)


def anchor_covariances(factors: np.ndarray, eps: float) -> np.ndarray:
    return factors @ factors.transpose(0, 2, 1) + eps * np.eye(factors.shape[-1])


def gradient(anchors: GaussianAnchors, loss: torch.Tensor, *extra: torch.Tensor) -> np.ndarray:
    tensors = [anchors.means, anchors.L, *extra]
    grads = torch.autograd.grad(loss, tensors)
    return np.concatenate([g.detach().double().reshape(-1).numpy() for g in grads])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_w2_margin_issue_case_is_one_in_float32():
    """Two anchors with one L̃ = Q·diag(9.9, 0.3×10, 0×53), means 1 apart: W₂² = 1 by hand, so the loss is 2 − 1."""
    rng = np.random.default_rng(0)
    factor = spread_factor(rng, 64, spectra(64)["issue"])
    means = np.zeros((2, 64))
    means[1, 0] = 1.0
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.float64):
        anchors = make_anchors(np.stack([factor, factor]), means, 1e-4, dtype)
        loss = w2_margin_separation_loss(anchors, margin=2.0)
        losses[dtype], grads[dtype] = loss.item(), gradient(anchors, loss)
    assert losses[torch.float32] == pytest.approx(1.0, rel=1e-3)
    assert losses[torch.float64] == pytest.approx(1.0, rel=1e-9)
    assert np.isfinite(grads[torch.float32]).all() and np.abs(grads[torch.float32]).max() > 0
    assert cosine(grads[torch.float32], grads[torch.float64]) > 0.99


@pytest.mark.parametrize("k", [16, 64, 256])
@pytest.mark.parametrize("kind", ["issue", "geometric", "lowrank_at_clip", "init"])
def test_w2_margin_float32_matches_float64_reference(k, kind):
    rng = np.random.default_rng(k)
    if kind == "init":
        factors = np.stack([0.05 * np.eye(k)] * 3)
    else:
        norm = CLIP if kind == "lowrank_at_clip" else None
        factors = np.stack([spread_factor(rng, k, spectra(k)[kind], norm) for _ in range(3)])
    means = rng.normal(size=(3, k)) * 0.3
    covariances = anchor_covariances(factors, 1e-4)
    pairs = [(0, 1), (0, 2), (1, 2)]
    distances = [reference_w2(means[i], covariances[i], means[j], covariances[j]) for i, j in pairs]
    margin = 1.5 * max(distances)
    want = np.mean([margin - d for d in distances])
    results = {}
    for dtype in (torch.float32, torch.float64):
        anchors = make_anchors(factors, means, 1e-4, dtype)
        loss = w2_margin_separation_loss(anchors, margin)
        results[dtype] = loss.item(), gradient(anchors, loss)
    assert results[torch.float32][0] == pytest.approx(want, rel=1e-3)
    assert results[torch.float64][0] == pytest.approx(want, rel=1e-6)
    assert cosine(results[torch.float32][1], results[torch.float64][1]) > 0.99


def draws(rng: np.random.Generator, mean: np.ndarray, covariance: np.ndarray, n: int) -> np.ndarray:
    return rng.multivariate_normal(mean, covariance, size=n, method="eigh")


def reference_fit(latents: np.ndarray, labels: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> float:
    """Mean over classes of W₂²(N(batch mean, np.cov), anchor), float64."""
    values = []
    for c in np.unique(labels):
        z = latents[labels == c]
        values.append(reference_w2(z.mean(0), np.atleast_2d(np.cov(z, rowvar=False)), means[c], covariances[c]))
    return float(np.mean(values))


def fit_results(latents: np.ndarray, labels: np.ndarray, factors: np.ndarray, means: np.ndarray, eps: float):
    results = {}
    for dtype in (torch.float32, torch.float64):
        anchors = make_anchors(factors, means, eps, dtype)
        z = torch.tensor(latents, dtype=dtype, requires_grad=True)
        loss = fit_loss(z, torch.tensor(labels), None, anchors)
        results[dtype] = loss.item(), gradient(anchors, loss, z)
    return results


def test_fit_issue_case_13_draws_in_float32():
    rng = np.random.default_rng(1)
    factor = spread_factor(rng, 64, spectra(64)["issue"])
    covariance = anchor_covariances(factor[None], 1e-4)[0]
    mean = rng.normal(size=64) * 0.1
    latents = draws(rng, mean, covariance, 13)
    labels = np.zeros(13, dtype=np.int64)
    want = reference_fit(latents, labels, mean[None], covariance[None])
    results = fit_results(latents, labels, factor[None], mean[None], 1e-4)
    assert results[torch.float32][0] == pytest.approx(want, rel=1e-3)
    assert results[torch.float64][0] == pytest.approx(want, rel=1e-6)
    assert cosine(results[torch.float32][1], results[torch.float64][1]) > 0.99


@pytest.mark.parametrize("k, per_class", [(16, 13), (64, 13), (256, 13), (256, 40), (16, 20), (16, 40)],
                         ids=["16-gram", "64-gram", "256-gram", "256-gram-40", "16-gram-full-rank", "16-kxk"])
@pytest.mark.parametrize("kind", ["issue", "geometric", "lowrank_at_clip", "init"])
def test_fit_float32_matches_float64_reference(k, per_class, kind):
    """Three classes drawn from (spread) anchors, each fitted against its own anchor; k=16 with 40 draws is the k×k route.

    With 20 draws at k=16 (n − 1 > k, n ≤ 1.25·k) the n×n route sees full-rank classes.
    """
    rng = np.random.default_rng(k + per_class)
    if kind == "init":
        factors = np.stack([0.05 * np.eye(k)] * 3)
        sources = anchor_covariances(np.stack([spread_factor(rng, k, spectra(k)["geometric"]) for _ in range(3)]), 1e-4)
    else:
        norm = CLIP if kind == "lowrank_at_clip" else None
        factors = np.stack([spread_factor(rng, k, spectra(k)[kind], norm) for _ in range(3)])
        sources = anchor_covariances(factors, 1e-4)
    means = rng.normal(size=(3, k)) * 0.1
    latents = np.concatenate([draws(rng, means[c] + 0.05, sources[c], per_class) for c in range(3)])
    labels = np.repeat(np.arange(3), per_class)
    want = reference_fit(latents, labels, means, anchor_covariances(factors, 1e-4))
    results = fit_results(latents, labels, factors, means, 1e-4)
    assert results[torch.float32][0] == pytest.approx(want, rel=1e-3)
    assert results[torch.float64][0] == pytest.approx(want, rel=1e-6)
    assert cosine(results[torch.float32][1], results[torch.float64][1]) > 0.99


@pytest.mark.parametrize("k", [16, 64, 256])
@pytest.mark.parametrize("kind", ["issue", "geometric", "lowrank_at_clip"])
def test_bures_wasserstein_sq_float32_matches_reference(k, kind):
    rng = np.random.default_rng(3 + k)
    norm = CLIP if kind == "lowrank_at_clip" else None
    factors = np.stack([spread_factor(rng, k, spectra(k)[kind], norm) for _ in range(2)])
    S = anchor_covariances(factors, 1e-4)
    m = rng.normal(size=(2, k))
    want = reference_w2(m[0], S[0], m[1], S[1])
    inputs = {dtype: [torch.tensor(a, dtype=dtype, requires_grad=True) for a in (m[0], S[0], m[1], S[1])]
              for dtype in (torch.float32, torch.float64)}
    values, grads = {}, {}
    for dtype, (m1, S1, m2, S2) in inputs.items():
        value = bures_wasserstein_sq(m1, S1, m2, S2)
        values[dtype] = value.item()
        grads[dtype] = np.concatenate([g.double().reshape(-1).numpy()
                                       for g in torch.autograd.grad(value, [m1, S1, m2, S2])])
    assert values[torch.float32] == pytest.approx(want, rel=1e-3)
    assert values[torch.float64] == pytest.approx(want, rel=1e-6)
    assert cosine(grads[torch.float32], grads[torch.float64]) > 0.99


def test_float64_gradients_match_central_differences_of_the_scipy_formula():
    """The float64 path the float32 gradients are compared with is itself right: directional derivatives."""
    rng = np.random.default_rng(4)
    k, eps = 16, 1e-4
    factors = np.stack([spread_factor(rng, k, spectra(k)["issue"]) for _ in range(2)])
    means = rng.normal(size=(2, k)) * 0.3
    latents = draws(rng, means[0], anchor_covariances(factors, eps)[0], 9)
    labels = np.zeros(9, dtype=np.int64)

    def fit_value(z: np.ndarray, m: np.ndarray, f: np.ndarray) -> float:
        return reference_fit(z, labels, m, anchor_covariances(f, eps))

    def margin_value(m: np.ndarray, f: np.ndarray) -> float:
        S = anchor_covariances(f, eps)
        return 1e3 - reference_w2(m[0], S[0], m[1], S[1])

    anchors = make_anchors(factors, means, eps, torch.float64)
    z = torch.tensor(latents, requires_grad=True)
    fit_grad = gradient(anchors, fit_loss(z, torch.tensor(labels), None, anchors), z)
    margin_grad = gradient(anchors, w2_margin_separation_loss(anchors, 1e3))
    h = 1e-5  # the reference itself is exact to ~1e-11
    for _ in range(3):
        dm, df, dz = rng.normal(size=means.shape), rng.normal(size=factors.shape), rng.normal(size=latents.shape)
        direction = np.concatenate([dm.ravel(), df.ravel(), dz.ravel()])
        numeric = (fit_value(latents + h * dz, means + h * dm, factors + h * df)
                   - fit_value(latents - h * dz, means - h * dm, factors - h * df)) / (2 * h)
        assert fit_grad @ direction == pytest.approx(numeric, rel=1e-4)
        direction = np.concatenate([dm.ravel(), df.ravel()])
        numeric = (margin_value(means + h * dm, factors + h * df) - margin_value(means - h * dm, factors - h * df)) / (2 * h)
        assert margin_grad @ direction == pytest.approx(numeric, rel=1e-4)


@pytest.mark.parametrize("eps", [1e-6, 1e-8, 1e-10])
def test_tiny_ridge_with_lowrank_factor_at_the_clip_bound_does_not_raise(eps):
    """float32 Cholesky of L̃L̃ᵀ + εI fails here; the k×k fit route and w2_margin must not."""
    rng = np.random.default_rng(5)
    k = 8
    factors = np.stack([spread_factor(rng, k, [1.0, 0.5], CLIP) for _ in range(2)])
    means = rng.normal(size=(2, k))
    covariances = anchor_covariances(factors, eps)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(torch.tensor(covariances, dtype=torch.float32))
    latents = np.concatenate([draws(rng, means[c], covariances[c], 30) for c in range(2)])  # 30 > k + 1: k×k
    labels = np.repeat(np.arange(2), 30)
    anchors = make_anchors(factors, means, eps, torch.float32)
    z = torch.tensor(latents, dtype=torch.float32, requires_grad=True)
    fit = fit_loss(z, torch.tensor(labels), None, anchors)
    distance = reference_w2(means[0], covariances[0], means[1], covariances[1])
    margin = w2_margin_separation_loss(anchors, 2 * distance)
    for value in (fit, margin):
        grads = torch.autograd.grad(value, [anchors.means, anchors.L, z], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert fit.item() == pytest.approx(reference_fit(latents, labels, means, covariances), rel=1e-3)
    assert margin.item() == pytest.approx(distance, rel=1e-3)
