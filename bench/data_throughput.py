"""Data-layer throughput: samples/s of one training epoch of group-stratified batches per dataset.

    python bench/data_throughput.py [--data-root ../shared/data] [--textcaps-images 320]

* digits, heart: the defaults;
* mnist_usps: a 12k-sample training set (MNIST 6.5k + USPS 5.5k from the real files), batch 128,
  compared with a forward pass of the default ``cnn`` encoders over the same epoch;
* textcaps: synthetic JPEGs (official layout, in a temporary folder) at 224x224, one epoch decoding
  images vs one epoch over cached frozen ResNet-18 features (the cache is built first and timed
  separately; ``feature_backbone_weights: random`` as no pretrained weights are needed to time it).

Figures are printed, never asserted (SPEC §9).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tdro.config import Config  # noqa: E402
from tdro.data import EvalBatches, GroupedDataset, GroupStratifiedBatches, build_dataset  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def epoch_rate(dataset, batch_size: int, repeats: int = 3, split: str = "train") -> tuple[float, int, float]:
    """(samples/s, samples per epoch, seconds per epoch): best of ``repeats`` epochs."""
    batches = GroupStratifiedBatches(dataset, split, batch_size, generator=torch.Generator().manual_seed(0))
    best, samples = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        samples = 0
        for batch in batches:
            for x, y in batch.values():
                samples += len(y)
        best = min(best, time.perf_counter() - start)
    return samples / best, samples, best


def forward_seconds(dataset, batch_size: int) -> float:
    """Seconds for the default encoders' forward pass over one training epoch (no grad)."""
    from tdro.models.encoders import create_encoder

    encoders = {n: create_encoder(g.encoder, 64, g.input_info, **g.encoder_options).eval()
                for n, g in dataset.groups.items()}
    batches = list(GroupStratifiedBatches(dataset, "train", batch_size, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        start = time.perf_counter()
        for batch in batches:
            for name, (x, _) in batch.items():
                encoders[name](x)
    return time.perf_counter() - start


def report(name: str, rate: float, samples: int, seconds: float, extra: str = "") -> None:
    print(f"{name:<28} {rate:>12,.0f} samples/s   ({samples} samples in {seconds * 1e3:8.1f} ms){extra}")


def make_textcaps(root: Path, n_images: int, classes=("Bottle", "Car", "Food", "Book")) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 320)[None, :, None]
    for split, count in (("train", n_images), ("val", max(4, n_images // 4))):
        records = []
        for i in range(count):
            cls = classes[i % len(classes)]
            path = f"train/{split}_{i:05d}.jpg"
            pixels = np.clip(ramp + rng.normal(0, 20, (240, 320, 3)), 0, 255).astype(np.uint8)
            (root / "images" / "train").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / "images" / path, quality=90)
            records.append({"image_id": f"{split}{i}", "image_classes": [cls], "image_path": path,
                            "caption_str": f"a {cls.lower()} with the number {i} written on it"})
        (root / f"TextCaps_0.1_{split}.json").write_text(json.dumps({"data": records}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(SHARED))
    parser.add_argument("--textcaps-images", type=int, default=320)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")

    digits = build_dataset(Config())
    report("digits (batch 32)", *epoch_rate(digits, 32))

    root = Path(args.data_root)
    if (root / "mnist").is_dir() or (root / "t10k-images-idx3-ubyte.gz").is_file():
        mnist_usps = build_dataset(Config(dataset="mnist_usps", data_root=str(root), mnist_size=6500, usps_size=5500,
                                          majority_frac=0.5, val_frac=0.05, test_frac=0.05))
        rate, samples, seconds = epoch_rate(mnist_usps, 128)
        forward = forward_seconds(mnist_usps, 128)
        report("mnist_usps 12k (batch 128)", rate, samples, seconds,
               f"; cnn forward over the epoch {forward * 1e3:.0f} ms = {forward / seconds:.0f}x the batching")
        report("mnist_usps eval (batch 512)", *eval_rate(mnist_usps, 512))
        heart = build_dataset(Config(dataset="heart", data_root=str(root)))
        report("heart (batch 64)", *epoch_rate(heart, 64))
    else:
        print(f"mnist_usps, heart: skipped (no official files under {root})")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_textcaps(tmp / "textcaps", args.textcaps_images)
        base = dict(dataset="textcaps", data_root=str(tmp / "textcaps"), textcaps_num_classes=None)
        decoding = visual_only(build_dataset(Config(**base)))
        d_rate, d_samples, d_seconds = epoch_rate(decoding, 32, repeats=1)
        report("textcaps visual, decoding", d_rate, d_samples, d_seconds, " (224x224 JPEG decode + resize)")
        start = time.perf_counter()
        cached = build_dataset(Config(**base, feature_cache=True, feature_backbone_weights="random",
                                      feature_cache_dir=str(tmp / "cache")))
        build = time.perf_counter() - start
        c_rate, c_samples, c_seconds = epoch_rate(visual_only(cached), 32)
        report("textcaps visual, cached", c_rate, c_samples, c_seconds,
               f"; {c_rate / d_rate:,.0f}x decoding (cache built once in {build:.1f} s for "
               f"{len(cached.info['image_ids'])} images)")


def visual_only(dataset):
    """The visual group alone (the text group costs the same with or without the cache)."""
    return GroupedDataset(dataset.name, {"visual": dataset.groups["visual"]}, dataset.class_names)


def eval_rate(dataset, batch_size: int) -> tuple[float, int, float]:
    start = time.perf_counter()
    samples = sum(len(y) for batch in EvalBatches(dataset, "test", batch_size) for _, y in batch.values())
    seconds = time.perf_counter() - start
    return samples / seconds, samples, seconds


if __name__ == "__main__":
    main()
