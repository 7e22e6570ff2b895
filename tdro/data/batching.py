"""Group-stratified training batches and fixed-order evaluation batches (SPEC §3).

Every training batch is a dict ``group name -> (x, y)`` holding exactly that group's quota.
Inputs are gathered by indexing each group's tensor (or InputStore) with one LongTensor per
batch: no per-item Python calls.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.utils.data

from tdro.data.base import GroupedDataset, SPLITS, train_inputs
from tdro.keys import ConfigError

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

    def epoch_orders(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Draw the next epoch's sample order: per group, (num_batches, quota) positions for x and for y."""
        orders = {}
        for name, split in self.splits.items():
            order = self._draw(name, self.num_batches * self.quotas[name]).view(self.num_batches, -1)
            # one transfer per epoch when the data live on an accelerator
            x_order = order.to(split.x.device) if isinstance(split.x, torch.Tensor) else order
            orders[name] = (x_order, order.to(split.y.device))
        return orders

    def gather(self, positions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, ...]]:
        """One batch from its positions per group (a row of ``epoch_orders``)."""
        batch = {}
        for name, (x_positions, y_positions) in positions.items():
            split = self.splits[name]
            batch[name] = (train_inputs(split.x, x_positions), split.y[y_positions])
            if self.with_index:
                batch[name] += (y_positions,)
        return batch

    def batch_positions(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The next epoch's batches as positions per group; the order is drawn when iteration starts."""
        orders = self.epoch_orders()
        for b in range(self.num_batches):
            yield {name: (x_order[b], y_order[b]) for name, (x_order, y_order) in orders.items()}

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        for positions in self.batch_positions():
            yield self.gather(positions)


class _BatchPositions(torch.utils.data.Sampler):
    """The DataLoader's sampler: each epoch's batch positions, drawn in the main process when an epoch starts."""

    def __init__(self, batches: GroupStratifiedBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        return self.batches.batch_positions()


class _Gatherer(torch.utils.data.Dataset):
    """What a worker runs: positions of one batch -> the batch (decoding images, reading the cache)."""

    def __init__(self, batches: GroupStratifiedBatches) -> None:
        self.batches = batches

    def __getitem__(self, positions: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        return self.batches.gather(positions)


class PrefetchBatches:
    """``GroupStratifiedBatches`` whose batches are prepared ahead in ``num_workers`` worker processes.

    The order is still drawn in the main process from the same generator, when an epoch's iteration
    starts, so the batches, ``state_dict`` and a resumed run are exactly those of the plain sampler;
    workers only gather (decode, read caches) the batches of the epoch in progress, two per worker
    ahead. ``pin_memory`` returns page-locked batches for faster, asynchronous copies to CUDA.
    Workers persist across epochs and end with the process (or its death).
    """

    def __init__(self, batches: GroupStratifiedBatches, num_workers: int, pin_memory: bool = False) -> None:
        on_device = [name for name, split in batches.splits.items() if split.y.device.type != "cpu"
                     or isinstance(split.x, torch.Tensor) and split.x.device.type != "cpu"]
        if num_workers and on_device:
            raise ConfigError(f"key 'num_workers' is {num_workers} but groups {on_device} hold their training data on "
                              "an accelerator, which worker processes cannot read; use num_workers: 0")
        self.batches = batches
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.loader = torch.utils.data.DataLoader(
            _Gatherer(batches), batch_size=None, sampler=_BatchPositions(batches), num_workers=self.num_workers,
            collate_fn=_as_is, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            prefetch_factor=2 if self.num_workers else None,
            generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone (the loader draws a base seed)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, tuple[torch.Tensor, ...]]]:
        for batch in self.loader:
            yield _as_tuples(batch) if self.pin_memory else batch

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.batches.load_state_dict(state)


def _as_is(batch: dict) -> dict:
    """The loader's collate function: a batch is already whole (the default would turn tuples into lists)."""
    return batch


def _as_tuples(value):
    """A pinned batch with its tuples back (pinning returns the parts of a tuple as a list)."""
    if isinstance(value, dict):
        return {name: _as_tuples(part) for name, part in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(part) for part in value)
    return value


def prefetched(batches: GroupStratifiedBatches, num_workers: int, pin_memory: bool | None,
               device: torch.device) -> GroupStratifiedBatches | PrefetchBatches:
    """The training batches as configured (``num_workers``, ``pin_memory``): the sampler itself when neither is on."""
    if pin_memory and device.type != "cuda":
        raise ConfigError(f"key 'pin_memory' is true but the device is {device}; page-locked batches only speed up "
                          "copies to CUDA: use pin_memory: null (on for CUDA) or false")
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    if num_workers == 0 and not pin:
        return batches
    return PrefetchBatches(batches, num_workers, pin)


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
