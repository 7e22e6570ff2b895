"""Every data key of the config takes effect (the reference silently ignored several)."""
import re
from pathlib import Path

import pytest
import torch

import tdro.config
from tdro.config import Config
from tdro.data import DataError, build_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")


def data_block_keys() -> list[str]:
    source = Path(tdro.config.__file__).read_text()
    block = source.split("# --- data keys ---")[1].split("# --- end data keys ---")[0]
    return re.findall(r"^    (\w+):", block, flags=re.M)


def fingerprint(dataset) -> tuple:
    parts = [dataset.name, tuple(dataset.class_names)]
    for name, group in dataset.groups.items():
        parts += [name, group.kind, group.encoder, tuple(sorted(group.input_info.items()))]
        for split in ("train", "val", "test"):
            s = group.split(split)
            x = s.x
            if isinstance(x, torch.Tensor):
                content = float(x.double().sum())
            elif hasattr(x, "paths"):
                content = (tuple(map(str, x.paths)), x.transform.image_size)
            else:
                content = len(x)
            parts += [split, len(s), int(s.y.sum()), int(s.index.sum()), content]
    return tuple(parts)


@pytest.fixture(scope="module")
def textcaps_root(tmp_path_factory):
    from test_data_textcaps import make_root

    return make_root(tmp_path_factory.mktemp("textcaps_keys"))


BASES = {
    "digits": {},
    "mnist_usps": {"dataset": "mnist_usps", "data_root": str(SHARED), "mnist_size": 1000, "usps_size": 300},
    "mnist_usps3": {"dataset": "mnist_usps", "data_root": str(SHARED), "mnist_usps_layout": "skewed3",
                    "mnist28_size": 600, "mnist32_size": 600, "usps_size": 300},
    "mnist_usps_balanced": {"dataset": "mnist_usps", "data_root": str(SHARED), "mnist_usps_layout": "balanced",
                            "mnist_total_size": 500, "usps_total_size": 500},
    "heart": {"dataset": "heart", "data_root": str(SHARED)},
    "heart_folds": {"dataset": "heart", "data_root": str(SHARED), "n_folds": 5},
    "textcaps": {"dataset": "textcaps", "image_size": 32, "textcaps_num_classes": 5},
    "textcaps_spurious": {"dataset": "textcaps", "image_size": 32, "textcaps_num_classes": 5,
                          "spurious_correlation": True},
}

CHANGES = [
    ("digits", "data_split_seed", 1), ("digits", "val_frac", 0.2), ("digits", "test_frac", 0.3),
    ("digits", "majority_frac", 0.6), ("digits", "group_max_train_samples", [100, None]),
    ("digits", "only_groups", ["coarse"]),
    ("digits", "digits_groups", ["image", "flat"]), ("digits", "digits_sizes", [300, 100]),
    ("digits", "digits_majority", [[0, 1, 2, 3, 4], [5, 6, 7, 8]]),
    ("mnist_usps", "mnist_usps_layout", "balanced"), ("mnist_usps", "usps_source", "libsvm"),
    ("mnist_usps", "mnist_size", 900), ("mnist_usps", "usps_size", 200),
    ("mnist_usps", "mnist_majority", [0, 1]), ("mnist_usps", "usps_majority", [9]),
    ("mnist_usps3", "mnist28_size", 500), ("mnist_usps3", "mnist32_size", 500),
    ("mnist_usps3", "mnist28_majority", [5]), ("mnist_usps3", "mnist32_majority", [1, 2]),
    ("mnist_usps3", "usps_majority", [0]),
    ("mnist_usps_balanced", "mnist_total_size", 300), ("mnist_usps_balanced", "usps_total_size", 300),
    ("heart", "feature_mask", "all"), ("heart", "impute_missing", False), ("heart", "n_folds", 4),
    ("heart_folds", "fold_index", 1), ("heart", "group_max_train_samples", {"va": 10}),
    ("textcaps", "textcaps_groups", ["text"]), ("textcaps", "textcaps_num_classes", 3),
    ("textcaps", "textcaps_class_names", ["Boy", "Person"]), ("textcaps", "include_combined_group", True),
    ("textcaps", "spurious_correlation", True), ("textcaps_spurious", "spurious_majority_frac", 0.3),
    ("textcaps_spurious", "spurious_group_classes", {"text": [0], "visual": [1, 2, 3, 4]}),
    ("textcaps", "image_size", 48), ("textcaps", "text_max_len", 40),
]
# keys whose effect is a file, an error or a batch, each checked by the named test
ELSEWHERE = {
    "dataset": "test_data_digits.py::test_registry_and_summary",
    "data_root": "every real-file test reads data_root",
    "download": "test_data_mnist_usps.py / test_data_heart.py offline download tests",
    "batching": "test_data_batching.py::test_balanced_mode_and_config_keys",
    "mnist_usps_pool": "test_data_mnist_usps.py::test_official_train_split_only_needs_the_train_images",
    "textcaps_source": "test_data_textcaps.py::test_huggingface_source_without_package_or_network",
    "textcaps_image_dir": "test_data_textcaps.py::test_annotations_folder_and_image_dir_key",
    "feature_cache": "test_data_textcaps.py::test_feature_cache_computed_once_and_keyed",
    "feature_cache_dir": "test_data_textcaps.py::test_feature_cache_computed_once_and_keyed",
    "feature_backbone_weights": "test_feature_backbone_weights_path_takes_effect below",
    "image_cache": "test_image_pipeline.py::test_the_image_cache_is_built_once_keyed_by_files_and_size_and_matches_decoding",
    "image_cache_size": "test_image_pipeline.py::test_the_image_cache_is_built_once_keyed_by_files_and_size_and_matches_decoding",
    "augment": "test_image_pipeline.py::test_augmentation_crops_and_flips_each_image_by_seed_and_step_and_leaves_evaluation_alone",
    "augment_min_scale": "test_image_pipeline.py::test_augmentation_crops_and_flips_each_image_by_seed_and_step_and_leaves_evaluation_alone",
    "num_workers": "test_image_pipeline.py::test_seed_baseline_fine_tuning_on_the_fixture_with_workers_resumes_exactly_after_a_sigkill",
    "pin_memory": "test_image_pipeline.py::test_num_workers_and_pin_memory_are_validated_and_plain_batches_need_no_loader",
}


def build(base: str, textcaps_root, **changes):
    values = dict(BASES[base])
    if values.get("dataset") == "textcaps":
        values["data_root"] = str(textcaps_root)
    values.update(changes)
    return build_dataset(Config(**values))


def test_every_data_key_is_covered():
    covered = {key for _, key, _ in CHANGES} | set(ELSEWHERE)
    missing = [key for key in data_block_keys() if key not in covered]
    assert not missing, f"data keys without a test that they take effect: {missing}"


@pytest.mark.parametrize("base,key,value", CHANGES, ids=[f"{b}-{k}" for b, k, _ in CHANGES])
def test_key_changes_the_dataset(base, key, value, textcaps_root):
    assert getattr(Config(**{key: value}), key) == value
    default = fingerprint(build(base, textcaps_root))
    changed = fingerprint(build(base, textcaps_root, **{key: value}))
    assert changed != default


def test_feature_backbone_weights_path_takes_effect(tmp_path, textcaps_root):
    from tdro.data.cache import build_backbone

    weights = tmp_path / "resnet18.pth"
    state = build_backbone("random").state_dict()
    state = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in state.items()}
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(state, weights)
    common = dict(feature_cache=True, feature_cache_dir=str(tmp_path / "cache"), textcaps_num_classes=2)
    random = build("textcaps", textcaps_root, feature_backbone_weights="random", **common)
    from_file = build("textcaps", textcaps_root, feature_backbone_weights=str(weights), **common)
    assert random.info["feature_cache"]["file"] != from_file.info["feature_cache"]["file"]
    assert not torch.equal(random.groups["visual"].train.x, from_file.groups["visual"].train.x)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        build("textcaps", textcaps_root, feature_backbone_weights=str(tmp_path / "absent.pth"), **common)


def test_pool_false_reads_only_the_official_train_split():
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset(Config(**BASES["mnist_usps"], mnist_usps_pool=False))
