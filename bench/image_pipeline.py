"""Image fine-tuning input pipeline: images/s into the model at 224², and the ResNet-18 train-step rate.

    python bench/image_pipeline.py [--images 256] [--batch-size 32] [--threads 2] [--steps 3] [--device auto]

On the TextCaps-shaped fixture (tests/textcaps_fixture.py: the real annotation records repeated,
synthetic JPEGs at the real image sizes, about 1024 x 700) in a temporary folder, visual group only:

* decode in the training thread (today): ``ImageFileStore`` decodes, resizes and normalises each batch;
* prefetching workers: the same batches gathered by ``PrefetchBatches`` worker processes;
* uint8 cache: batches read from the decoded-image memory map and made model inputs by the trainer's
  ``TrainInputs`` (normalise at 224²; and with augmentation: random resized crop from 256², flip);
* frozen-feature cache: 512-d features (``feature_backbone_weights: random``: no weights needed to time it);
* a simulated accelerator step (a sleep: the CPU stays free, as while a GPU computes) slower than
  decoding, fed by in-thread decoding and by prefetching workers: prefetch hides decoding when
  decoding is faster than compute;
* ResNet-18 (``resnet_visual``) train steps (forward, backward, Adam) on the device, alone and fed by
  in-thread decoding, by prefetching workers and by the uint8 cache with augmentation.

Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from textcaps_fixture import make_textcaps  # noqa: E402  (tests/textcaps_fixture.py)
from tdro.config import Config  # noqa: E402
from tdro.data import GroupedDataset, GroupStratifiedBatches, build_dataset  # noqa: E402
from tdro.data.augment import TrainInputs  # noqa: E402
from tdro.data.base import batch_to_device  # noqa: E402
from tdro.data.batching import PrefetchBatches  # noqa: E402
from tdro.training.host_memory import keep_freed_memory  # noqa: E402


def visual_only(dataset: GroupedDataset) -> GroupedDataset:
    """The visual group alone (the text group costs the same on every path)."""
    return GroupedDataset(dataset.name, {"visual": dataset.groups["visual"]}, dataset.class_names, dataset.info)


def batches_of(dataset: GroupedDataset, batch_size: int, workers: int = 0):
    plain = GroupStratifiedBatches(dataset, "train", batch_size, generator=torch.Generator().manual_seed(0))
    return PrefetchBatches(plain, workers) if workers else plain


def input_rate(batches, inputs: TrainInputs | None, device: torch.device, epochs: int = 1) -> float:
    """Images/s from the sampler to model-ready tensors on ``device`` (best of ``epochs`` epochs)."""
    best = 0.0
    for _ in range(epochs):
        start, images = time.perf_counter(), 0
        for step, batch in enumerate(batches):
            x = {"visual": batch_to_device(batch["visual"][0], device)}
            x = inputs(x, step) if inputs is not None else x
            images += len(x["visual"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, images / (time.perf_counter() - start))
    return best


class TrainStep:
    """ResNet-18 visual encoder + linear head: cross-entropy forward, backward and an Adam step."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        from tdro.models.encoders import create_encoder

        self.device = device
        self.model = torch.nn.Sequential(create_encoder("resnet_visual", 128, {"in_channels": 3}),
                                         torch.nn.Linear(128, num_classes)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(self.model(x), y.to(self.device)).backward()
        self.optimizer.step()


def train_rate(step: TrainStep, batches, inputs: TrainInputs | None, steps: int, fixed=None) -> float:
    """Images/s of ``steps`` train steps fed by ``batches`` (or the same ``fixed`` batch: compute alone)."""
    iterator = endless(batches) if fixed is None else None
    images, start = 0, None
    for i in range(steps + 1):  # the first step warms up (and starts the workers)
        if i == 1:
            if step.device.type == "cuda":
                torch.cuda.synchronize()
            start, images = time.perf_counter(), 0
        x, y = fixed if fixed is not None else next(iterator)["visual"]
        x = batch_to_device(x, step.device)
        x = inputs({"visual": x}, i)["visual"] if inputs is not None else x
        step(x, y)
        images += len(y)
    if step.device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def endless(batches):
    """Batches epoch after epoch."""
    while True:
        yield from batches


def sleep_rate(seconds: float, batches, steps: int) -> float:
    """Images/s of ``steps`` steps that each take ``seconds`` off the CPU (an accelerator's), fed by ``batches``."""
    iterator, images, start = endless(batches), 0, None
    for i in range(steps + 1):
        if i == 1:
            start, images = time.perf_counter(), 0
        _, y = next(iterator)["visual"]
        time.sleep(seconds)
        images += len(y)
    return images / (time.perf_counter() - start)


def report(name: str, rate: float, reference: float | None = None) -> None:
    ratio = f"   {rate / reference:8.1f}x decode" if reference else ""
    print(f"  {name:<58} {rate:>10,.0f} images/s{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training records of the fixture (real sizes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and decode threads")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed ResNet-18 train steps per feeding path")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the trainer does
    torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, 224x224 into the model, "
          f"freed host memory kept: {kept}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        root = make_textcaps(tmp / "textcaps", train_records=args.images, val_records=16)
        print(f"fixture: {args.images} + 16 records, JPEGs at the real sizes, written in {time.perf_counter() - start:.1f} s")
        base = dict(dataset="textcaps", data_root=str(root), textcaps_num_classes=None, val_frac=0.1,
                    feature_cache_dir=str(tmp / "cache"))
        decoding = visual_only(build_dataset(Config(**base)))
        decoding.groups["visual"].train.x.threads = args.threads
        n = len(decoding.groups["visual"].train)
        print(f"visual group: {n} training images")

        print("input pipeline (no model):")
        decode = input_rate(batches_of(decoding, args.batch_size), None, device)
        report("JPEG decode in the training thread (today)", decode)
        prefetch = batches_of(decoding, args.batch_size, args.workers)
        report(f"prefetching workers ({args.workers}), decode in the workers", input_rate(prefetch, None, device, 2), decode)

        caches = {}
        for augment in (False, True):
            start = time.perf_counter()
            caches[augment] = visual_only(build_dataset(Config(**base, image_cache=True, augment=augment)))
            seconds, size = time.perf_counter() - start, caches[augment].info["image_cache"]["size"]
            print(f"  (cache of {n} images at {size}² built in {seconds:.1f} s = {n / seconds:,.0f} images/s: "
                  f"draft-mode decode, {args.threads} threads; once per image list)")
        report("uint8 cache, batches read (the CPU's share when a GPU converts)",
               input_rate(batches_of(caches[False], args.batch_size), None, device, 3), decode)
        for augment, cached in caches.items():
            inputs = TrainInputs.from_config(cached, Config(**base, image_cache=True, augment=augment))
            what = "random resized crop 256² -> 224² + flip" if augment else "normalise 224²"
            report(f"uint8 cache, {what}", input_rate(batches_of(cached, args.batch_size), inputs, device, 3), decode)
        features = visual_only(build_dataset(Config(**base, feature_cache=True, feature_backbone_weights="random")))
        report("frozen-feature cache (512-d rows; no backbone to train)",
               input_rate(batches_of(features, args.batch_size), None, device, 3), decode)

        print("a simulated accelerator step (sleeps, leaving the CPU free) at 0.7 x the decode rate:")
        seconds = args.batch_size / (0.7 * decode)
        report("compute alone", args.batch_size / seconds)
        report("fed by decode in the training thread (today)",
               sleep_rate(seconds, batches_of(decoding, args.batch_size), args.steps * 2))
        report(f"fed by prefetching workers ({args.workers})",
               sleep_rate(seconds, batches_of(decoding, args.batch_size, args.workers), args.steps * 2))

        print(f"ResNet-18 train steps (forward + backward + Adam), {args.steps} timed steps each:")
        step = TrainStep(len(decoding.class_names), device)
        fixed = next(iter(batches_of(decoding, args.batch_size)))["visual"]
        compute = train_rate(step, None, None, args.steps, fixed=fixed)
        report("compute alone (one batch again and again)", compute)
        report("fed by decode in the training thread (today)",
               train_rate(step, batches_of(decoding, args.batch_size), None, args.steps))
        report(f"fed by prefetching workers ({args.workers})",
               train_rate(step, batches_of(decoding, args.batch_size, args.workers), None, args.steps))
        inputs = TrainInputs.from_config(caches[True], Config(**base, image_cache=True, augment=True))
        report("fed by the uint8 cache with augmentation",
               train_rate(step, batches_of(caches[True], args.batch_size), inputs, args.steps))


if __name__ == "__main__":
    main()
