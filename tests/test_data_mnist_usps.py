"""mnist_usps on the real official files in ../shared/data (MNIST test split, USPS usps.t.bz2 and usps.h5)."""
import bz2
import gzip
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tdro.config import Config
from tdro.data import DataError, DataFileError, build_dataset
from tdro.data.mnist_usps import IDX_IMAGES_MAGIC, read_idx, read_usps_libsvm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"real data folder {SHARED} is absent")


def cfg(root=SHARED, **changes):
    return Config(dataset="mnist_usps", data_root=str(root), **changes)


@pytest.fixture(scope="module")
def skewed():
    return build_dataset(cfg())


def ids(dataset):
    return {(n, s): set(g.split(s).index.tolist()) for n, g in dataset.groups.items() for s in ("train", "val", "test")}


def assert_disjoint_within(dataset, groups):
    keys = [(g, s) for g in groups for s in ("train", "val", "test")]
    all_ids = ids(dataset)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not all_ids[a] & all_ids[b], (a, b)


def test_pool_mode_makes_a_real_experiment(skewed):
    assert skewed.group_names == ["mnist", "usps"]
    mnist, usps = skewed.groups["mnist"], skewed.groups["usps"]
    assert mnist.train.x.shape[1:] == (1, 28, 28) and usps.train.x.shape[1:] == (1, 16, 16)
    assert (mnist.encoder, mnist.input_info, mnist.encoder_options) == (
        "cnn", {"in_channels": 1, "image_size": 28}, {"pool_size": 7})
    assert usps.input_info == {"in_channels": 1, "image_size": 16}
    sources = skewed.info["sources"]
    assert list(sources["mnist"]) == ["test"]  # the train images are absent: only the 10k test images
    assert sources["usps"]["train"][0].endswith("usps.h5:train")  # auto: h5 has two splits, LIBSVM one
    assert any("train split is incomplete" in note for note in skewed.info["notes"])
    for group, size, majority in ((mnist, 3000, range(5)), (usps, 1000, range(5, 10))):
        assert len(group.train) == size
        assert int(torch.bincount(group.train.y, minlength=10)[list(majority)].sum()) == round(0.8 * size)
        assert float(group.train.x.min()) >= 0 and float(group.train.x.max()) <= 1
    assert len(mnist.test) == 2000 and len(mnist.val) == 1200  # test_frac of 10k, val_frac of the rest
    assert_disjoint_within(skewed, ["mnist"])
    assert_disjoint_within(skewed, ["usps"])


def test_same_split_for_any_seed(skewed):
    assert ids(build_dataset(cfg(seed=3))) == ids(skewed)
    assert ids(build_dataset(cfg(data_split_seed=3))) != ids(skewed)


def test_three_groups_with_their_own_majorities():
    ds = build_dataset(cfg(mnist_usps_layout="skewed3", mnist28_size=600, mnist32_size=300, usps_size=200,
                           mnist28_majority=[0, 1], mnist32_majority=[8, 9], usps_majority=[4], majority_frac=0.9))
    assert ds.group_names == ["mnist28", "usps", "mnist32"]
    m32 = ds.groups["mnist32"]
    assert m32.train.x.shape[1:] == (1, 32, 32) and m32.encoder_options == {"pool_size": 8}
    assert float(m32.train.x[:, :, :2].abs().sum()) == 0 and float(m32.train.x[:, :, :, -2:].abs().sum()) == 0
    for name, size, majority in (("mnist28", 600, [0, 1]), ("mnist32", 300, [8, 9]), ("usps", 200, [4])):
        counts = torch.bincount(ds.groups[name].train.y, minlength=10)
        assert len(ds.groups[name].train) == size
        assert int(counts[majority].sum()) == round(0.9 * size), name  # mnist32_majority takes effect
    assert_disjoint_within(ds, ["mnist28", "mnist32"])  # both MNIST groups draw from one pool, disjointly
    assert len(ds.groups["mnist28"].test) == pytest.approx(2 * len(ds.groups["mnist32"].test), abs=12)


def test_balanced_subsets_and_usps_libsvm():
    ds = build_dataset(cfg(mnist_usps_layout="balanced", mnist_total_size=500, usps_total_size=300,
                           usps_source="libsvm"))
    for name, total in (("mnist", 500), ("usps", 300)):
        group = ds.groups[name]
        counts = sum(torch.bincount(group.split(s).y, minlength=10) for s in ("train", "val", "test"))
        assert counts.tolist() == [total // 10] * 10
    assert ds.info["sources"]["usps"]["test"][0].endswith("usps.t.bz2")
    assert_disjoint_within(ds, ["mnist"])


def test_libsvm_reader_matches_h5_labels():
    x, y = read_usps_libsvm(SHARED / "usps" / "usps.t.bz2")
    assert x.shape == (2007, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]


def test_official_train_split_only_needs_the_train_images():
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte.gz.*mnist_usps_pool: true"):
        build_dataset(cfg(mnist_usps_pool=False))


def test_too_large_sizes_name_the_key():
    with pytest.raises(DataError, match=r"mnist_size=9000"):
        build_dataset(cfg(mnist_size=9000))


# ----------------------------------------------------------------------------- bad input
def test_missing_files_name_the_paths_and_the_source(tmp_path):
    with pytest.raises(DataFileError) as error:
        build_dataset(cfg(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in message
    assert "ossci-datasets.s3.amazonaws.com/mnist" in message and "download: true" in message


def _root_with(tmp_path, images_bytes=None, usps_text=None):
    """A data root with the real MNIST test labels and USPS h5, plus the given MNIST images file."""
    (tmp_path / "t10k-labels-idx1-ubyte.gz").symlink_to(SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz")
    if images_bytes is None:
        (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz")
    else:
        (tmp_path / "t10k-images-idx3-ubyte").write_bytes(images_bytes)
    if usps_text is None:
        (tmp_path / "usps.h5").symlink_to(SHARED / "usps" / "usps.h5")
    else:
        (tmp_path / "usps.t.bz2").write_bytes(bz2.compress(usps_text.encode()))
    return tmp_path


def test_truncated_idx_file(tmp_path):
    images = gzip.decompress((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    root = _root_with(tmp_path, images_bytes=images[:100_000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated.*download it again"):
        build_dataset(cfg(root))
    with pytest.raises(DataError, match="truncated inside its IDX header"):
        (tmp_path / "short").write_bytes(images[:10])
        read_idx(tmp_path / "short", IDX_IMAGES_MAGIC)
    (tmp_path / "cut.gz").write_bytes((SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated or corrupt compressed"):
        read_idx(tmp_path / "cut.gz", IDX_IMAGES_MAGIC)


def test_wrong_magic_idx_file(tmp_path):
    labels = gzip.decompress((SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    root = _root_with(tmp_path, images_bytes=labels)  # a labels file under the images name
    with pytest.raises(DataError, match=r"not an MNIST IDX images file: magic number 0x00000801, expected 0x00000803"):
        build_dataset(cfg(root))


def test_libsvm_line_with_bad_index(tmp_path):
    good = "3 " + " ".join(f"{i}:-1.0" for i in range(1, 257))
    bad = "5 1:-1.0 2:0.5 300:0.1"
    root = _root_with(tmp_path, usps_text=f"{good}\n{bad}\n")
    with pytest.raises(DataError, match=r"usps.t.bz2, line 2: feature index 300 .* outside 1..256"):
        build_dataset(cfg(root, usps_source="libsvm"))
    (tmp_path / "usps.t.bz2").write_bytes(bz2.compress(f"{good}\n7 a:1\n".encode()))
    with pytest.raises(DataError, match=r"line 2: bad LIBSVM entry 'a:1'"):
        read_usps_libsvm(tmp_path / "usps.t.bz2")


def test_usps_h5_without_h5py(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match=r"needs the optional package h5py"):
        build_dataset(cfg(usps_source="h5"))


def test_download_while_offline_fails_fast_with_the_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataFileError, match=r"download of MNIST into .*failed.*place them in") as error:
        build_dataset(cfg(tmp_path, download=True))
    assert str(tmp_path) in str(error.value)
    # USPS too: every MNIST file is present (a tiny but valid train pair), USPS is not
    shutil.copy(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-images-idx3-ubyte.gz")
    shutil.copy(SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz")
    n = 10
    header = lambda magic, *dims: b"".join(v.to_bytes(4, "big") for v in (magic, *dims))  # noqa: E731
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header(0x803, n, 28, 28) + bytes(n * 784))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(header(0x801, n) + bytes(range(n)))
    with pytest.raises(DataFileError, match=r"download of USPS into .*usps.bz2 and usps.t.bz2"):
        build_dataset(cfg(tmp_path, download=True, mnist_usps_pool=True))
