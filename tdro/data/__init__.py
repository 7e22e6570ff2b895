"""Grouped datasets: groups by name, each with train / val / test splits, and group-stratified batches.

``build_dataset(config)`` builds the dataset named by ``config.dataset`` from the ``DATASETS``
registry: ``digits`` (embedded default), ``mnist_usps``, ``heart``, ``textcaps``. Each module's
docstring documents its files, layouts and preprocessing.
"""
from __future__ import annotations

from tdro.data.base import (DataError, DataFileError, Group, GroupedDataset, InputStore, PairStore, Split,
                            SPLITS)
from tdro.data.batching import EvalBatches, GroupStratifiedBatches, group_quotas, train_batches
from tdro.data.splits import check_caps, resolve_per_group, split_rng, stratified_cap
from tdro.registry import Registry, unknown_choice_message

DATASETS: Registry[GroupedDataset] = Registry("dataset")


@DATASETS.register("digits")
def _digits(config) -> GroupedDataset:
    from tdro.data.digits import build_digits

    return build_digits(config)


@DATASETS.register("mnist_usps")
def _mnist_usps(config) -> GroupedDataset:
    from tdro.data.mnist_usps import build_mnist_usps

    return build_mnist_usps(config)


@DATASETS.register("heart")
def _heart(config) -> GroupedDataset:
    from tdro.data.heart import build_heart

    return build_heart(config)  # applies group_max_train_samples itself, before its statistics


@DATASETS.register("textcaps")
def _textcaps(config) -> GroupedDataset:
    from tdro.data.textcaps import build_textcaps

    return build_textcaps(config)


CAPPED_INSIDE = ("heart",)


def cap_train(dataset: GroupedDataset, caps, data_split_seed: int) -> GroupedDataset:
    """Apply ``group_max_train_samples``: keep at most the cap of each group's training samples
    (class-stratified, chosen from ``data_split_seed``)."""
    names = dataset.group_names
    caps = check_caps(resolve_per_group(caps, names, "group_max_train_samples"), names)
    for name, cap in zip(names, caps):
        group = dataset.groups[name]
        if cap is None or cap >= len(group.train):
            continue
        import numpy as np

        keep = stratified_cap(np.arange(len(group.train)), group.train.y.cpu().numpy(), cap,
                              split_rng(data_split_seed, "cap", name))
        group.train = group.train.subset(keep)
    return dataset


def keep_groups(dataset: GroupedDataset, names: list) -> GroupedDataset:
    """Apply ``only_groups`` after the build, so per-position keys keep indexing the dataset's own groups."""
    if not names:
        raise DataError(f"only_groups is an empty list; name at least one of the dataset's groups "
                        f"({', '.join(dataset.group_names)}), or null for all")
    for name in names:
        if not isinstance(name, str) or name not in dataset.groups:
            raise DataError("only_groups: " + unknown_choice_message("group", name, dataset.group_names))
        if names.count(name) > 1:
            raise DataError(f"only_groups names group {name!r} {names.count(name)} times; name each group once")
    kept = {name: group for name, group in dataset.groups.items() if name in names}
    left_out = [name for name in dataset.groups if name not in names]
    return GroupedDataset(dataset.name, kept, list(dataset.class_names), {**dataset.info, "left_out_groups": left_out})


def build_dataset(config) -> GroupedDataset:
    """The dataset ``config.dataset`` names, built from the config's data keys."""
    dataset = DATASETS.get(config.dataset)(config)
    if config.dataset not in CAPPED_INSIDE and config.group_max_train_samples is not None:
        dataset = cap_train(dataset, config.group_max_train_samples, config.data_split_seed)
    if config.only_groups is not None:
        dataset = keep_groups(dataset, config.only_groups)
    return dataset


__all__ = [
    "DATASETS", "DataError", "DataFileError", "EvalBatches", "Group", "GroupStratifiedBatches", "GroupedDataset",
    "InputStore", "PairStore", "SPLITS", "Split", "build_dataset", "cap_train", "group_quotas", "train_batches",
]
