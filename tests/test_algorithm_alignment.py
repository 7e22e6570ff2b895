"""CORAL, MMD and latent L2 against float64 numpy references; random fixed anchors stay put while the rest trains."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from algorithm_runs import assert_exact_resume, cli_one_epoch, small_config
from tdro.algorithms import BatchLosses, Grouper
from tdro.algorithms.coral import CORAL, coral_penalty
from tdro.algorithms.latent_l2 import LatentL2
from tdro.algorithms.mmd import DOMAINBED_GAMMAS, MMD, mmd_penalty
from tdro.config import Config, ConfigError
from tdro.data import build_dataset
from tdro.data.base import Group, GroupedDataset, Split
from tdro.models.anchors import GaussianAnchors
from tdro.models.multigroup import build_model
from tdro.training.trainer import Trainer, seed_everything

K = 4
GROUPS = 4


def fake_dataset(groups: str = "abcd") -> GroupedDataset:
    split = Split(torch.zeros(4, 2), torch.arange(4) % 2)
    return GroupedDataset("fake", {g: Group(g, "tabular", "mlp_tabular", {"input_dim": 2}, {}, split, split, split)
                                   for g in groups}, ["0", "1"])


def latents_and_groups(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents (N, K) of groups with ``sizes`` samples (0 = absent from the batch), in group order."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    return rng.normal(size=(len(groups), K)) + groups[:, None], groups


def hand_coral(z: np.ndarray, groups: np.ndarray, num_groups: int) -> float:
    """Mean over present pairs of the mean gap + mean over pairs with n ≥ 2 of the covariance gap (loops, np.cov)."""
    mean_gaps, covariance_gaps = [], []
    for i in range(num_groups):
        for j in range(i + 1, num_groups):
            x, y = z[groups == i], z[groups == j]
            if len(x) and len(y):
                mean_gaps.append(np.mean((x.mean(0) - y.mean(0)) ** 2))
            if len(x) > 1 and len(y) > 1:
                covariance_gaps.append(np.mean((np.cov(x, rowvar=False) - np.cov(y, rowvar=False)) ** 2))
    return (np.mean(mean_gaps) if mean_gaps else 0.0) + (np.mean(covariance_gaps) if covariance_gaps else 0.0)


def hand_mmd(z: np.ndarray, groups: np.ndarray, num_groups: int, gammas: list[float]) -> float:
    """Mean over present pairs of the biased MMD², each kernel mean a double loop over samples."""
    def kernel_mean(x, y):
        return np.mean([[sum(np.exp(-g * np.sum((a - b) ** 2)) for g in gammas) for b in y] for a in x])
    values = [kernel_mean(z[groups == i], z[groups == i]) + kernel_mean(z[groups == j], z[groups == j])
              - 2 * kernel_mean(z[groups == i], z[groups == j])
              for i in range(num_groups) for j in range(i + 1, num_groups)
              if (groups == i).any() and (groups == j).any()]
    return float(np.mean(values)) if values else 0.0


def as_tensors(z: np.ndarray, groups: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(z, dtype=dtype, requires_grad=True), torch.as_tensor(groups)


# group 2 absent throughout; one group alone; a one-sample group (no covariance)
SIZES = [[5, 4, 0, 3], [6, 0, 0, 0], [5, 1, 0, 4]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
def test_coral_penalty_matches_a_hand_computation(sizes, dtype):
    z, groups = latents_and_groups(sizes)
    latents, group_ids = as_tensors(z, groups, dtype)
    penalty = coral_penalty(latents, group_ids, GROUPS)
    assert penalty.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(penalty.item(), hand_coral(z, groups, GROUPS), rtol=rtol)


def test_coral_one_sample_group_keeps_its_mean_term_and_skips_its_covariance_term():
    z, groups = latents_and_groups([3, 1, 0, 0])
    penalty = coral_penalty(*as_tensors(z, groups, torch.float64), GROUPS)
    np.testing.assert_allclose(penalty.item(), np.mean((z[:3].mean(0) - z[3]) ** 2), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", SIZES)
def test_mmd_penalty_matches_a_double_loop(sizes, dtype):
    z, groups = latents_and_groups(sizes)
    z = z * 0.3  # so that several bandwidths contribute
    gammas = DOMAINBED_GAMMAS
    penalty = mmd_penalty(*as_tensors(z, groups, dtype), GROUPS, gammas)
    tolerance = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(penalty.item(), hand_mmd(z, groups, GROUPS, gammas), **tolerance)


@pytest.mark.parametrize("penalty", [lambda z, g: coral_penalty(z, g, GROUPS),
                                     lambda z, g: mmd_penalty(z, g, GROUPS, DOMAINBED_GAMMAS)], ids=["coral", "mmd"])
def test_gradients_are_finite_on_ties_zero_variance_and_one_sample_groups(penalty):
    z, groups = latents_and_groups([4, 1, 0, 3])
    z[5:] = z[5]  # group 3: three identical latents (zero covariance, zero distances)
    z[1] = z[0]   # a tie across samples of group 0
    latents, group_ids = as_tensors(z, groups, torch.float32)
    value = penalty(latents, group_ids)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0


def test_gradients_match_finite_differences():
    z, groups = latents_and_groups([3, 1, 0, 2])
    latents, group_ids = as_tensors(z * 0.3, groups, torch.float64)
    assert torch.autograd.gradcheck(lambda x: coral_penalty(x, group_ids, GROUPS), (latents,))
    assert torch.autograd.gradcheck(lambda x: mmd_penalty(x, group_ids, GROUPS, [0.1, 1.0, 10.0]), (latents,))


def test_identical_groups_have_zero_penalty():
    z, _ = latents_and_groups([5])
    latents, group_ids = as_tensors(np.concatenate([z, z]), np.repeat([0, 1], 5), torch.float64)
    assert coral_penalty(latents, group_ids, 2).item() == pytest.approx(0.0, abs=1e-15)
    assert mmd_penalty(latents, group_ids, 2, DOMAINBED_GAMMAS).item() == pytest.approx(0.0, abs=1e-12)


def batch_of(z: np.ndarray, groups: np.ndarray, per_sample: np.ndarray) -> BatchLosses:
    n = len(groups)
    group_ids = torch.as_tensor(groups)
    return BatchLosses(torch.tensor(per_sample), torch.zeros(n, 2), torch.tensor(z), torch.zeros(n, dtype=torch.long),
                       group_ids, group_ids, torch.arange(n), epoch=0)


def test_each_algorithm_loss_is_erm_plus_lambda_times_its_penalty():
    z, groups = latents_and_groups([3, 2, 0, 4])
    per_sample = np.random.default_rng(1).uniform(0, 2, size=len(groups))
    batch = batch_of(z, groups, per_sample)
    grouper = Grouper(fake_dataset())
    cases = [(CORAL(Config(algorithm="coral", coral_lambda=0.7), grouper), 0.7 * hand_coral(z, groups, GROUPS)),
             (MMD(Config(algorithm="mmd", mmd_lambda=2.0, mmd_gammas=[0.5, 2]), grouper),
              2.0 * hand_mmd(z, groups, GROUPS, [0.5, 2])),
             (LatentL2(Config(algorithm="latent_l2", latent_l2_lambda=0.3), grouper), 0.3 * np.mean(z**2)),
             (CORAL(Config(algorithm="coral", coral_lambda=0.0), grouper), 0.0)]
    for algorithm, penalty in cases:
        np.testing.assert_allclose(algorithm.loss(batch).item(), per_sample.mean() + penalty, rtol=1e-12)


def test_bad_keys_and_one_group_datasets_are_refused():
    for gammas, match in (([], r"mmd_gammas.*\[\]"), ([1.0, 0], r"element \[1\] is 0"),
                          (["1e-3"], "write 0.001"), ([True], "element"), ([float("inf")], "element")):
        with pytest.raises(ConfigError, match=match):
            Config(algorithm="mmd", mmd_gammas=gammas)
    with pytest.raises(ConfigError, match="coral_lambda"):
        Config(algorithm="coral", coral_lambda=-1.0)
    with pytest.raises(ConfigError, match="latent_l2_lambda"):
        Config(algorithm="erm", latent_l2_lambda=1.0)
    for cls, name in ((CORAL, "coral"), (MMD, "mmd")):
        with pytest.raises(ConfigError, match=f"algorithm '{name}' aligns groups.*one group"):
            cls(Config(algorithm=name), Grouper(fake_dataset("a"))).check_dataset(fake_dataset("a"))


# --- random fixed anchor targets ---

@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_random_fixed_anchors_are_buffers_drawn_with_the_learned_init_expectation(covariance):
    torch.manual_seed(0)
    anchors = GaussianAnchors(400, 8, eps=1e-6, covariance=covariance, targets="random_fixed")
    assert list(anchors.parameters()) == []
    assert set(anchors.state_dict()) == {"means", "L" if covariance == "full" else "raw_scale"}
    covariances = anchors.covariance(torch.float64)
    # E[S] = 0.05²·I + εI (full: a scaled Wishart draw; diagonal: its diagonal's χ²_k/k law); means N(0, 0.1²)
    np.testing.assert_allclose(covariances.mean(0).numpy(), (0.05**2 + 1e-6) * np.eye(8), atol=2e-4)
    np.testing.assert_allclose(anchors.variance().double().var().item(), 0.05**4 * 2 / 8, rtol=0.15)
    np.testing.assert_allclose(anchors.means.std().item(), 0.1, rtol=0.05)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_random_fixed_anchors_follow_the_seed(covariance):
    config = Config(anchor_targets="random_fixed", anchor_covariance=covariance, latent_dim=8, head_hidden=0)
    dataset = build_dataset(config)

    def anchors(seed: int) -> dict[str, torch.Tensor]:
        seed_everything(seed, False)
        return build_model(config, dataset).anchors.state_dict()

    first, again, other = anchors(0), anchors(0), anchors(1)
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
        assert not torch.equal(first[name], other[name])


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_random_fixed_anchors_stay_put_while_the_encoders_train(tmp_path, covariance):
    config = small_config(tmp_path, epochs=1, anchor_targets="random_fixed", anchor_covariance=covariance,
                          lambda_fit=0.1, lambda_sep=0.1)
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.start()
    try:
        trainer.fit()
    finally:
        trainer.close()
    after = trainer.model.state_dict()
    anchors = [k for k in before if k.startswith("anchors.")]
    assert anchors and all(torch.equal(before[k], after[k]) for k in anchors)
    assert all(not k.startswith("anchors.") for k, _ in trainer.model.named_parameters())
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoders.", "head.")))


def test_anchor_targets_has_no_effect_without_anchor_losses():
    warnings = Config(anchor_targets="random_fixed", lambda_fit=0.0, lambda_sep=0.0).inactive_key_warnings()
    assert any("'anchor_targets'" in w and "no anchor loss" in w for w in warnings)
    assert not any("'anchor_targets'" in w for w in Config(anchor_targets="random_fixed").inactive_key_warnings())
    warnings = Config(anchor_targets="random_fixed", sep_method="w2_margin", lambda_sep=0.1).inactive_key_warnings()
    assert any("'lambda_sep'" in w and "holds fixed" in w for w in warnings)


# --- whole runs ---

# Each CLI run costs ~10 s of start-up, so random fixed anchors ride along with latent_l2 and with coral's resume.
@pytest.mark.parametrize("keys", [dict(algorithm="coral", coral_lambda=1.0),
                                  dict(algorithm="mmd", lambda_fit=0.1, lambda_sep=0.1),
                                  dict(algorithm="latent_l2", anchor_targets="random_fixed", lambda_fit=0.1,
                                       lambda_sep=0.1)],
                         ids=["coral", "mmd+anchors", "latent_l2+random_fixed"])
def test_one_epoch_cli_run(tmp_path, keys):
    summary = cli_one_epoch(tmp_path, **keys)
    assert summary["algorithm"] == keys["algorithm"]
    assert np.isfinite(summary["test"]["worst_group_acc"]) and summary["config_warnings"] == []


def test_exact_resume_of_coral_with_random_fixed_anchors(tmp_path):
    assert_exact_resume(tmp_path, epochs=2, algorithm="coral", coral_lambda=1.0, anchor_targets="random_fixed",
                        lambda_fit=0.1, lambda_sep=0.1)
