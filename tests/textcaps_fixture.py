"""A TextCaps-shaped data folder for tests and benchmarks: the real annotation records, synthetic JPEGs.

The 100 + 100 real records of ``../shared/data/textcaps`` (official TextCaps_0.1 format) are repeated
to any number of records per split; copy k > 0 of a record gets the image id ``<id>-r<k>`` (its own
image file), keeping the real class list and caption texts. Each image is a synthetic JPEG at the
record's real ``image_width`` x ``image_height`` (times ``image_scale``, for fast tests), with texture
so that it decodes about as slowly as a photo, tinted by its first class so a model can learn from it.
The layout is the official local one that ``tdro.data.textcaps`` reads:
``<root>/TextCaps_0.1_{train,val}.json`` and ``<root>/images/<image_path>``.

It lives in tests/ (beside the other shared test helpers), not in the library: only tests and
``bench/`` scripts use it, and bench scripts import it from here (``sys.path`` gets ``tests/``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np

# the real annotation samples; TEXTCAPS_SOURCE points elsewhere (bench/gpu_check.sh on a machine without ../shared)
SHARED_TEXTCAPS = Path(os.environ.get("TEXTCAPS_SOURCE") or Path(__file__).resolve().parents[2] / "shared" / "data" / "textcaps")
SPLITS = ("train", "val")


def real_records(split: str, source: Path = SHARED_TEXTCAPS) -> dict:
    """The real annotation file of one split (top-level fields and its ``data`` records)."""
    return json.loads((source / f"TextCaps_0.1_{split}.json_samples.json").read_text())


def _repeat(records: list[dict], count: int) -> list[dict]:
    """``count`` records cycling through ``records``; copy k > 0 names its own image ``<id>-r<k>``."""
    out = []
    for i in range(count):
        record, k = copy.deepcopy(records[i % len(records)]), i // len(records)
        if k:
            image_id = f"{record['image_id']}-r{k}"
            folder = Path(record["image_path"]).parent
            record.update(image_id=image_id, image_name=image_id, image_path=str(folder / f"{image_id}.jpg"),
                          caption_id=record["caption_id"] + k * 1_000_000)
        out.append(record)
    return out


def _tint(label: str) -> np.ndarray:
    """A stable RGB colour per class name."""
    return np.frombuffer(hashlib.sha256(label.encode()).digest()[:3], dtype=np.uint8).astype(np.float32)


def synthetic_image(width: int, height: int, label: str, rng: np.random.Generator):
    """A PIL RGB image: class tint + smooth blobs + fine grain (JPEG entropy close to a photo's)."""
    from PIL import Image

    coarse = rng.normal(0.0, 60.0, (max(2, height // 32), max(2, width // 32), 3)).astype(np.float32)
    blobs = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height),
                                                                                              Image.BICUBIC))
    grain = rng.integers(-8, 9, (height, width, 1), dtype=np.int16)
    pixels = 0.5 * blobs.astype(np.float32) + 0.5 * _tint(label) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_textcaps(root: str | Path, train_records: int = 100, val_records: int = 100, image_scale: float = 1.0,
                  quality: int = 90, seed: int = 0, source: Path = SHARED_TEXTCAPS) -> Path:
    """Write a TextCaps folder under ``root`` (created); returns it. Existing image files are kept."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in zip(SPLITS, (train_records, val_records)):
        content = real_records(split, source)
        content["data"] = _repeat(content["data"], count)
        root.mkdir(parents=True, exist_ok=True)
        (root / f"TextCaps_0.1_{split}.json").write_text(json.dumps(content))
        written = set()
        for record in content["data"]:
            path = root / "images" / record["image_path"]
            if record["image_id"] in written or path.is_file():
                continue
            written.add(record["image_id"])
            width = max(1, round(record["image_width"] * image_scale))
            height = max(1, round(record["image_height"] * image_scale))
            path.parent.mkdir(parents=True, exist_ok=True)
            image = synthetic_image(width, height, record["image_classes"][0], rng)
            image.save(path, format="JPEG", quality=quality)
    return root
