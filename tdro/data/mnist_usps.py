"""mnist_usps: MNIST 28x28 and USPS 16x16 digits (optionally MNIST zero-padded to 32x32).

Sources, all read from ``data_root`` (or its ``mnist/``, ``MNIST/raw/``, ``usps/`` sub-folders):

* MNIST IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (gzipped or not);
* USPS LIBSVM files ``usps.bz2`` (train) and ``usps.t.bz2`` (test), values in [-1, 1], labels 1..10;
* or ``usps.h5`` (the Kaggle layout: ``train``/``test`` groups with ``data`` in [0, 1] and
  ``target`` 0..9; needs h5py). The two USPS versions are preprocessed differently and are never
  mixed: ``usps_source`` picks one (``auto``: the one with more splits present, LIBSVM on a tie).

With ``download: true`` missing files are fetched through torchvision (MNIST into
``<data_root>/MNIST/raw``, USPS LIBSVM into ``<data_root>``); offline, that fails at once with
the paths to fill by hand.

Pool: with ``mnist_usps_pool: true`` (default) every official split that is present is pooled
before re-splitting, so the MNIST test images alone make a real experiment; with ``false`` only
the official train split is used (as the reference's skewed loaders did).

Layouts (``mnist_usps_layout``); every split comes from ``data_split_seed``:

* ``skewed``: groups ``mnist`` and ``usps``. ``test_frac`` of each pool's classes is held out for
  test and ``val_frac`` of the rest for validation (both keep the source class mix); the training
  set is ``mnist_size`` / ``usps_size`` samples drawn without replacement, ``majority_frac`` of
  them over ``mnist_majority`` / ``usps_majority``.
* ``skewed3``: groups ``mnist28``, ``usps``, ``mnist32`` (zero-padded by 2 px per side).
  MNIST-28 and MNIST-32 take disjoint samples, each with its own majority classes
  (``mnist28_majority``, ``mnist32_majority``: the reference ignored the latter); their val/test
  hold-outs are divided in proportion to ``mnist28_size`` : ``mnist32_size``.
* ``balanced``: per-class balanced subsets of ``mnist_total_size`` / ``usps_total_size``
  (total/10 per class), then a stratified train / val / test split.

Pixels are floats in [0, 1] (ToTensor scaling; USPS LIBSVM mapped with (x + 1) / 2).
"""
from __future__ import annotations

import bz2
import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tdro.data.base import DataError, DataFileError, Group, GroupedDataset, Split
from tdro.data.files import data_root, find_file, search_dirs
from tdro.data.splits import deal, skewed_sample, split_rng, spread, train_val_test

log = logging.getLogger(__name__)

MNIST_DIRS = ("mnist", "MNIST/raw", "MNIST")
USPS_DIRS = ("usps", "USPS")
MNIST_ORIGIN = "https://ossci-datasets.s3.amazonaws.com/mnist/ (torchvision's mirror of http://yann.lecun.com/exdb/mnist/)"
USPS_ORIGIN = ("https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps (usps.bz2, usps.t.bz2) "
               "or Kaggle's 'USPS dataset' (usps.h5)")
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
CLASS_NAMES = [str(d) for d in range(10)]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------- readers
def _decompressed(path: Path, what: str, origin: str) -> bytes:
    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
    except (EOFError, OSError, zlib.error, ValueError) as error:
        raise DataError(f"{path} is a truncated or corrupt compressed {what} file ({error}); "
                        f"delete it and download it again from {origin}") from error
    return raw


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """An IDX array (uint8) checked against its magic number and declared size."""
    path = Path(path)
    kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
    data = _decompressed(path, "MNIST IDX", MNIST_ORIGIN)
    remedy = f"delete it and download it again from {MNIST_ORIGIN}"
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte IDX magic; {remedy}")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an MNIST IDX {kind} file: magic number 0x{found:08x}, expected "
                        f"0x{magic:08x}; check the file name/kind or {remedy}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header ({len(data)} of {header} bytes); {remedy}")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims))
    if len(data) - header != count:
        state = "truncated" if len(data) - header < count else "longer than its header says"
        raise DataError(f"{path} is {state}: the header declares shape {dims} ({count} bytes of data) but "
                        f"{len(data) - header} bytes follow; {remedy}")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def check_digit_labels(labels: np.ndarray, where: str, origin: str) -> np.ndarray:
    """The labels, refused (naming ``where``, the count and the values) unless every one is a digit 0..9."""
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        values = sorted(set(labels[bad].tolist()))
        shown = ", ".join(map(str, values[:10])) + (", ..." if len(values) > 10 else "")
        raise DataError(f"{where}: {int(bad.sum())} of {len(labels)} labels are outside the digits 0..9 "
                        f"(values {shown}); the file is corrupt or not a digit labels file: delete it and download it "
                        f"again from {origin}")
    return labels


def read_usps_libsvm(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """USPS LIBSVM lines ``label i:v ...`` (labels 1..10 = digit + 1, indices 1..256, values in [-1, 1])
    as (N, 16, 16) floats in [0, 1] and digit labels."""
    path = Path(path)
    text = _decompressed(path, "USPS LIBSVM", USPS_ORIGIN).decode("ascii", errors="replace")
    remedy = f"the file is corrupt: delete it and download it again from {USPS_ORIGIN}"
    images, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            label = int(float(tokens[0]))
        except ValueError:
            raise DataError(f"{path}, line {number}: label {tokens[0]!r} is not a number; {remedy}") from None
        if not 1 <= label <= 10:
            raise DataError(f"{path}, line {number}: label {label} is outside 1..10 (digit + 1); {remedy}")
        row = np.full(256, -1.0, dtype=np.float32)
        for token in tokens[1:]:
            index, _, value = token.partition(":")
            try:
                i = int(index)
                v = float(value)
            except ValueError:
                raise DataError(f"{path}, line {number}: bad LIBSVM entry {token!r} (expected index:value with an "
                                f"integer index in 1..256); {remedy}") from None
            if not 1 <= i <= 256:
                raise DataError(f"{path}, line {number}: feature index {i} in {token!r} is outside 1..256 "
                                f"(16x16 pixels); {remedy}")
            row[i - 1] = v
        images.append(row)
        labels.append(label - 1)
    if not images:
        raise DataError(f"{path} holds no samples; {remedy}")
    x = (np.stack(images).reshape(-1, 16, 16) + 1.0) / 2.0
    return np.clip(x, 0.0, 1.0).astype(np.float32), np.asarray(labels, dtype=np.int64)


def read_usps_h5(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of the Kaggle ``usps.h5``: (N, 16, 16) floats in [0, 1] and digit labels."""
    try:
        import h5py
    except ImportError as error:
        raise DataError(f"reading {path} needs the optional package h5py (pip install h5py, or tdro's 'h5' extra); "
                        "or use the LIBSVM files usps.bz2 / usps.t.bz2 with usps_source: libsvm") from error
    try:
        with h5py.File(path, "r") as f:
            data = np.asarray(f[split]["data"], dtype=np.float32)
            target = np.asarray(f[split]["target"], dtype=np.int64)
    except (OSError, KeyError) as error:
        raise DataError(f"{path} is not a readable usps.h5 with {split}/data and {split}/target ({error}); "
                        f"download it again from {USPS_ORIGIN}") from error
    if data.ndim != 2 or data.shape[1] != 256 or len(data) != len(target):
        raise DataError(f"{path}: {split}/data has shape {data.shape} and {split}/target {target.shape}; "
                        "expected (N, 256) and (N,)")
    return data.reshape(-1, 16, 16), check_digit_labels(target, f"{path}:{split}/target", USPS_ORIGIN)


# ----------------------------------------------------------------------------- sources
@dataclass
class Pool:
    """All present official splits of one dataset, concatenated (train first)."""

    images: np.ndarray  # (N, H, W) float32 in [0, 1]
    labels: np.ndarray  # (N,) int64
    parts: dict  # split name -> (file description, offset, count)
    notes: tuple = ()  # e.g. an official split left out because one of its files is missing


def _mnist_files(root: Path) -> dict[str, tuple[Path | None, Path | None]]:
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = find_file(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"], MNIST_DIRS)
        labels = find_file(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"], MNIST_DIRS)
        files[split] = (images, labels)
    return files


def _download_mnist(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on the mirror
        raise DataFileError(
            f"download of MNIST into {root / 'MNIST' / 'raw'} failed ({type(error).__name__}: {_one_line(error)}); if this "
            f"machine is offline, get train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from {MNIST_ORIGIN} and place them in "
            f"{root} (or {root / 'MNIST' / 'raw'}) by hand") from error


def load_mnist_pool(root: Path, pool: bool, download: bool) -> Pool:
    files = _mnist_files(root)
    wanted = ("train", "test") if pool else ("train",)
    complete = lambda f: f[0] is not None and f[1] is not None  # noqa: E731
    if download and not all(complete(files[s]) for s in wanted):
        _download_mnist(root)
        files = _mnist_files(root)
    present = [s for s in wanted if complete(files[s])]
    notes = []
    for split in wanted:
        if split not in present and any(files[split]):
            have = next(p for p in files[split] if p is not None)
            notes.append(f"MNIST {split} split is incomplete (found {have} but not its "
                         f"{'images' if files[split][0] is None else 'labels'} file); it is left out")
            log.warning(notes[-1])
    if not present:
        prefix = "train" if not pool else "t10k"
        expected = [root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"]
        extra = "" if pool else "; or set mnist_usps_pool: true to use whichever official splits are present"
        raise DataFileError(
            f"MNIST files not found: expected {expected[0]} and {expected[1]} (the train and/or t10k pairs, gzipped or "
            f"not, in {', '.join(str(d) for d in search_dirs(root, MNIST_DIRS))}). Get them from {MNIST_ORIGIN} "
            f"and place them in {root} (data_root), or set download: true{extra}")
    images, labels, parts, offset = [], [], {}, 0
    for split in present:
        image_path, label_path = files[split]
        x = read_idx(image_path, IDX_IMAGES_MAGIC)
        y = check_digit_labels(read_idx(label_path, IDX_LABELS_MAGIC), str(label_path), MNIST_ORIGIN)
        if x.ndim != 3 or len(x) != len(y):
            raise DataError(f"{image_path} holds {x.shape} images but {label_path} holds {len(y)} labels; "
                            "the pair must match (re-download both)")
        images.append(x.astype(np.float32) / 255.0)
        labels.append(y.astype(np.int64))
        parts[split] = (str(image_path), offset, len(y))
        offset += len(y)
    return Pool(np.concatenate(images), np.concatenate(labels), parts, tuple(notes))


def _usps_files(root: Path) -> dict:
    return {
        "libsvm": {"train": find_file(root, ["usps.bz2", "usps"], USPS_DIRS),
                   "test": find_file(root, ["usps.t.bz2", "usps.t"], USPS_DIRS)},
        "h5": find_file(root, ["usps.h5"], USPS_DIRS),
    }


def _download_usps(root: Path) -> None:
    try:
        from torchvision.datasets import USPS

        for train in (True, False):
            USPS(str(root), train=train, download=True)
    except Exception as error:
        raise DataFileError(
            f"download of USPS into {root} failed ({type(error).__name__}: {_one_line(error)}); if this machine is offline, "
            f"get usps.bz2 and usps.t.bz2 (or usps.h5) from {USPS_ORIGIN} and place them in {root} by hand") from error


def load_usps_pool(root: Path, pool: bool, download: bool, source: str) -> Pool:
    wanted = ("train", "test") if pool else ("train",)
    files = _usps_files(root)

    def libsvm_present(f):
        return [s for s in wanted if f["libsvm"][s] is not None]

    def h5_present(f):
        if f["h5"] is None:
            return []
        try:
            import h5py

            with h5py.File(f["h5"], "r") as h:
                return [s for s in wanted if s in h]
        except ImportError:
            return list(wanted)  # reading reports the missing h5py with its remedy
        except OSError as error:
            raise DataError(f"{f['h5']} is not a readable HDF5 file ({error}); "
                            f"download it again from {USPS_ORIGIN}") from error

    if download and source != "h5" and len(libsvm_present(files)) < len(wanted) and (
            source == "libsvm" or len(h5_present(files)) < len(wanted)):
        _download_usps(root)
        files = _usps_files(root)
    n_libsvm, n_h5 = len(libsvm_present(files)), len(h5_present(files))
    if source == "auto":
        source = "h5" if n_h5 > n_libsvm else "libsvm"
    present = libsvm_present(files) if source == "libsvm" else h5_present(files)
    if not present:
        names = "usps.bz2" + ("/usps.t.bz2" if pool else "") if source == "libsvm" else "usps.h5"
        fetch = "set download: true" if source == "libsvm" else "use usps_source: libsvm with download: true"
        extra = "" if pool else "; or set mnist_usps_pool: true to use whichever official splits are present"
        raise DataFileError(
            f"USPS files not found: expected {root / names.split('/')[0]} ({names}, usps_source: {source}) in "
            f"{', '.join(str(d) for d in search_dirs(root, USPS_DIRS))}. Get them from {USPS_ORIGIN} and place them "
            f"in {root} (data_root), or {fetch} (torchvision fetches the LIBSVM files){extra}")
    images, labels, parts, offset = [], [], {}, 0
    for split in present:
        if source == "libsvm":
            x, y = read_usps_libsvm(files["libsvm"][split])
            where = str(files["libsvm"][split])
        else:
            x, y = read_usps_h5(files["h5"], split)
            where = f"{files['h5']}:{split}"
        images.append(x)
        labels.append(y)
        parts[split] = (where, offset, len(y))
        offset += len(y)
    return Pool(np.concatenate(images), np.concatenate(labels), parts)


# ----------------------------------------------------------------------------- layouts
def _group(name: str, pool: Pool, positions: tuple[np.ndarray, np.ndarray, np.ndarray], pad: int = 0,
           pool_size: int = 7) -> Group:
    splits = []
    for p in positions:
        x = torch.from_numpy(pool.images[p]).unsqueeze(1)
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        splits.append(Split(x.contiguous(), torch.from_numpy(pool.labels[p]), torch.from_numpy(p)))
    size = splits[0].x.shape[-1]
    return Group(name, "image", "cnn", {"in_channels": 1, "image_size": size}, {"pool_size": pool_size}, *splits)


def _skewed(pool: Pool, config, name: str, size: int, majority, size_key: str, major_key: str):
    seed = config.data_split_seed
    train_pool, val, test = train_val_test(pool.labels, config.test_frac, config.val_frac, split_rng(seed, name, "holdout"))
    what = f"mnist_usps group {name!r} ({size_key}={size}, {major_key}={list(majority)}, majority_frac={config.majority_frac})"
    train = skewed_sample(train_pool, pool.labels, size, majority, config.majority_frac, 10,
                          split_rng(seed, name, "train"), what)
    return train, val, test, train_pool


def _balanced(pool: Pool, config, name: str, total: int, key: str):
    per_class = spread(total, 10)
    rng = split_rng(config.data_split_seed, name, "balanced")
    chosen = []
    for c, n in enumerate(per_class):
        members = np.flatnonzero(pool.labels == c)
        if n > len(members):
            raise DataError(f"mnist_usps balanced layout: {key}={total} needs {n} samples of class {c} in the "
                            f"{name} pool, which has only {len(members)}; lower {key} or add official splits")
        chosen.append(members[rng.permutation(len(members))[:n]])
    subset = np.sort(np.concatenate(chosen))
    return train_val_test(pool.labels, config.test_frac, config.val_frac, rng, positions=subset)


def build_mnist_usps(config) -> GroupedDataset:
    root = data_root(config)
    mnist = load_mnist_pool(root, config.mnist_usps_pool, config.download)
    usps = load_usps_pool(root, config.mnist_usps_pool, config.download, config.usps_source)
    layout = config.mnist_usps_layout
    seed = config.data_split_seed
    groups: dict[str, Group] = {}
    if layout == "skewed":
        usps_major = config.usps_majority if config.usps_majority is not None else [5, 6, 7, 8, 9]
        m = _skewed(mnist, config, "mnist", config.mnist_size, config.mnist_majority, "mnist_size", "mnist_majority")
        u = _skewed(usps, config, "usps", config.usps_size, usps_major, "usps_size", "usps_majority")
        groups["mnist"] = _group("mnist", mnist, m[:3])
        groups["usps"] = _group("usps", usps, u[:3])
    elif layout == "skewed3":
        usps_major = config.usps_majority if config.usps_majority is not None else [4, 5, 6]
        train28, val, test, train_pool = _skewed(mnist, config, "mnist28", config.mnist28_size,
                                                 config.mnist28_majority, "mnist28_size", "mnist28_majority")
        rest = np.setdiff1d(train_pool, train28)
        what = (f"mnist_usps group 'mnist32' (mnist32_size={config.mnist32_size}, "
                f"mnist32_majority={list(config.mnist32_majority)}, majority_frac={config.majority_frac}; "
                "drawn from the MNIST samples that mnist28 left)")
        train32 = skewed_sample(rest, mnist.labels, config.mnist32_size, config.mnist32_majority,
                                config.majority_frac, 10, split_rng(seed, "mnist32", "train"), what)
        weights = [config.mnist28_size, config.mnist32_size]
        val28, val32 = deal(val, mnist.labels, weights, split_rng(seed, "mnist28/32", "val"))
        test28, test32 = deal(test, mnist.labels, weights, split_rng(seed, "mnist28/32", "test"))
        u = _skewed(usps, config, "usps", config.usps_size, usps_major, "usps_size", "usps_majority")
        groups["mnist28"] = _group("mnist28", mnist, (train28, val28, test28))
        groups["usps"] = _group("usps", usps, u[:3])
        groups["mnist32"] = _group("mnist32", mnist, (train32, val32, test32), pad=2, pool_size=8)
    else:  # balanced
        groups["mnist"] = _group("mnist", mnist, _balanced(mnist, config, "mnist", config.mnist_total_size,
                                                           "mnist_total_size"))
        groups["usps"] = _group("usps", usps, _balanced(usps, config, "usps", config.usps_total_size,
                                                        "usps_total_size"))
    info = {"layout": layout, "pool": config.mnist_usps_pool,
            "sources": {"mnist": mnist.parts, "usps": usps.parts}, "notes": list(mnist.notes + usps.notes)}
    return GroupedDataset("mnist_usps", groups, list(CLASS_NAMES), info)
