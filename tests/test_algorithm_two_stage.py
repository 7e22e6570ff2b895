"""The two-stage baselines: JTT's up-weighted loss and error set, DFR's balanced validation split and frozen
features, stage runs reused, CLI runs, exact resume, and the inputs they refuse."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from algorithm_runs import assert_exact_resume, cli_one_epoch, small_config
from tdro.algorithms import Grouper
from tdro.algorithms.base import BatchLosses
from tdro.algorithms.dfr import DFR
from tdro.algorithms.jtt import JTT, upweighted_mean
from tdro.config import Config, ConfigError
from tdro.data import build_dataset
from tdro.data.base import Group, GroupedDataset, Split
from tdro.models.multigroup import build_model
from tdro.training import trainer as trainer_module
from tdro.training.checkpoint import load_checkpoint
from tdro.training.trainer import build_parts, train

CPU = torch.device("cpu")
DFR_KEYS = dict(algorithm="dfr", lambda_fit=0.0, lambda_sep=0.0)
JTT_KEYS = dict(algorithm="jtt", jtt_epochs=1, jtt_upweight=5.0)
# BatchNorm in the coarse encoder: its running statistics must not move while DFR retrains the head
DFR_BN_KEYS = dict(groups=[{"name": "coarse", "norm": "batch"}], **DFR_KEYS)


def resumed_run(tmp_path: Path, keys: dict) -> tuple[Config, dict]:
    """The uninterrupted run of ``assert_exact_resume`` (2 epochs; its stopped twin resumed to the same records)."""
    summary = assert_exact_resume(tmp_path, epochs=2, **keys)
    return small_config(tmp_path, run_name="straight", epochs=2, **keys), summary


@pytest.fixture(scope="module")
def jtt_run(tmp_path_factory):
    return resumed_run(tmp_path_factory.mktemp("jtt"), JTT_KEYS)


@pytest.fixture(scope="module")
def dfr_run(tmp_path_factory):
    return resumed_run(tmp_path_factory.mktemp("dfr"), DFR_BN_KEYS)


def test_exact_resume(jtt_run, dfr_run):
    """The fixtures are ``assert_exact_resume`` runs: stopped after epoch 1 and resumed == uninterrupted."""
    assert jtt_run[1]["algorithm"] == "jtt" and dfr_run[1]["algorithm"] == "dfr"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_upweighted_mean_matches_a_hand_computation(dtype):
    losses = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=dtype)
    in_error_set = torch.tensor([False, True, False, True])
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    expected = (0.5 + 5 * 2.0 + 1.0 + 5 * 3.0) / (1 + 5 + 1 + 5)
    assert upweighted_mean(losses, in_error_set, 5.0).item() == pytest.approx(expected, rel=rel)
    assert upweighted_mean(losses, in_error_set, 1.0).item() == pytest.approx(6.5 / 4, rel=rel)  # λ = 1: ERM
    everything = torch.ones(4, dtype=torch.bool)  # every sample in the error set, or none: the plain mean again
    assert upweighted_mean(losses, everything, 100.0).item() == pytest.approx(6.5 / 4, rel=rel)
    assert upweighted_mean(losses, ~everything, 100.0).item() == pytest.approx(6.5 / 4, rel=rel)


def test_jtt_error_set_is_what_the_stage_model_gets_wrong_and_the_stage_is_reused(jtt_run, monkeypatch):
    config, summary = jtt_run
    stage_dir = Path(config.output_dir) / summary["algorithm_records"]["stage_run"]
    assert [p.name for p in (Path(config.output_dir) / "stages").iterdir()] == [stage_dir.name]
    stage_config = Config.load([stage_dir / "config.yaml"])
    assert (stage_config.algorithm, stage_config.epochs, stage_config.early_stopping_patience) == ("erm", 1, 0)
    dataset = build_dataset(config)
    model = build_model(stage_config, dataset)
    model.load_state_dict(load_checkpoint(stage_dir / "checkpoints" / "last.pt")["model"])
    model.eval()
    with torch.no_grad():
        wrong = torch.cat([model({name: group.train.x})[1][name].argmax(1) != group.train.y
                           for name, group in dataset.groups.items()])
    sizes = [len(group.train.y) for group in dataset.groups.values()]
    records = summary["algorithm_records"]
    assert records["error_set_size"] == {name: int(part.sum()) for name, part in zip(dataset.groups, wrong.split(sizes))}
    assert records["error_set_total"] == int(wrong.sum()) > 0 and records["jtt_upweight"] == 5.0

    def refuse(*args, **kwargs):
        raise AssertionError("the stage run was trained again")

    monkeypatch.setattr(trainer_module, "train", refuse)
    monkeypatch.setattr(trainer_module, "resume", refuse)
    stamp = (stage_dir / "summary.json").stat().st_mtime_ns
    algorithm = build_parts(config, CPU).algorithm
    assert (stage_dir / "summary.json").stat().st_mtime_ns == stamp
    assert torch.equal(algorithm.error_set, wrong)
    # the loss weighs each sample by its id's membership, by hand in float64
    ids = torch.tensor([int(wrong.nonzero()[0]), int((~wrong).nonzero()[0]), int(wrong.nonzero()[-1])])
    losses = torch.tensor([1.5, 0.25, 4.0], dtype=torch.float64)
    batch = BatchLosses(losses, torch.zeros(3, 10), torch.zeros(3, 8), torch.zeros(3, dtype=torch.long),
                        torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), ids, 0)
    assert algorithm.loss(batch).item() == pytest.approx((5 * 1.5 + 0.25 + 5 * 4.0) / 11, rel=1e-12)


def tiny_dataset() -> GroupedDataset:
    """Two groups, two classes; val cells of 5, 10 (group a) and 4, 8 (group b) samples with distinct source ids."""
    def split(counts: list[int], first_id: int) -> Split:
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        return Split(torch.randn(len(y), 3), y, torch.arange(first_id, first_id + len(y)))

    groups = {name: Group(name, "tabular", "mlp_tabular", {"input_dim": 3}, {}, split([6, 6], 1000 * i),
                          split(val, 1000 * i + 100), split([2, 2], 1000 * i + 500))
              for i, (name, val) in enumerate({"a": [5, 10], "b": [4, 8]}.items())}
    return GroupedDataset("tiny", groups, ["0", "1"])


@pytest.mark.parametrize("cells, frac, retrain, select", [
    ("group_class", 0.4, {"a/0": 2, "a/1": 2, "b/0": 2, "b/1": 2}, {"a/0": 3, "a/1": 6, "b/0": 2, "b/1": 5}),
    ("group_class", 0.99, {"a/0": 3, "a/1": 3, "b/0": 3, "b/1": 3}, {"a/0": 1, "a/1": 1, "b/0": 1, "b/1": 1}),
    ("group", 0.4, {"a": 5, "b": 5}, {"a": 9, "b": 7}),
])
def test_dfr_split_is_balanced_disjoint_and_seeded(tmp_path, cells, frac, retrain, select):
    dataset = tiny_dataset()
    config = Config(output_dir=str(tmp_path), groupdro_cells=cells, dfr_retrain_frac=frac, **DFR_KEYS)
    dfr = DFR(config, Grouper(dataset, cells))
    parts = dfr.split_validation(dataset)
    assert {u: c["retrain"] for u, c in dfr.unit_counts.items()} == retrain
    assert {u: c["select"] for u, c in dfr.unit_counts.items()} == select
    for name, (train_positions, select_positions) in parts.items():
        y = dataset.groups[name].val.y
        for positions, wanted in ((train_positions, retrain), (select_positions, select)):
            counts = torch.bincount(y[positions], minlength=2).tolist() if cells == "group_class" else [len(positions)]
            assert counts == [n for unit, n in wanted.items() if unit.startswith(name)]
        assert not set(train_positions.tolist()) & set(select_positions.tolist())
        assert set(train_positions.tolist()) | set(select_positions.tolist()) <= set(range(len(y)))
    again = DFR(config, Grouper(dataset, cells)).split_validation(dataset)
    assert all(torch.equal(a, b) for name in parts for a, b in zip(parts[name], again[name]))
    other = DFR(config.replace(data_split_seed=1), Grouper(dataset, cells)).split_validation(dataset)
    assert any(not torch.equal(a, b) for name in parts for a, b in zip(parts[name], other[name]))


def test_dfr_retrains_only_the_head_on_the_balanced_validation_part(dfr_run):
    config, summary = dfr_run
    records = summary["algorithm_records"]
    stage_dir = Path(config.output_dir) / records["stage_run"]
    assert records["stage_checkpoint"] == "best.pt"
    stage = load_checkpoint(stage_dir / "checkpoints" / "best.pt")["model"]
    ours = load_checkpoint(Path(config.output_dir) / "straight" / "checkpoints" / "last.pt")["model"]
    encoders = [k for k in stage if k.startswith("encoders.")]
    assert any("running_mean" in k for k in encoders)
    assert all(torch.equal(stage[k], ours[k]) for k in encoders)
    assert not torch.equal(stage["head.weight"], ours["head.weight"])
    dataset = build_dataset(config)
    for name, ids in records["source_ids"].items():
        val_ids = set(dataset.groups[name].val.index.tolist())
        assert set(ids["retrain"]) <= val_ids and set(ids["select"]) <= val_ids
        assert not set(ids["retrain"]) & set(ids["select"])
        assert summary["group_sizes"][name] == {"train": len(ids["retrain"]), "val": len(ids["select"]),
                                               "test": len(dataset.groups[name].test.y)}
    assert len({len(ids["retrain"]) for ids in records["source_ids"].values()}) == 1  # balanced over the groups


@pytest.mark.parametrize("keys", [dict(algorithm="jtt", jtt_epochs=1), DFR_KEYS])
def test_one_epoch_cli_run(tmp_path, keys):
    summary = cli_one_epoch(tmp_path, **keys)
    assert summary["algorithm"] == keys["algorithm"] and summary["algorithm_records"]["stage_run"].startswith("stages/")


def test_dfr_refuses_a_cell_without_two_validation_samples_before_writing(tmp_path):
    config = small_config(tmp_path, val_frac=0.02, groupdro_cells="group_class", **DFR_KEYS)
    with pytest.raises(ConfigError, match=r"'coarse/0' \(1\).*raise val_frac, or use groupdro_cells: group"):
        train(config)
    assert not Path(config.output_dir).exists()


def test_stage_configs():
    jtt = JTT.stages(Config(algorithm="jtt", jtt_epochs=3, jtt_upweight=50.0, groupdro_cells="group_class"))["identify"]
    assert (jtt.algorithm, jtt.epochs, jtt.early_stopping_patience, jtt.jtt_upweight) == ("erm", 3, 0, 20.0)
    assert jtt.groupdro_cells == "group" and jtt.run_name is None
    features = DFR.stages(Config(epochs=5, **DFR_KEYS))["features"]
    assert (features.algorithm, features.epochs) == ("erm", 5)
    features = DFR.stages(Config(epochs=5, dfr_stage_epochs=3, dfr_retrain_frac=0.3, **DFR_KEYS))["features"]
    assert (features.epochs, features.dfr_stage_epochs, features.dfr_retrain_frac) == (3, None, 0.5)


def test_config_errors():
    with pytest.raises(ConfigError, match="retrains only the head.*set lambda_fit: 0 and lambda_sep: 0"):
        Config(algorithm="dfr")
    with pytest.raises(ConfigError, match="freeze_backbone_epochs"):
        Config(freeze_backbone_epochs=1, **DFR_KEYS)
    with pytest.raises(ConfigError, match="does not read key.*'jtt_upweight' \\(read by jtt\\)"):
        Config(algorithm="erm", jtt_upweight=5.0)
    with pytest.raises(ConfigError, match="'lr_warmup_epochs' has value 3 but jtt_epochs is 2"):
        Config(algorithm="jtt", jtt_epochs=2, lr_warmup_epochs=3)
    with pytest.raises(ConfigError, match="'lr_step_size' has value 15 but jtt_epochs is 2"):
        Config(algorithm="jtt", jtt_epochs=2, lr_scheduler="step")
    with pytest.raises(ConfigError, match="jtt_upweight"):
        Config(algorithm="jtt", jtt_upweight=0.5)
    with pytest.raises(ConfigError, match="dfr_retrain_frac"):
        Config(dfr_retrain_frac=1.0, **DFR_KEYS)
