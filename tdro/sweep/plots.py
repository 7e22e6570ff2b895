"""Static matplotlib figures of a sweep: optimisation history, parameter importances, pruned trials.

Each function takes an Optuna study (or a ``tdro.sweep.Sweep``) and returns a Figure; display it with
``tdro.viz.show(fig)``. A figure that has nothing to show says why inside its axes instead of failing
(no complete trial yet, importances undefined with fewer than two complete trials, no pruned trial).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MIN_TRIALS_FOR_IMPORTANCE = 2
STATE_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:red", "FAIL": "0.5", "RUNNING": "tab:green"}


def _study(study_or_sweep: Any):
    return getattr(study_or_sweep, "study", study_or_sweep)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _objective_label(study) -> str:
    attrs = study.user_attrs.get("tdro_search_space") or {}
    monitor = (attrs.get("base") or {}).get("monitor", "val_worst_group_acc")
    return f"{monitor} (validation)"


def _maximize(study) -> bool:
    return study.direction.name == "MAXIMIZE"


def plot_history(study_or_sweep: Any) -> Figure:
    """Objective of every complete trial by trial number, with the best value so far."""
    study = _study(study_or_sweep)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if not trials:
        _note(ax, "no complete trial yet")
        ax.set_title(f"Optimisation history: {study.study_name}")
        return fig
    numbers = np.array([t.number for t in trials])
    values = np.array([t.value for t in trials], dtype=float)
    best = np.maximum.accumulate(values) if _maximize(study) else np.minimum.accumulate(values)
    ax.scatter(numbers, values, s=22, color="tab:blue", label="complete trial", zorder=3)
    ax.step(numbers, best, where="post", color="tab:orange", label="best so far")
    others = [t for t in study.get_trials(deepcopy=False) if t.state.name == "PRUNED" and t.intermediate_values]
    if others:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in others]
        ax.scatter([t.number for t in others], last, s=18, marker="x", color="tab:red",
                   label="pruned (last reported)", zorder=2)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_objective_label(study))
    ax.set_title(f"Optimisation history: {study.study_name}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def param_importances(study_or_sweep: Any) -> tuple[dict[str, float] | None, str]:
    """(importances, message): fANOVA importances of the searched keys, or None with the reason they are undefined."""
    import optuna

    study = _study(study_or_sweep)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"parameter importances are undefined with fewer than {MIN_TRIALS_FOR_IMPORTANCE} complete "
                      f"trials (this study has {len(complete)})")
    values = np.array([t.value for t in complete], dtype=float)
    if np.allclose(values, values[0]):
        return None, f"parameter importances are undefined: all {len(complete)} complete trials have the same value"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError) as err:
        return None, f"parameter importances could not be computed: {err}"
    if not importances or any(not math.isfinite(v) for v in importances.values()):
        return None, "parameter importances are undefined for these trials"
    return dict(importances), f"fANOVA importances over {len(complete)} complete trials"


def plot_importances(study_or_sweep: Any) -> Figure:
    """Horizontal bars of parameter importances, or the reason they are undefined."""
    study = _study(study_or_sweep)
    importances, message = param_importances(study)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(len(importances or {}), 2)))
    ax.set_title("Parameter importances")
    if importances is None:
        _note(ax, message)
        return fig
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, normalised)")
    ax.set_xlim(0, 1)
    ax.set_title(f"Parameter importances ({message})", fontsize=10)
    return fig


def plot_intermediate_values(study_or_sweep: Any) -> Figure:
    """Per-epoch validation values: pruned trials in red (where they stopped), complete trials in light blue."""
    study = _study(study_or_sweep)
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.set_title(f"Intermediate values ({len(pruned)} pruned of {len(trials)} trials with reports)")
    if not trials:
        _note(ax, "no trial reported a value yet")
        return fig
    for trial in sorted(trials, key=lambda t: t.state.name == "PRUNED"):
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        is_pruned = trial.state.name == "PRUNED"
        color = STATE_COLORS.get(trial.state.name, "0.5")
        ax.plot(steps, values, color=color, alpha=0.9 if is_pruned else 0.35, lw=1.4 if is_pruned else 1.0,
                marker="o", ms=3)
        if is_pruned:
            ax.plot(steps[-1], values[-1], marker="x", color="tab:red", ms=8, mew=2)
            ax.annotate(f"#{trial.number}", (steps[-1], values[-1]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points", color="tab:red")
    handles = [plt.Line2D([], [], color="tab:red", marker="x", label="pruned (x = stopped)"),
               plt.Line2D([], [], color="tab:blue", alpha=0.35, label="complete")]
    if not pruned:
        ax.text(0.01, 0.02, "no trial was pruned", transform=ax.transAxes, fontsize=8, color="0.35")
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(_objective_label(study))
    ax.grid(alpha=0.3)
    return fig
