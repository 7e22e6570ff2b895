"""digits: the embedded default, scikit-learn's real 8x8 handwritten digits (1,797 images, no download).

Each group is one *view* of disjoint digit images, with its own feature space and encoder:

* ``image``  - the 8x8 image (1 channel) through ``cnn``;
* ``coarse`` - 2x2 average-pooled 4x4 image as a 16-d vector through ``mlp_tabular``;
* ``masked`` - the 32 pixels of a fixed checkerboard as a 32-d vector through ``mlp_tabular``;
* ``flat``   - all 64 pixels as a vector through ``mlp_tabular``.

Partition (all from ``data_split_seed``): ``test_frac`` of every class is held out for test, then
``val_frac`` of the rest for validation; both are dealt evenly and class-stratified to the groups
(so every group is evaluated on the source class mix). Each group's training set is then drawn
without replacement from what is left: ``digits_sizes[g]`` samples, ``majority_frac`` of them
spread over the classes ``digits_majority[g]`` (opposite skews by default). Pixel values are
scaled to [0, 1].
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from tdro.data.base import DataError, Group, GroupedDataset, Split
from tdro.data.splits import deal, skewed_sample, split_rng, train_val_test

VIEWS = ("image", "coarse", "masked", "flat")
MLP_OPTIONS = {"hidden_dim": 64, "dropout": 0.1}


def _view(name: str, images: np.ndarray) -> tuple[np.ndarray, str, str, dict, dict]:
    """(inputs, kind, encoder, input_info, encoder_options) of one view of (N, 8, 8) images in [0, 1]."""
    n = len(images)
    if name == "image":
        return images[:, None], "image", "cnn", {"in_channels": 1, "image_size": 8}, {"pool_size": 2}
    if name == "coarse":
        x = images.reshape(n, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(n, 16)
    elif name == "masked":
        rows, cols = np.indices((8, 8))
        x = images[:, (rows + cols) % 2 == 0]
    elif name == "flat":
        x = images.reshape(n, 64)
    else:  # checked before
        raise AssertionError(name)
    return x, "tabular", "mlp_tabular", {"input_dim": x.shape[1]}, dict(MLP_OPTIONS)


def _group_names(views: list[str]) -> list[str]:
    return [v if views.count(v) == 1 else f"{v}_{i}" for i, v in enumerate(views)]


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, images (1797, 8, 8) in 0..16 and labels, read from its data file.

    Reading ``sklearn/datasets/data/digits.csv.gz`` as ``load_digits`` does, without importing
    scikit-learn (about 1 s of every digits run's start-up); ``load_digits`` where that file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'digits' is read from scikit-learn's bundled data, but scikit-learn is not "
                        "installed; pip install scikit-learn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        data = np.loadtxt(handle, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def build_digits(config) -> GroupedDataset:
    views = list(config.digits_groups)
    sizes = list(config.digits_sizes)
    majorities = list(config.digits_majority)
    if not views:
        raise DataError("digits_groups is empty; list at least one view, e.g. [image, coarse]")
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise DataError(f"digits_groups has unknown view(s) {unknown}; allowed: {', '.join(VIEWS)}")
    if len(sizes) != len(views) or len(majorities) != len(views):
        raise DataError(f"digits_groups ({len(views)} views), digits_sizes ({len(sizes)} entries) and "
                        f"digits_majority ({len(majorities)} entries) must have one entry per group")
    for i, size in enumerate(sizes):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise DataError(f"digits_sizes[{i}] must be a positive integer, got {size!r}")
    for i, major in enumerate(majorities):
        if not isinstance(major, (list, tuple)):
            raise DataError(f"digits_majority[{i}] must be a list of class ids, got {major!r}")

    raw_images, raw_labels = load_digit_images()
    images = (raw_images / 16.0).astype(np.float32)
    labels = raw_labels.astype(np.int64)
    num_classes = 10
    names = _group_names(views)

    rng = split_rng(config.data_split_seed, "digits")
    pool, val, test = train_val_test(labels, config.test_frac, config.val_frac, rng)
    n_groups = len(views)
    val_parts = deal(val, labels, [1.0] * n_groups, rng)
    test_parts = deal(test, labels, [1.0] * n_groups, rng)

    groups = {}
    for g, (name, view) in enumerate(zip(names, views)):
        what = f"digits group {name!r} (digits_sizes[{g}]={sizes[g]}, digits_majority[{g}], majority_frac)"
        train = skewed_sample(pool, labels, sizes[g], majorities[g], config.majority_frac, num_classes,
                              split_rng(config.data_split_seed, "digits", name), what)
        pool = np.setdiff1d(pool, train)
        x_all, kind, encoder, info, options = _view(view, images)
        splits = [Split(torch.from_numpy(np.ascontiguousarray(x_all[p])), torch.from_numpy(labels[p]),
                        torch.from_numpy(p)) for p in (train, val_parts[g], test_parts[g])]
        groups[name] = Group(name, kind, encoder, info, options, *splits)
    info = {"source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 1,797 images)",
            "views": dict(zip(names, views))}
    return GroupedDataset("digits", groups, [str(c) for c in range(num_classes)], info)
