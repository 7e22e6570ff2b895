"""Bures–Wasserstein distances and class moments against independent float64 numpy/scipy references."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from tdro.objectives.gaussian import (
    bures_wasserstein_sq,
    class_moments,
    diagonal_bures_wasserstein_sq,
    diagonal_moments_bures_wasserstein_sq,
    gram_route,
    lowrank_bures_wasserstein_sq,
    symmetric_eigh,
)

EPS = 1e-4


def reference_w2(m1: np.ndarray, S1: np.ndarray, m2: np.ndarray, S2: np.ndarray) -> float:
    """‖Δm‖² + tr S1 + tr S2 − 2 tr sqrtm(sqrtm(S1) S2 sqrtm(S1)) in float64 (real parts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on the singular batch covariances
        root = np.real(scipy.linalg.sqrtm(S1))
        cross = np.real(np.trace(scipy.linalg.sqrtm(root @ S2 @ root)))
    return float(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross)


def random_spd(rng: np.random.Generator, batch: int, k: int) -> np.ndarray:
    a = rng.normal(size=(batch, k, k))
    return a @ a.transpose(0, 2, 1) / k + 0.1 * np.eye(k)


def random_anchors(rng: np.random.Generator, num_classes: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor means and factors L̃ (random, so that the cross term is not a scaled identity)."""
    means = torch.tensor(rng.normal(size=(num_classes, k)))
    factor = torch.tensor(rng.normal(size=(num_classes, k, k)) * 0.4)
    return means, factor


def anchor_covariance(factor: torch.Tensor) -> np.ndarray:
    f = factor.numpy()
    return f @ f.transpose(0, 2, 1) + EPS * np.eye(f.shape[-1])


def labelled_latents(rng: np.random.Generator, counts: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents with the given per-class counts, shuffled so classes are interleaved."""
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    latents = rng.normal(size=(len(labels), k)) + labels[:, None]
    return torch.tensor(latents), torch.tensor(labels)


# ---------------------------------------------------------------- full Bures–Wasserstein


def test_full_matches_scipy_on_random_spd():
    rng = np.random.default_rng(0)
    for k in (1, 3, 7):
        S1, S2 = random_spd(rng, 4, k), random_spd(rng, 4, k)
        m1, m2 = rng.normal(size=(4, k)), rng.normal(size=(4, k))
        got = bures_wasserstein_sq(*map(torch.tensor, (m1, S1, m2, S2))).numpy()
        want = [reference_w2(m1[b], S1[b], m2[b], S2[b]) for b in range(4)]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-10)


def test_full_with_rank_deficient_batch_covariance_matches_scipy_in_either_order():
    rng = np.random.default_rng(1)
    k = 6
    for n in (2, 3, 5):  # rank n − 1 < k
        x = rng.normal(size=(n, k))
        S1 = np.cov(x, rowvar=False)[None]
        S2 = random_spd(rng, 1, k)
        m1, m2 = rng.normal(size=(1, k)), rng.normal(size=(1, k))
        want = reference_w2(m1[0], S1[0], m2[0], S2[0])
        forward = bures_wasserstein_sq(*map(torch.tensor, (m1, S1, m2, S2)))
        swapped = bures_wasserstein_sq(*map(torch.tensor, (m2, S2, m1, S1)))
        np.testing.assert_allclose(forward.numpy(), [want], rtol=1e-6)
        np.testing.assert_allclose(swapped.numpy(), [want], rtol=1e-6)


def test_full_is_symmetric_and_zero_at_identical_arguments():
    rng = np.random.default_rng(2)
    m1, m2 = torch.tensor(rng.normal(size=(5, 4))), torch.tensor(rng.normal(size=(5, 4)))
    S1, S2 = torch.tensor(random_spd(rng, 5, 4)), torch.tensor(random_spd(rng, 5, 4))
    torch.testing.assert_close(bures_wasserstein_sq(m1, S1, m2, S2), bures_wasserstein_sq(m2, S2, m1, S1))
    same = bures_wasserstein_sq(m1, S1, m1, S1)
    assert same.abs().max() < 1e-12 * S1.diagonal(dim1=1, dim2=2).sum(-1).max()
    assert (bures_wasserstein_sq(m1, S1, m2, S2) > 0.1).all()  # and clearly non-zero otherwise


def test_diagonal_closed_form_equals_full_form_on_diagonal_inputs():
    rng = np.random.default_rng(3)
    m1, m2 = torch.tensor(rng.normal(size=(6, 5))), torch.tensor(rng.normal(size=(6, 5)))
    v1, v2 = torch.tensor(rng.uniform(0.01, 3, size=(6, 5))), torch.tensor(rng.uniform(0.01, 3, size=(6, 5)))
    full = bures_wasserstein_sq(m1, torch.diag_embed(v1), m2, torch.diag_embed(v2))
    torch.testing.assert_close(diagonal_bures_wasserstein_sq(m1, v1, m2, v2), full)
    want = [reference_w2(m1[b].numpy(), np.diag(v1[b]), m2[b].numpy(), np.diag(v2[b])) for b in range(6)]
    np.testing.assert_allclose(full.numpy(), want, rtol=1e-9)


def test_full_rejects_bad_shapes_and_two_singular_covariances():
    m, S = torch.zeros(2, 3), torch.eye(3).repeat(2, 1, 1)
    with pytest.raises(ValueError, match="matching shapes"):
        bures_wasserstein_sq(m, S, m[:, :2], S)
    singular = torch.zeros(2, 3, 3)
    with pytest.raises(ValueError, match="positive definite"):
        bures_wasserstein_sq(m, singular, m, singular)


def test_full_gradcheck_on_random_spd():
    rng = np.random.default_rng(4)
    inputs = [torch.tensor(rng.normal(size=shape), requires_grad=True) for shape in [(2, 3), (2, 3, 3)] * 2]

    def w2(m1, a1, m2, a2):
        eye = torch.eye(3, dtype=torch.float64)
        return bures_wasserstein_sq(m1, a1 @ a1.transpose(1, 2) + 0.1 * eye, m2, a2 @ a2.transpose(1, 2) + 0.1 * eye)

    assert torch.autograd.gradcheck(w2, inputs)


# ---------------------------------------------------------------- fast path: batch classes vs anchors


@pytest.mark.parametrize(
    "counts, k, gram",
    [
        ([2, 3, 5, 1, 4], 6, True),  # n_max − 1 < k: the n×n route, every batch covariance rank-deficient
        ([2, 3, 7], 6, True),  # n_max − 1 = k
        ([2, 10, 4], 8, True),  # n_max − 1 > k, n_max = 1.25·k: the n×n route with a full-rank class
        ([2, 3, 9, 1], 3, False),  # n_max > 1.25·k: the k×k route, with rank-deficient classes among full-rank ones
    ],
)
def test_lowrank_fit_path_matches_scipy(counts, k, gram):
    rng = np.random.default_rng(5)
    latents, labels = labelled_latents(rng, counts, k)
    means, factor = random_anchors(rng, len(counts), k)
    scale = torch.tensor(rng.uniform(0.5, 2.0, size=len(counts)))
    moments = class_moments(latents, labels, len(counts))
    assert gram_route(moments) is gram
    got = lowrank_bures_wasserstein_sq(moments, means, factor, EPS, scale).numpy()
    S = anchor_covariance(factor * scale[:, None, None])
    want = []
    for c in moments.classes.tolist():
        z = latents[labels == c].numpy()
        want.append(reference_w2(z.mean(0), np.cov(z, rowvar=False).reshape(k, k), means[c].numpy(), S[c]))
    assert moments.classes.tolist() == [c for c, n in enumerate(counts) if n >= 2]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_lowrank_fit_path_is_zero_when_the_batch_matches_the_anchor():
    rng = np.random.default_rng(6)
    latents, labels = labelled_latents(rng, [40, 30], 3)
    moments = class_moments(latents, labels, 2)
    eye = torch.eye(3, dtype=torch.float64)
    factor = torch.linalg.cholesky(moments.covariance() - EPS * eye)
    distances = lowrank_bures_wasserstein_sq(moments, moments.means, factor, EPS)
    assert distances.abs().max() < 1e-10


@pytest.mark.parametrize("counts, k", [([2, 3, 4], 4), ([3, 10, 5], 8), ([3, 8, 5], 2)],
                         ids=["gram", "gram_full_rank", "kxk"])
def test_lowrank_fit_path_gradcheck_wrt_latents_and_anchor_parameters(counts, k):
    rng = np.random.default_rng(7)
    latents, labels = labelled_latents(rng, counts, k)
    means, factor = random_anchors(rng, len(counts), k)
    inputs = [t.clone().requires_grad_() for t in (latents, means, factor)]

    def fit(z, m, f):
        return lowrank_bures_wasserstein_sq(class_moments(z, labels, len(counts)), m, f, EPS)

    assert torch.autograd.gradcheck(fit, inputs)


def _fit_gradients(latents: torch.Tensor, labels: torch.Tensor, means: torch.Tensor, factor: torch.Tensor):
    inputs = [t.clone().requires_grad_() for t in (latents, means, factor)]
    moments = class_moments(inputs[0], labels, means.shape[0])
    loss = lowrank_bures_wasserstein_sq(moments, inputs[1], inputs[2], EPS).mean()
    return loss, torch.autograd.grad(loss, inputs)


def test_fit_gradients_finite_in_float32_with_repeated_eigenvalues():
    """Latent 64, 10 classes × 13 samples, anchors at init (S = 0.05²I + εI: one eigenvalue, 64 times)."""
    torch.manual_seed(0)
    k, classes = 64, 10
    labels = torch.arange(classes).repeat_interleave(13)
    latents = torch.randn(labels.numel(), k)
    means = torch.zeros(classes, k)
    factor = 0.05 * torch.eye(k).repeat(classes, 1, 1)
    loss, grads = _fit_gradients(latents, labels, means, factor)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    loss64, grads64 = _fit_gradients(latents.double(), labels, means.double(), factor.double())
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=0)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


@pytest.mark.parametrize("k", [64, 11, 3], ids=["gram", "gram_full_rank", "kxk"])
def test_fit_gradients_finite_in_float32_with_duplicated_latents(k):
    torch.manual_seed(1)
    classes = 10
    labels = torch.arange(classes).repeat_interleave(13)
    latents = torch.randn(labels.numel(), k)
    latents[labels == 0] = latents[labels == 0][0]  # one class collapsed to a point: Ŝ = 0
    latents[labels == 1] = latents[labels == 1][:2].repeat(7, 1)[:13]  # another with rank 1
    means = torch.randn(classes, k) * 0.1
    factor = 0.05 * torch.eye(k).repeat(classes, 1, 1)
    loss, grads = _fit_gradients(latents, labels, means, factor)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    loss64, grads64 = _fit_gradients(latents.double(), labels, means.double(), factor.double())
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=0)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-3 * g64.abs().max().item())


def test_diagonal_fit_path_matches_numpy_closed_form():
    rng = np.random.default_rng(8)
    latents, labels = labelled_latents(rng, [2, 5, 1, 9], 4)
    means = torch.tensor(rng.normal(size=(4, 4)))
    variance = torch.tensor(rng.uniform(0.05, 2.0, size=(4, 4)))
    moments = class_moments(latents, labels, 4)
    got = diagonal_moments_bures_wasserstein_sq(moments, means, variance).numpy()
    want = []
    for c in moments.classes.tolist():
        z = latents[labels == c].numpy()
        spread = np.sqrt(z.var(0, ddof=1)) - np.sqrt(variance[c].numpy())
        want.append(np.sum((z.mean(0) - means[c].numpy()) ** 2) + np.sum(spread**2))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_diagonal_fit_path_gradient_finite_when_a_dimension_has_no_spread():
    latents = torch.tensor([[1.0, 2.0], [1.0, 3.0], [0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    moments = class_moments(latents, torch.tensor([0, 0, 1, 1]), 2)
    loss = diagonal_moments_bures_wasserstein_sq(moments, torch.zeros(2, 2), torch.ones(2, 2)).sum()
    (grad,) = torch.autograd.grad(loss, latents)
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------- class moments


def loop_moments(latents: np.ndarray, labels: np.ndarray, groups: np.ndarray | None):
    """{class or (group, class): (count, mean, covariance)} for every key with ≥ 2 samples, by a loop."""
    keys = [int(c) for c in labels] if groups is None else [(int(g), int(c)) for g, c in zip(groups, labels)]
    out = {}
    for key in set(keys):
        z = latents[[i for i, other in enumerate(keys) if other == key]]
        if len(z) >= 2:
            out[key] = (len(z), z.mean(0), np.cov(z, rowvar=False).reshape(z.shape[1], z.shape[1]))
    return out


@pytest.mark.parametrize("per_group", [False, True], ids=["pooled", "per_group"])
def test_class_moments_match_a_loop_reference(per_group):
    rng = np.random.default_rng(9)
    n, k, num_classes = 40, 3, 6
    labels = rng.integers(0, num_classes, size=n)
    labels[:2] = [5, 4]
    labels[2:] = np.where(labels[2:] == 5, 0, labels[2:])  # class 5: one sample, must be dropped
    groups = rng.integers(0, 3, size=n)
    latents = rng.normal(size=(n, k))
    moments = class_moments(
        torch.tensor(latents), torch.tensor(labels), num_classes, torch.tensor(groups) if per_group else None
    )
    want = loop_moments(latents, labels, groups if per_group else None)
    if per_group:
        got_keys = list(zip(moments.groups.tolist(), moments.classes.tolist()))
    else:
        assert moments.groups is None
        got_keys = moments.classes.tolist()
    assert len(got_keys) == len(set(got_keys)) and set(got_keys) == set(want) and 5 not in moments.classes.tolist()
    covariance = moments.covariance().numpy()
    for p, key in enumerate(got_keys):
        count, mean, cov = want[key]
        assert moments.counts[p] == count and moments.mask[p].sum() == count
        assert not moments.mask[p, count:].any() and (moments.centred[p, count:] == 0).all()
        np.testing.assert_allclose(moments.means[p].numpy(), mean, rtol=1e-12)
        np.testing.assert_allclose(covariance[p], cov, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(moments.variance()[p].numpy(), np.diag(cov), rtol=1e-10)


def test_class_moments_empty_when_no_class_has_two_samples():
    for latents, labels in ((torch.randn(3, 4), torch.tensor([0, 1, 2])), (torch.randn(0, 4), torch.zeros(0))):
        moments = class_moments(latents, labels, 3, torch.zeros_like(labels))
        assert moments.num == 0 and moments.centred.shape == (0, 0, 4) and moments.mask.shape == (0, 0)
        assert moments.groups.shape == moments.classes.shape == moments.counts.shape == (0,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"latents": torch.zeros(4)}, "latents"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels"),
        ({"num_classes": 0}, "num_classes"),
        ({"min_count": 1}, "min_count"),
        ({"group_ids": torch.zeros(3, dtype=torch.long)}, "group_ids"),
        ({"labels": torch.tensor([0, 1, 2, 1])}, r"labels must lie in \[0, 2\).*from 0 to 2"),
        ({"labels": torch.tensor([0, -1, 1, 1])}, "from -1 to 1"),
        ({"group_ids": torch.tensor([0, -1, 0, 0])}, "group_ids must be >= 0, got -1"),
    ],
)
def test_class_moments_rejects_bad_arguments(kwargs, match):
    arguments = {"latents": torch.zeros(4, 2), "labels": torch.zeros(4, dtype=torch.long), "num_classes": 2}
    with pytest.raises(ValueError, match=match):
        class_moments(**{**arguments, **kwargs})


@pytest.mark.parametrize("n", [3, 32, 33, 64])
def test_symmetric_eigh_matches_numpy_on_both_sides_of_the_cusolver_batch_limit(n):
    """The one eigen-solver of the Bures terms: numpy's eigh (independent LAPACK call) on repeated and spread spectra."""
    rng = np.random.default_rng(n)
    basis = np.linalg.qr(rng.normal(size=(4, n, n)))[0]
    spectra = np.stack([np.repeat([2.0, 0.5], [n // 2, n - n // 2]), np.logspace(-12, 3, n),
                        np.zeros(n), rng.uniform(size=n)])
    matrices = torch.tensor(basis @ (spectra[:, :, None] * basis.transpose(0, 2, 1)))
    values, vectors = symmetric_eigh(matrices)
    reference = np.linalg.eigvalsh(matrices.numpy())
    np.testing.assert_allclose(values.numpy(), reference, atol=1e-12 * 1e3)
    np.testing.assert_allclose(symmetric_eigh(matrices, vectors=False).numpy(), reference, atol=1e-12 * 1e3)
    rebuilt = vectors @ torch.diag_embed(values) @ vectors.transpose(1, 2)
    np.testing.assert_allclose(rebuilt.numpy(), matrices.numpy(), atol=1e-11 * 1e3)
