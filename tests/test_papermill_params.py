"""Notebooks as researchers run them (issue 14): relative paths mean the project root from JupyterLab,
papermill and the CLI; list and mapping parameters passed with papermill's -p; render_run takes nothing
beside it; every parameters cell parses in papermill; the README's sweep commands run in order; the strip
command. Notebook items run the real notebooks through papermill (its CLI where -p's strings matter)."""
from __future__ import annotations

import ast
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from tdro import paths
from tdro.__main__ import main
from tdro.config import Config
from tdro.sweep import SweepError, open_sweep
from tdro.viz.notebook import NotebookParameterError, config_from_namespace, strip_notebook, yaml_parameter

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
TINY = {"epochs": 1, "progress": False, "digits_sizes": [200, 60], "latent_samples_per_group": 60}
ENV = {**os.environ, "MPLBACKEND": "agg", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.kernelspec import find_kernel_specs

    os.environ["MPLBACKEND"] = "agg"  # the kernel inherits it
    return "tdro" if "tdro" in find_kernel_specs() else "python3"


def make_project(root: Path, *notebooks: str) -> Path:
    """A tdro checkout elsewhere: its pyproject.toml marker, params/ and the named notebooks (the package stays
    the installed one, so only where relative paths land can differ)."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "tdro"\nversion = "0"\n')
    shutil.copytree(REPO / "params", root / "params")
    (root / "notebooks").mkdir()
    for name in notebooks:
        shutil.copy(NOTEBOOKS / f"{name}.ipynb", root / "notebooks" / f"{name}.ipynb")
    return root


def papermill_cli(notebook: Path, out: Path, kernel: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    """papermill's own command line, so -p values arrive as the strings a shell passes."""
    command = [sys.executable, "-m", "papermill", str(notebook), str(out), "-k", kernel, "--no-progress-bar",
               *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=900)


def cell_errors(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [f"{o['ename']}: {o['evalue']}" for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o["output_type"] == "error"]


# ------------------------------------------------------------------------------------------- project root (unit)
def test_project_root_is_found_above_the_working_directory(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj")
    other = project / "notebooks" / "vendored"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "something-else"\n')  # not the marker
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.chdir(other)
    assert paths.project_root() == project
    monkeypatch.chdir(project / "notebooks")  # where JupyterLab starts a notebook's kernel
    assert paths.enter_project_root() == project and Path.cwd() == project


def test_project_root_then_the_notebook_folder_then_the_package(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("JPY_SESSION_NAME", str(project / "notebooks" / "train.ipynb"))  # set by JupyterLab
    assert paths.project_root() == project
    monkeypatch.delenv("JPY_SESSION_NAME")
    assert paths.project_root() == REPO  # papermill started outside: the checkout of the installed package


def test_no_project_root_is_an_error_naming_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "search_starts", lambda: [tmp_path])
    with pytest.raises(paths.ProjectRootError, match=f"no tdro project root .* at or above {tmp_path}; start "
                                                     "JupyterLab or papermill inside the tdro checkout"):
        paths.project_root()


# ------------------------------------------------------------------------------------ list / mapping parameters (unit)
def test_yaml_parameter_parses_papermill_strings():
    assert yaml_parameter("overrides", '{"latent_dim": 16}', dict) == {"latent_dim": 16}
    assert yaml_parameter("overrides", "{latent_dim: 16, data_root: data/x}", dict) == {"latent_dim": 16,
                                                                                         "data_root": "data/x"}
    assert yaml_parameter("rerun_seeds", "[0, 1]", list) == [0, 1]
    assert yaml_parameter("rerun_seeds", [2], list) == [2]  # a Python value from the cell or papermill's API
    assert yaml_parameter("overrides", {}, dict) == {}
    assert yaml_parameter("parameters_file", "params/groupdro.yaml", list, single=str) == ["params/groupdro.yaml"]
    assert yaml_parameter("parameters_file", "[a.yaml, b.yaml]", list, single=str) == ["a.yaml", "b.yaml"]


@pytest.mark.parametrize("name, value, expected, message", [
    ("rerun_seeds", "0, 1", list, "notebook parameter 'rerun_seeds' has value '0, 1' (str); expected a list, "
                                  "e.g. -p rerun_seeds '[0, 1]'"),
    ("rerun_seeds", 3, list, "notebook parameter 'rerun_seeds' has value 3 (int); expected a list"),
    ("overrides", "[1, 2]", dict, "notebook parameter 'overrides' has value '[1, 2]' (list); expected a mapping, "
                                  "e.g. -p overrides '{\"latent_dim\": 16}'"),
    ("overrides", "{latent_dim: [16}", dict, "notebook parameter 'overrides' has value '{latent_dim: [16}', which "
                                             "is not valid YAML"),
    ("parameters_file", 7, list, "notebook parameter 'parameters_file' has value 7 (int); expected a list or one str"),
])
def test_yaml_parameter_errors_name_the_parameter_value_and_fix(name, value, expected, message):
    single = str if name == "parameters_file" else None
    with pytest.raises(NotebookParameterError) as raised:
        yaml_parameter(name, value, expected, single=single)
    assert message in str(raised.value)


# ------------------------------------------------------------------------------------------- render_run (unit)
def test_render_run_returns_the_runs_config_and_refuses_changes_beside_it(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    Config(latent_dim=8, epochs=3).save(run / "config.yaml")
    listed = {"render_run": str(run), "parameters_file": [], "latent_dim": Config().latent_dim}
    config = config_from_namespace(listed, ("parameters_file", "render_run"))
    assert (config.latent_dim, config.epochs) == (8, 3)  # as it was trained, not the listed defaults
    injected = {**listed, "In": ["# Parameters\nrender_run = 'x'\nlatent_dim = 128\nlr = 0.5\n"], "latent_dim": 128,
                "lr": 0.5}
    with pytest.raises(NotebookParameterError) as raised:
        config_from_namespace(injected, ("parameters_file", "render_run"))
    assert str(raised.value).startswith(f"render_run {run} re-renders a finished run as it was trained, so "
                                        "latent_dim, lr would be listed but not applied; drop them")
    with pytest.raises(NotebookParameterError, match="so parameters_file would be listed but not applied"):
        config_from_namespace({**listed, "parameters_file": ["params/groupdro.yaml"]},
                              ("parameters_file", "render_run"))
    with pytest.raises(NotebookParameterError, match=r"render_run .*missing is not a run directory \(no config.yaml"):
        config_from_namespace({**listed, "render_run": str(tmp_path / "missing")}, ("parameters_file", "render_run"))


# --------------------------------------------------------------------------------- parameters cells parse in papermill
@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_papermill_parses_every_parameters_cell(path, caplog):
    """papermill's parser drops a line with a second '=' (e.g. in a comment): -p NAME then warns 'unknown
    parameter' and `make phases` printed both for start_from."""
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    nb = load_notebook_node(str(path))
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [n.targets[0].id for n in ast.parse(cell.source).body if isinstance(n, ast.Assign)]
    with caplog.at_level(logging.WARNING, logger="papermill"):
        inferred = [p.name for p in _infer_parameters(nb)]
    assert inferred == names
    assert not [r.message for r in caplog.records if "Unable to parse" in r.getMessage()]


# ------------------------------------------------------------------------------------------- strip command (unit)
def test_strip_notebooks_restores_the_committed_notebook(tmp_path, capsys):
    path = tmp_path / "train.ipynb"
    shutil.copy(NOTEBOOKS / "train.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[0].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
    code[0].execution_count = 3
    code[1].metadata["execution"] = {"iopub.status.busy": "2024-01-01"}
    code[1].metadata["scrolled"] = True
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["papermill"] = {"parameters": {}}
    nb.metadata["language_info"]["version"] = "3.11.9"
    nbformat.write(nb, path)
    assert main(["strip-notebooks", str(path)]) == 0
    assert capsys.readouterr().out.startswith("stripped")
    assert path.read_text() == (NOTEBOOKS / "train.ipynb").read_text()
    assert strip_notebook(path) is False


# ------------------------------------------------------------------------------------------- open_sweep (unit)
def test_sweep_notebook_attach_refuses_fixed_keys(tmp_path):
    with pytest.raises(SweepError, match=r"fixed \{'epochs': 5\} and smoke False shape a new study's search space, "
                                         "but search_file is empty"):
        open_sweep("", "groupdro", "", tmp_path, fixed={"epochs": 5})
    with pytest.raises(SweepError, match="search_file and study_name are both empty"):
        open_sweep("", "", "", tmp_path)


# ----------------------------------------------------------------------------------------- notebooks through papermill
@pytest.mark.slow
def test_jupyterlab_style_run_writes_to_the_projects_outputs(tmp_path, kernel):
    """Kernel started in notebooks/ (as JupyterLab does): the default output_dir, the parameters cell's own
    parameters_file example and compare's default runs_root all mean the project's folders."""
    import papermill

    project = make_project(tmp_path / "proj", "train", "compare")
    papermill.execute_notebook(str(project / "notebooks" / "train.ipynb"), str(tmp_path / "train.ipynb"),
                               parameters={"parameters_file": ["params/groupdro.yaml"], "run_name": "lab", **TINY},
                               kernel_name=kernel, cwd=str(project / "notebooks"), progress_bar=False)
    run = project / "outputs" / "runs" / "lab"
    assert (run / "summary.json").is_file()
    assert not (project / "notebooks" / "outputs").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["output_dir"] == "outputs/runs"  # recorded as given: the same config (and hash) as the CLI's
    assert config["groupdro_enabled"] is True  # params/groupdro.yaml was found from notebooks/
    nb = papermill.execute_notebook(str(project / "notebooks" / "compare.ipynb"), str(tmp_path / "compare.ipynb"),
                                    parameters={}, kernel_name=kernel, cwd=str(project / "notebooks"),
                                    progress_bar=False)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "1 runs under outputs/runs" in text


def test_render_run_with_a_config_key_fails_the_first_cell(tmp_path, kernel):
    """-p render_run DIR -p latent_dim 128 used to render the run with its own latent size while listing 128."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    Config(**TINY).save(run / "config.yaml")
    out = tmp_path / "render.ipynb"
    result = papermill_cli(NOTEBOOKS / "train.ipynb", out, kernel, "-p", "render_run", str(run),
                           "-p", "latent_dim", "128", cwd=REPO)
    assert result.returncode != 0
    assert cell_errors(out) == [f"NotebookParameterError: render_run {run} re-renders a finished run as it was "
                                "trained, so latent_dim would be listed but not applied; drop them (only "
                                "notebook-display parameters may accompany render_run, and train.ipynb has none), "
                                "or leave render_run empty to train a new run with them"]


def test_a_list_parameter_that_is_no_list_fails_before_any_trial(tmp_path, kernel):
    out = tmp_path / "sweep.ipynb"
    result = papermill_cli(NOTEBOOKS / "sweep.ipynb", out, kernel, "-p", "rerun_seeds", "0, 1", "-p", "trials", "1",
                           "-p", "sweeps_dir", str(tmp_path / "sweeps"), cwd=REPO)
    assert result.returncode != 0
    [error] = cell_errors(out)
    assert error.startswith("NotebookParameterError: notebook parameter 'rerun_seeds' has value '0, 1' (str); "
                            "expected a list, e.g. -p rerun_seeds '[0, 1]'")
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_phase_notebook_from_papermills_cli_with_overrides_and_start_from(tmp_path, kernel):
    """`make phases`' start_from line parses (no 'unknown parameter'), -p overrides '{...}' arrives as a mapping,
    and the relative start_from and output_dir mean the project's, from a kernel started in notebooks/."""
    project = make_project(tmp_path / "proj", "phase2_architecture")
    Config(dataset="digits", epochs=25, lr=0.002).save(project / "start.yaml")
    out = tmp_path / "phase2.ipynb"
    result = papermill_cli(project / "notebooks" / "phase2_architecture.ipynb", out, kernel, "-p", "smoke", "True",
                           "-p", "seeds", "1", "-p", "isolate_runs", "False", "-p", "start_from", "start.yaml",
                           "-p", "overrides", '{"latent_dim": 16, "digits_sizes": [200, 60]}',
                           cwd=project / "notebooks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Unable to parse" not in result.stderr and "unknown parameter" not in result.stderr
    phase = project / "outputs" / "phases" / "phase2_architecture"
    assert (phase / "impact.csv").is_file() and (phase / "chosen.yaml").is_file()
    baseline = next(p for p in (phase / "runs").iterdir() if p.name.startswith("baseline"))
    config = Config.load([baseline / "config.yaml"])
    assert (config.latent_dim, config.lr, config.digits_sizes) == (16, 0.002, [200, 60])


def readme_sweep_commands() -> list[list[str]]:
    """The commands of the README's sweep block, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Sweeps (Optuna)", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def one_trial(argv: list[str]) -> list[str]:
    """The same command with 1 trial where it runs trials (--trials N, -p trials N; 0 stays 0)."""
    argv = list(argv)
    for i in range(len(argv) - 1):
        if argv[i] in ("--trials", "trials") and argv[i + 1] != "0":
            argv[i + 1] = "1"
    return argv


@pytest.mark.slow
def test_readme_sweep_commands_run_in_order(tmp_path, kernel, monkeypatch):
    """Each README sweep command, tiny (1 trial, the search file's smoke runs, a temporary sweeps folder), in
    order: the CLI in this process, the notebook through papermill's CLI; the PostgreSQL worker line needs a
    server (tests/test_sweeps.py covers it)."""
    commands = readme_sweep_commands()
    assert len(commands) == 6 and sum("postgresql" in " ".join(c) for c in commands) == 1
    sweeps = tmp_path / "sweeps"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for number, command in enumerate(commands):
        if any(arg.startswith("postgresql://") for arg in command):
            continue
        if command[:3] == [".venv/bin/python", "-m", "tdro"]:
            argv = one_trial(command[3:]) + ["--sweeps-dir", str(sweeps)]
            argv += ["--smoke"] if "-f" in argv else []
            assert main(argv) == 0, command
        else:
            assert command[:2] == [".venv/bin/papermill", "notebooks/sweep.ipynb"] and command[3:5] == ["-k", "tdro"]
            out = tmp_path / f"sweep{number}.ipynb"
            result = papermill_cli(REPO / command[1], out, kernel, *one_trial(command[5:]), "-p", "smoke", "True",
                                   "-p", "sweeps_dir", str(sweeps), cwd=REPO)
            assert result.returncode == 0, result.stderr[-3000:]
            assert cell_errors(out) == []
    assert sorted(p.name for p in sweeps.iterdir()) == ["groupdro", "groupdro_epochs5"]
    assert len(list((sweeps / "groupdro" / "runs").iterdir())) == 2  # CLI 1 trial + the notebook's 1
    assert len(list((sweeps / "groupdro_epochs5" / "runs").iterdir())) == 2
    assert sorted(p.name for p in (sweeps / "groupdro" / "best").iterdir() if p.is_dir()) == ["seed_0", "seed_1",
                                                                                              "seed_2"]
    fixed = [Config.load([p / "config.yaml"]).epochs for p in (sweeps / "groupdro_epochs5" / "runs").iterdir()]
    assert fixed == [5, 5]  # -p epochs 5 (CLI) and fixed {"epochs": 5} (notebook) are one search space
    best = sorted(p.name for p in (sweeps / "groupdro_epochs5" / "best").iterdir() if p.is_dir())
    assert best == ["seed_0", "seed_1"]  # the notebook's -p rerun_seeds "[0, 1]"
