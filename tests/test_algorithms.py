"""The algorithm registry and its wiring: seed switch ≡ algorithm key, keys owned by algorithms, results
unchanged by the move of GroupDRO into tdro/algorithms, and a Trainer built from parts handed to it."""
import pytest
import torch

from tdro.algorithms import ALGORITHMS, Algorithm, Grouper
from tdro.config import Config, ConfigError, merge_changes
from tdro.data import build_dataset
from tdro.runs import read_jsonl
from tdro.training.trainer import Trainer, build_parts, train

SMALL = dict(progress=False, epochs=3, batch_size=64, latent_dim=16, head_hidden=0, latent_samples_per_group=0,
             log_interval=4)

# Recorded with the trainer before algorithms were plugins (commit edaa15c, same seed and keys): the move must not
# change a number.
BEFORE = {
    "groupdro_anchors_before_loss": {
        "keys": dict(groupdro_enabled=True, groupdro_eta=0.05, groupdro_warmup_epochs=1,
                     groupdro_update_timing="before_loss", lambda_fit=0.1, lambda_sep=0.1),
        "q": {"image": 0.49563172459602356, "coarse": 0.504368245601654},
        "train_loss": [2.770509719848633, 2.5479965209960938, 2.4463155269622803],
        "val_wga": [0.17272727272727273, 0.24545454545454545, 0.34545454545454546],
        "test_wga": 0.3407821229050279, "test_loss": 2.1463470884020284},
    "groupdro_cells": {
        "keys": dict(groupdro_enabled=True, groupdro_cells="group_class", groupdro_update_mode="exp",
                     groupdro_eta=0.1, groupdro_warmup_epochs=0),
        "q": None,
        "train_loss": [2.314141035079956, 2.218613386154175, 2.1100778579711914],
        "val_wga": [0.11818181818181818, 0.20909090909090908, 0.41818181818181815],
        "test_wga": 0.4022346368715084, "test_loss": 1.9960055975528812},
    "erm": {
        "keys": {}, "q": None,
        "train_loss": [2.1802117824554443, 2.0348944664001465, 1.9083102941513062],
        "val_wga": [0.16363636363636364, 0.2636363636363636, 0.34545454545454546],
        "test_wga": 0.36312849162011174, "test_loss": 2.2386095477345926},
}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_groupdro_and_erm_give_the_numbers_of_the_trainer_before_plugins(tmp_path, name):
    expected = BEFORE[name]
    result = train(Config(output_dir=str(tmp_path), run_name=name, **SMALL, **expected["keys"]))
    history = read_jsonl(result.run_dir / "history.jsonl")
    assert [e["train"]["loss"] for e in history] == pytest.approx(expected["train_loss"], rel=1e-5)
    assert [e["val"]["worst_group_acc"] for e in history] == expected["val_wga"]
    assert result.summary["test"]["worst_group_acc"] == expected["test_wga"]
    assert result.summary["test"]["loss"] == pytest.approx(expected["test_loss"], rel=1e-5)
    if expected["q"] is not None:
        assert history[-1]["q"] == pytest.approx(expected["q"], rel=1e-5)
    assert result.summary["algorithm"] == ("erm" if name == "erm" else "groupdro")


def test_the_seed_switch_means_algorithm_groupdro_and_a_disagreement_is_an_error():
    assert Config(groupdro_enabled=True) == Config(algorithm="groupdro")
    assert Config(groupdro_enabled=True).result_hash() == Config(algorithm="groupdro").result_hash()
    assert Config(groupdro_enabled=False).algorithm == "erm" and Config().algorithm == "erm"
    assert Config(algorithm="groupdro").groupdro_enabled is True
    with pytest.raises(ConfigError, match="groupdro_enabled is true but algorithm is 'erm'"):
        Config(groupdro_enabled=True, algorithm="erm")
    with pytest.raises(ConfigError, match="groupdro_enabled is false but algorithm is 'groupdro'"):
        Config(groupdro_enabled=False, algorithm="groupdro")
    with pytest.raises(ConfigError, match="did you mean 'groupdro'"):
        Config(algorithm="grupdro")
    # a saved resolved config loads back, and switching the algorithm of a resolved config lets the switch follow
    groupdro = Config(groupdro_enabled=True)
    assert Config.from_dict(groupdro.to_dict()) == groupdro
    assert groupdro.replace(algorithm="erm").groupdro_enabled is False
    assert Config().replace(groupdro_enabled=True).algorithm == "groupdro"


def test_every_registered_algorithm_key_is_a_config_key_and_the_seed_keys_only_warn():
    for name in ALGORITHMS.names():
        algorithm = ALGORITHMS.get(name)
        assert issubclass(algorithm, Algorithm)
        assert set(algorithm.key_names()) <= set(Config.keys()), name
    warnings = Config(groupdro_eta=0.1).inactive_key_warnings()
    assert len(warnings) == 1 and warnings[0].startswith("key 'groupdro_eta' is set to 0.1 but has no effect: only "
                                                         "algorithm 'groupdro'")
    assert warnings[0].endswith("reads it (algorithm is 'erm')")
    with pytest.raises(ConfigError, match="unknown key 'groupdro_etta' .*did you mean 'groupdro_eta'"):
        Config.from_dict({"groupdro_etta": 0.1})


def test_grouper_numbers_units_and_samples_once_for_groups_and_cells():
    dataset = build_dataset(Config())
    sizes = [len(group.train.y) for group in dataset.groups.values()]
    by_group = Grouper(dataset, "group")
    assert by_group.names == ["image", "coarse"] and by_group.train_counts.tolist() == sizes
    cells = Grouper(dataset, "group_class")
    assert cells.names[:2] == ["image/0", "image/1"] and cells.num_units == 20
    assert cells.train_counts.sum().item() == sum(sizes)
    group_ids, labels = torch.tensor([0, 1, 1]), torch.tensor([3, 0, 9])
    assert cells.unit_ids(group_ids, labels).tolist() == [3, 10, 19]
    assert by_group.unit_ids(group_ids, labels).tolist() == [0, 1, 1]
    assert by_group.sample_ids(group_ids, torch.tensor([5, 0, 7])).tolist() == [5, sizes[0], sizes[0] + 7]


def test_a_trainer_trains_the_parts_it_is_handed(tmp_path):
    config = Config(output_dir=str(tmp_path), run_name="handed", **{**SMALL, "epochs": 1})
    dataset = build_dataset(config)
    kept = {name: group for name, group in dataset.groups.items() if name == "image"}
    dataset.groups = kept
    parts = build_parts(config, torch.device("cpu"), dataset=dataset)
    assert list(parts.model.encoders) == ["image"]
    trainer = Trainer(config, parts=parts)
    trainer.start()
    try:
        summary = trainer.fit().summary
    finally:
        trainer.close()
    assert summary["groups"] == ["image"]


def test_layers_that_set_one_name_of_the_algorithm_let_the_other_follow():
    resolved = Config().to_dict()  # algorithm: erm, groupdro_enabled: false
    assert Config.from_dict(merge_changes(resolved, {"groupdro_enabled": True})).algorithm == "groupdro"
    assert Config.from_dict(merge_changes({"groupdro_enabled": True}, {"algorithm": "jtt"})).algorithm == "jtt"
    assert merge_changes({"lr": 1.0}, {"lr": 2.0}, {"epochs": 3}) == {"lr": 2.0, "epochs": 3}
    with pytest.raises(ConfigError, match="groupdro_enabled is true but algorithm is 'jtt'"):
        Config.from_dict(merge_changes(resolved, {"groupdro_enabled": True, "algorithm": "jtt"}))
