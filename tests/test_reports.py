"""Per-run reports: executed for real (papermill on a tiny digits run, the CLI as a user calls it), and
checked for what a reader needs: the files in the run directory, figures as PNG and PDF, and HTML that
reads with no network (no external script, stylesheet or frame source) and no kernel."""
from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from tdro.reports import export_html, started_kernel

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("losses", "group_accuracy", "group_weights", "learning_rates", "latent_view", "latent_epochs", "confusions")
TINY = ("-p", "epochs", "2", "-p", "progress", "False", "-p", "digits_sizes", "[200, 60]",
        "-p", "latent_samples_per_group", "20")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def network_loads(html: str) -> list[str]:
    """Every address the page would fetch: script/link/img/iframe sources, CSS url() and imports, JS imports."""
    tags = re.findall(r"<(?:script|link|img|iframe|source|video|audio)\b[^>]*\b(?:src|href)=[\"']?([a-z]+://[^\"' >]+)",
                      html, re.I)
    css = (re.findall(r"url\(\s*[\"']?([a-z]+://[^\"')]+)", html, re.I)
           + re.findall(r"@import\s+[\"']?([a-z]+://\S+)", html))
    scripts = re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S | re.I)
    return tags + css + [address for body in scripts for address in re.findall(r"[a-z]+://[^\s\"'`)]+", body)]


def tdro(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tdro", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "agg"})


def test_export_drops_widget_views_and_every_cdn_script(tmp_path):
    nb = new_notebook(cells=[new_code_cell("view", outputs=[new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": "m1", "version_major": 2, "version_minor": 0},
                              "text/plain": "[a view that needs a running kernel]"})])])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                             "version_minor": 0}}
    nbformat.write(nb, tmp_path / "x.ipynb")
    html = export_html(tmp_path / "x.ipynb").read_text()
    assert (tmp_path / "x.html").is_file()
    assert network_loads(html) == [] and "<script" not in html  # no require.js, widget manager, MathJax, Mermaid
    assert "[a view that needs a running kernel]" in html and WIDGET_VIEW not in html


@pytest.fixture(scope="module")
def kernel() -> str:
    from jupyter_client.kernelspec import find_kernel_specs

    return "tdro" if "tdro" in find_kernel_specs() else "python3"


def test_the_report_process_skips_jsonschema_s_iri_grammar():
    """jsonschema compiles an RFC 3987 grammar at import (~1 s) for a format nbformat never checks."""
    code = "import sys, tdro.reports, papermill; assert sys.modules['rfc3987_syntax'] is None, 'grammar imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_started_kernel_is_warm_then_stopped_with_its_clients(kernel):
    """The kernel imports the notebook's modules before its first cell (no output, no execution count), answers
    the client papermill makes at once (the warm-up's client has a session of its own: the kernel routes replies
    by session), and is stopped with every client made for it, also when the report fails."""
    from jupyter_core.utils import run_sync

    printed = []
    with started_kernel(kernel) as manager:
        client = manager.client()
        client.start_channels()
        run_sync(client.wait_for_ready)(timeout=30)
        reply = run_sync(client.execute_interactive)(
            "import sys; print('tdro.training.trainer' in sys.modules, 'tdro.viz.notebook' in sys.modules)",
            timeout=60, output_hook=lambda msg: printed.append(msg["content"].get("text", "")))
    assert "".join(printed).split() == ["True", "True"] and reply["content"]["execution_count"] == 1
    assert not run_sync(manager.is_alive)() and not client.channels_running
    with pytest.raises(RuntimeError, match="report failed"), started_kernel(kernel) as manager:
        client = manager.client()
        client.start_channels()
        run_sync(client.wait_for_ready)(timeout=30)
        raise RuntimeError("report failed")
    assert not run_sync(manager.is_alive)() and not client.channels_running


@pytest.fixture(scope="module")
def trained(tmp_path_factory, kernel) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m tdro report --train` (make run's command) on a 2-epoch digits run."""
    runs = tmp_path_factory.mktemp("reports") / "runs"
    result = tdro("report", "--train", *TINY, "-p", "output_dir", str(runs), "--kernel", kernel)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    return run_dir, result


@pytest.mark.slow
def test_train_report_writes_the_run_directory_report(trained):
    run_dir, result = trained
    assert f"report: {run_dir / 'report.html'}" in result.stdout and "selected epoch" in result.stdout
    for name in ("summary.json", "report.ipynb", "report.html"):
        assert (run_dir / name).is_file(), name
    for name in FIGURES:
        assert (run_dir / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert (run_dir / "figures" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    nb = nbformat.read(run_dir / "report.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert "run directory:" in "".join(o.get("text", "") for o in outputs)
    shown = {base64.b64decode(o["data"]["image/png"]): o["metadata"]["image/png"]["width"]
             for o in outputs if "image/png" in o.get("data", {})}
    for name in FIGURES:  # the report shows the saved PNG itself (one render), at half its 200-dpi width
        png = (run_dir / "figures" / f"{name}.png").read_bytes()
        assert shown[png] == round(int.from_bytes(png[16:20], "big") / 2), name


@pytest.mark.slow
def test_report_html_reads_offline_with_the_latent_evolution(trained):
    run_dir, _ = trained
    html = (run_dir / "report.html").read_text()
    assert network_loads(html) == []
    animation = re.search(r'<div class="animation">.*?</script>', html, re.S).group(0)
    assert len(re.findall(r'frames\[\d+\] = "data:image/png;base64,', html)) == 2  # both epochs, embedded
    assert "_anim_img" in animation and WIDGET_VIEW not in html
    assert "LatentExplorer of run" in html and "needs a running kernel" in html  # the widget's text, no VBox(...)
    assert "VBox(children" not in html


@pytest.mark.slow
def test_report_cli_rerenders_a_finished_run(trained, kernel):
    run_dir, _ = trained
    history = (run_dir / "history.jsonl").read_text()
    (run_dir / "report.html").unlink()
    result = tdro("report", str(run_dir), "--kernel", kernel)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"report: {run_dir / 'report.html'}")
    assert (run_dir / "report.html").is_file() and (run_dir / "history.jsonl").read_text() == history  # no training
    nb = nbformat.read(run_dir / "report.ipynb", as_version=4)
    assert nb.metadata["papermill"]["parameters"]["render_run"] == str(run_dir)


def test_report_cli_refuses_mixed_arguments(tmp_path, capsys):
    from tdro.__main__ import main

    assert main(["report", str(tmp_path), "-p", "epochs", "1"]) == 2 and "need --train" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2 and "no finished run" in capsys.readouterr().err
    assert main(["report"]) == 2 and "or --train" in capsys.readouterr().err
