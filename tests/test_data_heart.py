"""heart on the four real UCI processed.*.data files in ../shared/data."""
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tdro.config import Config
from tdro.data import DataError, DataFileError, build_dataset
from tdro.data.heart import FEATURES, HETAGG_MASKS, SITES

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HEART = SHARED / "uci_heart_disease"
pytestmark = pytest.mark.skipif(not HEART.is_dir(), reason=f"real data folder {HEART} is absent")


def cfg(root=SHARED, **changes):
    return Config(dataset="heart", data_root=str(root), **changes)


@pytest.fixture(scope="module")
def heart():
    return build_dataset(cfg())


def copy_files(tmp_path):
    for site in SITES:
        shutil.copy(HEART / f"processed.{site}.data", tmp_path / f"processed.{site}.data")
    return tmp_path


def test_hospitals_labels_and_hetagg_masks(heart):
    assert heart.group_names == list(SITES) and heart.class_names == ["no disease", "disease"]
    for site, group in heart.groups.items():
        assert (group.kind, group.encoder, group.encoder_options) == ("tabular", "mlp_tabular",
                                                                     {"hidden_dim": 64, "dropout": 0.1})
        assert group.input_info == {"input_dim": len(HETAGG_MASKS[site])}
        assert group.train.x.shape[1] == len(HETAGG_MASKS[site])
        assert sum(len(group.split(s)) for s in ("train", "val", "test")) == {
            "cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}[site]  # imputed: no row dropped
    positives = {s: sum(int(g.split(p).y.sum()) for p in ("train", "val", "test")) for s, g in heart.groups.items()}
    assert positives == {"cleveland": 139, "hungarian": 106, "switzerland": 115, "va": 149}  # num > 0
    assert heart.info["feature_mask"]["hungarian"] == [FEATURES[i] for i in HETAGG_MASKS["hungarian"]]


def test_rows_disjoint_and_split_by_data_split_seed(heart):
    def rows(ds):
        return {(n, s): set(g.split(s).index.tolist()) for n, g in ds.groups.items() for s in ("train", "val", "test")}

    r = rows(heart)
    for site in SITES:
        parts = [r[(site, s)] for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert rows(build_dataset(cfg(seed=9))) == r
    assert rows(build_dataset(cfg(data_split_seed=9))) != r


def test_per_site_standardisation_from_training_rows(heart):
    for group in heart.groups.values():
        x = group.train.x.double()
        varying = x.std(0) > 0
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1], dtype=torch.double), atol=1e-5)
        assert torch.allclose(x.std(0, unbiased=False)[varying], torch.ones(int(varying.sum()), dtype=torch.double),
                              atol=1e-4)


def test_statistics_come_from_training_rows_only(tmp_path, heart):
    root = copy_files(tmp_path)
    test_row = int(heart.groups["cleveland"].test.index[0])
    path = root / "processed.cleveland.data"
    lines = path.read_text().splitlines()
    fields = lines[test_row].split(",")
    fields[0], fields[3], fields[4] = "99.0", "9999.0", "?"  # age, trestbps, chol of a test row
    lines[test_row] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    changed = build_dataset(cfg(root))
    for split in ("train", "val"):
        assert torch.equal(changed.groups["cleveland"].split(split).x, heart.groups["cleveland"].split(split).x)
    assert not torch.equal(changed.groups["cleveland"].test.x, heart.groups["cleveland"].test.x)


def test_stratified_k_fold_partitions_each_site():
    tests = [build_dataset(cfg(n_folds=5, fold_index=k)) for k in range(5)]
    for site, n in (("switzerland", 123), ("va", 200)):
        folds = [set(ds.groups[site].test.index.tolist()) for ds in tests]
        assert sum(len(f) for f in folds) == n and len(set().union(*folds)) == n
        for k, ds in enumerate(tests):
            group = ds.groups[site]
            assert not folds[k] & set(group.train.index.tolist()) and not folds[k] & set(group.val.index.tolist())
            assert len(group.test) in (n // 5, n // 5 + 1)
        negatives = [int((ds.groups[site].test.y == 0).sum()) for ds in tests]
        assert max(negatives) - min(negatives) <= 1  # stratified
    with pytest.raises(DataError, match="fold_index 5 is outside 0..4"):
        build_dataset(cfg(n_folds=5, fold_index=5))


def test_caps_dropna_and_masks_take_effect(heart):
    capped = build_dataset(cfg(group_max_train_samples=[None, None, 20, 25]))
    assert capped.sizes("train") == {**heart.sizes("train"), "switzerland": 20, "va": 25}
    assert capped.sizes("test") == heart.sizes("test")
    dropped = build_dataset(cfg(impute_missing=False))
    assert sum(len(dropped.groups["switzerland"].split(s)) for s in ("train", "val", "test")) == 46
    homogeneous = build_dataset(cfg(feature_mask="all"))
    assert {g.input_info["input_dim"] for g in homogeneous.groups.values()} == {13}
    custom = build_dataset(cfg(feature_mask=[[0, 1], None, [5], [12, 3]]))
    assert [g.input_info["input_dim"] for g in custom.groups.values()] == [2, 13, 1, 2]
    assert torch.allclose(custom.groups["va"].train.x, homogeneous.groups["va"].train.x[:, [3, 12]])


def test_common_encoder_reads_the_zero_filled_union(heart):
    union = build_dataset(cfg(common_encoder=True))
    for site, group in union.groups.items():
        assert group.input_info == {"input_dim": 13}
        outside = [i for i in range(13) if i not in HETAGG_MASKS[site]]
        assert float(group.train.x[:, outside].abs().sum()) == 0
        assert torch.equal(group.train.x[:, HETAGG_MASKS[site]], heart.groups[site].train.x)


@pytest.mark.parametrize("mask,message", [
    ("hetero", "is not one of hetagg, all"),
    ([[0, 1]], "has 1 entries but the dataset has 4 groups"),
    ([[0, 13], None, None, None], "feature indices 0..12"),
])
def test_bad_feature_mask(mask, message):
    with pytest.raises(DataError, match=message):
        build_dataset(cfg(feature_mask=mask))


def test_wrong_column_count(tmp_path):
    root = copy_files(tmp_path)
    path = root / "processed.hungarian.data"
    lines = path.read_text().splitlines()
    lines[4] = lines[4] + ",1"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"processed.hungarian.data, line 5: 15 comma-separated fields, expected 14"):
        build_dataset(cfg(root))


def test_missing_file_and_offline_download(tmp_path, monkeypatch):
    root = copy_files(tmp_path)
    (root / "processed.va.data").unlink()
    with pytest.raises(DataFileError, match=r"processed.va.data not found.*archive.ics.uci.edu.*download: true"):
        build_dataset(cfg(root))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataFileError, match=r"download of the UCI heart file processed.va.data .*failed") as error:
        build_dataset(cfg(root, download=True))
    assert str(root / "uci_heart_disease" / "processed.va.data") in str(error.value)
    assert not list(root.rglob("*.part"))


def test_summary_table(heart):
    table = heart.summary()
    assert table.loc[("switzerland", "train"), "size"] == len(heart.groups["switzerland"].train)
    assert (table["no disease"] + table["disease"] == table["size"]).all()
    assert np.isfinite(table["size"].to_numpy()).all()
