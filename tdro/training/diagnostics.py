"""Diagnostics that explain a result: latent alignment, whether GroupDRO acted, whether selection fell in a warm-up.

- **Alignment**, every epoch on validation (``alignment``): the W₂ (Bures–Wasserstein) distance of
  each group's class-conditional latents (a Gaussian fit: mean and unbiased covariance) to its class
  anchor, and between the groups of each class. It is the quantity the anchor method claims to
  reduce. Computed in float64 by ``tdro.objectives.gaussian``, all (group, class) pairs at once.
- **GroupDRO that never acted** (``q_deviation``): the largest |q − q₀| over units, q₀ the initial
  weights, at every epoch end and logged step; below ``Q_MOVED_THRESHOLD`` q never left q₀.
- **Selection in a warm-up** (``active_warmups``): the selected epoch lies within an epoch count
  during which q was held, the learning rate warmed up or the backbone was frozen.

``summarize`` turns a run's records into the flat scalars of ``summary.json``'s ``diagnostics``;
``diagnostic_notes`` into the sentences reports and ``python -m tdro show`` print. Epochs are
1-based, as in every record (epoch e = after e passes over the training data).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tdro.config import Config
    from tdro.models.anchors import GaussianAnchors

Q_MOVED_THRESHOLD = 0.01  # max |q − q₀| below this: GroupDRO's weights never moved
PER_CLASS_LIMIT = 100  # (group, class) pairs up to which the per-class W₂ to the anchors is recorded too
PAIR_SEPARATOR = "|"  # between-group keys: "<group a>|<group b>"
WARMUP_MEANINGS = {"groupdro_warmup_epochs": "GroupDRO's q held at its initial value",
                   "lr_warmup_epochs": "the learning rate still warming up",
                   "freeze_backbone_epochs": "the pretrained backbone frozen"}


# --------------------------------------------------------------------------------------------- alignment
def gaussian_fits(latents: torch.Tensor, labels: torch.Tensor, group_ids: torch.Tensor, num_classes: int):
    """Per (group, class) Gaussian fits in float64: (ClassMoments, covariances S, factors F with F Fᵀ = S).

    F is the thinner of the sample factor Xᵀ/√(n−1) (k × n_max) and the eigen-root (k × k), so the
    small matrices whose eigenvalues W₂ takes are at most min(n_max, k) wide. Pairs with fewer than
    2 samples have no covariance and are left out.
    """
    import torch

    from tdro.objectives.gaussian import class_moments

    moments = class_moments(latents.double(), labels, num_classes, group_ids, min_count=2)
    covariance = moments.covariance()
    _, n_max, k = moments.centred.shape
    if n_max <= k:
        dof = (moments.counts - 1).to(covariance.dtype)
        factor = moments.centred.transpose(1, 2) / dof.sqrt()[:, None, None]
    else:
        values, vectors = torch.linalg.eigh(covariance)
        factor = vectors * values.clamp_min(0.0).sqrt()[:, None, :]
    return moments, covariance, factor


def _distance(squared: torch.Tensor) -> torch.Tensor:
    """W₂ from W₂² (round-off may leave a tiny negative W₂² for identical Gaussians)."""
    return squared.clamp_min(0.0).sqrt()


def _means_by(values: torch.Tensor, index: torch.Tensor, size: int) -> list[float | None]:
    """Mean of ``values`` per ``index`` in range(size); None where an index has no value."""
    import torch

    sums = torch.zeros(size, dtype=values.dtype).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=size)
    return [None if n == 0 else s for s, n in zip((sums / counts.clamp_min(1)).tolist(), counts.tolist())]


def alignment(latents: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
              group_ids: torch.Tensor | np.ndarray, anchors: GaussianAnchors | None,
              group_names: Sequence[str], class_names: Sequence[str]) -> dict[str, Any]:
    """W₂ of each group's class-conditional Gaussian fit to its class anchor and to the other groups' fits.

    Returns ``{"to_anchor": {group: mean over classes}, "between_groups": {"a|b": mean over the
    classes both have}}`` and, when groups × classes ≤ ``PER_CLASS_LIMIT``, ``"to_anchor_per_class":
    {group: {class: W₂}}``; None where a group (or pair) has no class with 2 samples. ``to_anchor``
    parts are left out when ``anchors`` is None.
    """
    import torch

    from tdro.objectives.gaussian import factored_bures_wasserstein_sq

    latents = torch.as_tensor(latents).cpu()
    labels = torch.as_tensor(labels).long().cpu()
    group_ids = torch.as_tensor(group_ids).long().cpu()
    num_groups, num_classes = len(group_names), len(class_names)
    moments, covariance, factor = gaussian_fits(latents, labels, group_ids, num_classes)
    groups, classes = moments.groups, moments.classes
    result: dict[str, Any] = {}
    if anchors is not None:
        with torch.no_grad():
            anchor_means = anchors.means.detach().cpu().double().index_select(0, classes)
            anchor_covariance = anchors.covariance(torch.float64).detach().cpu().index_select(0, classes)
        to_anchor = _distance(factored_bures_wasserstein_sq(anchor_means, anchor_covariance, moments.means,
                                                            covariance, factor))
        result["to_anchor"] = dict(zip(group_names, _means_by(to_anchor, groups, num_groups)))
        if num_groups * num_classes <= PER_CLASS_LIMIT:
            detail: dict[str, dict[str, float]] = {name: {} for name in group_names}
            for g, c, value in zip(groups.tolist(), classes.tolist(), to_anchor.tolist()):
                detail[group_names[g]][class_names[c]] = value
            result["to_anchor_per_class"] = detail
    row = torch.full((num_groups, num_classes), -1, dtype=torch.long)
    row[groups, classes] = torch.arange(moments.num)
    between: dict[str, float | None] = {}
    for a, b in itertools.combinations(range(num_groups), 2):
        both = (row[a] >= 0) & (row[b] >= 0)
        ra, rb = row[a][both], row[b][both]
        key = f"{group_names[a]}{PAIR_SEPARATOR}{group_names[b]}"
        between[key] = None if not len(ra) else _distance(factored_bures_wasserstein_sq(
            moments.means[ra], covariance[ra], moments.means[rb], covariance[rb], factor[rb])).mean().item()
    result["between_groups"] = between
    return result


# --------------------------------------------------------------------------------------------- GroupDRO, warm-ups
def q_deviation(q: Mapping[str, float] | None, initial: Mapping[str, float] | None) -> float | None:
    """max over units of |q − q₀| (None without weights)."""
    if not q or not initial:
        return None
    return max(abs(q[unit] - initial[unit]) for unit in initial)


def group_weight(q: Mapping[str, float] | None, group: str) -> float | None:
    """A group's weight in q: its own unit, or the sum of its (group, class) cells ``group/class``."""
    if not q:
        return None
    if group in q:
        return q[group]
    cells = [value for unit, value in q.items() if unit.split("/")[0] == group]
    return sum(cells) if cells else None


def active_warmups(config: Config, has_backbone: bool) -> dict[str, int]:
    """{key: epochs} of this run's warm-ups: q held (algorithms with that key), LR warm-up, frozen backbone."""
    from tdro.algorithms import ALGORITHMS

    counts = {"groupdro_warmup_epochs": config.groupdro_warmup_epochs
              if "groupdro_warmup_epochs" in ALGORITHMS.get(config.algorithm).key_names() else 0,
              "lr_warmup_epochs": config.lr_warmup_epochs,
              "freeze_backbone_epochs": config.freeze_backbone_epochs if has_backbone else 0}
    return {name: value for name, value in counts.items() if value > 0}


# --------------------------------------------------------------------------------------------- summary
def _overall(alignment_part: Mapping[str, float | None] | None) -> float | None:
    """Mean over groups (or pairs) of a per-epoch alignment entry."""
    values = [v for v in (alignment_part or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def summarize(history: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]], selected_epoch: int,
              initial_q: Mapping[str, float] | None, warmups: Mapping[str, int]) -> dict[str, Any]:
    """The flat scalars of ``summary.json``'s ``diagnostics``, from the run's records, so study tables can show them."""
    by_epoch = {record["epoch"]: record for record in history}
    selected = by_epoch.get(selected_epoch, {})
    first = history[0] if history else {}
    last = history[-1] if history else {}
    out: dict[str, Any] = {}
    for part in ("to_anchor", "between_groups"):
        for label, record in (("first", first), ("selected", selected), ("last", last)):
            out[f"alignment_{part}_{label}"] = _overall((record.get("alignment") or {}).get(part))
    worst = [v for v in ((selected.get("alignment") or {}).get("to_anchor") or {}).values() if v is not None]
    out["alignment_to_anchor_worst_group_selected"] = max(worst) if worst else None
    deviations = [d for d in (q_deviation(r.get("q"), initial_q) for r in [*history, *steps]) if d is not None]
    out["q_max_deviation"] = max(deviations) if deviations else None
    out["q_deviation_selected"] = q_deviation(selected.get("q"), initial_q)
    out["q_moved"] = None if out["q_max_deviation"] is None else out["q_max_deviation"] >= Q_MOVED_THRESHOLD
    within = [name for name, epochs in warmups.items() if selected_epoch <= epochs]
    out["selected_in_warmup"] = bool(within)
    out["selected_in_warmup_of"] = ",".join(within) or None
    out.update(warmups)
    return out


def _number(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def diagnostic_notes(summary: Mapping[str, Any]) -> list[str]:
    """Sentences that explain a finished run: a selection within a warm-up, whether GroupDRO acted, alignment."""
    diagnostics = summary.get("diagnostics")
    if not diagnostics:
        return []
    epoch = summary.get("selected_epoch")
    notes = []
    for name in (diagnostics.get("selected_in_warmup_of") or "").split(","):
        if name:
            notes.append(f"WARNING: the selected epoch {epoch} lies within the warm-up ({name} = {diagnostics[name]}: "
                         f"{WARMUP_MEANINGS.get(name, 'warm-up')}); the selected model did not see the full method.")
    largest = diagnostics.get("q_max_deviation")
    if largest is not None:
        initial = summary.get("initial_q") or {}
        start = "uniform" if len(set(initial.values())) <= 1 else "their initial values"
        measured = (f"largest |q − q₀| over the run {_number(largest)}, "
                    f"{_number(diagnostics.get('q_deviation_selected'))} at the selected epoch")
        if largest < Q_MOVED_THRESHOLD:
            notes.append(f"GroupDRO's weights never moved from {start} ({measured}; below {Q_MOVED_THRESHOLD}): "
                         f"GroupDRO did not act in this run, so its result is not evidence about GroupDRO "
                         f"(raise groupdro_eta, train longer, or shorten groupdro_warmup_epochs).")
        else:
            notes.append(f"GroupDRO's weights moved from {start} ({measured}).")
    for part, what, over in (("to_anchor", "to the class anchors", "groups"),
                             ("between_groups", "between the groups of a class", "group pairs")):
        first, chosen = diagnostics.get(f"alignment_{part}_first"), diagnostics.get(f"alignment_{part}_selected")
        if first is not None or chosen is not None:
            notes.append(f"W₂ {what} (validation, mean over {over} and classes): {_number(first)} after epoch 1, "
                         f"{_number(chosen)} at the selected epoch {epoch}.")
    return notes
