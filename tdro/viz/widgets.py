"""ipywidgets views over run records: ``LatentExplorer`` (step through epochs of one run's latent view)
and ``RunDashboard`` (select runs under a folder, filter by dataset and arm, overlay a metric, see
GroupDRO weights and a summary table).

Every view draws with the static functions of ``tdro.viz.static``, so a report can show the same
figure above the widget for readers without a kernel. Display a view by leaving it last in a cell
(or ``display(view)``); ``view.widget`` is the top-level ipywidgets container.

Figures go into ``widgets.Image`` (PNG bytes) and tables into ``widgets.HTML``, never into an
``widgets.Output``: headless execution (papermill/nbclient) mimics Output widgets by sending comm
messages on the shell channel while it waits for the cell's reply there, which sometimes hangs the
execution for good (jupyter/nbclient#312). Image and HTML values are plain widget state, saved in
the executed notebook's metadata.

Without a kernel (JupyterLab on a saved notebook, an HTML export) a widget cannot run: each view's
plain-text form then says what it is and where its static version is, instead of ``VBox(children=…)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
from IPython.display import display

from tdro.runs import Run, find_runs
from tdro.viz.static import (as_run, figure_png, latent_epochs, load_latents, metric_columns, study_labels,
                             plot_latents, plot_metric_curves, plot_weights_by_run, run_label, summary_table)

ALL = "(all)"


class _View:
    widget: widgets.Widget
    without_kernel: str  # the plain-text form, shown where the widget cannot run

    def _ipython_display_(self) -> None:
        display({**self.widget._repr_mimebundle_(), "text/plain": self.without_kernel}, raw=True)


def _image() -> widgets.Image:
    return widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))


class LatentExplorer(_View):
    """Step through the epochs of a run's latent view (``latents/epoch_XXX.npz``) with a slider or Play."""

    def __init__(self, run: str | Path | Run) -> None:
        self.run = as_run(run)
        self.epochs = latent_epochs(self.run)
        self.without_kernel = (f"[LatentExplorer of run {self.run.run_id}: an interactive view that needs a running "
                               "kernel; the latent figures and the animation above show the same epochs]")
        if not self.epochs:
            self.widget = widgets.HTML(f"run <code>{self.run.run_id}</code> recorded no latent snapshots "
                                       "(latent_samples_per_group = 0): nothing to explore")
            return
        start = self.run.summary.get("selected_epoch")
        start = start if start in self.epochs else self.epochs[-1]
        self.slider = widgets.SelectionSlider(options=[(str(e), e) for e in self.epochs], value=start,
                                              description="epoch", continuous_update=False)
        self.play = widgets.Play(min=0, max=len(self.epochs) - 1, value=self.epochs.index(start), interval=800,
                                 description="play")
        self.play.observe(lambda change: setattr(self.slider, "value", self.epochs[change["new"]]), names="value")
        self.image = _image()
        self.slider.observe(lambda change: self.draw(change["new"]), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.play, self.slider]), self.image])
        self.draw(start)

    def draw(self, epoch: int) -> None:
        """Show the latent view of ``epoch`` (from 1, as in the records and the file names)."""
        self.image.value = figure_png(plot_latents(load_latents(self.run, epoch)))


class RunDashboard(_View):
    """Compare runs under a folder: filter by dataset and arm, select runs, choose a metric.

    Shows the chosen metric's curves overlaid, GroupDRO weights per selected run, and a summary
    table. ``select``, ``set_metric`` and ``set_filters`` drive it from code (and tests).
    """

    def __init__(self, root: str | Path = "outputs/runs", metric: str = "val.worst_group_acc",
                 max_selected: int = 8) -> None:
        self.root = Path(root)
        self.max_selected = max_selected
        self.without_kernel = (f"[RunDashboard of the runs under {self.root}: an interactive view that needs a running "
                               "kernel; the figures above are its static version]")
        self.dataset_filter = widgets.Dropdown(description="dataset")
        self.arm_filter = widgets.Dropdown(description="arm")
        self.run_select = widgets.SelectMultiple(description="runs", rows=8, layout=widgets.Layout(width="60%"))
        self.metric = widgets.Dropdown(description="metric")
        self.refresh_button = widgets.Button(description="rescan folder", icon="refresh")
        self.curves = _image()
        self.weights = _image()
        self.table = widgets.HTML()
        tab = widgets.Tab(children=[self.curves, self.weights, self.table])
        for i, title in enumerate(("curves", "GroupDRO weights", "summary")):
            tab.set_title(i, title)
        self.widget = widgets.VBox([
            widgets.HTML(f"<b>Runs under</b> <code>{self.root}</code>"),
            widgets.HBox([self.dataset_filter, self.arm_filter, self.refresh_button]),
            self.run_select, self.metric, tab,
        ])
        self._initial_metric = metric
        self._updating = False
        self.scan()
        self.dataset_filter.observe(self._on_filter, names="value")
        self.arm_filter.observe(self._on_filter, names="value")
        self.run_select.observe(lambda _: self.redraw(), names="value")
        self.metric.observe(lambda _: self.draw_curves(), names="value")
        self.refresh_button.on_click(lambda _: self.scan())

    # --- data ---
    def scan(self) -> None:
        """(Re)load every run under the root folder and reset the filters."""
        self.runs: dict[str, Run] = {}
        self.meta: dict[str, dict] = {}
        for path in find_runs(self.root):
            run = as_run(path)
            label = self._unique(run_label(run))
            self.runs[label] = run
            meta = study_labels(path)
            self.meta[label] = {"dataset": str(run.config.get("dataset")),
                                "arm": str(meta.get("arm", "(not a study run)")), "study": meta.get("study")}
        self._updating = True
        try:
            self.dataset_filter.options = [ALL] + sorted({m["dataset"] for m in self.meta.values()})
            self.arm_filter.options = [ALL] + sorted({m["arm"] for m in self.meta.values()})
            self.dataset_filter.value = self.arm_filter.value = ALL
            metrics = metric_columns(self.runs.values())
            self.metric.options = metrics
            if metrics:
                self.metric.value = self._initial_metric if self._initial_metric in metrics else metrics[0]
            self._apply_filters()
        finally:
            self._updating = False
        self.redraw()

    def _unique(self, label: str) -> str:
        if label not in self.runs:
            return label
        i = 2
        while f"{label} ({i})" in self.runs:
            i += 1
        return f"{label} ({i})"

    def filtered(self) -> list[str]:
        """Run labels that pass the dataset and arm filters."""
        return [label for label, m in self.meta.items()
                if self.dataset_filter.value in (ALL, m["dataset"]) and self.arm_filter.value in (ALL, m["arm"])]

    def _apply_filters(self) -> None:
        labels = self.filtered()
        previous = [label for label in self.run_select.value if label in labels]
        self.run_select.options = labels
        self.run_select.value = tuple(previous or labels[: self.max_selected])

    def _on_filter(self, _change) -> None:
        if self._updating:
            return
        self._updating = True
        try:
            self._apply_filters()
        finally:
            self._updating = False
        self.redraw()

    # --- programmatic control ---
    @property
    def selected(self) -> list[str]:
        return list(self.run_select.value)

    def select(self, labels: Sequence[str]) -> None:
        unknown = [label for label in labels if label not in self.run_select.options]
        if unknown:
            raise ValueError(f"unknown or filtered-out runs {unknown}; available: {list(self.run_select.options)}")
        self.run_select.value = tuple(labels)

    def set_metric(self, metric: str) -> None:
        if metric not in self.metric.options:
            raise ValueError(f"metric {metric!r} is not recorded by these runs; available: {list(self.metric.options)}")
        self.metric.value = metric

    def set_filters(self, dataset: str = ALL, arm: str = ALL) -> None:
        for name, dropdown, value in (("dataset", self.dataset_filter, dataset), ("arm", self.arm_filter, arm)):
            if value not in dropdown.options:
                raise ValueError(f"no runs with {name} {value!r}; available: {list(dropdown.options)}")
        self._updating = True
        try:
            self.dataset_filter.value, self.arm_filter.value = dataset, arm
            self._apply_filters()
        finally:
            self._updating = False
        self.redraw()

    def summary(self) -> pd.DataFrame:
        """The summary table of the selected runs."""
        labels = self.selected
        return summary_table([self.runs[label] for label in labels], labels)

    # --- drawing ---
    def redraw(self) -> None:
        if self._updating:
            return
        self.draw_curves()
        self.draw_weights()
        self.draw_table()

    def draw_curves(self) -> None:
        if self._updating:
            return
        labels = self.selected
        self.curves.value = figure_png(plot_metric_curves([self.runs[label] for label in labels],
                                                          self.metric.value or "val.worst_group_acc", labels))

    def draw_weights(self) -> None:
        labels = self.selected
        self.weights.value = figure_png(plot_weights_by_run([self.runs[label] for label in labels], labels))

    def draw_table(self) -> None:
        table = self.summary()
        self.table.value = (table.round(4).to_html(index=False, na_rep="—") if len(table)
                            else "<i>no runs selected</i>")
