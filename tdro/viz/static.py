"""Static figures and tables of run records (matplotlib/seaborn): what the reports show without a kernel.

Every function reads a run's records (``tdro.runs``: ``config.yaml``, ``history.jsonl``,
``steps.jsonl``, ``summary.json``, ``latents/epoch_*.npz``), never the model, so a report can be
re-rendered without retraining. Single-run functions take a run directory or a loaded
``tdro.runs.Run``; multi-run functions take a list of them. Figures are returned (not shown).

Groups are coloured by ``group_colors`` (Okabe–Ito, keyed by the dataset's group order), so a group
keeps its colour in every figure of a run, a study and a report. ``show(fig, save_as=...)`` also
writes the figure as PNG and PDF; ``latent_animation`` is the latent evolution as a self-contained
HTML/JS player (no network, no kernel).
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine, TightLayoutEngine
from matplotlib.patches import Ellipse

from tdro.runs import Run, load_run
from tdro.training.diagnostics import PAIR_SEPARATOR, WARMUP_MEANINGS, diagnostic_notes

MARKERS = ("o", "^", "s", "D", "P", "X", "v", "*")
LINE_STYLES = ("-", "--", "-.", ":")
LOSS_PARTS = ("cls", "fit", "sep")
# Okabe & Ito (2008), "Color Universal Design": 8 colours told apart under protanopia, deuteranopia and
# tritanopia. Yellow and black come last: yellow is faint on white, black is the reference lines' colour.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000")
REFERENCE_COLOR = "0.3"  # per-epoch worst group, train accuracy: lines that are no group
FIGURE_FORMATS = ("png", "pdf")
SAVE_DPI = 200  # of the saved PNG
METRIC_LABELS = {
    "acc": "accuracy", "worst_group_acc": "worst-group acc", "balanced_acc": "balanced acc", "loss": "loss",
    "worst_group_loss": "worst-group loss", "macro_f1": "macro F1", "worst_group": "worst group",
}


# --------------------------------------------------------------------------------------------- helpers
def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes; the figure is closed."""
    from io import BytesIO

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches=_bbox_inches(fig))
    plt.close(fig)
    return buffer.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of PNG bytes, read from their header (no decoding)."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def figure_description(fig: Figure) -> str:
    """A one-line text description of a figure (its title and panel titles), for alt text."""
    parts = [fig._suptitle.get_text()] if getattr(fig, "_suptitle", None) is not None else []
    parts += [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    return "; ".join(dict.fromkeys(p for p in parts if p)) or "figure"


def save_figure(fig: Figure, path: str | Path, dpi: int = SAVE_DPI, background: bool = False) -> list[Path]:
    """Write a figure as ``<path>.png`` and ``<path>.pdf`` (for papers), creating the folder; the figure stays open.

    With ``background`` the PDF is written by a forked child while the caller goes on (``wait_for_figures``);
    off Linux (no fork on Windows; forking is unsafe under macOS's system frameworks) it is written here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_name(f"{path.name}.{fmt}") for fmt in FIGURE_FORMATS]
    png, *others = written
    bbox_inches = _bbox_inches(fig)
    fig.savefig(png, dpi=dpi, bbox_inches=bbox_inches)
    for target in others:
        if background and sys.platform == "linux":
            _write_in_child(fig, target, dpi, bbox_inches)
        else:
            fig.savefig(target, dpi=dpi, bbox_inches=bbox_inches)
    return written


def _bbox_inches(fig: Figure) -> str | None:
    """``"tight"`` only for a figure without a layout engine: one with constrained or tight layout already fits
    its canvas, and a tight crop would draw it twice (10–37 % of a figure's ``show``, bench/report_figures.py)."""
    return None if isinstance(fig.get_layout_engine(), (ConstrainedLayoutEngine, TightLayoutEngine)) else "tight"


@dataclass
class _FigureWriter:
    """A forked child writing one figure file; ``errors`` is the read end of the pipe its error comes through."""

    pid: int
    errors: int
    target: Path


_FIGURE_WRITERS: list[_FigureWriter] = []


def _write_in_child(fig: Figure, target: Path, dpi: int, bbox_inches: str | None) -> None:
    """Write ``target`` from a forked copy of this process, so the caller goes on drawing on another core.

    The child sees the figure as it is now and writes ``<target>.part``, renamed when complete, so a
    reader never finds half a file; ``wait_for_figures`` reports its failure.
    """
    import matplotlib.backends.backend_pdf  # noqa: F401 (imported here once, not in every child)

    _reap_figure_writers(block=len(_FIGURE_WRITERS) >= (os.cpu_count() or 1))
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():  # Python ≥ 3.12 warns of forking with threads; the child only writes a file
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never returns, never touches the parent's streams (a kernel's belong to its sockets)
        os.close(read_end)
        status = 1
        part = target.with_name(target.name + ".part")
        try:
            os.setsid()  # out of the kernel's process group: interrupting or killing the kernel signals that group
            logging.disable(logging.CRITICAL)
            warnings.simplefilter("ignore")
            sys.stdout = sys.stderr = open(os.devnull, "w")
            fig.savefig(part, dpi=dpi, bbox_inches=bbox_inches, format=target.suffix[1:])
            os.replace(part, target)
            status = 0
        except BaseException as error:
            os.write(write_end, "".join(traceback.format_exception_only(error)).encode())
            part.unlink(missing_ok=True)
        finally:
            os._exit(status)
    os.close(write_end)
    _FIGURE_WRITERS.append(_FigureWriter(pid, read_end, target))


def _reap_figure_writers(block: bool) -> None:
    """Collect finished figure writers (with ``block``: wait for the oldest one at least); raise their failures."""
    failures = []
    for writer in list(_FIGURE_WRITERS):
        pid, status = os.waitpid(writer.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            continue
        block = False
        _FIGURE_WRITERS.remove(writer)
        with os.fdopen(writer.errors, "rb") as pipe:
            error = pipe.read().decode(errors="replace").strip()
        if status != 0:
            failures.append(f"{writer.target} was not written: {error or f'its writer exited with status {status}'}")
    if failures:
        raise RuntimeError("\n".join(failures))


def wait_for_figures() -> None:
    """Wait until every figure file ``show(save_as=...)`` handed to a background writer is written; raise if one failed.

    Reports call it before stopping their kernel; a process calls it at exit.
    """
    while _FIGURE_WRITERS:
        _reap_figure_writers(block=True)


atexit.register(wait_for_figures)


def show(fig: Figure, dpi: int = 100, save_as: str | Path | None = None) -> None:
    """Display a figure as a PNG image (with its titles as alt text) and close it.

    Works with any matplotlib backend (``MPLBACKEND=agg`` under papermill included), so executed
    notebooks and their HTML exports always carry the picture. ``save_as`` (a path without suffix,
    e.g. ``run.path / "figures" / "losses"``) also writes it as PNG and PDF; the notebook then shows
    the saved PNG's bytes, drawn once, at the size of a ``dpi`` rendering. The PDF is written by a
    background process (``wait_for_figures``), which takes its time off the notebook's.
    """
    from IPython.display import Image, display

    alt = figure_description(fig)
    if save_as is None:
        display(Image(data=figure_png(fig, dpi), format="png", alt=alt))
        return
    png = save_figure(fig, save_as, background=True)[0].read_bytes()
    plt.close(fig)
    display(Image(data=png, format="png", alt=alt, width=round(png_size(png)[0] * dpi / SAVE_DPI)))


def as_run(run: str | Path | Run) -> Run:
    """A loaded run from a directory (or the run itself)."""
    return run if isinstance(run, Run) else load_run(run)


def run_label(run: Run) -> str:
    """Short label of a run: its arm and seed when the study runner made it, else its directory name."""
    meta = study_labels(run.path)
    if meta:
        return f"{meta.get('arm', '?')} s{meta.get('seed', '?')}"
    return run.run_id


def study_labels(run_dir: str | Path) -> dict:
    """The labels (study, arm, seed, ...) the study runner writes into a run directory ({} for runs made otherwise)."""
    import json

    from tdro.studies.runner import METADATA_FILE

    path = Path(run_dir) / METADATA_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def group_colors(group_names: Sequence[str]) -> dict[str, str]:
    """{group: colour}: the i-th group of the dataset's order gets the i-th Okabe–Ito colour, in every figure.

    Past 8 groups the colours repeat (markers and labels still tell the groups apart)."""
    return {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(dict.fromkeys(group_names))}


def run_group_colors(run: Run, seen: Iterable[str] = ()) -> dict[str, str]:
    """Group colours of a run, keyed by its dataset's group order (``summary.json``'s ``groups``; an
    unfinished run's records list the groups in that order too), then any other names in ``seen``."""
    return group_colors([*run.summary.get("groups", []), *seen])


def _group_columns(table: pd.DataFrame, prefix: str) -> dict[str, str]:
    """{group: column} of columns ``<prefix><group>`` (e.g. prefix 'val.group_acc.')."""
    return {c[len(prefix):]: c for c in table.columns if c.startswith(prefix) and "." not in c[len(prefix):]}


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _check_history(run: Run) -> pd.DataFrame:
    if run.history.empty:
        raise ValueError(f"run {run.path} has no history.jsonl records yet (no epoch finished)")
    return run.history


def _epochs(history: pd.DataFrame) -> np.ndarray:
    return history["epoch"].to_numpy()  # records count epochs from 1, as the figures do


def _mark_selected(ax, run: Run) -> None:
    """A thin vertical line at the selected epoch of a finished run."""
    selected = run.summary.get("selected_epoch")
    if selected is not None:
        ax.axvline(selected, color="0.6", lw=0.8)
        ax.text(selected, 0.98, " selected", color="0.4", fontsize=8, va="top", transform=ax.get_xaxis_transform())


def _integer_x(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------------------------- one run
def plot_losses(run: str | Path | Run) -> Figure:
    """Left: train and validation loss per epoch (and the classification part); right: anchor loss parts.

    The parts are the unweighted terms the trainer records (``fit``, ``sep``); the total is
    cls + lambda_fit * fit + lambda_sep * sep.
    """
    run = as_run(run)
    history = _check_history(run)
    epochs = _epochs(history)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    left.plot(epochs, history["train.loss"], marker="o", label="train loss (total)")
    if "train.cls" in history:
        left.plot(epochs, history["train.cls"], marker=".", ls="--", label="train cls")
    if "val.loss" in history:
        left.plot(epochs, history["val.loss"], marker="s", label="val loss (cls)")
    _integer_x(left, right)
    left.set(xlabel="epoch", ylabel="loss", title="Loss")
    left.legend(fontsize=8)
    parts = [p for p in ("fit", "sep") if f"train.{p}" in history and np.nanmax(np.abs(history[f"train.{p}"])) > 0]
    if parts:
        for part in parts:
            right.plot(epochs, history[f"train.{part}"], marker="o", label=f"{part} (unweighted)")
        if all((history[f"train.{p}"] > 0).all() for p in parts):
            right.set_yscale("log")
        right.set(xlabel="epoch", ylabel="loss part", title="Anchor loss parts (train)")
        right.legend(fontsize=8)
    else:
        _empty(right, "anchor losses off (lambda_fit = lambda_sep = 0)")
        right.set_title("Anchor loss parts (train)")
    return fig


def plot_group_accuracy(run: str | Path | Run, split: str = "val") -> Figure:
    """Per-group accuracy per epoch on ``split``, the worst group at the selected epoch highlighted,
    and the per-epoch worst-group accuracy as a dashed line."""
    run = as_run(run)
    history = _check_history(run)
    epochs = _epochs(history)
    groups = _group_columns(history, f"{split}.group_acc.")
    colors = run_group_colors(run, groups)
    worst = _highlighted_group(run, split)
    fig, ax = plt.subplots(figsize=(7.5, 3.8), constrained_layout=True)
    for group, column in groups.items():
        is_worst = group == worst  # highlighted by width and label; the group keeps its colour
        ax.plot(epochs, history[column], marker="o", lw=3 if is_worst else 1.4, color=colors[group],
                zorder=3 if is_worst else 2, label=f"{group} (worst)" if is_worst else group)
    if f"{split}.worst_group_acc" in history:
        ax.plot(epochs, history[f"{split}.worst_group_acc"], ls="--", color=REFERENCE_COLOR, lw=1,
                label="worst group (per epoch)")
    if "train.acc" in history:
        ax.plot(epochs, history["train.acc"], ls=":", color=REFERENCE_COLOR, label="train acc (all groups)")
    _mark_selected(ax, run)
    _integer_x(ax)
    ax.set(xlabel="epoch", ylabel="accuracy", title=f"Per-group accuracy ({split})", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _highlighted_group(run: Run, split: str) -> str | None:
    """The worst group at the selected epoch (summary), else at the last recorded epoch."""
    metrics = run.summary.get(split) if run.summary else None
    if metrics and metrics.get("worst_group"):
        return metrics["worst_group"]
    column = f"{split}.worst_group"
    return None if column not in run.history else run.history[column].iloc[-1]


def plot_group_weights(run: str | Path | Run, ax=None) -> Figure:
    """GroupDRO weights q per group over training steps (steps.jsonl), with the epoch-end values as dots.

    With ``groupdro_cells: group_class`` the weights are per (group, class) cell (``group/class``):
    each group's total weight is drawn bold and its cells thin, in the group's colour.
    """
    run = as_run(run)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 3.4), constrained_layout=True)
    steps = _group_columns(run.steps, "q.") if not run.steps.empty else {}
    epochs = _group_columns(run.history, "q.") if not run.history.empty else {}
    if steps and epochs and run.steps["step"].nunique() < max(2, len(run.history)):
        steps = {}  # fewer logged steps than epochs (log_interval above the steps per epoch): use the epochs
    if not steps and not epochs:
        _empty(ax, "GroupDRO off (ERM): no group weights")
    else:
        table, x = (run.steps, run.steps["step"]) if steps else (run.history, run.history["epoch"])
        columns = steps or epochs
        cells = any("/" in key for key in columns)
        by_group: dict[str, list[str]] = {}
        for key, column in columns.items():
            by_group.setdefault(key.split("/")[0], []).append(column)
        colors = run_group_colors(run, by_group)
        for group, group_columns in by_group.items():
            color = colors[group]
            if cells:
                for column in group_columns:
                    ax.plot(x, table[column], lw=0.7, alpha=0.45, color=color)
                ax.plot(x, table[group_columns].sum(axis=1), lw=2.2, color=color, label=f"{group} (sum of its cells)")
            else:
                ax.plot(x, table[group_columns[0]], lw=1.8, color=color, label=group)
        if steps and epochs and not cells:
            last_step = run.steps.groupby("epoch")["step"].max()
            for group, column in epochs.items():
                ax.plot(run.history["epoch"].map(last_step), run.history[column], ls="none", marker="o",
                        color=colors[group], ms=4)
        warmup = run.config.get("groupdro_warmup_epochs") or 0
        if warmup and steps and "epoch" in run.steps:
            warm = run.steps.loc[run.steps["epoch"] <= warmup, "step"]
            if len(warm):
                ax.axvspan(run.steps["step"].min(), warm.max(), color="0.9", zorder=0, label="warm-up (q held)")
        elif warmup and not steps:
            _integer_x(ax)
            ax.axvspan(0.5, min(warmup, len(run.history)) + 0.5, color="0.9", zorder=0, label="warm-up (q held)")
        ax.legend(fontsize=8)
        ax.set(xlabel="step" if steps else "epoch", ylabel="q (thin: cells)" if cells else "q (group weight)", ylim=(0, 1))
    ax.set_title(f"GroupDRO weights — {run_label(run)}" if fig is None else "GroupDRO weights per group")
    return fig if fig is not None else ax.figure


def plot_learning_rates(run: str | Path | Run) -> Figure:
    """Learning rate per parameter group (backbone, new) per epoch."""
    run = as_run(run)
    history = _check_history(run)
    epochs = _epochs(history)
    fig, ax = plt.subplots(figsize=(7.5, 3.2), constrained_layout=True)
    columns = _group_columns(history, "lr.")
    for name, column in columns.items():
        ax.plot(epochs, history[column], marker="o", label=name)
    if columns and (history[list(columns.values())] > 0).all().all():
        ax.set_yscale("log")
    _integer_x(ax)
    note = "" if "backbone" in columns else "; no backbone parameters"
    ax.set(xlabel="epoch", ylabel="learning rate",
           title=f"LR per parameter group ({run.config.get('lr_scheduler', '?')} schedule{note})")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------- diagnostics
def plot_alignment(run: str | Path | Run) -> Figure:
    """Per epoch on validation: W₂ of each group's class-conditional latents to their class anchors (left, one
    line per group) and between the groups of each class (right, one line per pair); means over classes.

    This is what the anchor losses claim to reduce (``tdro.training.diagnostics.alignment``)."""
    run = as_run(run)
    history = _check_history(run)
    epochs = _epochs(history)
    to_anchor = _group_columns(history, "alignment.to_anchor.")
    between = _group_columns(history, "alignment.between_groups.")
    colors = run_group_colors(run, to_anchor)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    left.set_title("W₂ to the class anchor (val)")
    right.set_title("W₂ between the groups of a class (val)")
    if not to_anchor and not between:
        for ax in (left, right):
            _empty(ax, "no alignment recorded (the run predates the diagnostics)")
        return fig
    for group, column in to_anchor.items():
        left.plot(epochs, history[column], marker="o", color=colors[group], label=group)
    for i, (pair, column) in enumerate(between.items()):
        right.plot(epochs, history[column], marker=MARKERS[i % len(MARKERS)], color=REFERENCE_COLOR,
                   ls=LINE_STYLES[i % len(LINE_STYLES)], label=pair.replace(PAIR_SEPARATOR, " vs "))
    for ax, lines, missing in ((left, to_anchor, "the model has no anchors"), (right, between, "one group: no pair")):
        if not lines:
            _empty(ax, missing)
            continue
        _mark_selected(ax, run)
        _integer_x(ax)
        ax.set(xlabel="epoch", ylabel="W₂ (mean over classes)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return fig


def plot_selection(run: str | Path | Run) -> Figure:
    """Why this epoch: the monitor per epoch against the training curve, the selected epoch starred and the
    warm-ups (q held, LR warm-up, frozen backbone) shaded; the title says when the selection fell in one."""
    run = as_run(run)
    history = _check_history(run)
    epochs = _epochs(history)
    summary, diagnostics = run.summary, run.summary.get("diagnostics") or {}
    monitor = summary.get("monitor", run.config.get("monitor", "monitor"))
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    warmups = [name for name in WARMUP_MEANINGS if diagnostics.get(name)]
    for name, hatch in zip(warmups, ("//", "\\\\", "..")):
        ax.axvspan(0.5, diagnostics[name] + 0.5, facecolor="0.93", edgecolor="0.75", hatch=hatch, lw=0, zorder=0,
                   label=f"{name} = {diagnostics[name]}")
    if "monitor.value" in history:
        ax.plot(epochs, history["monitor.value"], marker="o", color=OKABE_ITO[3], label=f"{monitor} (monitor)")
    if "train.acc" in history and not str(monitor).endswith("loss"):
        ax.plot(epochs, history["train.acc"], ls=":", color=REFERENCE_COLOR, label="train acc")
    selected = summary.get("selected_epoch")
    chosen = history.loc[history["epoch"] == selected, "monitor.value"] if "monitor.value" in history else []
    if len(chosen):
        ax.plot([selected], [chosen.iloc[0]], marker="*", ms=16, color=OKABE_ITO[4], ls="none", zorder=4,
                label=f"selected: epoch {selected}")
    handles, labels = ax.get_legend_handles_labels()
    if "train.loss" in history:
        loss_ax = ax.twinx()
        loss_ax.plot(epochs, history["train.loss"], ls="--", color="0.55", label="train loss (right axis)")
        loss_ax.set_ylabel("train loss")
        more = loss_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    _integer_x(ax)
    title = f"Selection: epoch {selected} of {summary.get('epochs_run', len(history))} by {monitor}"
    if diagnostics.get("selected_in_warmup"):
        title += "\nWITHIN THE WARM-UP (" + diagnostics["selected_in_warmup_of"] + ")"
    ax.set(xlabel="epoch", ylabel=str(monitor), title=title)
    ax.legend(handles, labels, fontsize=8, loc="best")
    return fig


def diagnostics_note(run: str | Path | Run):
    """The run's diagnostics as sentences for its report: selection (and a warm-up), whether GroupDRO acted,
    alignment; an ``IPython.display.Markdown``."""
    from IPython.display import Markdown

    run = as_run(run)
    summary = run.summary
    if not summary:
        return Markdown(f"Run `{run.run_id}` has not finished: no diagnostics yet.")
    lines = [f"Selected epoch **{summary['selected_epoch']}** of {summary['epochs_run']} by `{summary['monitor']}` "
             f"({summary['selection_split']}) = {summary['monitor_value']:.4g}."]
    lines += diagnostic_notes(summary) or ["This run predates the diagnostics (its summary.json has none)."]
    return Markdown("\n".join(f"- {line}" for line in lines))


# --------------------------------------------------------------------------------------------- latents
@dataclass
class LatentSnapshot:
    """One epoch's ``latents/epoch_XXX.npz``: val latents and anchors on the first two principal axes."""

    epoch: int
    points: np.ndarray          # (N, 2)
    labels: np.ndarray          # (N,)
    groups: np.ndarray          # (N,) group index
    means: np.ndarray           # (C, 2)
    covariances: np.ndarray     # (C, 2, 2)
    group_names: list[str]
    class_names: list[str]
    explained_variance: np.ndarray  # (2,)


def latent_epochs(run_dir: str | Path | Run) -> list[int]:
    """Epochs (from 1, as in history.jsonl) that have a latent snapshot."""
    path = run_dir.path if isinstance(run_dir, Run) else Path(run_dir)
    return sorted(int(p.stem.split("_")[1]) for p in (path / "latents").glob("epoch_*.npz"))


def load_latents(run_dir: str | Path | Run, epoch: int | None = None) -> LatentSnapshot:
    """The latent snapshot of ``epoch`` (default: the selected epoch if recorded, else the last)."""
    run = as_run(run_dir)
    available = latent_epochs(run)
    if not available:
        raise FileNotFoundError(f"run {run.path} has no latents/epoch_*.npz (latent_samples_per_group was 0?)")
    if epoch is None:
        selected = run.summary.get("selected_epoch")
        epoch = selected if selected in available else available[-1]
    if epoch not in available:
        raise FileNotFoundError(f"run {run.path} has no latent snapshot for epoch {epoch}; it has {available}")
    with np.load(run.path / "latents" / f"epoch_{epoch:03d}.npz") as data:
        return LatentSnapshot(epoch, data["points"], data["labels"], data["groups"], data["means"], data["covariances"],
                              [str(g) for g in data["group_names"]], [str(c) for c in data["class_names"]],
                              data["explained_variance"])


def class_colors(num_classes: int) -> list:
    """One colour per class (tab10 up to 10 classes, tab20 up to 20, then husl)."""
    if num_classes <= 10:
        return list(plt.get_cmap("tab10").colors[:num_classes])
    if num_classes <= 20:
        return list(plt.get_cmap("tab20").colors[:num_classes])
    import seaborn as sns  # only here: importing it (and SciPy with it) takes ~1 s

    return sns.color_palette("husl", num_classes)


def ellipse_parameters(covariance: np.ndarray, n_std: float = 2.0) -> tuple[float, float, float]:
    """(width, height, angle in degrees) of the n_std-sigma ellipse of a 2x2 covariance."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, dtype=float))
    values = np.clip(values, 0.0, None)
    major = vectors[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0]))
    return 2 * n_std * math.sqrt(values[1]), 2 * n_std * math.sqrt(values[0]), angle


def plot_latents(snapshot: LatentSnapshot, ax=None, legend: bool = True, title: str | None = None) -> Figure:
    """Validation latents coloured by class and marked by group; anchor means (X) with 2-sigma ellipses."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
    LatentView(ax, snapshot, legend, title)
    return fig if fig is not None else ax.figure


class LatentView:
    """The artists of one latent view (``plot_latents``); ``update`` moves them to another epoch's snapshot,
    so an animation's frames change the data of the same artists instead of redrawing the axes."""

    def __init__(self, ax, snapshot: LatentSnapshot, legend: bool = True, title: str | None = None) -> None:
        self.ax, self.title = ax, title
        self.colors = class_colors(len(snapshot.class_names))
        self.points = []
        for g, group in enumerate(snapshot.group_names):
            mask = snapshot.groups == g
            self.points.append(ax.scatter(snapshot.points[mask, 0], snapshot.points[mask, 1],
                                          c=[self.colors[int(y)] for y in snapshot.labels[mask]],
                                          marker=MARKERS[g % len(MARKERS)], s=18, alpha=0.65, linewidths=0,
                                          label=f"group {group}"))
        self.ellipses, self.means, self.names = [], [], []
        for c, name in enumerate(snapshot.class_names):
            width, height, angle = ellipse_parameters(snapshot.covariances[c])
            self.ellipses.append(ax.add_patch(Ellipse(snapshot.means[c], width, height, angle=angle, fill=False,
                                                      lw=1.6, color=self.colors[c])))
            self.means.append(ax.scatter(*snapshot.means[c], marker="X", s=140, color=self.colors[c],
                                         edgecolors="black", linewidths=0.8, zorder=4))
            self.names.append(ax.annotate(name, snapshot.means[c], textcoords="offset points", xytext=(6, 6),
                                          fontsize=8, weight="bold"))
        self._label(snapshot)
        ax.autoscale_view()
        if legend:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], ls="none", marker=MARKERS[g % len(MARKERS)], color="0.3", label=f"group {name}")
                       for g, name in enumerate(snapshot.group_names)]
            handles += [Line2D([], [], ls="none", marker="o", color=self.colors[c], label=f"class {name}")
                        for c, name in enumerate(snapshot.class_names)]
            ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    def _label(self, snapshot: LatentSnapshot) -> None:
        ev = snapshot.explained_variance
        self.ax.set(xlabel=f"PC 1 ({ev[0]:.0%} of variance)", ylabel=f"PC 2 ({ev[1]:.0%})",
                    title=self.title or f"Validation latents, epoch {snapshot.epoch} (X = anchor mean, ellipse = 2σ)")

    def update(self, snapshot: LatentSnapshot) -> None:
        """Show ``snapshot`` (the same run's groups and classes) with these artists; the axis limits stay."""
        for g, points in enumerate(self.points):
            mask = snapshot.groups == g
            points.set_offsets(snapshot.points[mask])
            points.set_facecolor([self.colors[int(y)] for y in snapshot.labels[mask]])
        for c, (ellipse, mean, name) in enumerate(zip(self.ellipses, self.means, self.names)):
            width, height, angle = ellipse_parameters(snapshot.covariances[c])
            ellipse.set(center=snapshot.means[c], width=width, height=height, angle=angle)
            mean.set_offsets([snapshot.means[c]])
            name.xy = tuple(snapshot.means[c])
        self._label(snapshot)


def _no_latents_figure(run: Run) -> Figure:
    fig, ax = plt.subplots(figsize=(7.5, 1.6), constrained_layout=True)
    _empty(ax, f"run {run.run_id} recorded no latent snapshots (latent_samples_per_group = 0)")
    return fig


def plot_latent_view(run: str | Path | Run, epoch: int | None = None) -> Figure:
    """The latent view of one epoch of a run (default: the selected epoch); a note if none was recorded."""
    run = as_run(run)
    if not latent_epochs(run):
        return _no_latents_figure(run)
    return plot_latents(load_latents(run, epoch))


def plot_latent_epochs(run: str | Path | Run, epochs: Sequence[int] | None = None, max_panels: int = 4) -> Figure:
    """Latent views of several epochs side by side (default: up to ``max_panels`` evenly spaced, last included)."""
    run = as_run(run)
    available = latent_epochs(run)
    if not available:
        return _no_latents_figure(run)
    if epochs is None:
        idx = np.unique(np.linspace(0, len(available) - 1, min(max_panels, len(available))).round().astype(int))
        epochs = [available[i] for i in idx]
    fig, axes = plt.subplots(1, len(epochs), figsize=(4.2 * len(epochs), 4.2), constrained_layout=True, squeeze=False)
    for ax, epoch in zip(axes[0], epochs):
        plot_latents(load_latents(run, epoch), ax=ax, legend=False, title=f"epoch {epoch}")
    return fig


# matplotlib's JS animation draws its buttons with Font Awesome from a CDN: text glyphs read offline
ANIMATION_STYLESHEET = ('<link rel="stylesheet"\n'
                        'href="https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/css/font-awesome.min.css">')
ANIMATION_ICONS = {"fa-minus": "&minus;", "fa-fast-backward": "&#x23EE;", "fa-step-backward": "&#x23F4;&#x258F;",
                   "fa-play fa-flip-horizontal": "&#x25C0;", "fa-pause": "&#x23F8;", "fa-play": "&#x25B6;",
                   "fa-step-forward": "&#x2595;&#x23F5;", "fa-fast-forward": "&#x23ED;", "fa-plus": "+"}


def offline_animation_html(html: str) -> str:
    """matplotlib's ``to_jshtml`` without its one network resource (the icon font): glyphs instead.

    Raises if matplotlib's template changed so that a network address would remain."""
    html = html.replace(ANIMATION_STYLESHEET, "")
    for icon, glyph in ANIMATION_ICONS.items():
        html = html.replace(f'<i class="fa {icon}"></i>', glyph)
    if "://" in html:  # base64 frames never contain ':' — only an address can
        raise RuntimeError("matplotlib's animation HTML still loads a network resource; update ANIMATION_ICONS")
    return html


def latent_animation(run: str | Path | Run, max_frames: int = 40, dpi: int = 72, interval_ms: int = 700):
    """The latent evolution as a self-contained HTML/JS player (frames embedded as PNG): reads offline, no kernel.

    Up to ``max_frames`` evenly spaced epochs, last included, on fixed axes (the view of each epoch is
    its own principal axes, as in ``plot_latents``). Returns an ``IPython.display.HTML``.

    Every frame is one draw of the same artists moved to the next epoch (``LatentView.update``), in the
    first frame's layout: on fixed axis limits a layout pass per frame would find the same one."""
    from tempfile import TemporaryDirectory

    from IPython.display import HTML
    from matplotlib.animation import HTMLWriter

    run = as_run(run)
    available = latent_epochs(run)
    if not available:
        return HTML(f"<p>run <code>{run.run_id}</code> recorded no latent snapshots "
                    "(latent_samples_per_group = 0): no animation</p>")
    idx = np.unique(np.linspace(0, len(available) - 1, min(max_frames, len(available))).round().astype(int))
    snapshots = [load_latents(run, available[i]) for i in idx]
    # points, and each anchor's 2σ ellipse by its bounding box (mean ± 2·sqrt of the covariance's diagonal)
    reach = [2 * np.sqrt(np.clip(np.diagonal(s.covariances, axis1=1, axis2=2), 0.0, None)) for s in snapshots]
    corners = np.concatenate([np.concatenate([s.points, s.means - r, s.means + r]) for s, r in zip(snapshots, reach)])
    pad = 0.08 * (corners.max(axis=0) - corners.min(axis=0) + 1e-9)
    low, high = corners.min(axis=0) - pad, corners.max(axis=0) + pad
    fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
    view = LatentView(ax, snapshots[0])
    ax.set(xlim=(low[0], high[0]), ylim=(low[1], high[1]))
    writer = HTMLWriter(fps=1000 / interval_ms, embed_frames=True, default_mode="once")
    try:
        with TemporaryDirectory() as folder:
            path = Path(folder) / "animation.html"
            with writer.saving(fig, path, dpi):
                writer.grab_frame()
                with plt.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
                    fig.set_layout_engine(None)  # no layout engine, whatever the style says: the layout stays
                for snapshot in snapshots[1:]:
                    view.update(snapshot)
                    writer.grab_frame()
            html = path.read_text()
    finally:
        plt.close(fig)
    return HTML(offline_animation_html(html))


# --------------------------------------------------------------------------------------------- confusion, tables
def plot_confusions(run: str | Path | Run, split: str = "test") -> Figure:
    """One confusion matrix (rows: true class, columns: predicted) per group at the selected checkpoint."""
    run = as_run(run)
    metrics = run.summary.get(split) if run.summary else None
    if not metrics:
        raise ValueError(f"run {run.path} has no {split} metrics in summary.json (unfinished run?)")
    confusions = metrics["group_confusion"]
    classes = list(metrics["class_acc"])
    n = len(confusions)
    fig, axes = plt.subplots(1, n, figsize=(min(4.6 * n, 18), 4.2), constrained_layout=True, squeeze=False)
    for ax, (group, matrix) in zip(axes[0], confusions.items()):
        _count_heatmap(ax, np.asarray(matrix), classes, annotate=len(classes) <= 12)
        acc = metrics["group_acc"].get(group)
        ax.set(xlabel="predicted", ylabel="true", title=f"{group} ({split} acc {acc:.3f})" if acc is not None else group)
    _turn_overlapping_ticklabels(fig)
    return fig


def _count_heatmap(ax, counts: np.ndarray, labels: Sequence[str], annotate: bool = True) -> None:
    """A matrix of counts drawn as seaborn's ``heatmap(counts, annot=annotate, fmt="d", cmap="Blues", cbar=False,
    square=True)`` draws it, with matplotlib alone: importing seaborn (and SciPy) cost a report ~1 s.

    Tick labels that overlap are turned by ``_turn_overlapping_ticklabels`` once the figure is complete."""
    ax.set_aspect("equal")
    for spine in ax.spines.values():
        spine.set_visible(False)
    mesh = ax.pcolormesh(counts, cmap="Blues", vmin=float(counts.min()), vmax=float(counts.max()), linewidths=0,
                         edgecolor="white")
    ax.set(xlim=(0, counts.shape[1]), ylim=(0, counts.shape[0]))
    ax.invert_yaxis()
    ax.set(xticks=np.arange(counts.shape[1]) + 0.5, yticks=np.arange(counts.shape[0]) + 0.5)
    ax.set_xticklabels(labels)
    ax.set_yticklabels(labels, rotation="vertical", va="center")
    if annotate:
        mesh.update_scalarmappable()
        for (row, column), count, color in zip(np.ndindex(counts.shape), counts.flat, mesh.get_facecolors()):
            ax.text(column + 0.5, row + 0.5, f"{count:d}", color=".15" if _relative_luminance(color) > 0.408 else "w",
                    ha="center", va="center", fontsize=7)


def _relative_luminance(color) -> float:
    """WCAG relative luminance of an RGB(A) colour: what decides dark or light text on it (as in seaborn)."""
    from matplotlib.colors import to_rgb

    rgb = np.asarray(to_rgb(color))
    rgb = np.where(rgb <= 0.03928, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    return float(rgb @ [0.2126, 0.7152, 0.0722])


def _turn_overlapping_ticklabels(fig: Figure) -> None:
    """Heatmap tick labels as seaborn sets them: x labels that overlap turn vertical, y labels horizontal."""
    fig.draw_without_rendering()
    for ax in fig.axes:
        for labels, rotation in ((ax.get_xticklabels(), "vertical"), (ax.get_yticklabels(), "horizontal")):
            boxes = [label.get_window_extent() for label in labels]
            if boxes and max(box.count_overlaps(boxes) for box in boxes) > 1:
                plt.setp(labels, rotation=rotation)


def run_metrics_table(run: str | Path | Run) -> pd.DataFrame:
    """Val and test metrics at the selected checkpoint: one row per split, headline metrics and per-group acc."""
    run = as_run(run)
    rows = {}
    for split in ("val", "test"):
        metrics = run.summary.get(split)
        if not metrics:
            continue
        row = {METRIC_LABELS[m]: metrics.get(m) for m in ("acc", "worst_group_acc", "worst_group", "balanced_acc", "macro_f1", "loss")}
        row.update({f"acc {g}": v for g, v in metrics.get("group_acc", {}).items()})
        rows[split] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def run_facts(run: str | Path | Run) -> pd.Series:
    """Selection and cost of a run: selected epoch, monitor value, wall time, peak memory, samples/s."""
    run = as_run(run)
    s, h = run.summary, run.history
    facts = {
        "run": run.run_id,
        "dataset": run.config.get("dataset"),
        "selected epoch": s.get("selected_epoch"),
        "epochs run": s.get("epochs_run", len(h)),
        "monitor": s.get("monitor", run.config.get("monitor")),
        "monitor value": s.get("monitor_value"),
        "selection split": s.get("selection_split"),
        "wall time (s)": s.get("wall_seconds"),
        "peak memory (MB)": None if h.empty or "peak_memory_mb" not in h else float(h["peak_memory_mb"].max()),
        "samples/s (mean)": None if h.empty or "samples_per_second" not in h else float(h["samples_per_second"].mean()),
        "parameters": s.get("parameter_count"),
        "device": s.get("device"),
        "GroupDRO": run.config.get("groupdro_enabled"),
    }
    if s.get("test_selection"):
        facts["WARNING"] = "selected on the TEST split (allow_test_selection)"
    return pd.Series(facts, name="value")


# --------------------------------------------------------------------------------------------- many runs
def _runs(runs: Iterable[str | Path | Run]) -> list[Run]:
    return [as_run(r) for r in runs]


def metric_columns(runs: Iterable[str | Path | Run]) -> list[str]:
    """Numeric per-epoch history columns shared by the runs' records (val.* first)."""
    columns: dict[str, None] = {}
    for run in _runs(runs):
        for column in run.history.columns:
            if column not in ("epoch", "steps") and pd.api.types.is_numeric_dtype(run.history[column]):
                columns[column] = None
    order = {"val": 0, "train": 1}
    return sorted(columns, key=lambda c: (order.get(c.split(".")[0], 2), c.count("."), c))


def plot_metric_curves(runs: Iterable[str | Path | Run], metric: str = "val.worst_group_acc",
                       labels: Sequence[str] | None = None, ax=None, aggregate: dict[str, Sequence[int]] | None = None) -> Figure:
    """One curve per run of a history column over epochs (e.g. ``val.worst_group_acc``, ``train.loss``).

    ``aggregate`` maps a label to positions in ``runs`` to draw instead as mean ± std over those runs
    (the seeds of one arm)."""
    runs = _runs(runs)
    labels = list(labels) if labels is not None else [run_label(r) for r in runs]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4), constrained_layout=True)
    if aggregate:
        for label, members in aggregate.items():
            curves = [runs[i].history.set_index("epoch")[metric] for i in members
                      if not runs[i].history.empty and metric in runs[i].history]
            if not curves:
                continue
            table = pd.concat(curves, axis=1)
            mean, std = table.mean(axis=1), table.std(axis=1)
            x = table.index.to_numpy()
            line, = ax.plot(x, mean, marker="o", ms=3, label=f"{label} (n={table.shape[1]})")
            if table.shape[1] > 1:
                ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
    else:
        for run, label in zip(runs, labels):
            if run.history.empty or metric not in run.history:
                continue
            ax.plot(_epochs(run.history), run.history[metric], marker="o", ms=3, label=label)
    _integer_x(ax)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        _empty(ax, f"no run records {metric}")
    return fig if fig is not None else ax.figure


def plot_weights_by_run(runs: Iterable[str | Path | Run], labels: Sequence[str] | None = None, max_panels: int = 12) -> Figure:
    """GroupDRO weights over steps, one panel per run (ERM runs say so)."""
    runs = _runs(runs)[:max_panels]
    labels = list(labels) if labels is not None else [run_label(r) for r in runs]
    if not runs:
        fig, ax = plt.subplots(figsize=(6, 2), constrained_layout=True)
        _empty(ax, "no runs selected")
        return fig
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), constrained_layout=True, squeeze=False)
    for ax, run, label in zip(axes.flat, runs, labels):
        plot_group_weights(run, ax=ax)
        ax.set_title(label, fontsize=9)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    return fig


def summary_table(runs: Iterable[str | Path | Run], labels: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run: label, dataset, finished, selected epoch, val/test worst-group and overall acc,
    wall time, peak memory and mean samples/s."""
    runs = _runs(runs)
    labels = list(labels) if labels is not None else [run_label(r) for r in runs]
    rows = []
    for run, label in zip(runs, labels):
        facts = run_facts(run)
        row = {"run": label, "run_id": run.run_id, "dataset": run.config.get("dataset"), "finished": run.finished,
               "selected epoch": facts["selected epoch"], "epochs": len(run.history)}
        for split in ("val", "test"):
            metrics = run.summary.get(split) or {}
            row[f"{split} worst-group acc"] = metrics.get("worst_group_acc")
            row[f"{split} acc"] = metrics.get("acc")
        row.update({k: facts[k] for k in ("wall time (s)", "peak memory (MB)", "samples/s (mean)")})
        rows.append(row)
    return pd.DataFrame(rows)
