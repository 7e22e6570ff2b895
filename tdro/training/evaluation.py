"""Evaluation over one split: fixed-order per-group batches through the group's encoder and the head.

Inputs move to the device once per batch. A group's logits stay on the device until its last batch,
then one ``MetricAccumulator.update`` counts them there; the counts reach the CPU once per evaluation.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from tdro.data.base import batch_to_device
from tdro.training.distributed import Distributed
from tdro.training.metrics import MetricAccumulator

# eval_batch_size: null picks by device. On CPU, with the trainer's kept host memory (training.host_memory), CNN
# evaluation runs at the same rate from batch 128 to 1024 (with glibc's defaults it halved, from page faults), so
# the smaller batch, which holds less memory; accelerators want large batches.
EVAL_BATCH_SIZES = {"cpu": 128}
ACCELERATOR_EVAL_BATCH_SIZE = 1024


def eval_batch_size(batch_size: int | None, device: torch.device) -> int:
    """``batch_size`` as given, or the device's default when it is None (the ``eval_batch_size`` key's null)."""
    return EVAL_BATCH_SIZES.get(device.type, ACCELERATOR_EVAL_BATCH_SIZE) if batch_size is None else batch_size


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode under torch.inference_mode, restoring the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _forward_group(
    model: nn.Module,
    name: str,
    part: Any,
    device: torch.device,
    batch_size: int | None,
    autocast_dtype: torch.dtype | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(latents, logits) of one group's split in stored order, batch by batch, inputs moved per batch."""
    batch_size = eval_batch_size(batch_size, device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(part.y), batch_size):
        stop = min(start + batch_size, len(part.y))
        x = part.x[start:stop] if isinstance(part.x, torch.Tensor) else part.x[torch.arange(start, stop)]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            latents, logits = model({name: batch_to_device(x, device)})
        yield latents[name], logits[name]


def _split_parts(dataset: Any, split: str) -> dict[str, Any]:
    """Each group's Split for ``split`` (train, val or test), in dataset order."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; allowed: train, val, test")
    return {name: getattr(group, split) for name, group in dataset.groups.items()}


def _stacked(chunks: list[torch.Tensor], empty: torch.Tensor) -> np.ndarray:
    """Concatenated device chunks as one numpy array (``empty`` when there are none)."""
    return (torch.cat(chunks) if chunks else empty).cpu().numpy()


def evaluate(
    model: nn.Module,
    dataset: Any,
    split: str,
    device: torch.device | str,
    batch_size: int | None,
    autocast_dtype: torch.dtype | None = None,
    distributed: Distributed | None = None,
) -> dict:
    """METRICS (ARCHITECTURE.md) of ``model`` on one split of every group, with per-sample cross-entropy.

    ``distributed``: this rank evaluates every world-th sample of each group and the counts are summed
    over ranks, so every rank returns the metrics of the whole split.
    """
    device = torch.device(device)
    accumulator = MetricAccumulator(list(dataset.groups), list(dataset.class_names), device)
    outputs = []
    with _inference(model):
        for index, (name, part) in enumerate(_split_parts(dataset, split).items()):
            if distributed is not None:
                part = part.subset(distributed.shard(len(part.y)))
            if not len(part.y):
                continue
            batches = _forward_group(model, name, part, device, batch_size, autocast_dtype)
            outputs.append((index, torch.cat([logits for _, logits in batches]), part.y.to(device)))
        # One update per group, after all forward passes: per-batch metric kernels, or kernels between
        # the groups' forward passes, cost more than small (tabular) forward passes themselves.
        for index, logits, labels in outputs:
            accumulator.update(index, logits, labels)
    if distributed is not None:
        distributed.sum_(accumulator.counts)
        distributed.sum_(accumulator.loss_sums)
    return accumulator.compute()


def forward_only(
    model: nn.Module, dataset: Any, split: str, device: torch.device | str, batch_size: int | None
) -> int:
    """The bare forward pass of ``evaluate`` (same batching, no metrics); returns the number of samples."""
    device = torch.device(device)
    samples = 0
    with _inference(model):
        for name, part in _split_parts(dataset, split).items():
            for _, logits in _forward_group(model, name, part, device, batch_size, None):
                samples += len(logits)
    return samples


def collect_latents(
    model: nn.Module,
    dataset: Any,
    split: str,
    device: torch.device | str,
    batch_size: int | None,
    max_per_group: int | None = None,
) -> dict[str, Any]:
    """Latents (N, k) float32, labels (N,) and group index (N,) as numpy arrays, plus group and class names.

    ``max_per_group`` keeps that many evenly spaced samples of each larger group (deterministic).
    """
    device = torch.device(device)
    parts = _split_parts(dataset, split)
    if max_per_group is not None:
        if max_per_group < 1:
            raise ValueError(f"max_per_group must be at least 1 or None, got {max_per_group}")
        parts = {
            name: part if len(part.y) <= max_per_group
            else part.subset(torch.arange(max_per_group) * len(part.y) // max_per_group)
            for name, part in parts.items()
        }
    latents, labels, groups = [], [], []
    with _inference(model):
        for index, (name, part) in enumerate(parts.items()):
            latents += [z.float() for z, _ in _forward_group(model, name, part, device, batch_size, None)]
            labels.append(part.y)
            groups.append(torch.full_like(part.y, index))
    return {
        "latents": _stacked(latents, torch.zeros(0, 0)),
        "labels": _stacked(labels, torch.zeros(0, dtype=torch.int64)),
        "group": _stacked(groups, torch.zeros(0, dtype=torch.int64)),
        "group_names": list(parts),
        "class_names": list(dataset.class_names),
    }
