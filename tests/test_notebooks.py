"""The notebooks: committed clean, one parameters cell, defaults from the Config, no logic of their own,
and executed for real by papermill on tiny digits runs (no mocks), asserting on what they produced."""
from __future__ import annotations

import ast
import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from tdro.config import Config
from tdro.phases import load_phase
from tdro.viz.notebook import strip_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
OURS = ("train", "phase1_quick_wins", "phase2_architecture", "phase3_finetuning", "compare")
TRAIN_NOTEBOOK_PARAMETERS = {"parameters_file", "render_run"}
TINY = {"epochs": 2, "progress": False, "digits_sizes": [200, 60], "latent_samples_per_group": 60}


def parameters_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected exactly one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def assigned(source: str) -> dict:
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body
            if isinstance(node, ast.Assign)}


# ------------------------------------------------------------------------------------------- structure (fast)
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_are_committed_clean_with_one_parameters_cell(path, tmp_path):
    """JupyterLab's autosave writes outputs, execution counts and widget state into the notebook it runs."""
    strip = f"{path.name} holds what running it wrote: run `.venv/bin/python -m tdro strip-notebooks` and commit again"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    parameters_cell(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, strip
        assert set(cell.metadata) <= {"tags"}, strip
    assert set(nb.metadata) <= {"kernelspec", "language_info"}, strip  # no widget state, no papermill record
    assert nb.metadata["kernelspec"]["name"] == "tdro"
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    assert strip_notebook(copy) is False, strip  # nothing else for the strip command to remove


def test_all_our_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} >= set(OURS)


def test_train_parameters_are_the_config_defaults():
    source = parameters_cell(nbformat.read(NOTEBOOKS / "train.ipynb", as_version=4)).source
    values = assigned(source)
    defaults = Config().to_dict()
    config_keys = {k: v for k, v in values.items() if k in defaults}
    assert set(values) - set(config_keys) == TRAIN_NOTEBOOK_PARAMETERS
    assert config_keys == {k: defaults[k] for k in config_keys}, (
        "the Config's defaults changed: run tdro.viz.notebook.refresh_parameters_cell('notebooks/train.ipynb')")
    assert {"dataset", "visual_encoder", "text_encoder", "run_name", "epochs", "latent_dim", "groupdro_enabled"} <= set(values)


@pytest.mark.parametrize("name", OURS)
def test_notebooks_hold_no_logic(name):
    """Calls into tdro and display only: no functions, classes, loops, branches or try blocks."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    forbidden = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.For, ast.While, ast.If, ast.Try, ast.With,
                 ast.Lambda)
    for cell in nb.cells:
        if cell.cell_type == "code":
            found = [type(n).__name__ for n in ast.walk(ast.parse(cell.source)) if isinstance(n, forbidden)]
            assert not found, f"{name}: move {found} into tdro:\n{cell.source}"


# ------------------------------------------------------------------------------------------- execution (papermill)
@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.kernelspec import find_kernel_specs

    os.environ["MPLBACKEND"] = "agg"  # the kernel inherits it
    return "tdro" if "tdro" in find_kernel_specs() else "python3"


def execute(name: str, out: Path, kernel: str, **parameters) -> nbformat.NotebookNode:
    import papermill

    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters, kernel_name=kernel,
                               cwd=str(REPO), progress_bar=False)
    return nbformat.read(out, as_version=4)


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind in o.get("data", {})]


def widget_models(nb) -> list[dict]:
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    return list(state.values())


def png_count(nb) -> int:
    return sum(base64.b64decode(o["data"]["image/png"])[:4] == b"\x89PNG" for o in outputs(nb, "image/png"))


@pytest.mark.slow
def test_train_notebook_trains_and_renders(tmp_path, kernel):
    nb = execute("train", tmp_path / "train.ipynb", kernel, output_dir=str(tmp_path / "runs"), run_name="nb", **TINY)
    run = tmp_path / "runs" / "nb"
    for name in ("config.yaml", "history.jsonl", "steps.jsonl", "summary.json", "latents/epoch_001.npz"):
        assert (run / name).is_file(), name
    assert len((run / "history.jsonl").read_text().splitlines()) == 2
    assert png_count(nb) == 9  # selection, alignment, losses, group accuracy, weights, LR, latent view, latent epochs,
    # confusions
    markdown = [o["data"]["text/markdown"] for o in outputs(nb, "text/markdown")]
    assert any("Selected epoch" in text for text in markdown)  # the diagnostics note
    assert {p.name for p in (run / "figures").iterdir()} >= {"selection.png", "alignment.pdf"}
    tables = outputs(nb, "text/html")
    assert any("worst-group acc" in o["data"]["text/html"] for o in tables)  # the summary table
    assert any("peak memory (MB)" in o["data"]["text/html"] for o in tables)
    models = {m["model_name"]: m for m in widget_models(nb)}
    assert models["SelectionSliderModel"]["state"]["_options_labels"] == ["1", "2"]
    assert "ImageModel" in models  # the latent view the slider steps through
    assert not nb.metadata["papermill"].get("exception")


@pytest.mark.slow
def test_train_notebook_cli_with_parameter_file(tmp_path, kernel):
    """papermill's own CLI: -f params/groupdro.yaml plus -p for a key the parameters cell does not list."""
    out = tmp_path / "g.ipynb"
    command = [sys.executable, "-m", "papermill", "notebooks/train.ipynb", str(out), "-k", kernel,
               "-f", "params/groupdro.yaml", "-p", "epochs", "1", "-p", "progress", "False", "-p", "run_name", "g",
               "-p", "output_dir", str(tmp_path / "runs"), "-p", "log_interval", "3", "-p", "digits_sizes", "[200, 60]"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "agg"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = Config.load([tmp_path / "runs" / "g" / "config.yaml"])
    expected = Config.load([REPO / "params" / "groupdro.yaml"])
    assert config.groupdro_enabled and config.groupdro_eta == expected.groupdro_eta
    assert (config.log_interval, config.digits_sizes, config.epochs) == (3, [200, 60], 1)  # unlisted keys pass too
    history = [json.loads(line) for line in (tmp_path / "runs" / "g" / "history.jsonl").read_text().splitlines()]
    assert history[0]["q"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("parameters, message", [
    ({"latnt_dim": 3}, "unknown key 'latnt_dim' in parameters; did you mean 'latent_dim'?"),
    ({"lr": -1.0}, "key 'lr' has value -1.0; allowed: > 0.0"),
])
def test_invalid_parameter_fails_the_first_code_cell(tmp_path, kernel, parameters, message):
    from papermill.exceptions import PapermillExecutionError

    out = tmp_path / "bad.ipynb"
    with pytest.raises(PapermillExecutionError) as raised:
        execute("train", out, kernel, output_dir=str(tmp_path / "runs"), **parameters)
    assert raised.value.ename == "ConfigError" and message in raised.value.evalue
    nb = nbformat.read(out, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[2]  # parameters, injected parameters, then the first code cell
    assert first.outputs[-1]["output_type"] == "error" and message in first.outputs[-1]["evalue"]
    assert not (tmp_path / "runs").exists()  # nothing was written


@pytest.mark.slow
def test_train_notebook_rerenders_a_finished_run_without_training(tmp_path, kernel):
    execute("train", tmp_path / "a.ipynb", kernel, output_dir=str(tmp_path / "runs"), run_name="r", **TINY)
    before = sorted((tmp_path / "runs").iterdir())
    nb = execute("train", tmp_path / "b.ipynb", kernel, render_run=str(tmp_path / "runs" / "r"))
    assert sorted((tmp_path / "runs").iterdir()) == before
    assert png_count(nb) == 9
    changed = next(o["data"]["text/html"] for o in outputs(nb, "text/html") if "changed from the default" in
                   o["data"]["text/html"])
    assert "run_name" in changed and "digits_sizes" in changed  # the run's own config, as it was trained


@pytest.fixture(scope="module")
def phases(tmp_path_factory, kernel):
    """Phase 1 → 2 → 3 on tiny digits runs, each starting from the previous phase's chosen config."""
    root = tmp_path_factory.mktemp("phases")
    out = root / "outputs"
    notebooks, start = {}, ""
    for name, seeds in (("phase1_quick_wins", 2), ("phase2_architecture", 1), ("phase3_finetuning", 1)):
        notebooks[name] = execute(name, root / f"{name}.ipynb", kernel, dataset="digits", seeds=seeds, smoke=True,
                                  output_dir=str(out), start_from=start, isolate_runs=False)
        start = str(out / name / "chosen.yaml")
    return out, notebooks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phase1_quick_wins", "phase2_architecture", "phase3_finetuning"])
def test_phase_notebooks_measure_every_arm(phases, name):
    out, notebooks = phases
    nb = notebooks[name]
    spec = load_phase(name)
    impact = pd.read_csv(out / name / "impact.csv", index_col="arm")
    assert list(impact.index) == [arm.name for arm in spec.arms]  # a row per arm, not-applicable ones included
    runs = [p for p in (out / name / "runs").iterdir() if (p / "summary.json").is_file()]
    measured = impact[impact["status"] != "not applicable"]
    assert measured["seeds"].min() >= 1 and len(runs) >= 1
    html = "".join(o["data"]["text/html"] for o in outputs(nb, "text/html"))
    assert "expected impact (seed)" in html and "Δ worst-group acc [95% CI]" in html
    assert png_count(nb) == 3  # impact, arm curves, GroupDRO weights per arm
    assert sorted(p.name for p in (out / name / "figures").iterdir()) == sorted(  # also as files, for papers
        f"{figure}.{fmt}" for figure in ("impact", "arm_curves", "arm_weights") for fmt in ("png", "pdf"))
    assert Config.load([out / name / "chosen.yaml"]).dataset == "digits"
    if name == "phase1_quick_wins":
        assert impact.loc["char_cnn_text", "status"] == "not applicable"
        assert "no text group" in impact.loc["char_cnn_text", "notes"]
        assert impact.loc["batch_64", "seeds"] == 2 and impact.loc["batch_64", "paired_seeds"] == 2
        assert not pd.isna(impact.loc["batch_64", "worst_group_acc_ci_low"])
        assert "not applicable" in html
    if name == "phase2_architecture":
        assert impact.loc["differential_lr", "status"] == "not applicable"
    if name == "phase3_finetuning":
        assert set(impact.index[impact["status"] == "not applicable"]) >= {"classes_15", "classes_20"}
        assert Config.load([out / name / "chosen.yaml"]).groupdro_enabled


@pytest.mark.slow
def test_phase_notebook_reexecution_only_reuses(phases, tmp_path, kernel):
    out, _ = phases
    before = {p for p in out.rglob("summary.json")}
    nb = execute("phase1_quick_wins", tmp_path / "again.ipynb", kernel, dataset="digits", seeds=2, smoke=True,
                 output_dir=str(out), isolate_runs=False)
    assert {p for p in out.rglob("summary.json")} == before
    runs_table = next(o["data"]["text/html"] for c in nb.cells if "run_phase(" in c.source for o in c.outputs
                      if "text/html" in o.get("data", {}))
    assert "reused" in runs_table and "trained" not in runs_table


@pytest.mark.slow
def test_compare_notebook_dashboard_state(phases, tmp_path, kernel):
    out, _ = phases
    figures = tmp_path / "compare" / "figures"
    figures.parent.mkdir()
    nb = execute("compare", tmp_path / "compare" / "compare.ipynb", kernel, runs_root=str(out), max_runs=4,
                 figures_dir=str(figures))
    assert png_count(nb) == 2  # static curves and weights above the dashboard
    assert sorted(p.name for p in figures.iterdir()) == ["group_weights.pdf", "group_weights.png",
                                                         "metric_curves.pdf", "metric_curves.png"]
    models = widget_models(nb)
    select = [m for m in models if m["model_name"] == "SelectMultipleModel"]
    assert len(select) == 1
    labels = select[0]["state"]["_options_labels"]
    run_count = len({p.parent for p in out.rglob("summary.json")})
    assert len(labels) == run_count and "baseline s0" in labels
    assert len(select[0]["state"]["index"]) == 4  # the first max_runs selected
    dropdowns = {tuple(m["state"]["_options_labels"])[:2] for m in models if m["model_name"] == "DropdownModel"}
    assert ("(all)", "digits") in dropdowns
    images = [m for m in models if m["model_name"] == "ImageModel"]
    assert len(images) == 2
