"""Config: seed defaults, validation messages, YAML round trip, the seed's recommended blocks."""
import re
from pathlib import Path

import pytest
import yaml

from tdro.config import Config, ConfigError, parse_assignments

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "hyperparameter-optimization-analysis.md"
PARAMS = Path(__file__).resolve().parents[1] / "params"


def seed_recommended_blocks() -> list[dict]:
    text = SEED.read_text()
    section = text.split("Recommended Configuration", 1)[1].split("Implementation Priority", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the seed has a baseline and a GroupDRO block"
    return [yaml.safe_load(block) for block in blocks]


def test_defaults_are_the_seed_current_settings():
    c = Config()
    assert (c.optimizer, c.lr, c.weight_decay, c.batch_size, c.latent_dim, c.head_hidden, c.epochs) == (
        "adam", 1e-3, 1e-4, 32, 64, 128, 10)
    assert (c.lr_scheduler, c.grad_clip, c.groupdro_eta, c.groupdro_gamma, c.groupdro_warmup_epochs) == (
        "none", 1.0, 0.01, 0.9, 2)
    assert (c.lambda_fit, c.lambda_sep, c.anchor_eps, c.sep_samples_per_class, c.sep_method) == (
        1e-3, 1e-3, 1e-4, 16, "classifier")
    assert c.dataset == "digits"


def test_seed_recommended_blocks_load_unchanged_and_mean_what_the_seed_says():
    baseline, groupdro = seed_recommended_blocks()
    base = Config.from_dict({"dataset": "textcaps", **baseline})
    assert base.lr_scheduler == "linear" and (base.lr_start, base.lr_end) == (1e-3, 1e-5)
    assert (base.lr_backbone, base.lr_new, base.latent_dim, base.head_hidden) == (1e-4, 1e-3, 128, 256)
    assert [g["encoder"] for g in base.groups] == ["resnet_visual", "char_cnn_text"]
    assert not base.groupdro_enabled
    robust = Config.from_dict({"dataset": "textcaps", **baseline, **groupdro})
    assert robust.groupdro_enabled and robust.groupdro_warmup_epochs == 5
    assert robust.groupdro_update_mode == "exp_smooth" and robust.groupdro_gamma == 0.9


def test_params_files_hold_the_seed_blocks():
    baseline, groupdro = seed_recommended_blocks()
    loaded = Config.load([PARAMS / "seed_baseline.yaml", PARAMS / "seed_groupdro.yaml"])
    assert loaded == Config.from_dict({"dataset": "textcaps", **baseline, **groupdro})


@pytest.mark.parametrize("values, expected", [
    ({"lr_step_sz": 5}, "did you mean 'lr_step_size'"),
    ({"optimizer": "adm"}, "allowed: adam, adamw, sgd"),
    ({"lr": -1.0}, "key 'lr' has value -1.0"),
    ({"groupdro_gamma": 1.5}, "key 'groupdro_gamma'"),
    ({"latent_dim": "big"}, "expected int"),
    ({"lr_scheduler": "step", "lr_start": 1e-3, "lr_end": 1e-5}, "conflicts with lr_start/lr_end"),
    ({"lr_start": 1e-3}, "lr_start and lr_end must be set together"),
    ({"monitor": "test_worst_group_acc"}, "allow_test_selection"),
    ({"groups": ["cnn"]}, "groups[0] must be a mapping"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(values, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Config.from_dict(values)


def test_yaml_round_trip_is_equal(tmp_path):
    config = Config(lr_scheduler="StepLR", lr_step_size=3, groups=[{"name": "image", "encoder": "cnn"}])
    assert config.lr_scheduler == "step"
    config.save(tmp_path / "config.yaml")
    assert Config.load([tmp_path / "config.yaml"]) == config


def test_overrides_are_coerced_and_files_merge_in_order(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 1.0e-2\nepochs: 3\n")
    (tmp_path / "b.yaml").write_text("epochs: 4\n")
    config = Config.load([tmp_path / "a.yaml", tmp_path / "b.yaml"],
                         parse_assignments(["lr_end=1e-5", "lr_start=1e-3", "head_hidden=0"]))
    assert (config.lr, config.epochs, config.lr_scheduler, config.lr_end, config.head_hidden) == (
        1e-2, 4, "linear", 1e-5, 0)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("latent_dm: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'latent_dm' in .*x.yaml; did you mean 'latent_dim'"):
        Config.load([path])


def test_result_hash_ignores_run_name_but_not_results():
    assert Config(run_name="a").result_hash() == Config(run_name="b").result_hash()
    assert Config(lr=2e-3).result_hash() != Config().result_hash()
