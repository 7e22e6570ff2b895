"""Group-stratified training batches and fixed-order evaluation batches (SPEC §3).

Every training batch is a dict ``group name -> (x, y)`` holding exactly that group's quota.
Inputs are gathered by indexing each group's tensor (or InputStore) with one LongTensor per
batch: no per-item Python calls.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch

from tdro.data.base import GroupedDataset, SPLITS

MODES = ("proportional", "balanced")


def group_quotas(sizes: Sequence[int], batch_size: int, mode: str = "proportional") -> list[int]:
    """Samples per batch for each group; they sum to ``batch_size`` and are all at least 1.

    ``proportional``: round(B * n_g / N), at least 1, the largest groups absorbing the rounding
    (as the reference's StratifiedGroupSampler). ``balanced``: B // G each, the remainder going
    to the largest groups.
    """
    sizes = [int(n) for n in sizes]
    num_groups = len(sizes)
    if num_groups == 0:
        raise ValueError("group_quotas needs at least one group")
    if mode not in MODES:
        raise ValueError(f"unknown batching mode {mode!r}; allowed: {', '.join(MODES)}")
    if batch_size < num_groups:
        raise ValueError(f"batch_size {batch_size} is smaller than the number of groups ({num_groups}); "
                         f"every batch needs at least one sample of each group: use batch_size >= {num_groups}")
    if any(n <= 0 for n in sizes):
        raise ValueError(f"every group needs at least one sample to be batched, got sizes {sizes}")
    by_size = sorted(range(num_groups), key=lambda g: (-sizes[g], g))
    if mode == "balanced":
        quotas = [batch_size // num_groups] * num_groups
        for g in by_size[: batch_size - sum(quotas)]:
            quotas[g] += 1
        return quotas
    total = sum(sizes)
    quotas = [max(1, round(batch_size * n / total)) for n in sizes]
    while sum(quotas) > batch_size:  # the "at least 1" rule overshot: take from the largest quotas
        g = max(range(num_groups), key=lambda i: (quotas[i], sizes[i]))
        quotas[g] -= 1
    while sum(quotas) < batch_size:
        quotas[by_size[0]] += 1
    return quotas


def _permutation_stream(n: int, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """``length`` positions from consecutive random permutations of range(n) (a group cycles)."""
    repeats = math.ceil(length / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(repeats)])[:length]


class GroupStratifiedBatches:
    """An epoch of group-stratified batches: ``{group: (x, y)}`` with each group's quota.

    An epoch has ``max_g ceil(n_g / quota_g)`` batches: the group that needs the most batches
    (with proportional quotas, the largest group) is covered once, every other group at least
    once, cycling through fresh permutations. Every batch holds every group's full quota, so the
    last batch tops the covering group up from its next permutation. The order comes from
    ``generator`` alone (pass a seeded ``torch.Generator`` for reproducible epochs).
    """

    def __init__(self, dataset: GroupedDataset, split: str = "train", batch_size: int = 64,
                 mode: str = "proportional", generator: torch.Generator | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.dataset = dataset
        self.split = split
        self.batch_size = int(batch_size)
        self.mode = mode
        self.generator = generator
        self.splits = {name: group.split(split) for name, group in dataset.groups.items()}
        empty = [name for name, s in self.splits.items() if len(s) == 0]
        if empty:
            raise ValueError(f"groups {empty} have no {split} samples; cannot form group-stratified batches")
        sizes = [len(s) for s in self.splits.values()]
        self.quotas = dict(zip(self.splits, group_quotas(sizes, self.batch_size, mode)))
        self.num_batches = max(math.ceil(len(s) / self.quotas[n]) for n, s in self.splits.items())

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        orders = {}
        for name, split in self.splits.items():
            quota = self.quotas[name]
            order = _permutation_stream(len(split), self.num_batches * quota, self.generator)
            order = order.view(self.num_batches, quota)
            # one transfer per epoch when the data live on an accelerator
            x_order = order.to(split.x.device) if isinstance(split.x, torch.Tensor) else order
            orders[name] = (x_order, order.to(split.y.device))
        for b in range(self.num_batches):
            batch = {}
            for name, split in self.splits.items():
                x_order, y_order = orders[name]
                batch[name] = (split.x[x_order[b]], split.y[y_order[b]])
            yield batch


class EvalBatches:
    """Fixed-order batches over one split: each group's samples exactly once, in stored order.

    Batches hold one group each (``{group: (x, y)}`` with up to ``batch_size`` samples), groups in
    dataset order, so predictions can be concatenated back per group.
    """

    def __init__(self, dataset: GroupedDataset, split: str = "val", batch_size: int = 512) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.splits = {name: group.split(split) for name, group in dataset.groups.items()}
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return sum(math.ceil(len(s) / self.batch_size) for s in self.splits.values())

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        for name, split in self.splits.items():
            for start in range(0, len(split), self.batch_size):
                stop = min(start + self.batch_size, len(split))
                if isinstance(split.x, torch.Tensor):
                    x = split.x[start:stop]
                else:
                    x = split.x[torch.arange(start, stop)]
                yield {name: (x, split.y[start:stop])}


def train_batches(dataset: GroupedDataset, config, generator: torch.Generator | None = None
                  ) -> GroupStratifiedBatches:
    """The training batches a config asks for (``batch_size``, ``batching``)."""
    return GroupStratifiedBatches(dataset, "train", config.batch_size, config.batching, generator)
