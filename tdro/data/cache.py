"""Frozen-backbone feature cache: 512-d ResNet-18 features computed once, stored under outputs/cache.

A cache file is keyed by a hash of everything that determines its contents: the image list (each
file's path, size and modification time, in order), the image transform (size, resize, mean,
std), the backbone and the identity of its weights (the SHA-256 of the weights file, or the seed
of a random initialisation with the torch/torchvision versions), and the storage dtype. Anything
else changing leaves the file valid; any of these changing makes a new file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from tdro.data.base import DataError

CACHE_VERSION = 1
FEATURE_DIM = 512
RANDOM_INIT_SEED = 0


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_identity(weights: str) -> dict:
    """What makes the backbone's features: ``imagenet`` (torch hub cache), ``random`` or a path."""
    if weights == "random":
        import torchvision

        return {"weights": "random", "seed": RANDOM_INIT_SEED, "torch": torch.__version__,
                "torchvision": torchvision.__version__}
    from tdro.models.encoders import RESNET18_FILE, _resnet18_weights  # noqa: F401 (error text lives there)

    path = Path(os.path.join(torch.hub.get_dir(), "checkpoints", RESNET18_FILE)) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        _resnet18_weights(None if weights == "imagenet" else str(path))  # raises the clear missing-weights error
    return {"weights": "file", "sha256": _file_sha256(path), "path": str(path)}


def build_backbone(weights: str) -> torch.nn.Module:
    """The frozen ResNet-18 trunk (fc removed, eval mode, no gradients) of ``resnet_visual``."""
    from tdro.models.encoders import create_encoder

    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            trunk = create_encoder("resnet_visual", 1, {"in_channels": 3}).backbone
    else:
        path = None if weights == "imagenet" else weights
        trunk = create_encoder("resnet_visual", 1, {"in_channels": 3}, pretrained=True, weights_path=path).backbone
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk


def cache_key(store, weights: str) -> dict:
    return {
        "version": CACHE_VERSION,
        "images": store.identity(),
        "transform": store.transform.identity(),
        "backbone": "torchvision resnet18 trunk (fc removed), eval mode",
        "backbone_weights": backbone_identity(weights),
        "dtype": "float16",
    }


def cache_path(cache_dir: str | Path, prefix: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{prefix}-resnet18-{digest}.pt"


def cached_features(store, weights: str, cache_dir: str | Path, prefix: str = "features", batch_size: int = 64,
                    device: str | torch.device | None = None, progress: bool = True) -> tuple[torch.Tensor, Path, bool]:
    """(N, 512) float32 features of every image in ``store``, the cache file, and whether it was a hit."""
    key = cache_key(store, weights)
    path = cache_path(cache_dir, prefix, key)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DataError(f"feature cache {path} is unreadable ({error}); delete it to recompute") from error
        if saved.get("key") != json.dumps(key, sort_keys=True) or saved["features"].shape != (len(store), FEATURE_DIM):
            raise DataError(f"feature cache {path} does not match what it is keyed by; delete it to recompute")
        return saved["features"].float(), path, True

    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trunk = build_backbone(weights).to(device)
    out = torch.empty(len(store), FEATURE_DIM, dtype=torch.float16)
    with torch.inference_mode(), tqdm(total=len(store), desc=f"caching {prefix} features", unit="img",
                                      disable=not progress) as bar:
        for start in range(0, len(store), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(store)))
            out[idx] = trunk(store[idx].to(device)).float().cpu().half()
            bar.update(len(idx))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"key": json.dumps(key, sort_keys=True), "features": out}, tmp)
    os.replace(tmp, path)
    return out.float(), path, False
