"""Config keys and parameter files that used to pass validation and then fail or do nothing."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tdro.config
from tdro.__main__ import main
from tdro.config import DATASET_KEYS, LAYOUT_KEYS, Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"


@pytest.mark.parametrize("values, expected", [
    ({"lr_start": 0, "lr_end": 1e-5}, "key 'lr_start' has value 0.0; allowed: > 0.0"),
    ({"head_dropout": 1.0}, "key 'head_dropout' has value 1.0; allowed: >= 0.0 and < 1.0"),
    ({"val_frac": 1.0}, "key 'val_frac' has value 1.0; allowed: > 0.0 and < 1.0"),
    ({"test_frac": 1.0}, "key 'test_frac' has value 1.0; allowed: > 0.0 and < 1.0"),
    ({"seed": -1}, "key 'seed' has value -1; allowed: >= 0 and <= 4294967295"),
    ({"seed": 2**32}, "key 'seed' has value 4294967296; allowed: >= 0 and <= 4294967295"),
    ({"data_split_seed": -1}, "key 'data_split_seed' has value -1; allowed: >= 0"),
    ({"device": "foo"}, "key 'device' has value 'foo'; allowed: auto, cpu, cuda, cuda:N"),
    ({"device": "cuda:x"}, "key 'device' has value 'cuda:x'; allowed: auto, cpu, cuda, cuda:N"),
    ({"device": "cuda:"}, "key 'device' has value 'cuda:'"),
    ({"latent_dim": 1_000_000}, "key 'latent_dim' has value 1000000; allowed: >= 1 and <= 8192"),
    ({"epochs": 100_001}, "key 'epochs' has value 100001; allowed: >= 1 and <= 100000"),
    ({"mnist_majority": [0, 1, "a"]},
     "key 'mnist_majority' has value [0, 1, 'a']; allowed: a list of integers 0..9; element [2] is 'a'"),
    ({"mnist_majority": [0, True]}, "element [1] is True"),
    ({"usps_majority": [10]}, "key 'usps_majority' has value [10]; allowed: a list of integers 0..9; element [0] is 10"),
    ({"mnist28_majority": [-1]}, "key 'mnist28_majority'"),
    ({"mnist32_majority": [1.5]}, "key 'mnist32_majority' has value [1.5]"),
    ({"digits_sizes": [0, 150]}, "key 'digits_sizes' has value [0, 150]; allowed: a list of integers >= 1; element [0] is 0"),
    ({"digits_sizes": [600, "many"]}, "element [1] is 'many'"),
    ({"digits_majority": [[0, 1], "x"]}, "key 'digits_majority' has value [[0, 1], 'x']; allowed: a list of lists of integers"),
    ({"digits_majority": [[0, 1], [2, "a"]]}, "element [1][1] is 'a'"),
    ({"output_dir": ""}, "key 'output_dir' has value ''; allowed: a folder path"),
    ({"output_dir": "  "}, "key 'output_dir' has value '  '"),
    ({"epochs": 10, "freeze_backbone_epochs": 11},
     "key 'freeze_backbone_epochs' has value 11 but epochs is 10; allowed: 0..epochs"),
    ({"epochs": 3, "groupdro_enabled": True, "groupdro_warmup_epochs": 5},
     "key 'groupdro_warmup_epochs' has value 5 but epochs is 3; allowed: 0..epochs"),
    ({"epochs": 3, "lr_warmup_epochs": 4}, "key 'lr_warmup_epochs' has value 4 but epochs is 3"),
    ({"lr_scheduler": "cosine", "lr": 1e-3, "eta_min": 1e-2}, "key 'eta_min' has value 0.01 but lr is 0.001; allowed: 0..lr"),
    ({1: 2}, "key 1 (int) in config is not a key name"),
])
def test_values_that_used_to_fail_later_are_config_errors(values, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Config.from_dict(values)


@pytest.mark.parametrize("values", [
    {"device": "cuda:1"}, {"device": "mps"}, {"device": "cpu"}, {"device": "cuda"},  # syntax only: not checked here
    {"latent_dim": 8192}, {"epochs": 100_000}, {"seed": 2**32 - 1}, {"head_dropout": 0.0}, {"val_frac": 0.99},
    {"epochs": 2, "freeze_backbone_epochs": 2, "lr_warmup_epochs": 2, "groupdro_enabled": True, "groupdro_warmup_epochs": 2},
    {"epochs": 1},  # the default groupdro_warmup_epochs (2) does not matter while GroupDRO is off
    {"epochs": 1, "groupdro_enabled": True},  # nor when left at its default: the warm-up covers the run
    {"lr_start": 1e-3, "lr_end": 0.0}, {"mnist_majority": []}, {"digits_majority": [[], [9]]},
    {"run_name": "trial_0001"}, {"run_name": "a..b"}, {"run_name": "run.1"},
])
def test_edge_values_that_work_are_accepted(values):
    Config.from_dict(values)


@pytest.mark.parametrize("name", ["../../x", "..", ".", "", " ", "/tmp/x", "a/b", "a\\b", "x/", "nul\0"])
def test_run_name_must_be_one_folder_name_inside_output_dir(name):
    with pytest.raises(ConfigError, match=re.escape(f"key 'run_name' has value {name!r}; a run_name is one folder name")):
        Config(run_name=name)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BILLION_LAUGHS = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                  + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)))


@pytest.mark.parametrize("content, expected", [
    ("1: 2\n", r"key 1 \(int\) in .*x\.yaml is not a key name"),
    ("yes: 1\n", r"key True \(bool\) in .*x\.yaml is not a key name"),
    ("lr: 1.0e-3\nepochs: 3\nlr: 2.0e-3\n", r"parameter file .*x\.yaml: key 'lr' appears twice \(lines 1 and 3\); keep one"),
    ("groups:\n  - {encoder: cnn, encoder: mlp_tabular}\n", r"x\.yaml: key 'encoder' appears twice"),
    (BILLION_LAUGHS, r"parameter file .*x\.yaml: YAML alias \*a at line 2: parameter files may not use anchors and aliases"),
    ("", r"parameter file .*x\.yaml is empty"),
    ("# only a comment\n\n", r"parameter file .*x\.yaml is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"parameter file .*x\.yaml is not UTF-8 text \(byte 0x89 at offset 0\)"),
    (b"lr: 1\n\x00\x01\x02", r"parameter file .*x\.yaml is not valid YAML"),
    ("- lr\n- 1\n", r"must hold a mapping of key: value, got list"),
])
def test_bad_parameter_files_are_config_errors_naming_the_file(tmp_path, content, expected):
    path = write(tmp_path, "x.yaml", content)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=expected):
        Config.load([path])
    assert time.monotonic() - started < 5  # the alias bomb is refused, never expanded


def test_an_alias_bomb_on_the_command_line_is_refused_too():
    with pytest.raises(ConfigError, match=r"override value .*YAML alias \*a"):
        Config.load([], {"groups": "[&a [1, 1], [*a, *a]]"})


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x00binary", "1: 2\n", "", "lr: 1\nlr: 2\n", "run_name: ../../x\n",
                                     "lr_start: 0\nlr_end: 1.0e-5\n"])
def test_bad_config_stops_the_cli_before_anything_is_written(tmp_path, capsys, content):
    path = write(tmp_path, "bad.yaml", content)
    runs = tmp_path / "runs"
    assert main(["train", "-f", str(path), "-p", "output_dir", str(runs), "-p", "progress", "false"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not runs.exists()


def test_every_top_level_params_file_loads():
    for path in sorted(PARAMS.glob("*.yaml")):
        Config.load([path])
    Config.load([PARAMS / "seed_baseline.yaml", PARAMS / "seed_groupdro.yaml"])


def test_inactive_keys_are_named_with_their_value_and_why():
    config = Config(groupdro_enabled=True, groupdro_objective="max", groupdro_update_mode="exp", groupdro_gamma=0.5,
                    groupdro_init="proportional", groupdro_min_group_weight=0.1, groupdro_adjustment=1.0, groupdro_eta=0.2)
    warnings = config.inactive_key_warnings()
    for name, value in (("groupdro_update_mode", "'exp'"), ("groupdro_gamma", "0.5"), ("groupdro_init", "'proportional'"),
                        ("groupdro_min_group_weight", "0.1"), ("groupdro_adjustment", "1.0"), ("groupdro_eta", "0.2")):
        assert any(w.startswith(f"key {name!r} is set to {value} but has no effect: groupdro_objective 'max'")
                   for w in warnings), (name, warnings)
    assert len(warnings) == 6
    logsumexp = Config(groupdro_enabled=True, groupdro_objective="logsumexp", groupdro_eta=0.2, groupdro_gamma=0.5)
    assert [w.split(" is set")[0] for w in logsumexp.inactive_key_warnings()] == ["key 'groupdro_gamma'"]  # eta is its temperature


@pytest.mark.parametrize("values, inactive", [
    ({}, []),
    ({"groupdro_eta": 0.5, "groupdro_cells": "group_class"}, ["groupdro_eta", "groupdro_cells"]),  # GroupDRO off
    ({"groupdro_enabled": True, "groupdro_update_mode": "exp", "groupdro_gamma": 0.5}, ["groupdro_gamma"]),
    ({"groupdro_enabled": True, "groupdro_gamma": 0.5}, []),  # exp_smooth reads gamma
    ({"sep_margin": 3.0}, ["sep_margin"]),
    ({"sep_method": "w2_margin", "sep_samples_per_class": 4, "sep_margin": 3.0}, ["sep_samples_per_class"]),
    ({"lambda_sep": 0.0, "sep_method": "w2_margin"}, ["sep_method"]),
    ({"lambda_fit": 0.0, "per_group_fit": True}, ["per_group_fit"]),
    ({"head_hidden": 0, "head_dropout": 0.5}, ["head_dropout"]),
    ({"momentum": 0.5, "nesterov": True}, ["momentum", "nesterov"]),
    ({"optimizer": "sgd", "momentum": 0.5}, []),
    ({"lr_step_size": 3, "T_max": 4, "plateau_patience": 1}, ["lr_step_size", "T_max", "plateau_patience"]),
    ({"lr_scheduler": "cosine", "T_max": 4, "eta_min": 1e-5}, []),
    ({"lr": 3e-3, "lr_start": 1e-3, "lr_end": 1e-5}, ["lr"]),
    ({"lr": 3e-3, "lr_backbone": 1e-4, "lr_new": 1e-3}, ["lr"]),
    ({"lr": 3e-3, "lr_backbone": 1e-4, "lr_new": 1e-3, "lr_scheduler": "cosine"}, []),  # cosine divides by lr
    ({"allow_test_selection": True}, ["allow_test_selection"]),
    ({"mnist_size": 10, "n_folds": 5, "image_size": 32, "data_root": "x"}, ["mnist_size", "image_size", "n_folds", "data_root"]),
    ({"dataset": "mnist_usps", "mnist_usps_layout": "balanced", "mnist_size": 10, "majority_frac": 0.5},
     ["majority_frac", "mnist_size"]),
    ({"dataset": "heart", "fold_index": 1, "test_frac": 0.3}, ["fold_index"]),
    ({"dataset": "heart", "n_folds": 5, "fold_index": 1, "test_frac": 0.3}, ["test_frac"]),
    ({"dataset": "textcaps", "spurious_majority_frac": 0.5, "feature_cache_dir": "c", "textcaps_class_names": ["a", "b"],
      "textcaps_num_classes": 3}, ["spurious_majority_frac", "textcaps_num_classes", "feature_cache_dir"]),
])
def test_inactive_key_warnings_by_setting(values, inactive):
    warnings = Config(**values).inactive_key_warnings()
    assert sorted(re.match(r"key '(\w+)'", w).group(1) for w in warnings) == sorted(inactive), warnings


def test_dataset_specific_keys_cover_the_data_block_once():
    source = Path(tdro.config.__file__).read_text()
    block = source.split("# --- data keys ---")[1].split("# --- end data keys ---")[0]
    data_keys = set(re.findall(r"^    (\w+):", block, flags=re.M))
    owned = [k for names in DATASET_KEYS.values() for k in names]
    assert len(owned) == len(set(owned)) and set(owned) <= data_keys
    assert data_keys - set(owned) == {"dataset", "data_root", "download", "data_split_seed", "val_frac", "test_frac",
                                      "batching", "majority_frac", "group_max_train_samples",
                                      "only_groups", "num_workers", "pin_memory"}
    assert set(LAYOUT_KEYS) <= set(DATASET_KEYS["mnist_usps"])


def test_load_prints_each_inactive_key_warning_once(tmp_path, capsys):
    path = write(tmp_path, "p.yaml", "groupdro_enabled: true\ngroupdro_objective: max\ngroupdro_gamma: 0.4242\n")
    Config.load([path])
    Config.load([path])
    err = capsys.readouterr().err
    assert err.count("tdro: warning: key 'groupdro_gamma' is set to 0.4242 but has no effect") == 1
    Config(groupdro_gamma=0.4343)  # construction alone stays quiet; the trainer records inactive_key_warnings()
    assert "0.4343" not in capsys.readouterr().err


def test_eta_min_doc_says_what_the_cosine_schedule_does():
    from tdro.training.optim import base_learning_rates
    from tdro.training.schedules import EpochSchedule

    doc = {f.name: f.metadata["doc"] for f in Config.__dataclass_fields__.values()}["eta_min"]
    assert "final LR" not in doc.split(",")[0] and "eta_min / lr" in doc
    config = Config(epochs=5, lr=1e-2, lr_backbone=1e-3, lr_new=2e-2, lr_scheduler="cosine", T_max=4, eta_min=1e-4)
    final = EpochSchedule(config).factor(4)
    for base in base_learning_rates(config).values():
        assert base * final == pytest.approx(base * config.eta_min / config.lr)


def test_save_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    old = Config(lr=2e-3)
    old.save(path)
    assert Config.load([path]) == old and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]

    def interrupted(*args):
        raise OSError("disk vanished")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="disk vanished"):
        Config(lr=3e-3).save(path)
    assert Config.load([path]) == old and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


KILLED_WRITER = """
import os, signal, sys
import tdro.config
from tdro.config import Config
path, moment = sys.argv[1], sys.argv[2]
Config(lr=2e-3, digits_sizes=[400, 100]).save(path)
real = getattr(os, moment)
def kill(*args):
    if moment == "replace":
        real(*args)  # the rename happened: the new file is whole
    os.kill(os.getpid(), signal.SIGKILL)
setattr(os, moment, kill)
Config(lr=3e-3, run_name="second", groups=[{"encoder": "cnn"}] * 50).save(path)
"""


@pytest.mark.parametrize("moment, expected_lr", [("fsync", 2e-3), ("replace", 3e-3)])
def test_a_kill_during_save_leaves_the_old_or_the_new_config_whole(tmp_path, moment, expected_lr):
    path = tmp_path / "config.yaml"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), moment], cwd=ROOT, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert Config.load([path]).lr == expected_lr


def test_a_kill_at_any_moment_of_repeated_saves_leaves_a_whole_config(tmp_path):
    path = tmp_path / "config.yaml"
    code = ("import sys\nfrom tdro.config import Config\nconfigs = [Config(lr=2e-3), Config(lr=3e-3, groups=[{'encoder': 'cnn'}] * 80)]\n"
            "configs[0].save(sys.argv[1])\nprint('ready', flush=True)\ni = 0\n"
            "while True:\n    configs[i % 2].save(sys.argv[1])\n    i += 1\n")
    for delay in (0.0, 0.01, 0.03, 0.07):
        writer = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE)
        assert writer.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
        assert Config.load([path]).lr in (2e-3, 3e-3)
        assert yaml.safe_load(path.read_text())["lr"] in (2e-3, 3e-3)
