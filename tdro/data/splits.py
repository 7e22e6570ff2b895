"""Reproducible partitions: stratified hold-outs, class-skewed subsets, per-group caps.

Every function takes a ``numpy.random.Generator`` made by :func:`split_rng` from
``data_split_seed`` (never from ``seed``), so the partition is fixed independently of the
initialisation and batch-order seed. Positions are numpy int64 arrays into the caller's pool.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

from tdro.data.base import DataError


def split_rng(data_split_seed: int, *salt: int | str) -> np.random.Generator:
    """A generator for one partition step; ``salt`` (e.g. the dataset and group) keeps steps independent."""
    words = [int(data_split_seed) & 0xFFFFFFFF]
    for s in salt:
        words.append(s & 0xFFFFFFFF if isinstance(s, int) else zlib.crc32(str(s).encode()))
    return np.random.default_rng(words)


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal integers (the first ones get the remainder)."""
    base, extra = divmod(int(total), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _held_count(n: int, frac: float) -> int:
    if frac <= 0 or n == 0:
        return 0
    held = int(round(frac * n))
    if n >= 2:  # keep at least one sample on each side of the cut
        held = min(max(held, 1), n - 1)
    return held


def stratified_holdout(labels: np.ndarray, frac: float, rng: np.random.Generator,
                       positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``positions`` (default all) into (kept, held), holding out ``frac`` of every class."""
    labels = np.asarray(labels)
    positions = np.arange(len(labels)) if positions is None else np.asarray(positions, dtype=np.int64)
    kept, held = [], []
    for c in np.unique(labels[positions]):
        members = positions[labels[positions] == c]
        members = members[rng.permutation(len(members))]
        h = _held_count(len(members), frac)
        held.append(members[:h])
        kept.append(members[h:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(kept), cat(held)


def train_val_test(labels: np.ndarray, test_frac: float, val_frac: float, rng: np.random.Generator,
                   positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test: ``test_frac`` of all, then ``val_frac`` of the rest."""
    rest, test = stratified_holdout(labels, test_frac, rng, positions)
    train, val = stratified_holdout(labels, val_frac, rng, rest)
    return train, val, test


def deal(positions: np.ndarray, labels: np.ndarray, weights: Sequence[float], rng: np.random.Generator
         ) -> list[np.ndarray]:
    """Partition ``positions`` into len(weights) disjoint parts, stratified by class, sized by weight."""
    positions = np.asarray(positions, dtype=np.int64)
    labels = np.asarray(labels)
    weights = np.asarray(weights, dtype=float)
    weights = weights / weights.sum()
    parts: list[list[np.ndarray]] = [[] for _ in weights]
    for c in np.unique(labels[positions]):
        members = positions[labels[positions] == c]
        members = members[rng.permutation(len(members))]
        bounds = np.round(np.cumsum(weights) * len(members)).astype(int)
        start = 0
        for k, stop in enumerate(bounds):
            parts[k].append(members[start:stop])
            start = stop
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def skewed_counts(size: int, majority: Sequence[int], majority_frac: float, num_classes: int) -> dict[int, int]:
    """Per-class counts of a skewed subset: ``majority_frac`` of ``size`` spread over the majority
    classes, the rest over the other classes. An empty majority list means a balanced subset."""
    majority = [int(c) for c in majority]
    minority = [c for c in range(num_classes) if c not in majority]
    if not majority:
        return dict(zip(range(num_classes), spread(size, num_classes)))
    n_major = int(round(majority_frac * size))
    if not minority:
        n_major = size
    counts = dict(zip(majority, spread(n_major, len(majority))))
    counts.update(zip(minority, spread(size - n_major, len(minority))))
    return counts


def skewed_sample(positions: np.ndarray, labels: np.ndarray, size: int, majority: Sequence[int],
                  majority_frac: float, num_classes: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Draw a class-skewed subset of ``size`` from ``positions`` without replacement.

    The reference topped short classes up *with replacement* (duplicated samples); here a class
    that is too small is an error naming ``what`` (the keys that set the size) and the shortfall.
    """
    positions = np.asarray(positions, dtype=np.int64)
    labels = np.asarray(labels)
    bad = [c for c in majority if not 0 <= int(c) < num_classes]
    if bad:
        raise DataError(f"{what}: majority classes {bad} are not class ids 0..{num_classes - 1}")
    if len(set(int(c) for c in majority)) != len(majority):
        raise DataError(f"{what}: majority classes {list(majority)} repeat a class")
    if len(majority) == num_classes and majority_frac < 1:
        raise DataError(f"{what}: the majority classes list every class, so majority_frac={majority_frac} "
                        "has no minority classes to draw from; list fewer classes or use [] for a balanced group")
    chosen = []
    for c, n in skewed_counts(size, majority, majority_frac, num_classes).items():
        members = positions[labels[positions] == c]
        if n > len(members):
            raise DataError(
                f"{what}: needs {n} training samples of class {c} but only {len(members)} are left in the pool "
                f"(after the val/test hold-out and any other group's draw); lower the size or majority_frac, "
                f"or provide more data (e.g. the official train split)")
        chosen.append(members[rng.permutation(len(members))[:n]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_cap(positions: np.ndarray, labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``positions``, keeping the class proportions (each present class keeps >= 1
    when the cap allows)."""
    positions = np.asarray(positions, dtype=np.int64)
    if cap >= len(positions):
        return positions
    labels = np.asarray(labels)
    classes, counts = np.unique(labels[positions], return_counts=True)
    share = counts / counts.sum() * cap
    take = np.floor(share).astype(int)
    if cap >= len(classes):
        take = np.maximum(take, 1)
    while take.sum() > cap:
        take[np.argmax(take)] -= 1
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while take.sum() < cap:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    chosen = []
    for c, n in zip(classes, take):
        members = positions[labels[positions] == c]
        chosen.append(members[rng.permutation(len(members))[:n]])
    return np.sort(np.concatenate(chosen))


def resolve_per_group(value, group_names: Sequence[str], key: str) -> list:
    """A per-group setting given as a list (by position) or a mapping (by group name)."""
    if value is None:
        return [None] * len(group_names)
    if isinstance(value, dict):
        unknown = [k for k in value if k not in group_names]
        if unknown:
            raise DataError(f"{key}: unknown group(s) {unknown}; this dataset's groups are {list(group_names)}")
        return [value.get(name) for name in group_names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(group_names):
            raise DataError(f"{key} has {len(value)} entries but the dataset has {len(group_names)} groups "
                            f"({', '.join(group_names)}); give one entry per group (null = no setting) "
                            "or a mapping by group name")
        return list(value)
    raise DataError(f"{key} must be a list (one entry per group) or a mapping by group name, got {value!r}")


def check_caps(caps: list, group_names: Sequence[str], key: str = "group_max_train_samples") -> list:
    for name, cap in zip(group_names, caps):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise DataError(f"{key}: the cap for group {name!r} must be a positive integer or null, got {cap!r}")
    return caps
