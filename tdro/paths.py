"""The project root, so that relative paths in notebook parameters mean the same everywhere.

JupyterLab starts a notebook's kernel in the notebook's folder (``notebooks/``), papermill in its
caller's folder, the CLI in the shell's. Every notebook's first code cell calls
``enter_project_root()``: the kernel then works in the project root, as the CLI run from the
project root does, so every relative path — a notebook parameter (``output_dir``, ``parameters_file``,
``render_run``, ``runs_root``, ``start_from``, ``sweeps_dir``, ...), a key of a parameter file or of
``overrides`` (``data_root``, ``feature_cache_dir``, ...) — resolves against it, and a run's
``config.yaml`` holds the same (relative) values whichever of the three started it. An absolute path
stays as it is.

The project root is the nearest folder holding the tdro project's ``pyproject.toml`` (``name =
"tdro"``), searched upward from the working directory, then from the notebook's folder (JupyterLab
passes the notebook's path as ``JPY_SESSION_NAME``), then from the installed tdro package (an
editable install lives in the checkout).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path

MARKER = "pyproject.toml"
PROJECT_NAME = "tdro"


class ProjectRootError(FileNotFoundError):
    """No tdro project root above any of the searched folders; the message lists them and the remedy."""


def is_project_root(folder: Path) -> bool:
    """Whether ``folder`` holds a pyproject.toml declaring the tdro project (another project's does not count)."""
    path = folder / MARKER
    if not path.is_file():
        return False
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    project = data.get("project")
    return isinstance(project, dict) and project.get("name") == PROJECT_NAME


def search_starts() -> list[Path]:
    """Folders the project root is searched above, in order: cwd, the notebook's folder, the tdro package."""
    starts = [Path.cwd()]
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        starts.append(Path(session).resolve().parent)
    starts.append(Path(__file__).resolve().parent)
    return starts


def project_root() -> Path:
    """The tdro project root (see the module docstring), or ``ProjectRootError`` naming where it looked."""
    starts = search_starts()
    for start in starts:
        for folder in (start, *start.parents):
            if is_project_root(folder):
                return folder
    raise ProjectRootError(
        f"no tdro project root (a folder whose {MARKER} declares name = {PROJECT_NAME!r}) at or above "
        f"{', '.join(str(s) for s in starts)}; start JupyterLab or papermill inside the tdro checkout "
        "(or give papermill --cwd <checkout>)")


def enter_project_root() -> Path:
    """Make the project root the working directory (a notebook's first cell), so relative paths resolve there."""
    root = project_root()
    os.chdir(root)
    return root
