"""Static plots (matplotlib/seaborn) and ipywidgets views of run records.

- ``tdro.viz.static``: one function per figure or table the notebooks show (losses, per-group
  accuracy, GroupDRO weights, learning rates, latent view with anchor ellipses, confusion matrices,
  run tables, multi-run curves; the diagnostics: alignment, selection, ``diagnostics_note``),
  ``show(fig, save_as=...)``, which displays a figure as PNG with any backend (and saves it as PNG + PDF, the
  displayed image being the saved PNG; the PDF is written by a background process, ``wait_for_figures``
  waits for it), ``group_colors`` (one colour-vision-safe colour per group,
  everywhere) and ``latent_animation`` (the latent evolution as offline HTML/JS, frames drawn by moving one
  ``LatentView``'s artists).
- ``tdro.viz.widgets``: ``LatentExplorer`` (epoch stepping in the latent view) and
  ``RunDashboard`` (run selection, filters, metric overlay, weights, summary).
- ``tdro.viz.notebook``: notebook parameters → Config (papermill ``-p``/``-f`` semantics).
- ``tdro.viz.phase_plots``: figures of a phase (arms overlaid, GroupDRO weights per arm, impact).

Widgets are imported on first use, so ``import tdro.viz`` does not need ipywidgets.
"""
from tdro.viz.static import (OKABE_ITO, LatentSnapshot, LatentView, class_colors, diagnostics_note,
                             ellipse_parameters, figure_png, group_colors, latent_animation, latent_epochs,
                             load_latents, metric_columns, plot_alignment, plot_confusions, plot_group_accuracy,
                             plot_group_weights, plot_latent_epochs, plot_latent_view, plot_latents,
                             plot_learning_rates, plot_losses, plot_metric_curves, plot_selection, plot_weights_by_run,
                             run_facts, run_group_colors, run_metrics_table, save_figure, show, summary_table,
                             wait_for_figures)

__all__ = [
    "OKABE_ITO", "LatentExplorer", "LatentSnapshot", "LatentView", "RunDashboard", "class_colors",
    "diagnostics_note", "ellipse_parameters", "figure_png", "group_colors", "latent_animation", "latent_epochs",
    "load_latents", "metric_columns", "plot_alignment", "plot_confusions", "plot_group_accuracy",
    "plot_group_weights", "plot_latent_epochs", "plot_latent_view", "plot_latents", "plot_learning_rates",
    "plot_losses", "plot_metric_curves", "plot_selection", "plot_weights_by_run", "run_facts", "run_group_colors",
    "run_metrics_table", "save_figure", "show", "summary_table", "wait_for_figures",
]


def __getattr__(name: str):
    if name in ("LatentExplorer", "RunDashboard"):
        from tdro.viz import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'tdro.viz' has no attribute {name!r}")
