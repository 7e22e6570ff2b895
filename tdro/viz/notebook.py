"""Notebook parameters → Config, with papermill's meaning of ``-p`` and ``-f``.

A notebook's ``parameters`` cell lists some Config keys with their defaults (taken from
``Config()``; see ``parameters_source``). papermill injects the values passed with ``-p KEY VALUE``
or read from ``-f FILE.yaml`` into a cell headed ``# Parameters`` right after it; any Config key may
be passed that way, listed or not. ``config_from_namespace(globals())`` then builds the Config:

1. the YAML files of the notebook parameter ``parameters_file`` (merged in order, like ``-f``);
2. every name papermill injected (a name that is neither a Config key nor a notebook parameter is
   passed on too, so it fails with the Config's "unknown key ... did you mean" message);
3. every listed Config key whose value differs from the Config default (edited by hand in
   JupyterLab).

Invalid values fail here, in the first code cell, with the Config's error message. With
``render_run`` (re-render a finished run) the Config is the run's own ``config.yaml``, and any
parameter file or Config key passed beside it is an error. When a Config default changes,
``refresh_parameters_cell("notebooks/train.ipynb")`` rewrites the cell to match.

papermill's ``-p`` passes ``[0, 1]`` and ``{"latent_dim": 16}`` as strings: ``yaml_parameter`` parses the
notebook parameters that expect a list or a mapping (``overrides``, ``fixed``, ``rerun_seeds``,
``parameters_file``). ``strip_notebook`` removes what executing a notebook writes into it (outputs,
execution counts, widget state), so notebooks are committed clean (``python -m tdro strip-notebooks``).
"""
from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tdro.config import Config

INJECTED_HEADER = "# Parameters"  # papermill's Python translator heads the injected cell with this line
EXAMPLES = {list: "[0, 1]", dict: '{"latent_dim": 16}'}  # shown in yaml_parameter's error
KINDS = {list: "list", dict: "mapping"}
KEPT_NOTEBOOK_METADATA = ("kernelspec", "language_info")  # what strip_notebook keeps (the kernel papermill uses)
KEPT_LANGUAGE_INFO = ("name", "pygments_lexer")
KEPT_CELL_METADATA = ("tags",)  # the parameters tag; execution times, scrolling, papermill's records go


class NotebookParameterError(ValueError):
    """A notebook parameter (not a Config key) that cannot be used; the message names it, its value and the fix."""


def yaml_parameter(name: str, value: Any, expected: type[list] | type[dict], single: type | None = None) -> Any:
    """A list or mapping notebook parameter: papermill's ``-p`` passes '[0, 1]' as a string, so parse it as YAML.

    ``single`` (e.g. ``str`` for ``parameters_file``) is a type whose lone value stands for a one-item list.
    """
    parsed = value
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise NotebookParameterError(
                f"notebook parameter {name!r} has value {value!r}, which is not valid YAML "
                f"({str(err).splitlines()[0]}); expected a {KINDS[expected]}, e.g. -p {name} '{EXAMPLES[expected]}'"
            ) from err
    if single is not None and isinstance(parsed, single):
        parsed = [parsed]
    if not isinstance(parsed, expected):
        also = f" or one {single.__name__}" if single is not None else ""
        raise NotebookParameterError(
            f"notebook parameter {name!r} has value {value!r} ({type(parsed).__name__}); expected a "
            f"{KINDS[expected]}{also}, e.g. -p {name} '{EXAMPLES[expected]}' (YAML) or {EXAMPLES[expected]} "
            "in the parameters cell")
    return parsed


def injected_names(history: Sequence[str] | None) -> list[str]:
    """Names assigned in the last papermill-injected cell found in IPython's input history ``In``."""
    for source in reversed(list(history or [])):
        if isinstance(source, str) and source.split("\n", 1)[0].strip() == INJECTED_HEADER:
            return [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
    return []


def config_overrides(namespace: Mapping[str, Any], notebook_parameters: Iterable[str] = ("parameters_file",)
                     ) -> tuple[list[str], dict[str, Any]]:
    """(parameter files, overrides) of a notebook namespace, as described in the module docstring."""
    notebook_parameters = set(notebook_parameters)
    files = yaml_parameter("parameters_file", namespace.get("parameters_file", []), list, single=str)
    defaults = Config().to_dict()
    overrides: dict[str, Any] = {}
    for name in injected_names(namespace.get("In")):
        if name not in notebook_parameters:
            overrides[name] = namespace[name]
    for name, default in defaults.items():
        if name in namespace and name not in overrides and namespace[name] != default:
            overrides[name] = namespace[name]
    return list(files), overrides


def config_from_namespace(namespace: Mapping[str, Any], notebook_parameters: Iterable[str] = ("parameters_file",)
                          ) -> Config:
    """The Config of a notebook run: parameter files, then injected and edited parameters; or, with
    ``render_run``, the finished run's own config (nothing else may be passed beside it)."""
    files, overrides = config_overrides(namespace, notebook_parameters)
    render_run = namespace.get("render_run")
    if not render_run:
        return Config.load(files, overrides)
    return rendered_run_config(render_run, files, overrides)


def rendered_run_config(render_run: Any, files: Sequence[str], overrides: Mapping[str, Any]) -> Config:
    """The config a finished run was trained with; a change passed beside render_run would be shown but not applied."""
    if not isinstance(render_run, (str, Path)):
        raise NotebookParameterError(f"notebook parameter 'render_run' has value {render_run!r}; expected a run "
                                     "directory such as outputs/runs/<run_id> (empty: train a new run)")
    passed = (["parameters_file"] if files else []) + sorted(overrides)
    if passed:
        raise NotebookParameterError(
            f"render_run {render_run} re-renders a finished run as it was trained, so {', '.join(passed)} "
            "would be listed but not applied; drop them (only notebook-display parameters may accompany render_run, "
            "and train.ipynb has none), or leave render_run empty to train a new run with them")
    config_path = Path(render_run) / "config.yaml"
    if not config_path.is_file():
        raise NotebookParameterError(f"render_run {render_run} is not a run directory (no config.yaml in "
                                     f"{Path(render_run).resolve()}); give a folder such as outputs/runs/<run_id>")
    return Config.load([config_path])


def parameters_source(keys: Sequence[str], notebook_parameters: Mapping[str, tuple[Any, str]] | None = None) -> str:
    """Source of a ``parameters`` cell: ``key = default`` for the Config keys (defaults from ``Config()``,
    each with its one-line meaning), then the notebook-only parameters ``{name: (default, comment)}``."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    defaults = Config().to_dict()
    lines = ["# Config keys with their defaults (any other Config key can be passed with -p as well;",
             "# -f params/*.yaml works too). Defaults come from tdro.config.Config. Relative paths",
             "# resolve against the project root (tdro.paths), wherever JupyterLab or papermill starts."]
    for name in keys:
        if name not in fields:
            raise KeyError(f"{name!r} is not a Config key")
        lines.append(f"{name} = {defaults[name]!r}  # {_comment(fields[name].metadata['doc'])}")
    if notebook_parameters:
        lines.append("# notebook parameters (not Config keys)")
        for name, (value, comment) in notebook_parameters.items():
            lines.append(f"{name} = {value!r}  # {_comment(comment)}")
    return "\n".join(lines)


def refresh_parameters_cell(path: str | Path) -> bool:
    """Rewrite a notebook's ``parameters`` cell with today's Config defaults and meanings, keeping its
    keys (in order) and its notebook-only parameters (value and comment). Returns whether it changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} must have exactly one cell tagged 'parameters', found {len(cells)}")
    cell = cells[0]
    keys, extra = [], {}
    lines = cell.source.splitlines()
    for node in ast.parse(cell.source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name in Config.keys():
            keys.append(name)
        else:
            text = lines[node.lineno - 1]
            comment = text.split("#", 1)[1].strip() if "#" in text else ""
            extra[name] = (ast.literal_eval(node.value), comment)
    source = parameters_source(keys, extra)
    if source == cell.source:
        return False
    cell.source = source
    nbformat.write(nb, path)
    return True


def _comment(text: str) -> str:
    """A one-line comment papermill's parameter parser accepts (it rejects '=' in comments)."""
    return " ".join(text.split()).replace(" = ", ": ").replace("=", ":")


def changed_keys(config: Config) -> dict[str, Any]:
    """Keys whose values differ from the Config defaults (what a notebook run changed)."""
    defaults = Config().to_dict()
    return {k: v for k, v in config.to_dict().items() if v != defaults[k]}


def strip_notebook(path: str | Path) -> bool:
    """Remove what executing or autosaving writes into a notebook (outputs, execution counts, widget state,
    papermill and cell metadata), keeping its cells, tags and kernel; returns whether it changed."""
    import nbformat

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    nb.metadata = nbformat.from_dict({k: v for k, v in nb.metadata.items() if k in KEPT_NOTEBOOK_METADATA})
    if "language_info" in nb.metadata:
        nb.metadata.language_info = nbformat.from_dict(
            {k: v for k, v in nb.metadata.language_info.items() if k in KEPT_LANGUAGE_INFO})
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({k: v for k, v in cell.metadata.items() if k in KEPT_CELL_METADATA})
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    if nbformat.writes(nb) == before:
        return False
    nbformat.write(nb, path)
    return True
