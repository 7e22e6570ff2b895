"""Data that used to be read silently wrong, on corrupted copies of the real files in ../shared/data: MNIST labels
outside 0..9, heart labels '?', a heart site too small to split, and an unreadable TextCaps image (found when the
dataset is built, before `python -m tdro train` makes a run directory)."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdro.config import Config
from tdro.data import DataError, build_dataset
from tdro.data.heart import MIN_SITE_ROWS, SITES, read_heart_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real data folder {SHARED} is absent")


# =============================================================================== MNIST / USPS labels
def mnist_root(tmp_path: Path, labels: np.ndarray | None = None) -> Path:
    """The real MNIST test split and USPS h5, with the MNIST labels replaced by ``labels`` (IDX header kept)."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "usps.h5").symlink_to(SHARED / "usps" / "usps.h5")
    raw = gzip.decompress((SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    if labels is not None:
        raw = raw[:8] + labels.astype(np.uint8).tobytes()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw)
    return tmp_path


def real_mnist_labels() -> np.ndarray:
    raw = gzip.decompress((SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    return np.frombuffer(raw, dtype=np.uint8, offset=8).copy()


def test_mnist_labels_outside_the_digits_are_an_error_naming_file_count_and_values(tmp_path):
    labels = real_mnist_labels()
    labels[[3, 500, 9000]] = [12, 200, 12]
    root = mnist_root(tmp_path, labels)
    with pytest.raises(DataError) as info:
        build_dataset(Config(dataset="mnist_usps", data_root=str(root)))
    message = str(info.value)
    assert str(root / "t10k-labels-idx1-ubyte") in message
    assert "3 of 10000 labels are outside the digits 0..9 (values 12, 200)" in message


def test_the_real_mnist_labels_pass_unchanged(tmp_path):
    dataset = build_dataset(Config(dataset="mnist_usps", data_root=str(mnist_root(tmp_path))))
    assert sorted(dataset.class_names) == [str(d) for d in range(10)]


def test_usps_h5_targets_outside_the_digits_are_an_error(tmp_path):
    h5py = pytest.importorskip("h5py")
    root = mnist_root(tmp_path)
    (root / "usps.h5").unlink()
    shutil.copy(SHARED / "usps" / "usps.h5", root / "usps.h5")
    with h5py.File(root / "usps.h5", "r+") as f:
        target = np.asarray(f["test"]["target"])
        target[:2] = [10, -1]
        f["test"]["target"][...] = target
    with pytest.raises(DataError, match=r"usps\.h5:test/target: 2 of 2007 labels are outside the digits 0\.\.9 "
                                        r"\(values -1, 10\)"):
        build_dataset(Config(dataset="mnist_usps", data_root=str(root)))


# =============================================================================== heart labels and sites
def heart_root(tmp_path: Path) -> Path:
    for site in SITES:
        shutil.copy(SHARED / "uci_heart_disease" / f"processed.{site}.data", tmp_path / f"processed.{site}.data")
    return tmp_path


def set_field(path: Path, lines: list[int], column: int, value: str) -> None:
    rows = path.read_text().splitlines()
    for line in lines:
        fields = rows[line - 1].split(",")
        fields[column] = value
        rows[line - 1] = ",".join(fields)
    path.write_text("\n".join(rows) + "\n")


def test_the_official_heart_files_have_a_label_on_every_row():
    """Why '?' labels are an error and not a counted drop: the official files have none."""
    for site in SITES:
        num = read_heart_file(SHARED / "uci_heart_disease" / f"processed.{site}.data")[:, -1]
        assert np.isin(num, [0, 1, 2, 3, 4]).all()


def test_a_heart_label_that_is_unknown_is_an_error_naming_file_and_lines(tmp_path):
    root = heart_root(tmp_path)
    path = root / "processed.hungarian.data"
    set_field(path, [7, 120], -1, "?")
    with pytest.raises(DataError) as info:
        build_dataset(Config(dataset="heart", data_root=str(root)))
    message = str(info.value)
    assert str(path) in message and "2 row(s) have no label (num is '?', unknown), at line(s) 7, 120" in message


def test_a_heart_label_outside_0_to_4_is_an_error(tmp_path):
    root = heart_root(tmp_path)
    set_field(root / "processed.va.data", [3], -1, "7")
    with pytest.raises(DataError, match=r"processed\.va\.data: 1 row\(s\) have a label num outside \(0, 1, 2, 3, 4\), "
                                        r"at line\(s\) 3"):
        build_dataset(Config(dataset="heart", data_root=str(root)))


def test_a_heart_site_too_small_to_split_is_an_error_naming_site_rows_and_minimum(tmp_path):
    root = heart_root(tmp_path)
    path = root / "processed.switzerland.data"
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(DataError) as info:
        build_dataset(Config(dataset="heart", data_root=str(root)))
    message = str(info.value)
    assert f"heart site 'switzerland' has 3 rows in {path}" in message
    assert f"needs at least {MIN_SITE_ROWS} to be split into train / val / test" in message


def test_a_heart_site_left_too_small_by_dropping_incomplete_rows_says_so(tmp_path):
    root = heart_root(tmp_path)
    path = root / "processed.va.data"
    set_field(path, list(range(1, 191)), 3, "?")  # trestbps missing on 190 of 200 rows
    build_dataset(Config(dataset="heart", data_root=str(root)))  # imputed: every row stays
    with pytest.raises(DataError, match=r"heart site 'va' has \d+ rows left after dropping \d+ incomplete ones "
                                        r"\(impute_missing: false\).* or impute_missing: true"):
        build_dataset(Config(dataset="heart", data_root=str(root), impute_missing=False))


# =============================================================================== TextCaps images
def textcaps_root(root: Path) -> Path:
    """The 200 real annotation records with small generated JPEGs at <root>/images/<image_path>."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        target = root / f"TextCaps_0.1_{split}.json"
        shutil.copy(SHARED / "textcaps" / f"TextCaps_0.1_{split}.json_samples.json", target)
        for record in json.loads(target.read_text())["data"]:
            path = root / "images" / record["image_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path, quality=95)
    return root


def used_image(root: Path, split: str) -> Path:
    """The image of the first record of ``split`` whose class is the most frequent train class (so it is used)."""
    train = json.loads((root / "TextCaps_0.1_train.json").read_text())["data"]
    top = Counter(r["image_classes"][0] for r in train).most_common(1)[0][0]
    records = json.loads((root / f"TextCaps_0.1_{split}.json").read_text())["data"]
    return root / "images" / next(r["image_path"] for r in records if r["image_classes"][0] == top)


@pytest.mark.parametrize("content", [b"", b"<html>404 not found</html>", b"\xff\xd8\xff"])
def test_an_unreadable_textcaps_image_fails_when_the_dataset_is_built(tmp_path, content):
    root = textcaps_root(tmp_path / "textcaps")
    bad = used_image(root, "val")
    bad.write_bytes(content)
    config = Config(dataset="textcaps", data_root=str(root), image_size=32, textcaps_num_classes=5)
    with pytest.raises(DataError, match=rf"1 of \d+ images cannot be read: {bad} \("):
        build_dataset(config)
    with pytest.raises(DataError, match=rf"cannot be read: {bad} \("):
        build_dataset(config.replace(feature_cache=True, feature_backbone_weights="random",
                                     feature_cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir()), "no features computed"
    build_dataset(config.replace(textcaps_groups=["text"]))  # no image group: the images are not needed


@pytest.mark.slow
def test_train_with_a_corrupt_textcaps_image_leaves_no_run_directory(tmp_path):
    root = textcaps_root(tmp_path / "textcaps")
    bad = used_image(root, "train")
    bad.write_bytes(b"not an image")
    output = tmp_path / "outputs"
    command = [sys.executable, "-m", "tdro", "train", "-p", "dataset", "textcaps", "-p", "data_root", str(root),
               "-p", "image_size", "32", "-p", "textcaps_num_classes", "5", "-p", "epochs", "1",
               "-p", "output_dir", str(output), "-p", "run_name", "corrupt", "-p", "progress", "false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "agg"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"images cannot be read: {bad}" in result.stderr
    assert not (output / "corrupt").exists(), "the failed start left a run directory that would block a re-run"
    assert not output.exists() or not any(output.rglob("config.yaml"))
