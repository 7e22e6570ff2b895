"""Image encoders' training step by memory layout, and evaluation throughput by batch size (issue 15 §3).

Layouts, each a forward + backward of one encoder on a fixed batch, interleaved in random order:

* ``contiguous``: the default NCHW layout with the adaptive pool always applied (tdro before issue 15);
* ``tdro``: the encoder as built now (``cnn``: channels-last weights and inputs, the no-op pool skipped);
* ``channels-last``: weights and inputs converted to channels-last (for ``resnet_visual``, which tdro
  keeps contiguous unless this is faster).

Then evaluation (forward in ``torch.no_grad``) images/s of the ``cnn`` encoder at several batch
sizes, which is what ``eval_batch_size: null`` chooses from per device.

    python bench/encoder_layout.py [--rounds 15] [--threads N] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from tdro.models.encoders import create_encoder

# name -> (encoder, input_info, options, batch shape)
WORKLOADS = {
    "cnn 28×28, batch 64": ("cnn", {"in_channels": 1}, {}, (64, 1, 28, 28)),
    "cnn 8×8 (digits), batch 64": ("cnn", {"in_channels": 1}, {"pool_size": 2}, (64, 1, 8, 8)),
    "resnet_visual 64×64, batch 32": ("resnet_visual", {"in_channels": 3}, {}, (32, 3, 64, 64)),
    "resnet_visual 224×224, batch 4": ("resnet_visual", {"in_channels": 3}, {}, (4, 3, 224, 224)),
}
EVAL_BATCHES = (64, 128, 256, 512, 1024)


def _contiguous_forward(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder run as before issue 15: NCHW weights and inputs, every layer applied."""
    encoder.to(memory_format=torch.contiguous_format)
    if hasattr(encoder, "net"):
        return lambda x: encoder.net(x.contiguous())
    return lambda x: encoder(x.contiguous())


def make_step(name: str, layout: str, device: torch.device) -> Callable[[], None]:
    """A closure running one forward + backward of the workload in the layout."""
    encoder_name, info, options, shape = WORKLOADS[name]
    torch.manual_seed(0)
    encoder = create_encoder(encoder_name, 64, info, **options).to(device)
    x = torch.randn(shape, device=device)
    if layout == "contiguous":
        forward = _contiguous_forward(encoder)
    elif layout == "channels-last":
        encoder.to(memory_format=torch.channels_last)
        forward = lambda batch: encoder(batch.contiguous(memory_format=torch.channels_last))  # noqa: E731
    else:
        forward = encoder

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        forward(x).square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def timed_rounds(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """ms per call, each round running every closure once in a fresh random order."""
    import random

    order = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 2):
        for name in order.sample(list(steps), len(steps)):
            start = time.perf_counter()
            steps[name]()
            if round_index >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"{'workload':<32} {'layout':<14} {'ms':>8} {'× contiguous':>13}")
    for name in args.workloads:
        layouts = ["contiguous", "tdro", "channels-last"]
        times = timed_rounds({layout: make_step(name, layout, device) for layout in layouts}, args.rounds)
        base = statistics.median(times["contiguous"])
        for layout in layouts:
            ms = statistics.median(times[layout])
            print(f"{name:<32} {layout:<14} {ms:8.2f} {ms / base:13.3f}")
    torch.manual_seed(0)
    encoder = create_encoder("cnn", 64, {"in_channels": 1}).to(device).eval()
    pool = torch.randn(max(EVAL_BATCHES) * 4, 1, 28, 28, device=device)
    rates: dict[int, list[float]] = {size: [] for size in EVAL_BATCHES}
    with torch.no_grad():
        for _ in range(max(3, args.rounds // 3)):
            for size in EVAL_BATCHES:
                start = time.perf_counter()
                for batch in pool.split(size):
                    encoder(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                rates[size].append(len(pool) / (time.perf_counter() - start))
    print("cnn 28×28 evaluation, images/s by batch size: " + ", ".join(
        f"{size}: {statistics.median(values):,.0f}" for size, values in rates.items()))


if __name__ == "__main__":
    main()
