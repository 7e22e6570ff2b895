"""tdro.viz: static figures, tables and widgets over hand-written run directories (the record contract
of docs/ARCHITECTURE.md), and the notebook-parameter helper."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

from tdro import viz  # noqa: E402
from tdro.config import Config, ConfigError  # noqa: E402
from tdro.runs import append_jsonl, load_run, write_json_atomic  # noqa: E402
from tdro.training.metrics import metrics_from_counts  # noqa: E402
from tdro.viz import static  # noqa: E402
from tdro.viz.notebook import (config_from_namespace, config_overrides, injected_names,  # noqa: E402
                               parameters_source)

GROUPS = ["mnist", "usps"]
CLASSES = ["0", "1", "2"]


def metrics(seed: int, worst: str | None = None) -> dict:
    """Real METRICS from random counts; ``worst`` makes that group clearly the worst."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 20, size=(2, 3, 3))
    if worst is not None:
        g = GROUPS.index(worst)
        counts[g] = counts[g] * (1 - np.eye(3, dtype=int)) + np.eye(3, dtype=int)  # mostly wrong
        counts[1 - g] += 50 * np.eye(3, dtype=int)
    return metrics_from_counts(counts.tolist(), (rng.uniform(1, 5, size=2) * counts.sum(axis=(1, 2))).tolist(),
                               GROUPS, CLASSES)


def write_run(root: Path, name: str, *, epochs: int = 3, groupdro: bool = True, cells: bool = False,
              dataset: str = "digits", finished: bool = True, latents: bool = True, phase: dict | None = None,
              backbone: bool = True) -> Path:
    """A run directory as the trainer writes it (config, history, steps, summary, latents, study.json)."""
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    config = {**Config().to_dict(), "dataset": dataset, "groupdro_enabled": groupdro, "epochs": epochs,
              "groupdro_warmup_epochs": 1}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    keys = [f"{g}/{c}" for g in GROUPS for c in CLASSES] if cells else GROUPS
    step = 0
    for index in range(epochs):
        epoch = index + 1  # records count epochs from 1
        q = None
        if groupdro:
            raw = np.linspace(1, 1 + index, len(keys))
            q = dict(zip(keys, (raw / raw.sum()).tolist()))
        for _ in range(2):
            step += 1
            append_jsonl(run / "steps.jsonl", {"step": step, "epoch": epoch, "loss": 1.0 / step, "cls": 0.9 / step,
                                               "fit": 0.5, "sep": 0.2, "q": q})
        lr = {"backbone": 1e-4 / epoch, "new": 1e-3 / epoch} if backbone else {"new": 1e-3}
        append_jsonl(run / "history.jsonl", {
            "epoch": epoch, "train": {"loss": 1.0 - 0.1 * index, "cls": 0.9 - 0.1 * index, "fit": 0.5, "sep": 0.2,
                                      "acc": 0.5 + 0.1 * index, "group_loss": {"mnist": 0.8, "usps": 1.2}},
            "q": q, "lr": lr, "val": metrics(index, worst="usps"), "epoch_seconds": 1.5,
            "samples_per_second": 1000.0 + 100 * index, "peak_memory_mb": 100.0 + 10 * index, "steps": 2,
            "nonfinite_steps": 0, "monitor": {"name": "val_worst_group_acc", "value": 0.5 + 0.1 * index, "improved": True},
            "alignment": {"to_anchor": {"mnist": 2.0 - 0.1 * index, "usps": 3.0 - 0.2 * index},
                          "between_groups": {"mnist|usps": 1.5 - 0.1 * index}}})
        if latents:
            (run / "latents").mkdir(exist_ok=True)
            rng = np.random.default_rng(index)
            np.savez_compressed(
                run / "latents" / f"epoch_{epoch:03d}.npz", points=rng.normal(size=(30, 2)),
                labels=np.arange(30) % 3, groups=(np.arange(30) >= 20).astype(int),
                means=np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]),
                covariances=np.stack([np.diag([1.0, 0.25]), np.eye(2), np.array([[2.0, 1.0], [1.0, 2.0]])]),
                group_names=np.array(GROUPS), class_names=np.array(CLASSES), explained_variance=np.array([0.6, 0.3]))
    if finished:
        write_json_atomic(run / "summary.json", {
            "run_id": name, "selected_epoch": 2, "monitor": "val_worst_group_acc", "monitor_value": 0.6,
            "selection_split": "val", "test_selection": False, "epochs_run": epochs,
            "val": metrics(10, worst="usps"), "test": metrics(11, worst="usps"), "wall_seconds": 12.5,
            "parameter_count": 1234, "device": "cpu", "groups": GROUPS, "classes": CLASSES,
            "config_hash": "abc", "initial_q": dict.fromkeys(keys, 1 / len(keys)) if groupdro else None,
            "diagnostics": {"groupdro_warmup_epochs": 1, "selected_in_warmup": False, "selected_in_warmup_of": None,
                            "q_max_deviation": 0.2 if groupdro else None, "q_deviation_selected": 0.1 if groupdro else None,
                            "q_moved": True if groupdro else None, "alignment_to_anchor_first": 2.5,
                            "alignment_to_anchor_selected": 2.35, "alignment_between_groups_first": 1.5,
                            "alignment_between_groups_selected": 1.4}})
    if phase:
        (run / "study.json").write_text(json.dumps(phase))
    return run


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path, "run_a")


def png_pixels(fig) -> np.ndarray:
    """A figure's drawing at 100 dpi, trimmed to its ink: what was drawn, whichever pass of an (iterative)
    constrained layout placed it; the figure is closed."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return np.asarray(Image.open(buffer))


def ink_margins(png: bytes) -> tuple[int, int, int, int]:
    """Blank pixels (top, bottom, left, right) between a PNG's edges and anything drawn."""
    from io import BytesIO

    from PIL import Image

    ink = (np.asarray(Image.open(BytesIO(png)).convert("RGB")) < 250).any(axis=-1)
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return rows[0], ink.shape[0] - 1 - rows[-1], columns[0], ink.shape[1] - 1 - columns[-1]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------------------- one run
def test_losses_figure_has_train_val_and_parts(run_dir):
    fig = viz.plot_losses(run_dir)
    left, right = fig.axes
    labels = [line.get_label() for line in left.lines]
    assert labels == ["train loss (total)", "train cls", "val loss (cls)"]
    assert [line.get_label() for line in right.lines] == ["fit (unweighted)", "sep (unweighted)"]
    np.testing.assert_allclose(left.lines[0].get_xdata(), [1, 2, 3])  # epochs counted from 1


def test_group_accuracy_highlights_the_worst_group(run_dir):
    fig = viz.plot_group_accuracy(run_dir, "val")
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert "usps (worst)" in lines and "mnist" in lines
    assert lines["usps (worst)"].get_linewidth() > lines["mnist"].get_linewidth()
    history = load_run(run_dir).history
    np.testing.assert_allclose(lines["usps (worst)"].get_ydata(), history["val.group_acc.usps"])
    assert "worst group (per epoch)" in lines


def test_group_weights_per_group_and_erm_note(tmp_path, run_dir):
    fig = viz.plot_group_weights(run_dir)
    ax = fig.axes[0]
    curves = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    assert set(curves) == {"mnist", "usps"}
    steps = load_run(run_dir).steps
    np.testing.assert_allclose(curves["usps"].get_ydata(), steps["q.usps"])
    assert any("warm-up" in t.get_text() for t in ax.get_legend().get_texts())

    erm = write_run(tmp_path, "erm", groupdro=False)
    texts = [t.get_text() for t in viz.plot_group_weights(erm).axes[0].texts]
    assert texts == ["GroupDRO off (ERM): no group weights"]


def test_group_weights_over_group_class_cells_sum_per_group(tmp_path):
    run = write_run(tmp_path, "cells", cells=True)
    ax = viz.plot_group_weights(run).axes[0]
    sums = {line.get_label(): line for line in ax.lines if "sum of its cells" in line.get_label()}
    assert set(sums) == {"mnist (sum of its cells)", "usps (sum of its cells)"}
    steps = load_run(run).steps
    expected = steps[[f"q.mnist/{c}" for c in CLASSES]].sum(axis=1)
    np.testing.assert_allclose(sums["mnist (sum of its cells)"].get_ydata(), expected)
    assert len(ax.lines) == 6 + 2  # thin cells + bold sums


def test_learning_rates_per_parameter_group(tmp_path, run_dir):
    ax = viz.plot_learning_rates(run_dir).axes[0]
    assert {line.get_label() for line in ax.lines} == {"backbone", "new"}
    assert ax.get_yscale() == "log"
    ax = viz.plot_learning_rates(write_run(tmp_path, "nb", backbone=False)).axes[0]
    assert "no backbone parameters" in ax.get_title()


def test_ellipse_parameters_are_two_sigma_axes():
    width, height, angle = viz.ellipse_parameters(np.diag([4.0, 1.0]))
    assert (width, height) == pytest.approx((8.0, 4.0))
    assert abs(angle) % 180 == pytest.approx(0.0, abs=1e-9)
    width, height, angle = viz.ellipse_parameters(np.array([[2.0, 1.0], [1.0, 2.0]]))
    assert (width, height) == pytest.approx((4 * math.sqrt(3), 4.0))
    assert angle % 180 == pytest.approx(45.0)


def test_latent_view_marks_groups_and_draws_anchor_ellipses(run_dir):
    snapshot = viz.load_latents(run_dir)  # default: the selected epoch (2)
    assert snapshot.epoch == 2 and snapshot.group_names == GROUPS and snapshot.class_names == CLASSES
    ax = viz.plot_latents(snapshot).axes[0]
    ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
    assert len(ellipses) == 3
    np.testing.assert_allclose([e.center for e in ellipses], snapshot.means)
    assert ellipses[0].width == pytest.approx(4.0) and ellipses[0].height == pytest.approx(2.0)
    groups = [c for c in ax.collections if c.get_label().startswith("group ")]
    assert [len(c.get_offsets()) for c in groups] == [20, 10]
    assert "60%" in ax.get_xlabel()
    assert viz.latent_epochs(run_dir) == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="no latent snapshot for epoch 7"):
        viz.load_latents(run_dir, 7)


def test_a_latent_view_moved_to_another_epoch_draws_that_epoch_s_view(run_dir):
    """The animation moves one view's artists from epoch to epoch: each frame is the picture a new view draws."""
    later = viz.load_latents(run_dir, 3)
    pictures = []
    for start in (viz.load_latents(run_dir, 1), later):
        fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
        view = viz.LatentView(ax, start)
        view.update(later)
        ax.set(xlim=(-6, 6), ylim=(-6, 6))
        pictures.append(png_pixels(fig))
    assert np.array_equal(*pictures)


def test_latent_epochs_figure_and_runs_without_latents(tmp_path, run_dir):
    assert len(viz.plot_latent_epochs(run_dir, max_panels=2).axes) == 2
    bare = write_run(tmp_path, "bare", latents=False)
    fig = viz.plot_latent_view(bare)
    assert "no latent snapshots" in fig.axes[0].texts[0].get_text()
    assert "no latent snapshots" in viz.plot_latent_epochs(bare).axes[0].texts[0].get_text()


def test_confusions_one_heatmap_per_group(run_dir):
    fig = viz.plot_confusions(run_dir, "test")
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == GROUPS
    summary = load_run(run_dir).summary
    annotations = [int(t.get_text()) for t in fig.axes[0].texts]
    assert annotations == np.asarray(summary["test"]["group_confusion"]["mnist"]).ravel().tolist()


@pytest.mark.parametrize("classes", [CLASSES, [f"category_{i}" for i in range(8)], [str(i) for i in range(16)]],
                         ids=["short labels", "long labels", "no counts"])
def test_confusion_heatmaps_are_the_pixels_seaborn_drew(classes):
    """The heatmaps are drawn without seaborn (its import cost a report ~1 s): the same picture as seaborn.heatmap,
    overlapping tick labels turned alike."""
    import seaborn as sns

    rng = np.random.default_rng(len(classes))
    matrices = [rng.integers(0, 40, size=(len(classes), len(classes))) for _ in GROUPS]
    annotate = len(classes) <= 12
    pictures = []
    for with_seaborn in (True, False):
        fig, axes = plt.subplots(1, len(matrices), figsize=(9.2, 4.2), constrained_layout=True)
        for ax, matrix in zip(axes, matrices):
            if with_seaborn:
                sns.heatmap(matrix, ax=ax, annot=annotate, fmt="d", cmap="Blues", cbar=False, square=True,
                            xticklabels=classes, yticklabels=classes, annot_kws={"fontsize": 7})
            else:
                static._count_heatmap(ax, matrix, classes, annotate)
            ax.set(xlabel="predicted", ylabel="true", title="group")
        if not with_seaborn:
            static._turn_overlapping_ticklabels(fig)
        pictures.append(png_pixels(fig))
    assert np.array_equal(*pictures)


def test_run_tables(run_dir):
    table = viz.run_metrics_table(run_dir)
    assert list(table.index) == ["val", "test"]
    summary = load_run(run_dir).summary
    assert table.loc["test", "worst-group acc"] == summary["test"]["worst_group_acc"]
    assert table.loc["test", "worst group"] == "usps"
    assert table.loc["val", "acc usps"] == summary["val"]["group_acc"]["usps"]
    facts = viz.run_facts(run_dir)
    assert facts["selected epoch"] == 2  # as summary.json says: records and figures count epochs from 1
    assert facts["peak memory (MB)"] == 120.0
    assert facts["samples/s (mean)"] == pytest.approx(1100.0)
    assert facts["wall time (s)"] == 12.5


# ------------------------------------------------------------------------------------------- many runs
def test_metric_curves_and_summary_of_many_runs(tmp_path):
    a = write_run(tmp_path, "a", phase={"study": "p1", "arm": "baseline", "seed": 0})
    b = write_run(tmp_path, "b", epochs=2, groupdro=False)
    ax = viz.plot_metric_curves([a, b], "val.worst_group_acc").axes[0]
    assert [line.get_label() for line in ax.lines] == ["baseline s0", "b"]
    assert viz.metric_columns([a, b])[0].startswith("val.")
    agg = viz.plot_metric_curves([a, b], "train.loss", aggregate={"both": [0, 1]}).axes[0]
    assert [line.get_label() for line in agg.lines] == ["both (n=2)"]
    np.testing.assert_allclose(agg.lines[0].get_ydata(), [1.0, 0.9, 0.8])  # epoch 3 from run a only
    table = viz.summary_table([a, b])
    assert list(table["run"]) == ["baseline s0", "b"]
    assert table.loc[0, "test worst-group acc"] == load_run(a).summary["test"]["worst_group_acc"]
    assert len(viz.plot_weights_by_run([a, b]).axes) == 2


# ------------------------------------------------------------------------------------------- colours, files, animation
OKABE_ITO = {"#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#F0E442", "#000000"}


def test_group_colors_are_okabe_ito_in_the_dataset_order():
    assert set(viz.OKABE_ITO) == OKABE_ITO and len(viz.OKABE_ITO) == 8
    colors = viz.group_colors(["a", "b", "c"])
    assert list(colors) == ["a", "b", "c"] and list(colors.values()) == list(viz.OKABE_ITO[:3])
    assert viz.group_colors(["b", "a"])["b"] == colors["a"]  # keyed by position in the dataset's order
    many = viz.group_colors([f"g{i}" for i in range(10)])
    assert many["g8"] == many["g0"] and len(set(many.values())) == 8  # past 8 groups the palette repeats


def line_colors(ax) -> dict[str, str]:
    from matplotlib.colors import to_hex

    return {line.get_label().split(" (")[0]: to_hex(line.get_color()).upper() for line in ax.lines
            if not line.get_label().startswith("_")}


def test_a_group_keeps_its_colour_in_every_figure(tmp_path, run_dir):
    expected = {g: c.upper() for g, c in viz.group_colors(GROUPS).items()}
    accuracy = line_colors(viz.plot_group_accuracy(run_dir).axes[0])
    weights = line_colors(viz.plot_group_weights(run_dir).axes[0])
    by_run = line_colors(viz.plot_weights_by_run([run_dir]).axes[0])
    cells = line_colors(viz.plot_group_weights(write_run(tmp_path, "cells", cells=True)).axes[0])
    for figure in (accuracy, weights, by_run, cells):
        assert {g: figure[g] for g in GROUPS} == expected
    assert accuracy["usps"] == expected["usps"]  # the worst group is highlighted by width, not recoloured


def test_save_figure_writes_png_and_pdf(tmp_path, run_dir):
    written = viz.save_figure(viz.plot_losses(run_dir), tmp_path / "figures" / "losses")
    assert written == [tmp_path / "figures" / "losses.png", tmp_path / "figures" / "losses.pdf"]
    assert written[0].read_bytes()[:4] == b"\x89PNG" and written[1].read_bytes()[:5] == b"%PDF-"
    viz.show(viz.plot_learning_rates(run_dir), save_as=tmp_path / "figures" / "lr")
    viz.wait_for_figures()
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"losses.png", "losses.pdf", "lr.png", "lr.pdf"}


def test_a_laid_out_figure_is_saved_whole_at_its_size_and_a_free_one_trimmed(tmp_path, run_dir):
    """A constrained-layout figure already fits its canvas: saved untrimmed (drawn once, not twice), figsize × dpi,
    nothing cut, even a legend outside the axes and a suptitle. A figure without a layout engine is trimmed."""
    fig, ax = plt.subplots(figsize=(5, 3), constrained_layout=True)
    ax.plot([0, 1], [0, 1], label="a rather long legend entry")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set(xlabel="epoch", ylabel="accuracy")
    fig.suptitle("a suptitle")
    png = viz.save_figure(fig, tmp_path / "laid_out")[0].read_bytes()
    assert static.png_size(png) == (5 * static.SAVE_DPI, 3 * static.SAVE_DPI)
    assert min(ink_margins(png)) >= 2
    for figure in (viz.plot_losses, viz.plot_confusions, viz.plot_latent_view, viz.plot_group_weights):
        png = viz.save_figure(figure(run_dir), tmp_path / figure.__name__)[0].read_bytes()
        assert min(ink_margins(png)) >= 2, figure.__name__

    free = plt.figure(figsize=(5, 3))
    free.add_axes((0, 0, 1, 1)).plot([0, 1], [0, 1])
    free.text(1.1, 0.5, "outside the canvas")  # a tight crop reaches it; an untrimmed save would cut it
    assert static.png_size(viz.save_figure(free, tmp_path / "free")[0].read_bytes())[0] > 5 * static.SAVE_DPI


def test_show_displays_the_saved_png_itself_at_the_size_of_its_dpi(monkeypatch, tmp_path, run_dir):
    """One PNG render a figure: the notebook shows the saved 200-dpi file's bytes at a 100-dpi rendering's width."""
    import IPython.display
    from matplotlib.figure import Figure

    shown, formats = [], []
    savefig = Figure.savefig
    monkeypatch.setattr(IPython.display, "display", shown.append)
    monkeypatch.setattr(Figure, "savefig", lambda fig, target, **kwargs: formats.append(Path(target).suffix)
                        or savefig(fig, target, **kwargs))
    viz.show(viz.plot_losses(run_dir), save_as=tmp_path / "losses")
    assert formats == [".png"]  # the PDF is drawn by a forked child (test_show_writes_the_pdf_in_the_background)
    (image,) = shown
    assert image.data == (tmp_path / "losses.png").read_bytes()
    assert image.width == round(static.png_size(image.data)[0] / 2) and image.alt.startswith("Loss")
    monkeypatch.setattr(Figure, "savefig", savefig)
    assert abs(image.width - static.png_size(viz.figure_png(viz.plot_losses(run_dir)))[0]) <= 1
    viz.show(viz.plot_losses(run_dir))  # nothing saved: a 100-dpi rendering at its own size
    assert shown[-1].width is None and static.png_size(shown[-1].data)[0] == pytest.approx(image.width, abs=1)


def without_creation_date(pdf: bytes) -> list[bytes]:
    return [line for line in pdf.splitlines() if b"/CreationDate" not in line]


def test_show_writes_the_pdf_in_the_background_and_it_is_the_synchronous_file(tmp_path, run_dir):
    """The PDF comes from a forked child, complete (written as .part, then renamed), the same bytes as savefig's."""
    viz.show(viz.plot_losses(run_dir), save_as=tmp_path / "shown" / "losses")
    viz.show(viz.plot_confusions(run_dir), save_as=tmp_path / "shown" / "confusions")
    viz.wait_for_figures()
    assert static._FIGURE_WRITERS == []
    for name, figure in (("losses", viz.plot_losses), ("confusions", viz.plot_confusions)):
        (direct,) = [p for p in viz.save_figure(figure(run_dir), tmp_path / "direct" / name) if p.suffix == ".pdf"]
        shown = (tmp_path / "shown" / f"{name}.pdf").read_bytes()
        assert without_creation_date(shown) == without_creation_date(direct.read_bytes()), name
    assert sorted(p.name for p in (tmp_path / "shown").iterdir()) == [
        "confusions.pdf", "confusions.png", "losses.pdf", "losses.png"]


def test_a_background_figure_that_cannot_be_written_is_an_error_naming_the_file(tmp_path, run_dir):
    (tmp_path / "losses.pdf").mkdir()  # the PDF's name is taken by a folder: the child's rename fails
    viz.show(viz.plot_losses(run_dir), save_as=tmp_path / "losses")
    with pytest.raises(RuntimeError, match=r"losses\.pdf was not written: .*IsADirectoryError"):
        viz.wait_for_figures()
    assert static._FIGURE_WRITERS == [] and not (tmp_path / "losses.pdf.part").exists()
    viz.wait_for_figures()  # reported once, then nothing is pending


def test_latent_animation_embeds_every_frame_and_needs_no_network(tmp_path, run_dir):
    html = viz.latent_animation(run_dir).data
    assert html.count("data:image/png;base64,") == 3  # one frame per recorded epoch
    assert "://" not in html and "font-awesome" not in html and 'class="fa ' not in html
    assert "_anim_img" in html and "<script" in html  # matplotlib's player
    assert viz.latent_animation(run_dir, max_frames=2).data.count("data:image/png;base64,") == 2
    assert "no latent snapshots" in viz.latent_animation(write_run(tmp_path, "bare", latents=False)).data


# ------------------------------------------------------------------------------------------- widgets
def test_latent_explorer_steps_through_epochs(run_dir):
    explorer = viz.LatentExplorer(run_dir)
    assert explorer.slider.options == (("1", 1), ("2", 2), ("3", 3))  # labels and files both count from 1
    assert explorer.slider.value == 2  # starts at the selected epoch
    first = explorer.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    explorer.slider.value = 3
    assert explorer.image.value != first
    explorer.play.value = 0  # Play counts frames from 0: the first recorded epoch
    assert explorer.slider.value == 1


def test_views_say_what_they_are_without_a_kernel(monkeypatch, tmp_path, run_dir):
    import tdro.viz.widgets as widgets_module

    shown = []
    monkeypatch.setattr(widgets_module, "display", lambda bundle, raw: shown.append(bundle))
    viz.LatentExplorer(run_dir)._ipython_display_()
    viz.RunDashboard(tmp_path)._ipython_display_()
    assert [set(b) for b in shown] == [{"text/plain", "application/vnd.jupyter.widget-view+json"}] * 2
    assert "LatentExplorer of run run_a" in shown[0]["text/plain"] and "animation above" in shown[0]["text/plain"]
    assert "RunDashboard" in shown[1]["text/plain"] and "needs a running kernel" in shown[1]["text/plain"]


def test_latent_explorer_without_latents(tmp_path):
    explorer = viz.LatentExplorer(write_run(tmp_path, "bare", latents=False))
    assert "nothing to explore" in explorer.widget.value


def test_dashboard_filters_selects_and_redraws(tmp_path):
    write_run(tmp_path, "p_base", phase={"study": "p1", "arm": "baseline", "seed": 0})
    write_run(tmp_path, "p_arm", phase={"study": "p1", "arm": "batch_64", "seed": 0})
    write_run(tmp_path, "heart_run", dataset="heart", groupdro=False)
    write_run(tmp_path / "nested", "unfinished", finished=False)
    board = viz.RunDashboard(tmp_path, metric="val.acc")
    assert list(board.run_select.options) == ["heart_run", "unfinished", "batch_64 s0", "baseline s0"]  # by path
    assert board.selected == list(board.run_select.options)
    assert list(board.dataset_filter.options) == ["(all)", "digits", "heart"]
    assert "batch_64" in board.arm_filter.options
    assert board.metric.value == "val.acc"
    assert board.curves.value[:4] == b"\x89PNG" and "<table" in board.table.value

    board.set_filters(dataset="digits", arm="batch_64")
    assert list(board.run_select.options) == ["batch_64 s0"] and board.selected == ["batch_64 s0"]
    board.set_filters()
    board.select(["baseline s0", "heart_run"])
    before = board.curves.value
    board.set_metric("train.loss")
    assert board.curves.value != before
    summary = board.summary()
    assert list(summary["run"]) == ["baseline s0", "heart_run"]
    assert list(summary["dataset"]) == ["digits", "heart"]
    with pytest.raises(ValueError, match="not recorded"):
        board.set_metric("val.nonsense")
    with pytest.raises(ValueError, match="no runs with dataset"):
        board.set_filters(dataset="textcaps")
    board.select([])
    assert "no runs selected" in board.table.value


def test_dashboard_widget_state_is_plain_state(tmp_path):
    """No ipywidgets.Output anywhere: headless execution can hang on them (jupyter/nbclient#312)."""
    import ipywidgets as widgets

    write_run(tmp_path, "a")
    board = viz.RunDashboard(tmp_path)

    def walk(w):
        yield w
        for child in getattr(w, "children", ()):
            yield from walk(child)

    kinds = {type(w) for w in walk(board.widget)}
    assert widgets.Output not in kinds and widgets.Image in kinds and widgets.SelectMultiple in kinds


# ------------------------------------------------------------------------------------------- notebook parameters
def test_injected_names_reads_the_last_papermill_cell():
    history = ["", "# Config keys ...\nlr = 0.001", "# Parameters\nlr = 0.01\nepochs = 2\n", "x = 1"]
    assert injected_names(history) == ["lr", "epochs"]
    assert injected_names(["", "a = 1"]) == []
    assert injected_names(None) == []


def test_config_overrides_precedence(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("groupdro_enabled: true\nlr: 0.05\nepochs: 4\n")
    defaults = Config()
    namespace = {
        "parameters_file": [str(params)], "render_run": "",
        "lr": defaults.lr, "epochs": defaults.epochs, "latent_dim": 32, "groupdro_enabled": False,
        # papermill injected lr (explicitly the default: it must still beat the file) and an unlisted key
        "In": ["", "# Parameters\nlr = 0.001\nhead_hidden = 7\n"], "head_hidden": 7,
    }
    files, overrides = config_overrides(namespace, ("parameters_file", "render_run"))
    assert files == [str(params)]
    assert overrides == {"lr": 0.001, "head_hidden": 7, "latent_dim": 32}
    config = config_from_namespace(namespace, ("parameters_file", "render_run"))
    assert (config.lr, config.head_hidden, config.latent_dim) == (0.001, 7, 32)
    assert config.groupdro_enabled is True and config.epochs == 4  # from the file (listed defaults do not override)


def test_invalid_parameters_fail_with_the_config_message():
    with pytest.raises(ConfigError, match="unknown key 'latnt_dim'.*did you mean 'latent_dim'"):
        config_from_namespace({"In": ["# Parameters\nlatnt_dim = 3\n"], "latnt_dim": 3})
    with pytest.raises(ConfigError, match="key 'lr' has value -1.0"):
        config_from_namespace({"lr": -1.0})


def test_parameters_source_uses_config_defaults():
    source = parameters_source(["dataset", "lr", "groups"], {"render_run": ("", "a = b")})
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - our own generated source
    assert namespace["dataset"] == Config().dataset and namespace["lr"] == Config().lr and namespace["groups"] is None
    assert namespace["render_run"] == ""
    assert all("=" not in line.split("#", 1)[1] for line in source.splitlines() if "#" in line and " = " in line)
    with pytest.raises(KeyError, match="not a Config key"):
        parameters_source(["latnt_dim"])


def test_refresh_parameters_cell_restores_config_defaults(tmp_path):
    import ast
    import shutil

    import nbformat

    from tdro.viz.notebook import refresh_parameters_cell

    path = tmp_path / "train.ipynb"
    shutil.copy(Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = cell.source.replace("\nlr = 0.001 ", "\nlr = 0.5 ")
    nbformat.write(nb, path)
    assert refresh_parameters_cell(path) is True
    source = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])).source
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(source).body if isinstance(n, ast.Assign)}
    assert values["lr"] == Config().lr and values["render_run"] == "" and values["parameters_file"] == []
    assert refresh_parameters_cell(path) is False


# ------------------------------------------------------------------------------------------- diagnostics
def test_alignment_figure_one_line_per_group_in_its_colour_and_one_per_pair(tmp_path, run_dir):
    left, right = viz.plot_alignment(run_dir).axes
    history = load_run(run_dir).history
    lines = {line.get_label(): line for line in left.lines if not line.get_label().startswith("_")}
    np.testing.assert_allclose(lines["usps"].get_ydata(), history["alignment.to_anchor.usps"])
    np.testing.assert_allclose(lines["usps"].get_xdata(), [1, 2, 3])
    expected = {g: c.upper() for g, c in viz.group_colors(GROUPS).items()}
    assert line_colors(left) == expected
    assert [line.get_label() for line in right.lines if not line.get_label().startswith("_")] == ["mnist vs usps"]
    old = write_run(tmp_path, "old")
    history_path = old / "history.jsonl"
    history_path.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "alignment"}) + "\n"
                                    for line in history_path.read_text().splitlines()))
    assert "predates the diagnostics" in viz.plot_alignment(old).axes[0].texts[0].get_text()


def test_selection_figure_marks_the_selected_epoch_and_the_warmup(run_dir):
    fig = viz.plot_selection(run_dir)
    ax = fig.axes[0]
    star = next(line for line in ax.lines if line.get_label() == "selected: epoch 2")
    assert list(star.get_xdata()) == [2] and star.get_ydata()[0] == pytest.approx(0.6)
    assert "groupdro_warmup_epochs = 1" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_title() == "Selection: epoch 2 of 3 by val_worst_group_acc"
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["diagnostics"].update(selected_in_warmup=True, selected_in_warmup_of="groupdro_warmup_epochs")
    summary_path.write_text(json.dumps(summary))
    assert "WITHIN THE WARM-UP (groupdro_warmup_epochs)" in viz.plot_selection(run_dir).axes[0].get_title()
    note = viz.diagnostics_note(run_dir).data
    assert note.startswith("- Selected epoch **2** of 3 by `val_worst_group_acc`")
    assert "WARNING: the selected epoch 2 lies within the warm-up" in note and "weights moved from uniform" in note
