"""Regret-DRO (GroupDRO on ℓ_g − R*_g) against a float64 hand computation; R* given or from stage runs; only_groups."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from algorithm_runs import SMALL, assert_exact_resume, cli_one_epoch, small_config
from tdro.algorithms import BatchLosses, Grouper
from tdro.algorithms.regret_dro import RegretDRO
from tdro.config import Config, ConfigError
from tdro.data import DataError, build_dataset
from tdro.data.base import Group, GroupedDataset, Split
from tdro.models.multigroup import build_model
from tdro.training.trainer import build_parts, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "uci_heart_disease").is_dir(), reason=f"{SHARED} is absent")


def split(n: int) -> Split:
    return Split(torch.zeros(n, 2), torch.arange(n) % 2)


def fake_dataset(val_sizes=(2, 2, 2)) -> GroupedDataset:
    groups = {name: Group(name, "tabular", "mlp_tabular", {"input_dim": 2}, {}, split(4), split(n), split(2))
              for name, n in zip("abc", val_sizes)}
    return GroupedDataset("fake", groups, ["0", "1"])


def batch(losses: list[list[float]], dtype: torch.dtype) -> BatchLosses:
    """A batch whose unit g holds the per-sample losses ``losses[g]`` (an empty list = absent)."""
    per_sample = torch.tensor([x for unit in losses for x in unit], dtype=dtype, requires_grad=True)
    units = torch.tensor([g for g, unit in enumerate(losses) for _ in unit])
    n = len(units)
    return BatchLosses(per_sample, torch.zeros(n, 2), torch.zeros(n, 8), torch.zeros(n, dtype=torch.long), units,
                       units, torch.arange(n), epoch=0)


def hand_step(q, losses, optimal, eta, clamp):
    """The loss Σ_present q_g e_g / Σ_present q_g, its gradient per sample, and the exp update of q on e, in float64."""
    present = np.array([len(unit) > 0 for unit in losses])
    means = np.array([np.mean(unit) if unit else 0.0 for unit in losses])
    excess = means - np.asarray(optimal)
    if clamp:
        excess = np.maximum(excess, 0.0)
    weights = np.where(present, q, 0.0) / q[present].sum()
    loss = float((weights * excess).sum())
    slope = weights / np.maximum([len(unit) for unit in losses], 1) * (excess > 0 if clamp else 1.0)
    gradient = np.concatenate([np.full(len(unit), slope[g]) for g, unit in enumerate(losses)])
    moved = q[present] * np.exp(eta * excess[present])
    new_q = q.copy()
    new_q[present] = q[present].sum() * moved / moved.sum()
    return loss, gradient, new_q


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clamp", [False, True])
def test_excess_loss_groupdro_matches_a_hand_computation(clamp, dtype):
    optimal, eta = [0.5, 0.6, 0.3], 2.0
    config = Config(algorithm="regret_dro", optimal_losses=optimal, regret_clamp=clamp, groupdro_eta=eta,
                    groupdro_update_mode="exp", groupdro_warmup_epochs=0)
    algorithm = RegretDRO(config, Grouper(fake_dataset()))
    # step 1: c absent, b below its R* (negative excess); step 2: c exactly at its R* (a tie at the clamp)
    steps = [[[0.9, 1.3], [0.2], []], [[2.0], [0.1, 0.3], [0.3]]]
    q = np.full(3, 1 / 3)
    tolerance = 1e-6 if dtype == torch.float64 else 1e-5
    for i, losses in enumerate(steps):
        expected_loss, expected_gradient, q = hand_step(q, losses, optimal, eta, clamp)
        b = batch(losses, dtype)
        loss = algorithm.loss(b)
        assert loss.dtype == dtype
        np.testing.assert_allclose(loss.item(), expected_loss, rtol=tolerance)
        if i == 0:
            loss.backward()
            np.testing.assert_allclose(b.per_sample.grad.double().numpy(), expected_gradient, rtol=tolerance)
        algorithm.after_step(b)
        np.testing.assert_allclose(list(algorithm.weights().values()), q, rtol=tolerance)
    assert list(algorithm.weights()) == ["a", "b", "c"]


def test_given_optimal_losses_in_a_cli_run_train_no_stage_runs(tmp_path):
    summary = cli_one_epoch(tmp_path, algorithm="regret_dro", optimal_losses=[0.5, 2])
    assert summary["algorithm"] == "regret_dro"
    assert summary["algorithm_records"] == {"optimal_losses": {"image": {"loss": 0.5, "from": "given"},
                                                               "coarse": {"loss": 2.0, "from": "given"}},
                                            "regret_clamp": False}
    assert not (tmp_path / "cli" / "stages").exists()


def test_cli_run_takes_r_star_from_stage_runs_and_a_second_build_reuses_them(tmp_path):
    summary = cli_one_epoch(tmp_path, algorithm="regret_dro", regret_clamp=True)
    records = summary["algorithm_records"]["optimal_losses"]
    stages = tmp_path / "cli" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == sorted(Path(r["from"]).name for r in records.values())
    for group, record in records.items():
        stage = json.loads((tmp_path / "cli" / record["from"] / "summary.json").read_text())
        assert stage["algorithm"] == "erm" and stage["groups"] == [group] and stage["epochs_run"] == 1
        assert record["loss"] == stage["val"]["group_loss"][group]
    files = {p: p.stat().st_mtime_ns for p in stages.rglob("*") if p.is_file()}
    config = Config(output_dir=str(tmp_path / "cli"), epochs=1, **SMALL, algorithm="regret_dro", groupdro_eta=0.5)
    parts = build_parts(config, torch.device("cpu"))
    assert {p: p.stat().st_mtime_ns for p in stages.rglob("*") if p.is_file()} == files  # nothing trained again
    assert {g: r["loss"] for g, r in parts.algorithm.summary()["optimal_losses"].items()} == {
        g: r["loss"] for g, r in records.items()}


def test_stage_configs_train_one_group_with_its_own_encoder_and_no_algorithm_keys():
    config = Config(algorithm="regret_dro", groupdro_eta=0.5, groups=[{"encoder": "cnn", "pool_size": 3}, {}])
    stages = RegretDRO.stages(config)
    assert list(stages) == ["image", "coarse"]
    assert stages["image"].groups == [{"name": "image", "encoder": "cnn", "pool_size": 3}]
    for name, stage in stages.items():
        assert stage.algorithm == "erm" and stage.only_groups == [name] and stage.groupdro_eta == 0.01
        assert build_model(stage, build_dataset(stage)).group_names == [name]
    assert RegretDRO.stages(config.replace(optimal_losses=[1, 1])) == {}


def test_exact_resume_with_r_star_from_stage_runs(tmp_path):
    summary = assert_exact_resume(tmp_path, algorithm="regret_dro", groupdro_warmup_epochs=0, groupdro_eta=1.0)
    assert abs(summary["final_q"]["image"] - 0.5) > 1e-4  # q moved, so its state was resumed
    assert all(r["from"].startswith("stages/") for r in summary["algorithm_records"]["optimal_losses"].values())
    assert len(list((tmp_path / "runs" / "stages").iterdir())) == 2  # shared by the three runs


def test_bad_optimal_losses_are_config_errors_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"'optimal_losses' has 3 value\(s\) but groupdro_cells 'group' gives "
                                          r"2 units: image, coarse"):
        train(small_config(tmp_path, algorithm="regret_dro", optimal_losses=[0.1, 0.2, 0.3]))
    with pytest.raises(ConfigError, match=r"has 2 value\(s\) but groupdro_cells 'group_class' gives 20 units: "
                                          r"image/0, image/1"):
        train(small_config(tmp_path, algorithm="regret_dro", groupdro_cells="group_class", optimal_losses=[1, 1]))
    assert not (tmp_path / "runs").exists()
    for bad in (float("nan"), float("inf"), -0.1, "1.0", True):
        with pytest.raises(ConfigError, match="key 'optimal_losses' has value .*allowed: finite numbers >= 0"):
            Config(algorithm="regret_dro", optimal_losses=[0.1, bad])
    with pytest.raises(ConfigError, match="stage runs give one loss per group, not per .* cell"):
        Config(algorithm="regret_dro", groupdro_cells="group_class")
    dataset = fake_dataset(val_sizes=(2, 0, 2))
    with pytest.raises(ConfigError, match="group\\(s\\) b have no validation samples"):
        RegretDRO(Config(algorithm="regret_dro"), Grouper(dataset)).check_dataset(dataset)


def same_group(a: Group, b: Group) -> bool:
    return all(torch.equal(a.split(s).x, b.split(s).x) and torch.equal(a.split(s).y, b.split(s).y)
               for s in ("train", "val", "test"))


def test_only_groups_keeps_named_digits_groups_in_dataset_order_after_per_position_caps():
    full = build_dataset(Config(group_max_train_samples=[None, 40]))
    kept = build_dataset(Config(group_max_train_samples=[None, 40], only_groups=["coarse"]))
    assert kept.group_names == ["coarse"] and len(kept.groups["coarse"].train) == 40
    assert same_group(kept.groups["coarse"], full.groups["coarse"]) and kept.info["left_out_groups"] == ["image"]
    assert build_dataset(Config(only_groups=["coarse", "image"])).group_names == ["image", "coarse"]
    assert build_model(Config(latent_dim=8), kept).group_names == ["coarse"]


@pytest.mark.parametrize("names, message", [
    (["imgae"], r"only_groups: unknown group 'imgae'; allowed: image, coarse \(did you mean 'image'\?\)"),
    ([0], r"unknown group 0; allowed: image, coarse"), ([], r"only_groups is an empty list.*\(image, coarse\)"),
    (["image", "image"], r"names group 'image' 2 times")])
def test_only_groups_refuses_bad_names(names, message):
    with pytest.raises(DataError, match=message):
        build_dataset(Config(only_groups=names))


@needs_shared
def test_only_groups_on_heart_and_mnist_usps():
    heart = {"dataset": "heart", "data_root": str(SHARED), "group_max_train_samples": [None, None, 20, 25]}
    full = build_dataset(Config(**heart))
    kept = build_dataset(Config(**heart, only_groups=["va", "switzerland"]))
    assert kept.group_names == ["switzerland", "va"] and kept.sizes()["va"] == 25
    assert all(same_group(kept.groups[n], full.groups[n]) for n in kept.groups)
    model = build_model(Config(dataset="heart", latent_dim=8), kept)
    assert model.group_names == ["switzerland", "va"] and model.encoders["va"].net[0].in_features == 9
    with pytest.raises(DataError, match="allowed: cleveland, hungarian, switzerland, va"):
        build_dataset(Config(**heart, only_groups=["basel"]))
    mnist_usps = {"dataset": "mnist_usps", "data_root": str(SHARED), "mnist_size": 300, "usps_size": 100}
    usps = build_dataset(Config(**mnist_usps, only_groups=["usps"]))
    assert usps.group_names == ["usps"]
    assert same_group(usps.groups["usps"], build_dataset(Config(**mnist_usps)).groups["usps"])
