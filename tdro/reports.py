"""Per-run reports: ``<run_dir>/report.ipynb`` (notebooks/train.ipynb executed by papermill), its HTML
export ``<run_dir>/report.html`` that reads with no network and no kernel, and ``<run_dir>/figures/``
(the notebook's static figures as PNG and PDF, written by ``tdro.viz.show(fig, save_as=...)``).

``render_report(run_dir)`` re-renders a finished run (``-p render_run``, no training);
``train_report(files, overrides)`` trains a new run through the notebook straight into its own
directory (``make run``); ``export_html(notebook)`` exports any executed notebook offline.

Offline HTML: nbconvert's page loads require.js, MathJax, Mermaid and the widget manager from CDNs.
Our notebooks need none of them (no LaTeX or diagrams; figures are PNG; the latent evolution is a self-contained
``tdro.viz.latent_animation``), so the export leaves them out, and widgets, which cannot run without
a kernel, show their plain-text form (what the view is, where its static version is).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nbformat

TRAIN_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb"
REPORT_NOTEBOOK = "report.ipynb"
REPORT_HTML = "report.html"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
OFFLINE_TEMPLATE = "tdro_offline.html.j2"
# nbconvert's lab page without its CDN scripts (require.js, the widget manager, MathJax, Mermaid)
OFFLINE_TEMPLATE_SOURCE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def offline_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy without widget views and widget state: offline they render blank, their text form says what they are."""
    nb = nbformat.from_dict(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if WIDGET_VIEW in output.get("data", {}) and "text/plain" in output["data"]:
                del output["data"][WIDGET_VIEW]
    return nb


def export_html(notebook: str | Path, html: str | Path | None = None) -> Path:
    """Export an executed notebook to HTML that needs no network and no kernel (default: beside it, ``.html``)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    notebook = Path(notebook)
    html = Path(html) if html is not None else notebook.with_suffix(".html")
    exporter = HTMLExporter(template_name="lab", template_file=OFFLINE_TEMPLATE,
                            extra_loaders=[DictLoader({OFFLINE_TEMPLATE: OFFLINE_TEMPLATE_SOURCE})])
    # a progress bar's frames (text ended by \r) show as the last frame, as in JupyterLab, not all of them
    exporter.register_preprocessor(CoalesceStreamsPreprocessor, enabled=True)
    body, _ = exporter.from_notebook_node(offline_notebook(nbformat.read(notebook, as_version=4)))
    html.write_text(body, encoding="utf-8")
    return html


def check_can_execute(kernel: str) -> None:
    """Fail before writing anything when the train notebook or the Jupyter kernel is missing, naming the remedy."""
    from jupyter_client.kernelspec import find_kernel_specs

    if not TRAIN_NOTEBOOK.is_file():
        raise FileNotFoundError(f"{TRAIN_NOTEBOOK} is missing: reports need tdro's source checkout (pip install -e)")
    if kernel not in find_kernel_specs():
        raise ValueError(f"Jupyter kernel {kernel!r} is not installed (make run registers 'tdro'); "
                         f"installed: {sorted(find_kernel_specs())}; choose one with --kernel")


def execute_train_notebook(out: Path, parameters: Mapping[str, Any], kernel: str) -> Path:
    """Execute notebooks/train.ipynb with papermill into ``out``, then export it offline; the HTML path."""
    import papermill

    papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(out), parameters=dict(parameters), kernel_name=kernel,
                               progress_bar=False)
    return export_html(out, out.with_name(REPORT_HTML))


def render_report(run_dir: str | Path, kernel: str = "tdro") -> Path:
    """Render a finished run's report into its directory (no training); the HTML path."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no summary.json); "
                                f"resume it with `python -m tdro train --resume {run_dir}`")
    check_can_execute(kernel)
    return execute_train_notebook(run_dir / REPORT_NOTEBOOK, {"render_run": str(run_dir)}, kernel)


def train_report(files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None,
                 kernel: str = "tdro") -> Path:
    """Train a new run by executing the train notebook into the run's own directory; the report's HTML path.

    The run directory is chosen before the notebook starts (the trainer's own naming), so the
    executed notebook is the run's report, training output included."""
    from tdro.config import Config, coerce_overrides
    from tdro.training.trainer import new_run_dir

    files = [str(Path(f).resolve()) for f in files]  # the notebook's kernel runs from the project root
    overrides = coerce_overrides(overrides or {})
    config = Config.load(files, overrides)  # the notebook's first cell checks the same; fail before a kernel starts
    run_dir = new_run_dir(config).resolve()
    if (run_dir / "config.yaml").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; render it with "
                              f"`python -m tdro report {run_dir}` or choose another run_name")
    check_can_execute(kernel)
    run_dir.mkdir(parents=True, exist_ok=True)
    parameters = {**overrides, "parameters_file": files, "output_dir": str(run_dir.parent), "run_name": run_dir.name}
    return execute_train_notebook(run_dir / REPORT_NOTEBOOK, parameters, kernel)
