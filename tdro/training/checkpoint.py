"""Checkpoints that load with torch.load(weights_only=True) and are written atomically."""
from __future__ import annotations

import io
import os
import pickle
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def capture_rng_states(data_generator: torch.Generator) -> dict:
    """Every random state a resumed run needs to continue as if it had not stopped."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    data_generator.set_state(states["data"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gauss"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(paths: Sequence[Path], payload: dict) -> None:
    """Write ``payload`` to each path in order (serialised once): temporary file, fsync, rename, so a kill leaves
    the previous checkpoint intact."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(path.suffix + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


class CheckpointError(ValueError):
    """A checkpoint file that is cut, corrupt or not a tdro checkpoint; the message names it and the remedy."""


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint's payload; a missing, cut or corrupt file is an error that says what to do instead."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; a run writes checkpoints/last.pt after its first epoch")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - damaged bytes fail anywhere in the unpickler (IndexError, KeyError, …)
        # torch's unpickling message advises weights_only=False, which would run code from the file
        described = isinstance(error, (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError))
        unreadable = isinstance(error, pickle.UnpicklingError) or not described or not str(error)
        reason = "it does not unpickle as tensors" if unreadable else str(error).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} is cut or corrupt ({reason}). {_remedy(path)}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"checkpoint {path} is not a tdro checkpoint (no model state). {_remedy(path)}")
    return payload


def _remedy(path: Path) -> str:
    """How to go on without a broken checkpoint: from its sibling, or from scratch."""
    run_dir = path.parent.parent
    other = path.with_name("best.pt" if path.name == "last.pt" else "last.pt")
    start_again = f"start the run again (remove {run_dir} or choose another run_name)"
    if not other.is_file():
        return f"There is no {other.name} to fall back on: {start_again}."
    if path.name == "last.pt":
        return (f"Resume from the best checkpoint instead: `cp {other} {path}` then `python -m tdro train --resume "
                f"{run_dir}` (epochs after best.pt's are trained again), or {start_again}.")
    return (f"Copy the last checkpoint over it (`cp {other} {path}`; the selected epoch becomes the last one), "
            f"or {start_again}.")
