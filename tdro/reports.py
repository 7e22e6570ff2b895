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

import functools
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

# jsonschema (imported by nbformat) compiles an RFC 3987 grammar at import, ~1 s, when rfc3987-syntax is installed
# (jupyter-events pulls it in), for its "iri" format check; nbformat validates no string format, so it is left out
sys.modules.setdefault("rfc3987_syntax", None)
import nbformat  # noqa: E402

TRAIN_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "train.ipynb"
REPORT_NOTEBOOK = "report.ipynb"
REPORT_HTML = "report.html"
# what the train notebook imports first: its kernel imports them while this process reads the Config
KERNEL_WARM_UP = "import pandas, tdro.viz.notebook, tdro.training.trainer"
# run in a report's kernel before it is stopped (stopping kills its process group, figure writers included)
WAIT_FOR_FIGURES = "import tdro.viz; tdro.viz.wait_for_figures()"  # tdro.viz: imported by KERNEL_WARM_UP already
FIGURES_TIMEOUT_S = 300
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


@functools.cache
def offline_exporter() -> Any:
    """nbconvert's HTML exporter without its CDN scripts, built once and warmed on a small notebook: importing
    nbconvert and compiling its templates take ~0.7 s, which a report spends while its kernel works."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    exporter = HTMLExporter(template_name="lab", template_file=OFFLINE_TEMPLATE,
                            extra_loaders=[DictLoader({OFFLINE_TEMPLATE: OFFLINE_TEMPLATE_SOURCE})])
    # a progress bar's frames (text ended by \r) show as the last frame, as in JupyterLab, not all of them
    exporter.register_preprocessor(CoalesceStreamsPreprocessor, enabled=True)
    exporter.from_notebook_node(new_notebook(cells=[new_markdown_cell("*warm-up*"), new_code_cell("1")]))
    return exporter


def export_html(notebook: str | Path, html: str | Path | None = None) -> Path:
    """Export an executed notebook to HTML that needs no network and no kernel (default: beside it, ``.html``)."""
    notebook = Path(notebook)
    html = Path(html) if html is not None else notebook.with_suffix(".html")
    body, _ = offline_exporter().from_notebook_node(offline_notebook(nbformat.read(notebook, as_version=4)))
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


@contextmanager
def started_kernel(kernel: str) -> Iterator[Any]:
    """A Jupyter kernel for papermill, started now: it boots and imports what the train notebook needs
    (``KERNEL_WARM_UP``) on a second core while this process reads the Config; when done it is stopped at once.

    A graceful stop would wait ~1 s for the kernel's interpreter to tear torch down; every file the notebook writes
    is closed when its last cell is done. nbclient leaves a kernel it did not start running and its own client
    open: the kernel is stopped here, with every client made for it."""
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.session import Session
    from jupyter_core.utils import run_sync

    clients = []

    class Kernel(AsyncKernelManager):
        """A kernel manager that keeps the clients it makes, to stop them with the kernel."""

        def client(self, **kwargs: Any) -> Any:
            clients.append(super().client(**kwargs))
            return clients[-1]

    manager = Kernel(kernel_name=kernel)
    run_sync(manager.start_kernel)()
    try:
        # a session of its own: the kernel routes replies by session, so one shared with nbclient's client would
        # take nbclient's replies whenever it connected last
        warm_up = manager.client(session=Session(key=manager.session.key))
        warm_up.start_channels(iopub=False, stdin=False, hb=False, control=False)
        warm_up.execute(KERNEL_WARM_UP, silent=True)  # no output, no execution count; the notebook queues behind it
        try:
            yield manager
        except BaseException:
            with suppress(Exception):  # the notebook's own error is the one to see
                wait_for_kernel_figures(warm_up)
            raise
        wait_for_kernel_figures(warm_up)
    finally:
        for client in clients:
            client.stop_channels()
        run_sync(manager.shutdown_kernel)(now=True)


def wait_for_kernel_figures(client: Any) -> None:
    """Wait for the figure files the kernel's notebook is still writing in the background (``viz.wait_for_figures``)."""
    from jupyter_core.utils import run_sync

    msg_id = client.execute(WAIT_FOR_FIGURES, silent=True)
    while True:
        reply = run_sync(client.get_shell_msg)(timeout=FIGURES_TIMEOUT_S)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    content = reply["content"]
    if content["status"] != "ok":
        raise RuntimeError(f"the report's figures were not all written: {content.get('ename')}: {content.get('evalue')}")


def execute_train_notebook(out: Path, parameters: Mapping[str, Any], manager: Any) -> Path:
    """Execute notebooks/train.ipynb with papermill on a ``started_kernel`` into ``out``; the notebook's path."""
    import papermill

    building = threading.Thread(target=offline_exporter)  # export_html's exporter, built while the kernel works
    building.start()
    papermill.execute_notebook(str(TRAIN_NOTEBOOK), str(out), parameters=dict(parameters),
                               kernel_name=manager.kernel_name, progress_bar=False, km=manager)
    building.join()
    return out


def render_report(run_dir: str | Path, kernel: str = "tdro") -> Path:
    """Render a finished run's report into its directory (no training); the HTML path."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no summary.json); "
                                f"resume it with `python -m tdro train --resume {run_dir}`")
    check_can_execute(kernel)
    with started_kernel(kernel) as manager:
        notebook = execute_train_notebook(run_dir / REPORT_NOTEBOOK, {"render_run": str(run_dir)}, manager)
    return export_html(notebook, notebook.with_name(REPORT_HTML))


def train_report(files: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None,
                 kernel: str = "tdro") -> Path:
    """Train a new run by executing the train notebook into the run's own directory; the report's HTML path.

    The run directory is chosen before the notebook starts (the trainer's own naming), so the
    executed notebook is the run's report, training output included."""
    check_can_execute(kernel)
    with started_kernel(kernel) as manager:  # it starts while the Config is read: torch's import here and there
        from tdro.config import Config, coerce_overrides
        from tdro.training.trainer import new_run_dir

        files = [str(Path(f).resolve()) for f in files]  # the notebook's kernel runs from the project root
        overrides = coerce_overrides(overrides or {})
        config = Config.load(files, overrides)  # the notebook's first cell checks the same; fail before it runs
        run_dir = new_run_dir(config).resolve()
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"run directory {run_dir} already holds a run; render it with "
                                  f"`python -m tdro report {run_dir}` or choose another run_name")
        run_dir.mkdir(parents=True, exist_ok=True)
        parameters = {**overrides, "parameters_file": files, "output_dir": str(run_dir.parent),
                      "run_name": run_dir.name}
        notebook = execute_train_notebook(run_dir / REPORT_NOTEBOOK, parameters, manager)
    return export_html(notebook, notebook.with_name(REPORT_HTML))
