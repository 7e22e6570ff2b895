"""Lazy image inputs: decode through PIL, resize, ImageNet-normalise, one batch at a time.

An image that cannot be read is an error naming the file (the reference returned a silent zero
image). ``ImageFileStore.check_headers`` opens every file's header when a dataset is built, so an
unreadable file fails before a run directory exists rather than in epoch 1.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tdro.data.base import DataError, InputStore

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageTransform:
    """PIL image -> (3, S, S) float tensor: RGB, bilinear resize to S x S, /255, normalise."""

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def identity(self) -> dict:
        return {"image_size": self.image_size, "resize": "PIL bilinear", "mean": list(self.mean), "std": list(self.std)}


def _header_problem(path: Path) -> str | None:
    """Why PIL cannot identify an image file from its header (format, size; PNG chunk checksums), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return f"{path} ({type(error).__name__}: {error})"
    if width < 1 or height < 1:
        return f"{path} (size {width}x{height})"
    return None


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _BaseImageStore(InputStore):
    transform: ImageTransform
    threads: int

    def _load(self, position: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        positions = torch.as_tensor(index, dtype=torch.long).reshape(-1).tolist()
        if self.threads > 1 and len(positions) > 1:  # PIL releases the GIL while decoding
            with ThreadPoolExecutor(min(self.threads, len(positions))) as pool:
                images = list(pool.map(self._load, positions))
        else:
            images = [self._load(p) for p in positions]
        if not images:
            size = self.transform.image_size
            return torch.zeros(0, 3, size, size)
        return torch.stack(images)


class ImageFileStore(_BaseImageStore):
    """Images stored as files; ``store[idx]`` decodes the batch (B, 3, S, S)."""

    def __init__(self, paths: Sequence[str | Path], transform: ImageTransform, threads: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self.threads = _default_threads() if threads is None else int(threads)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, position: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[position]
        try:
            with Image.open(path) as image:
                return self.transform(image)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); replace the file with a "
                            "valid image (re-download it) or remove it so the item is reported as missing") from error

    def check_headers(self) -> None:
        """Open every file's header without decoding its pixels; any unreadable file is an error naming it."""
        with ThreadPoolExecutor(max(1, self.threads)) as pool:  # PIL releases the GIL on file reads
            problems = [p for p in pool.map(_header_problem, self.paths) if p is not None]
        if problems:
            raise DataError(f"{len(problems)} of {len(self.paths)} images cannot be read: {'; '.join(problems[:5])}"
                            f"{'; ...' if len(problems) > 5 else ''}. Replace each with a valid image (re-download it) "
                            "or remove it so its item is reported as missing")

    def subset(self, positions) -> "ImageFileStore":
        positions = torch.as_tensor(positions, dtype=torch.long).tolist()
        return ImageFileStore([self.paths[p] for p in positions], self.transform, self.threads)

    def identity(self) -> list:
        """What determines these images: path, size and modification time of every file."""
        out = []
        for p in self.paths:
            stat = p.stat()
            out.append([str(p.resolve()), stat.st_size, stat.st_mtime_ns])
        return out


class CallableImageStore(_BaseImageStore):
    """Images fetched by a callable (e.g. rows of a Hugging Face dataset): ``fetch(key) -> PIL image``."""

    def __init__(self, keys: Sequence[Any], fetch: Callable[[Any], Any], transform: ImageTransform,
                 describe: Callable[[Any], str], identity_prefix: str, threads: int | None = None) -> None:
        self.keys = list(keys)
        self.fetch = fetch
        self.transform = transform
        self.describe = describe
        self.identity_prefix = identity_prefix
        self.threads = _default_threads() if threads is None else int(threads)

    def __len__(self) -> int:
        return len(self.keys)

    def _load(self, position: int) -> torch.Tensor:
        key = self.keys[position]
        try:
            return self.transform(self.fetch(key))
        except Exception as error:  # any decode failure must name the item, never become a zero image
            raise DataError(f"cannot read image {self.describe(key)} ({type(error).__name__}: {error})") from error

    def subset(self, positions) -> "CallableImageStore":
        positions = torch.as_tensor(positions, dtype=torch.long).tolist()
        return CallableImageStore([self.keys[p] for p in positions], self.fetch, self.transform, self.describe,
                                  self.identity_prefix, self.threads)

    def identity(self) -> list:
        return [f"{self.identity_prefix}:{k}" for k in self.keys]
