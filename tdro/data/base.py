"""The one shape of every dataset: groups by name, each with train / val / test splits."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

SPLITS = ("train", "val", "test")
KINDS = ("image", "text", "tabular", "features", "multimodal")


class DataError(ValueError):
    """Data that cannot be used as configured; the message names the file or key and the remedy."""


class DataFileError(DataError, FileNotFoundError):
    """A missing or unreadable data file; the message names the path and where to get the file."""


class InputStore:
    """Lazily materialised inputs (e.g. image files): ``store[LongTensor] -> Tensor`` batch.

    Subclasses implement ``__len__``, ``__getitem__`` (a 1-D LongTensor of positions) and
    ``subset`` (a store over some positions, used when a pool of items is split).
    """

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: torch.Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def subset(self, positions: Sequence[int] | torch.Tensor) -> "InputStore":  # pragma: no cover
        raise NotImplementedError

    def train_batch(self, index: torch.Tensor) -> Any:
        """What a training batch reads: ``self[index]``, or a cheaper form (uint8 images) the trainer finishes on the device."""
        return self[index]


class PairStore(InputStore):
    """Two aligned inputs of the same samples (image and caption): ``store[idx] -> (a[idx], b[idx])``."""

    def __init__(self, first: Any, second: Any) -> None:
        if len(first) != len(second):
            raise ValueError(f"PairStore parts differ in length: {len(first)} vs {len(second)}")
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first[index], self.second[index]

    def subset(self, positions: Sequence[int] | torch.Tensor) -> "PairStore":
        return PairStore(take(self.first, positions), take(self.second, positions))

    def train_batch(self, index: torch.Tensor) -> tuple[Any, Any]:
        return train_inputs(self.first, index), train_inputs(self.second, index)

    def to(self, device: torch.device | str) -> "PairStore":
        return PairStore(move(self.first, device), move(self.second, device))


def take(x: Any, positions: Sequence[int] | torch.Tensor) -> Any:
    """Rows ``positions`` of a tensor or an InputStore (a store stays lazy)."""
    positions = torch.as_tensor(positions, dtype=torch.long)
    if isinstance(x, torch.Tensor):
        return x[positions.to(x.device)]
    return x.subset(positions)


def train_inputs(x: Any, index: torch.Tensor) -> Any:
    """A training batch's inputs: rows of a tensor, or the store's ``train_batch``."""
    return x[index] if isinstance(x, torch.Tensor) else x.train_batch(index)


def batch_to_device(x: torch.Tensor | tuple, device: torch.device) -> torch.Tensor | tuple:
    """A batch's inputs on ``device``: a tensor, or a tuple of tensors for paired inputs."""
    if isinstance(x, tuple):
        return tuple(batch_to_device(part, device) for part in x)
    return x.to(device, non_blocking=True)


def move(x: Any, device: torch.device | str) -> Any:
    """Move a tensor (or a store that supports ``to``) to a device; other stores stay where they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if hasattr(x, "to"):
        return x.to(device)
    return x


@dataclass
class Split:
    """One group's samples in one split.

    ``x`` is indexable by a LongTensor of positions (a tensor or an InputStore); ``y`` holds int64
    class ids; ``index`` holds each sample's id in its source pool (image, row or digit number), so
    that split invariants can be checked and records can point back at the source.
    """

    x: Any
    y: torch.Tensor
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.y = torch.as_tensor(self.y, dtype=torch.long)
        if self.index is not None:
            self.index = torch.as_tensor(self.index, dtype=torch.long)
            if len(self.index) != len(self.y):
                raise ValueError(f"Split index has {len(self.index)} entries but y has {len(self.y)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Split x has {len(self.x)} samples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, positions: Sequence[int] | torch.Tensor) -> "Split":
        positions = torch.as_tensor(positions, dtype=torch.long)
        index = None if self.index is None else self.index[positions]
        return Split(take(self.x, positions), self.y[positions.to(self.y.device)], index)

    def to(self, device: torch.device | str) -> "Split":
        return Split(move(self.x, device), self.y.to(device), self.index)


@dataclass
class Group:
    """A named group: its input kind, default encoder spec and its three splits."""

    name: str
    kind: str
    encoder: str
    input_info: dict
    encoder_options: dict
    train: Split
    val: Split
    test: Split

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)

    def to(self, device: torch.device | str) -> "Group":
        return Group(self.name, self.kind, self.encoder, dict(self.input_info), dict(self.encoder_options),
                     self.train.to(device), self.val.to(device), self.test.to(device))


@dataclass
class GroupedDataset:
    """Groups by name (ordered: the order is the group index used in tensors) and class names.

    ``info`` carries facts about how the data were built: source files, notes such as splits that
    were absent or items that were left out (always reported, never dropped silently).
    """

    name: str
    groups: dict[str, Group]
    class_names: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, group in self.groups.items():
            if key != group.name:
                raise ValueError(f"group stored under {key!r} is named {group.name!r}")

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def group_index(self, name: str) -> int:
        if name not in self.groups:
            from tdro.registry import unknown_choice_message

            raise ValueError(unknown_choice_message("group", name, self.group_names))
        return self.group_names.index(name)

    def sizes(self, split: str = "train") -> dict[str, int]:
        """Number of samples per group in one split."""
        return {name: len(group.split(split)) for name, group in self.groups.items()}

    def to(self, device: torch.device | str) -> "GroupedDataset":
        """A copy whose in-memory tensors live on ``device`` (lazy stores stay on the CPU)."""
        return GroupedDataset(self.name, {n: g.to(device) for n, g in self.groups.items()},
                              list(self.class_names), dict(self.info))

    def summary(self):
        """A table with one row per (group, split): kind, encoder, size and per-class counts."""
        import pandas as pd

        rows = []
        for name, group in self.groups.items():
            for split in SPLITS:
                y = group.split(split).y.cpu()
                counts = torch.bincount(y, minlength=self.num_classes).tolist() if len(y) else [0] * self.num_classes
                row = {"group": name, "split": split, "kind": group.kind, "encoder": group.encoder, "size": len(y)}
                row.update({str(c): n for c, n in zip(self.class_names, counts)})
                rows.append(row)
        return pd.DataFrame(rows).set_index(["group", "split"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}: {g.kind}/{g.encoder} {len(g.train)}/{len(g.val)}/{len(g.test)}"
                          for n, g in self.groups.items())
        return f"GroupedDataset({self.name!r}, {self.num_classes} classes; train/val/test per group: {parts})"
