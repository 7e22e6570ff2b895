"""Decoded-image cache: every image decoded once into a uint8 memory map under outputs/cache.

Fine-tuning trains the backbone, so the frozen-feature cache cannot serve it, and decoding a
1024 x 700 JPEG costs milliseconds per image per epoch. Here each image is decoded once (PIL's
draft mode lets the JPEG decoder skip detail the target size does not need), resized to
``size`` x ``size`` (bilinear) and stored as uint8 (N, 3, size, size) in a ``.npy`` file opened as a
memory map: training then reads batches at memory speed.

A cache file is keyed, like the feature cache, by a hash of what determines its contents: the
image list (each file's path, size and modification time, in order), the decode (size, draft
mode, resize) and the storage layout. Its key is written beside it (``.json``, written last: a
file without its key is an unfinished build and is built again).
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tdro.data.base import DataError, InputStore
from tdro.data.images import ImageFileStore, ImageTransform

CACHE_VERSION = 1


def training_size(image_size: int, augment: bool) -> int:
    """The cached side when none is given: image_size, or 8/7 of it with augmentation (256 for 224)."""
    return int(image_size) if not augment else round(image_size * 8 / 7)


def decode(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: decoded in draft mode (the largest JPEG scale still >= size), bilinear resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {path} ({type(error).__name__}: {error}); replace the file with a valid "
                        "image (re-download it) or remove it so the item is reported as missing") from error


def cache_key(store: ImageFileStore, size: int) -> dict:
    """Everything that determines the cached pixels."""
    return {"version": CACHE_VERSION, "images": store.identity(),
            "decode": {"size": int(size), "draft": "PIL draft RGB", "resize": "PIL bilinear"},
            "dtype": "uint8", "layout": "NCHW"}


def cache_path(cache_dir: str | Path, prefix: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{prefix}-images{key['decode']['size']}-{digest}.npy"


def _read_key(path: Path) -> str | None:
    """The key written beside a finished cache file, or None (no file yet, or an unfinished build)."""
    key_file = path.with_suffix(".json")
    try:
        return key_file.read_text()
    except FileNotFoundError:
        return None


def build_cache(store: ImageFileStore, size: int, path: Path, threads: int, progress: bool) -> None:
    """Decode every image of ``store`` into ``path`` (temporary file, then renamed), then write its key."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(store), 3, size, size))
    try:
        with ThreadPoolExecutor(max(1, threads)) as pool, tqdm(total=len(store), desc="caching decoded images",
                                                               unit="img", disable=not progress) as bar:
            for i, pixels in enumerate(pool.map(lambda p: decode(p, size), store.paths)):  # PIL releases the GIL
                array[i] = pixels
                bar.update(1)
        array.flush()
        del array
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    key_tmp = path.with_name(f"{path.stem}.{os.getpid()}.json.tmp")
    key_tmp.write_text(json.dumps(cache_key(store, size), sort_keys=True))
    os.replace(key_tmp, path.with_suffix(".json"))


def cached_images(store: ImageFileStore, size: int, cache_dir: str | Path, prefix: str = "images",
                  threads: int | None = None, progress: bool = True) -> tuple["DecodedImageStore", Path, bool]:
    """A store over the decoded images of ``store`` (built once), the cache file, and whether it was a hit."""
    if size < store.transform.image_size:
        raise DataError(f"image_cache_size {size} is smaller than image_size {store.transform.image_size}; the cache "
                        "must hold at least the training resolution (use image_cache_size >= image_size or null)")
    key = json.dumps(cache_key(store, size), sort_keys=True)
    path = cache_path(cache_dir, prefix, json.loads(key))
    saved = _read_key(path)
    hit = saved is not None and path.is_file()
    if hit and saved != key:
        raise DataError(f"image cache {path} does not match what it is keyed by; delete it and "
                        f"{path.with_suffix('.json')} to rebuild")
    if not hit:
        store.check_headers()
        build_cache(store, size, path, store.threads if threads is None else threads, progress)
    cached = DecodedImageStore(path, store.transform)
    if cached.shape != (len(store), 3, size, size):
        raise DataError(f"image cache {path} holds shape {cached.shape}, expected {(len(store), 3, size, size)}; "
                        f"delete it and {path.with_suffix('.json')} to rebuild")
    return cached, path, hit


class DecodedImageStore(InputStore):
    """Images from a decoded-image cache file.

    ``store[idx]`` is the evaluation view, (B, 3, S, S) float normalised as ``transform`` does (S =
    ``transform.image_size``; resized when the cache is larger). ``train_batch(idx)`` is what training
    reads: the uint8 pixels at the cached size, which the trainer's input transform turns into
    float on the training device (with the augmentation, when on). The memory map is opened lazily
    in each process, so the store pickles as a file name (for data-loader workers).
    """

    def __init__(self, path: str | Path, transform: ImageTransform, positions: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.transform = transform
        self._array: np.ndarray | None = None
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)

    @property
    def array(self) -> np.ndarray:
        """The memory map, opened on first use in this process (pages are read as batches touch them)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole cache file's (N, 3, S, S), to check it against the image list."""
        return tuple(self.array.shape)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.array) if self.positions is None else len(self.positions)

    def train_batch(self, index: torch.Tensor) -> torch.Tensor:
        """(B, 3, size, size) uint8 pixels of the cached images."""
        rows = torch.as_tensor(index, dtype=torch.long).reshape(-1).numpy()
        if self.positions is not None:
            rows = self.positions[rows]
        return torch.from_numpy(self.array[rows])  # fancy indexing copies the rows out of the map

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return to_model_input(self.train_batch(index), self.transform.image_size, self.transform.mean,
                              self.transform.std)

    def subset(self, positions) -> "DecodedImageStore":
        positions = torch.as_tensor(positions, dtype=torch.long).numpy()
        rows = positions if self.positions is None else self.positions[positions]
        subset = DecodedImageStore(self.path, self.transform, rows)
        subset._array = self._array
        return subset


def to_model_input(pixels: torch.Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, image_size, image_size): /255, resized (antialiased bilinear) if needed,
    normalised; the same arithmetic as ``ImageTransform`` when no resize is needed."""
    x = pixels.float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size) and len(x):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return normalise_(x, mean, std)


def normalise_(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, in place (a new (B, 3, 224, 224) float tensor costs more than the arithmetic)."""
    return x.sub_(torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).div_(
        torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1))
