"""digits (embedded default): groups, honest splits, configured skews, every key taking effect."""
import numpy as np
import pytest
import torch

from tdro.config import Config
from tdro.data import DATASETS, DataError, build_dataset
from tdro.models.encoders import create_encoder


@pytest.fixture(scope="module")
def digits():
    return build_dataset(Config())


def all_ids(dataset):
    return {(name, split): set(g.split(split).index.tolist()) for name, g in dataset.groups.items()
            for split in ("train", "val", "test")}


def test_default_groups_and_encoder_specs(digits):
    assert digits.group_names == ["image", "coarse"]
    assert digits.class_names == [str(d) for d in range(10)]
    image, coarse = digits.groups["image"], digits.groups["coarse"]
    assert (image.kind, image.encoder, image.input_info) == ("image", "cnn", {"in_channels": 1, "image_size": 8})
    assert (coarse.kind, coarse.encoder, coarse.input_info) == ("tabular", "mlp_tabular", {"input_dim": 16})
    assert image.train.x.shape[1:] == (1, 8, 8) and coarse.train.x.shape[1:] == (16,)
    assert 0.0 <= float(image.train.x.min()) and float(image.train.x.max()) <= 1.0
    for group in digits.groups.values():  # the model side can build and run every default encoder
        encoder = create_encoder(group.encoder, 8, group.input_info, **group.encoder_options)
        assert encoder(group.val.x[:3]).shape == (3, 8)


def test_no_sample_in_two_splits_or_groups(digits):
    ids = all_ids(digits)
    keys = list(ids)
    for i, a in enumerate(keys):
        assert ids[a], a
        for b in keys[i + 1:]:
            assert not ids[a] & ids[b], (a, b)


def test_sizes_and_opposite_skews_as_configured(digits):
    for name, size, majority in (("image", 600, range(5)), ("coarse", 150, range(5, 10))):
        y = digits.groups[name].train.y
        assert len(y) == size
        counts = torch.bincount(y, minlength=10)
        assert int(counts[list(majority)].sum()) == round(0.8 * size)
        assert int(counts.min()) >= 1
    # val/test keep the source class mix (no skew), dealt evenly to the groups
    val = digits.sizes("val")
    assert abs(val["image"] - val["coarse"]) <= 10
    assert int(torch.bincount(digits.groups["coarse"].test.y).min()) >= 15


def test_split_fixed_by_data_split_seed_not_seed(digits):
    other_seed = build_dataset(Config(seed=5))
    assert all_ids(other_seed) == all_ids(digits)
    other_split = build_dataset(Config(data_split_seed=1))
    assert all_ids(other_split) != all_ids(digits)


def test_views_and_keys_take_effect():
    ds = build_dataset(Config(digits_groups=["masked", "flat", "image"], digits_sizes=[100, 50, 200],
                              digits_majority=[[1, 2], [], [3]], majority_frac=0.5, val_frac=0.3, test_frac=0.1))
    assert ds.group_names == ["masked", "flat", "image"]
    assert ds.groups["masked"].input_info == {"input_dim": 32}
    assert ds.groups["flat"].input_info == {"input_dim": 64}
    assert ds.sizes("train") == {"masked": 100, "flat": 50, "image": 200}
    masked_counts = torch.bincount(ds.groups["masked"].train.y, minlength=10)
    assert int(masked_counts[[1, 2]].sum()) == 50
    assert torch.bincount(ds.groups["flat"].train.y, minlength=10).tolist() == [5] * 10  # [] = balanced
    image_counts = torch.bincount(ds.groups["image"].train.y, minlength=10)
    assert int(image_counts[3]) == 100
    total_val = sum(ds.sizes("val").values())
    total_test = sum(ds.sizes("test").values())
    assert total_test == pytest.approx(0.1 * 1797, abs=10)
    assert total_val == pytest.approx(0.3 * 0.9 * 1797, abs=10)
    twice = build_dataset(Config(digits_groups=["coarse", "coarse"], digits_sizes=[50, 50]))
    assert twice.group_names == ["coarse_0", "coarse_1"]


def test_group_max_train_samples_caps_training_only():
    capped = build_dataset(Config(group_max_train_samples={"coarse": 40}))
    assert capped.sizes("train") == {"image": 600, "coarse": 40}
    assert capped.sizes("test") == build_dataset(Config()).sizes("test")
    assert len(torch.unique(capped.groups["coarse"].train.y)) == 10  # stratified: every class kept
    by_position = build_dataset(Config(group_max_train_samples=[None, 40]))
    assert torch.equal(by_position.groups["coarse"].train.index, capped.groups["coarse"].train.index)
    with pytest.raises(DataError, match="unknown group"):
        build_dataset(Config(group_max_train_samples={"usps": 40}))
    with pytest.raises(DataError, match="has 3 entries but the dataset has 2 groups"):
        build_dataset(Config(group_max_train_samples=[1, 2, 3]))


@pytest.mark.parametrize("changes,message", [
    (dict(digits_groups=["image", "pixels"]), "unknown view"),
    (dict(digits_sizes=[600]), "one entry per group"),
    (dict(digits_sizes=[1500, 150]), r"digits_sizes\[0\]=1500"),
    (dict(digits_majority=[[0, 1, 2, 3, 4], [11]]), "not class ids"),
    (dict(digits_majority=[list(range(10)), [5]]), "no minority classes"),
])
def test_bad_digits_keys(changes, message):
    with pytest.raises(DataError, match=message):
        build_dataset(Config(**changes))


def test_registry_and_summary(digits):
    assert DATASETS.names() == ["digits", "heart", "mnist_usps", "textcaps"]
    with pytest.raises(ValueError, match="unknown dataset 'digit'.*did you mean 'digits'"):
        DATASETS.get("digit")
    table = digits.summary()
    assert table.loc[("coarse", "train"), "size"] == 150
    assert table.loc[("image", "train"), [str(c) for c in range(5)]].sum() == 480
    assert list(table.index.get_level_values("split")[:3]) == ["train", "val", "test"]
    assert np.isfinite(table[[str(c) for c in range(10)]].to_numpy()).all()
