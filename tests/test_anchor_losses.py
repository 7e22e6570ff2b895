"""Anchor losses against float64 scipy/numpy loop references; AnchorLoss skips terms whose λ is 0."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from torch import nn

import tdro.objectives.anchor_losses as anchor_losses
from tdro.models.anchors import GaussianAnchors
from tdro.objectives.anchor_losses import (
    AnchorLoss,
    classifier_separation_loss,
    fit_loss,
    w2_margin_separation_loss,
)

NUM_CLASSES, K = 4, 5


def reference_w2(m1: np.ndarray, S1: np.ndarray, m2: np.ndarray, S2: np.ndarray) -> float:
    """‖Δm‖² + tr S1 + tr S2 − 2 tr sqrtm(sqrtm(S1) S2 sqrtm(S1)) in float64 (real parts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on the singular batch covariances
        root = np.real(scipy.linalg.sqrtm(S1))
        cross = np.real(np.trace(scipy.linalg.sqrtm(root @ S2 @ root)))
    return float(np.sum((m1 - m2) ** 2) + np.trace(S1) + np.trace(S2) - 2 * cross)


def make_anchors(covariance: str = "full", seed: int = 0, spread: float = 1.0) -> GaussianAnchors:
    """float64 anchors with random means and covariances (random factor or variances)."""
    torch.manual_seed(seed)
    anchors = GaussianAnchors(NUM_CLASSES, K, eps=1e-3, covariance=covariance).double()
    with torch.no_grad():
        anchors.means.copy_(torch.randn(NUM_CLASSES, K, dtype=torch.float64) * spread)
        if covariance == "full":
            anchors.L.copy_(torch.randn(NUM_CLASSES, K, K, dtype=torch.float64) * 0.3)
        else:
            anchors.raw_scale.copy_(torch.randn(NUM_CLASSES, K, dtype=torch.float64))
    return anchors


def batch(seed: int = 0):
    """Latents of 3 groups; class 3 has one sample in total, group 2 only one sample (neither fitted alone)."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 1, 2, 0, 3, 1])
    groups = np.array([0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 2])
    latents = rng.normal(size=(len(labels), K)) + labels[:, None]
    return torch.tensor(latents), torch.tensor(labels), torch.tensor(groups)


def reference_distance(z: np.ndarray, c: int, anchors: GaussianAnchors) -> float:
    """W₂² from the batch Gaussian of z to anchor c; diagonal anchors see only the batch variances."""
    with torch.no_grad():
        mean, covariance = anchors.means[c].numpy(), anchors.covariance()[c].numpy()
    batch_covariance = np.diag(z.var(0, ddof=1)) if anchors.diagonal else np.cov(z, rowvar=False)
    return reference_w2(z.mean(0), batch_covariance, mean, covariance)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_pooled_fit_loss_matches_scipy_mean_over_classes_with_two_samples(covariance):
    latents, labels, groups = batch()
    anchors = make_anchors(covariance)
    z, y = latents.numpy(), labels.numpy()
    want = np.mean([reference_distance(z[y == c], c, anchors) for c in (0, 1, 2)])
    got = fit_loss(latents, labels, groups, anchors)
    np.testing.assert_allclose(got.item(), want, rtol=1e-6)


def test_per_group_fit_loss_averages_within_each_group_then_over_groups():
    latents, labels, groups = batch()
    anchors = make_anchors()
    z, y, g = latents.numpy(), labels.numpy(), groups.numpy()
    per_group = []
    for group in (0, 1, 2):
        distances = [
            reference_distance(z[(g == group) & (y == c)], c, anchors)
            for c in range(NUM_CLASSES)
            if ((g == group) & (y == c)).sum() >= 2
        ]
        if distances:
            per_group.append(np.mean(distances))
    assert len(per_group) == 2
    got = fit_loss(latents, labels, groups, anchors, per_group_fit=True)
    np.testing.assert_allclose(got.item(), np.mean(per_group), rtol=1e-6)
    with pytest.raises(ValueError, match="group_ids"):
        fit_loss(latents, labels, None, anchors, per_group_fit=True)


def test_fit_loss_is_zero_when_no_class_has_two_samples():
    anchors = make_anchors()
    latents = torch.randn(3, K, dtype=torch.float64)
    loss = fit_loss(latents, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), anchors)
    assert loss.item() == 0.0


class PerGroupFit(nn.Module):
    """fit_loss as a module, so functional_call can swap the anchors' parameters for test inputs."""

    def __init__(self, anchors: GaussianAnchors, labels: torch.Tensor, groups: torch.Tensor) -> None:
        super().__init__()
        self.anchors, self.labels, self.groups = anchors, labels, groups

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return fit_loss(latents, self.labels, self.groups, self.anchors, per_group_fit=True)


@pytest.mark.parametrize("clipped", [False, True], ids=["in_range", "one_norm_clipped"])
def test_fit_loss_gradcheck_through_the_anchor_module(clipped):
    latents, labels, groups = batch(1)
    module = PerGroupFit(make_anchors(seed=1), labels, groups)
    if clipped:
        with torch.no_grad():
            module.anchors.L[1] *= 100.0  # Frobenius norm ≈ 70 > 10
    inputs = [t.detach().clone().requires_grad_() for t in (latents, module.anchors.means, module.anchors.L)]

    def loss(z, means, factor):
        return torch.func.functional_call(module, {"anchors.means": means, "anchors.L": factor}, (z,))

    assert torch.autograd.gradcheck(loss, inputs)


def test_fit_and_margin_losses_run_in_full_precision_under_bf16_autocast():
    torch.manual_seed(0)
    anchors = GaussianAnchors(10, 16)
    latents, labels = torch.randn(64, 16), torch.arange(64) % 10
    fit32, margin32 = fit_loss(latents, labels, None, anchors), w2_margin_separation_loss(anchors, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fit = fit_loss(latents, labels, None, anchors)
        margin = w2_margin_separation_loss(anchors, 2.0)
    fit_bf16_latents = fit_loss(latents.bfloat16(), labels, None, anchors)
    assert fit.dtype == margin.dtype == fit_bf16_latents.dtype == torch.float32
    torch.testing.assert_close(fit, fit32, rtol=1e-6, atol=0)
    torch.testing.assert_close(margin, margin32, rtol=1e-6, atol=0)
    torch.testing.assert_close(fit_bf16_latents, fit_loss(latents.bfloat16().float(), labels, None, anchors))


class CountingHead(nn.Module):
    """A linear head that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(K, NUM_CLASSES).double()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def test_classifier_separation_matches_a_per_class_loop_with_one_head_call():
    anchors = make_anchors()
    head = CountingHead()
    samples = anchors.sample(7, generator=torch.Generator().manual_seed(3)).detach()
    per_class = []
    for c in range(NUM_CLASSES):  # the reference's loop: one head call per class, numpy CE
        logits = head(samples[c]).detach().numpy()
        per_class.append(np.mean(scipy.special.logsumexp(logits, axis=1) - logits[:, c]))
    head.calls = 0
    got = classifier_separation_loss(anchors, head, 7, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(got.item(), np.mean(per_class), rtol=1e-10)
    assert head.calls == 1
    got.backward()
    assert anchors.means.grad.abs().sum() > 0 and anchors.L.grad.abs().sum() > 0


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_w2_margin_matches_scipy_pairs(covariance):
    anchors = make_anchors(covariance, spread=0.6)
    with torch.no_grad():
        means, cov = anchors.means.numpy(), anchors.covariance().numpy()
    pairs = [reference_w2(means[i], cov[i], means[j], cov[j]) for i, j in itertools.combinations(range(NUM_CLASSES), 2)]
    margin = float(np.median(pairs))  # some pairs inside the margin, some outside
    want = np.mean([max(0.0, margin - d) for d in pairs])
    got = w2_margin_separation_loss(anchors, margin)
    np.testing.assert_allclose(got.item(), want, rtol=1e-6)
    assert 0 < want < margin


def _counted(anchors: GaussianAnchors) -> list[int]:
    """Wrap anchors.sample with a call counter that still calls the real method."""
    calls = [0]
    real = anchors.sample

    def sample(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    anchors.sample = sample
    return calls


def test_separation_term_with_zero_lambda_is_not_computed():
    latents, labels, groups = batch()
    anchors, head = make_anchors(), CountingHead()
    sample_calls = _counted(anchors)
    parts = AnchorLoss(lambda_fit=0.5, lambda_sep=0.0)(latents, labels, groups, anchors, head)
    assert set(parts) == {"fit", "total"}
    assert head.calls == 0 and sample_calls[0] == 0
    torch.testing.assert_close(parts["total"], 0.5 * parts["fit"])


def test_fit_term_with_zero_lambda_is_not_computed(monkeypatch):
    latents, labels, groups = batch()
    latents.requires_grad_()
    anchors, head = make_anchors(), CountingHead()
    moment_calls = []
    real = anchor_losses.class_moments
    monkeypatch.setattr(anchor_losses, "class_moments", lambda *a, **k: moment_calls.append(1) or real(*a, **k))
    parts = AnchorLoss(lambda_fit=0.0, lambda_sep=0.25)(latents, labels, groups, anchors, head)
    assert set(parts) == {"sep", "total"} and not moment_calls and head.calls == 1
    assert torch.autograd.grad(parts["total"], latents, allow_unused=True) == (None,)
    nothing = AnchorLoss(0.0, 0.0)(latents, labels, groups, anchors, head)
    assert set(nothing) == {"total"} and nothing["total"].item() == 0.0 and not moment_calls and head.calls == 1


@pytest.mark.parametrize("sep_method", ["classifier", "w2_margin"])
def test_total_is_the_hand_weighted_sum_of_independently_computed_parts(sep_method):
    latents, labels, groups = batch()
    anchors, head = make_anchors(), CountingHead()
    torch.manual_seed(11)
    parts = AnchorLoss(0.3, 0.7, sep_method, samples_per_class=5, margin=3.0)(latents, labels, groups, anchors, head)
    torch.manual_seed(11)
    if sep_method == "classifier":
        sep = classifier_separation_loss(anchors, head, 5)
    else:
        sep = w2_margin_separation_loss(anchors, 3.0)
    fit = fit_loss(latents, labels, groups, anchors)
    torch.testing.assert_close(parts["fit"], fit)
    torch.testing.assert_close(parts["sep"], sep)
    torch.testing.assert_close(parts["total"], 0.3 * fit + 0.7 * sep)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lambda_fit": -1.0}, ["lambda_fit", "-1.0", ">= 0"]),
        ({"lambda_sep": float("nan")}, ["lambda_sep", "nan"]),
        ({"sep_method": "margin"}, ["sep_method", "'margin'", "classifier", "w2_margin"]),
        ({"samples_per_class": 0}, ["samples_per_class", "0"]),
        ({"margin": -2.0}, ["margin", "-2.0"]),
        ({"per_group_fit": 1}, ["per_group_fit", "1"]),
    ],
)
def test_anchor_loss_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as error:
        AnchorLoss(**{"lambda_fit": 1.0, "lambda_sep": 1.0, **kwargs})
    for word in words:
        assert word in str(error.value)



class BothTerms(nn.Module):
    """AnchorLoss (fit + classifier separation) as a module, with the same separation draws every call."""

    def __init__(self, covariance: str, per_group: bool, every_class: bool, clipped: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        rank = {"rank": 2} if covariance == "lowrank" else {}
        self.anchors = GaussianAnchors(NUM_CLASSES, K, eps=1e-3, covariance=covariance, **rank).double()
        self.factor_name = "U" if covariance == "lowrank" else "L"
        factor = getattr(self.anchors, self.factor_name)
        with torch.no_grad():
            factor.copy_(torch.randn(factor.shape, dtype=torch.float64) * 0.3)
            if clipped:
                factor[1] *= 100.0  # Frobenius norm far above 10: the clip's scale is in the graph
        self.latents, self.labels, self.groups = batch(2)
        if every_class:  # every class has two samples or more: the pooled rows are the anchors in order
            self.labels = torch.arange(len(self.labels)) % NUM_CLASSES
        self.head = nn.Linear(K, NUM_CLASSES).double()
        self.loss = AnchorLoss(0.4, 0.6, samples_per_class=3, per_group_fit=per_group)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(5)
        return self.loss(latents, self.labels, self.groups, self.anchors, self.head)["total"]


CASES = [(False, True, False), (False, False, False), (True, False, False), (False, True, True)]
CASE_IDS = ["pooled_all_classes", "pooled_gathered", "per_group_repeated_rows", "clipped"]


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
@pytest.mark.parametrize("per_group, every_class, clipped", CASES, ids=CASE_IDS)
def test_one_factor_op_gives_finite_difference_gradients_for_both_terms(covariance, per_group, every_class, clipped):
    """Fit (X·F[rows]) and separation (Z·Fᵀ) share one op and one gradient buffer: gradcheck it all."""
    module = BothTerms(covariance, per_group, every_class, clipped)
    factor = getattr(module.anchors, module.factor_name)
    names = ["anchors.means", f"anchors.{module.factor_name}", "head.weight"]

    def total(latents, means, raw, weight):
        return torch.func.functional_call(module, dict(zip(names, (means, raw, weight))), (latents,))

    tensors = (module.latents, module.anchors.means, factor, module.head.weight)
    assert torch.autograd.gradcheck(total, [t.detach().clone().requires_grad_() for t in tensors])


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
@pytest.mark.parametrize("per_group, every_class, clipped", CASES, ids=CASE_IDS)
def test_both_terms_gradients_in_float32_match_float64(covariance, per_group, every_class, clipped, monkeypatch):
    """The dtype training runs in: every gradient of the total within float32 round-off of the float64 one."""
    draw = torch.randn

    def same_draws(*shape, dtype=None, **kwargs):  # float64 runs see the float32 runs' separation noise
        return draw(*shape, dtype=torch.float32, **kwargs).to(dtype or torch.float32)

    monkeypatch.setattr(torch, "randn", same_draws)
    reference = BothTerms(covariance, per_group, every_class, clipped)
    single = BothTerms(covariance, per_group, every_class, clipped).float()
    grads = []
    for module, dtype in ((reference, torch.float64), (single, torch.float32)):
        latents = module.latents.to(dtype).requires_grad_()
        module(latents).backward()
        grads.append([latents.grad, *(p.grad for p in module.parameters())])
    for precise, rounded in zip(*grads):
        scale = precise.abs().max().item()
        torch.testing.assert_close(rounded.double(), precise, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("covariance", ["full", "lowrank"])
def test_fixed_anchors_pass_gradients_to_the_latents_only(covariance):
    """targets="random_fixed": the factor is a buffer, so the one op returns no factor gradient, only the latents'."""
    torch.manual_seed(0)
    rank = {"rank": 2} if covariance == "lowrank" else {}
    anchors = GaussianAnchors(NUM_CLASSES, K, eps=1e-3, covariance=covariance, targets="random_fixed", **rank).double()
    head = nn.Linear(K, NUM_CLASSES).double()
    latents, labels, groups = batch(3)
    loss = AnchorLoss(0.5, 0.5, samples_per_class=3)

    def total(z):
        torch.manual_seed(1)
        return loss(z, labels, groups, anchors, head)["total"]

    assert torch.autograd.gradcheck(total, [latents.clone().requires_grad_()])
    total(latents.clone().requires_grad_()).backward()
    assert all(t.grad is None for t in anchors.buffers()) and head.weight.grad is not None
