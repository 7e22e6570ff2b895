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

Invalid values fail here, in the first code cell, with the Config's error message. When a Config
default changes, ``refresh_parameters_cell("notebooks/train.ipynb")`` rewrites the cell to match.
"""
from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tdro.config import Config

INJECTED_HEADER = "# Parameters"  # papermill's Python translator heads the injected cell with this line


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
    files = namespace.get("parameters_file") or []
    if isinstance(files, str):
        files = [files]
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
    """The Config of a notebook run: parameter files, then injected and edited parameters."""
    files, overrides = config_overrides(namespace, notebook_parameters)
    return Config.load(files, overrides)


def parameters_source(keys: Sequence[str], notebook_parameters: Mapping[str, tuple[Any, str]] | None = None) -> str:
    """Source of a ``parameters`` cell: ``key = default`` for the Config keys (defaults from ``Config()``,
    each with its one-line meaning), then the notebook-only parameters ``{name: (default, comment)}``."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    defaults = Config().to_dict()
    lines = ["# Config keys with their defaults (any other Config key can be passed with -p as well;",
             "# -f params/*.yaml works too). Defaults come from tdro.config.Config."]
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
