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


class GroupStratifiedBatches:
    """Epochs of group-stratified batches: ``{group: (x, y)}`` with each group's quota.

    An epoch covers the largest group once: ``ceil(n_largest / quota_largest)`` batches, from a
    fresh permutation (the last batch is topped up from the next permutation, so every batch
    holds every full quota). With ``with_index`` each group's entry is ``(x, y, index)``, index = the
    samples' positions in the group's split (for algorithms that weigh samples). Every other group cycles: it reads a continuous stream of
    permutations that carries over from one epoch to the next, so all its samples are used
    equally often. The order comes from ``generator`` alone (pass a seeded
    ``torch.Generator`` for reproducible epochs); iterating again starts the next epoch.
    """

    def __init__(self, dataset: GroupedDataset, split: str = "train", batch_size: int = 64,
                 mode: str = "proportional", generator: torch.Generator | None = None,
                 with_index: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        self.dataset = dataset
        self.split = split
        self.batch_size = int(batch_size)
        self.mode = mode
        self.generator = generator
        self.with_index = with_index
        self.splits = {name: group.split(split) for name, group in dataset.groups.items()}
        empty = [name for name, s in self.splits.items() if len(s) == 0]
        if empty:
            raise ValueError(f"groups {empty} have no {split} samples; cannot form group-stratified batches")
        sizes = {name: len(s) for name, s in self.splits.items()}
        self.quotas = dict(zip(self.splits, group_quotas(list(sizes.values()), self.batch_size, mode)))
        self.largest = max(sizes, key=lambda name: sizes[name])  # first on ties
        self.num_batches = math.ceil(sizes[self.largest] / self.quotas[self.largest])
        self._streams = {name: torch.zeros(0, dtype=torch.long) for name in self.splits}

    def __len__(self) -> int:
        return self.num_batches

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The unread rest of each cycling group's permutation stream (with the generator, all a resume needs)."""
        return {name: stream.clone() for name, stream in self._streams.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self._streams):
            raise ValueError(f"batch state holds groups {sorted(state)}, expected {sorted(self._streams)}")
        self._streams = {name: stream.clone() for name, stream in state.items()}

    def _draw(self, name: str, length: int) -> torch.Tensor:
        n = len(self.splits[name])
        stream = torch.zeros(0, dtype=torch.long) if name == self.largest else self._streams[name]
        if len(stream) < length:
            fresh = [torch.randperm(n, generator=self.generator) for _ in range(math.ceil((length - len(stream)) / n))]
            stream = torch.cat([stream, *fresh])
        self._streams[name] = stream[length:]
        return stream[:length]

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        orders = {}
        for name, split in self.splits.items():
            order = self._draw(name, self.num_batches * self.quotas[name]).view(self.num_batches, -1)
            # one transfer per epoch when the data live on an accelerator
            x_order = order.to(split.x.device) if isinstance(split.x, torch.Tensor) else order
            orders[name] = (x_order, order.to(split.y.device))
        for b in range(self.num_batches):
            batch = {}
            for name, split in self.splits.items():
                x_order, y_order = orders[name]
                batch[name] = (split.x[x_order[b]], split.y[y_order[b]])
                if self.with_index:
                    batch[name] += (y_order[b],)
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
