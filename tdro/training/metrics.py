"""Evaluation metrics (SPEC §7) from a (group × true × predicted) count tensor kept on the device.

Every batch adds to the counts and per-group loss sums with index_add_ (no host sync, no
per-sample Python); ``compute`` moves them to the CPU once and derives the METRICS dict.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class MetricAccumulator:
    """Accumulates confusion counts per group and per-group loss sums over batches on one device."""

    def __init__(self, group_names: list[str], class_names: list[str], device: torch.device | str) -> None:
        """Zero counts for these groups and classes, allocated on ``device``."""
        self.group_names = list(group_names)
        self.class_names = list(class_names)
        self.device = torch.device(device)
        groups, classes = len(self.group_names), len(self.class_names)
        self.counts = torch.zeros(groups * classes * classes, dtype=torch.int64, device=self.device)
        loss_dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        self.loss_sums = torch.zeros(groups, dtype=loss_dtype, device=self.device)

    def update(
        self,
        group_index: int | torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        per_sample_loss: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: one group index for all rows or a (B,) tensor; loss defaults to per-sample CE."""
        if per_sample_loss is None:
            per_sample_loss = F.cross_entropy(logits.float(), labels, reduction="none")
        classes = len(self.class_names)
        if not isinstance(group_index, torch.Tensor):
            group_index = torch.full_like(labels, int(group_index))
        # cell = (group, true, predicted) flattened; index_add_ avoids bincount's device→host sync on CUDA.
        cells = torch.add(logits.argmax(1), labels, alpha=classes).add_(group_index, alpha=classes * classes)
        self.counts.index_add_(0, cells, torch.ones_like(cells))
        self.loss_sums.index_add_(0, group_index, per_sample_loss.detach().to(self.loss_sums.dtype))

    def compute(self) -> dict:
        """The METRICS dict of ARCHITECTURE.md: JSON-serialisable, None where a quantity has no samples."""
        groups, classes = len(self.group_names), len(self.class_names)
        counts = self.counts.cpu().numpy().reshape(groups, classes, classes)
        loss_sums = self.loss_sums.cpu().numpy().astype(np.float64)
        return metrics_from_counts(counts, loss_sums, self.group_names, self.class_names)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator as float64, NaN where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _py(value: float) -> float | None:
    """A numpy scalar as a Python float, NaN (no samples) as None."""
    return None if np.isnan(value) else float(value)


def metrics_from_counts(
    counts: np.ndarray, loss_sums: np.ndarray, group_names: list[str], class_names: list[str]
) -> dict:
    """METRICS from (G, C, C) confusion counts (group × true × predicted) and (G,) summed losses.

    Groups without samples report None and are left out of worst-group and balanced accuracy.
    ``worst_group`` is the group with the lowest accuracy (first in group order on ties);
    ``worst_group_loss`` is the highest group loss (the GroupDRO objective's worst case).
    Macro precision/recall/F1 follow scikit-learn's ``average="macro", zero_division=0`` over the
    classes that occur in the labels or the predictions.
    """
    sizes = counts.sum(axis=(1, 2))
    correct = np.trace(counts, axis1=1, axis2=2)
    group_acc = _ratio(correct, sizes)
    group_loss = _ratio(loss_sums, sizes)
    present = sizes > 0

    pooled = counts.sum(axis=0)
    true_per_class = pooled.sum(axis=1)
    predicted_per_class = pooled.sum(axis=0)
    hits = np.diag(pooled)
    occurring = (true_per_class + predicted_per_class) > 0
    precision = np.nan_to_num(_ratio(hits, predicted_per_class))
    recall = np.nan_to_num(_ratio(hits, true_per_class))
    f1 = np.nan_to_num(_ratio(2 * hits, true_per_class + predicted_per_class))

    def macro(values: np.ndarray) -> float | None:
        return float(values[occurring].mean()) if occurring.any() else None

    group_class_acc = _ratio(np.diagonal(counts, axis1=1, axis2=2), counts.sum(axis=2))
    worst = int(np.argmin(np.where(present, group_acc, np.inf))) if present.any() else None
    total = int(sizes.sum())
    return {
        "loss": _py(_ratio(loss_sums.sum(), total)),
        "acc": _py(_ratio(correct.sum(), total)),
        "balanced_acc": float(group_acc[present].mean()) if present.any() else None,
        "worst_group_acc": None if worst is None else float(group_acc[worst]),
        "worst_group": None if worst is None else group_names[worst],
        "worst_group_loss": float(group_loss[present].max()) if present.any() else None,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "group_acc": {g: _py(v) for g, v in zip(group_names, group_acc)},
        "group_loss": {g: _py(v) for g, v in zip(group_names, group_loss)},
        "group_size": {g: int(n) for g, n in zip(group_names, sizes)},
        "class_acc": {c: _py(v) for c, v in zip(class_names, _ratio(hits, true_per_class))},
        "group_class_acc": {
            g: {c: _py(v) for c, v in zip(class_names, row)} for g, row in zip(group_names, group_class_acc)
        },
        "confusion": pooled.tolist(),
        "group_confusion": {g: matrix.tolist() for g, matrix in zip(group_names, counts)},
    }
