"""Figures of a phase (``tdro.phases.PhaseResult``): arms overlaid, GroupDRO weights per arm, impact with CIs."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tdro.runs import load_run
from tdro.viz.static import _empty, plot_group_weights, plot_metric_curves


def _arm_runs(result) -> tuple[list, dict[str, list[int]]]:
    runs, members = [], {}
    labels = {plan.name: plan.arm.label for plan in result.plan.arms}
    for row in result.runs.itertuples():
        members.setdefault(labels.get(row.arm, row.arm), []).append(len(runs))
        runs.append(load_run(row.run_dir))
    return runs, members


def plot_arm_curves(result, metrics=("val.worst_group_acc", "val.acc", "train.loss")) -> Figure:
    """One panel per metric: each arm's mean over seeds per epoch (band: ± std)."""
    runs, members = _arm_runs(result)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics) + 2.5, 3.8), constrained_layout=True,
                             squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes[0], metrics)):
        plot_metric_curves(runs, metric, ax=ax, aggregate=members)
        if i < len(metrics) - 1 and ax.get_legend() is not None:
            ax.get_legend().remove()
    fig.suptitle(f"{result.plan.spec.title}: arms overlaid (mean ± std over seeds {result.plan.seeds})")
    return fig


def plot_arm_weights(result, seed: int | None = None) -> Figure:
    """GroupDRO weights over steps, one panel per arm (first seed by default); ERM arms say so."""
    seed = result.plan.seeds[0] if seed is None else seed
    rows = result.runs[result.runs["seed"] == seed]
    labels = {plan.name: plan.arm.label for plan in result.plan.arms}
    runs = [load_run(p) for p in rows["run_dir"]]
    if not any(run.config.get("groupdro_enabled") for run in runs):
        fig, ax = plt.subplots(figsize=(8, 1.4), constrained_layout=True)
        _empty(ax, "GroupDRO is off in every arm of this phase (ERM): no group weights")
        ax.set_title(f"{result.plan.spec.title}: GroupDRO weights per arm")
        return fig
    n = max(len(rows), 1)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.0 * nrows), constrained_layout=True, squeeze=False)
    if rows.empty:
        _empty(axes[0, 0], f"no runs for seed {seed}")
    for ax, row, run in zip(axes.flat, rows.itertuples(), runs):
        plot_group_weights(run, ax=ax)
        ax.set_title(f"{labels.get(row.arm, row.arm)} (seed {seed})", fontsize=9)
    for ax in list(axes.flat)[len(rows):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.plan.spec.title}: GroupDRO weights per arm")
    return fig


def plot_impact(table: pd.DataFrame) -> Figure:
    """Paired differences to the baseline (percentage points) with their confidence intervals, per arm and metric.

    ``table`` is ``tdro.phases.impact_table``'s numeric table; arms that do not apply are labelled."""
    arms = [a for a in table.index if table.loc[a, "status"] != "baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.55 * max(len(arms), 2) + 1.6), constrained_layout=True, sharey=True)
    y = np.arange(len(arms))[::-1]
    for ax, metric, title in zip(axes, ("worst_group_acc", "acc"), ("Δ worst-group acc (test)", "Δ acc (test)")):
        for yi, arm in zip(y, arms):
            r = table.loc[arm]
            if r["status"] == "not applicable":
                ax.text(0, yi, "not applicable", ha="center", va="center", fontsize=8, color="0.45")
                continue
            diff = 100 * r[f"{metric}_diff"]
            low, high = 100 * r[f"{metric}_ci_low"], 100 * r[f"{metric}_ci_high"]
            if not math.isnan(low):
                ax.errorbar(diff, yi, xerr=[[diff - low], [high - diff]], fmt="o", color="C0", capsize=4)
            else:
                ax.plot(diff, yi, "o", color="C0", mfc="white")
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.set(title=f"{title}, pp vs baseline (95% CI)", xlabel="percentage points")
    axes[0].set_yticks(y, [table.loc[a, "label"] for a in arms])
    return fig
