"""Locating official data files under ``data_root`` and downloading them when allowed."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

from tdro.data.base import DataFileError

DEFAULT_DATA_ROOT = "data"


def data_root(config) -> Path:
    """``config.data_root``, or ``./data`` when it is null."""
    return Path(config.data_root if config.data_root is not None else DEFAULT_DATA_ROOT).expanduser()


def search_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    """``root`` itself, then each conventional sub-folder (so data_root may be the shared parent)."""
    return [root] + [root / s for s in subdirs]


def find_file(root: Path, names: Iterable[str], subdirs: Sequence[str]) -> Path | None:
    """The first existing file among ``names`` in ``root`` or its conventional sub-folders."""
    names = list(names)
    for folder in search_dirs(root, subdirs):
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    return None


def missing_files_error(what: str, expected: Sequence[Path], origin: str, extra: str = "") -> DataFileError:
    """The error for absent official files: where they were looked for, where to get them, how to fix."""
    listed = ", ".join(str(p) for p in expected)
    return DataFileError(
        f"{what} not found; expected {listed}. Get the official files from {origin} and place them there "
        f"(data_root), or set download: true to fetch them{extra}")


def download_url(url: str, destination: Path, what: str, timeout: float = 15.0) -> None:
    """Fetch one file atomically; failure (e.g. offline) raises at once with the path to fill by hand."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        tmp.unlink(missing_ok=True)
        raise DataFileError(
            f"download of {what} from {url} failed ({error}); if this machine is offline, download it "
            f"elsewhere and place it at {destination} by hand (then download: false is enough)") from error
    os.replace(tmp, destination)
