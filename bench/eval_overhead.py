"""Evaluation time over bare forward time on 10k samples: the cost of metrics on top of the forward pass.

Two in-memory datasets of random tensors: (a) CNN image encoders, two groups of 28×28 and 16×16
images; (b) tabular MLP encoders, four groups with heart's per-site input widths. Forward-only
and full evaluation runs are interleaved (alternating which goes first) and medians compared; the
ratio of median wall times is judged, the ratio of median process-CPU times is printed beside it
(steadier on a shared machine), and so is the median time of the metric work alone (the per-group
MetricAccumulator updates and compute on precomputed logits), which no forward-pass noise blurs.
Targets: ≤ 1.02 (CNN) and ≤ 1.1 (tabular).

    python bench/eval_overhead.py [--device cpu] [--threads 1] [--case all|cnn|tabular]

On a shared machine pass ``--threads 1``: with several threads, other processes' load makes the
intra-op thread pool wait and the wall times swing far more than the metrics cost.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from tdro.data.base import Group, GroupedDataset, Split
from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import create_encoder
from tdro.models.heads import create_head
from tdro.models.multigroup import MultiGroupModel
from tdro.training.evaluation import collect_latents, evaluate, forward_only
from tdro.training.metrics import MetricAccumulator

LATENT, HEAD_HIDDEN = 64, 128
HEART_INPUT_DIMS = {"cleveland": 10, "hungarian": 8, "switzerland": 8, "va": 9}  # heart's hetagg masks


def random_dataset(shapes: dict[str, tuple[int, ...]], per_group: int, kind: str, encoder: str,
                   num_classes: int) -> GroupedDataset:
    """Random inputs of the given per-sample shapes and random labels, all in the val split."""
    groups = {}
    for name, shape in shapes.items():
        val = Split(torch.randn(per_group, *shape), torch.randint(0, num_classes, (per_group,)))
        empty = Split(torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long))
        info = {"in_channels": shape[0], "image_size": shape[-1]} if kind == "image" else {"input_dim": shape[0]}
        groups[name] = Group(name, kind, encoder, info, {}, empty, val, empty)
    return GroupedDataset("bench", groups, [str(c) for c in range(num_classes)])


def random_model(dataset: GroupedDataset, options: dict[str, dict]) -> MultiGroupModel:
    """One encoder per group (options per group), the default MLP head and Gaussian anchors."""
    classes = len(dataset.class_names)
    encoders = {name: create_encoder(g.encoder, LATENT, g.input_info, **options[name])
                for name, g in dataset.groups.items()}
    return MultiGroupModel(encoders, create_head(LATENT, classes, HEAD_HIDDEN), GaussianAnchors(classes, LATENT))


def timed(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call, synchronising the device before stopping the clocks."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def overhead(name: str, dataset: GroupedDataset, model: MultiGroupModel, device: torch.device,
             batch_size: int, repeats: int, target: float) -> bool:
    """Print median forward and evaluation times and their ratio; True when within target."""
    model.to(device)
    dataset = dataset.to(device) if device.type == "cuda" else dataset
    calls = {
        "forward": lambda: forward_only(model, dataset, "val", device, batch_size),
        "evaluate": lambda: evaluate(model, dataset, "val", device, batch_size),
    }
    for call in calls.values():  # warm-up (allocator, kernels, lazy imports)
        timed(call, device)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}
    for r in range(repeats):
        order = list(calls) if r % 2 == 0 else list(calls)[::-1]
        for key in order:
            times[key].append(timed(calls[key], device))
    (forward, forward_cpu), (full, full_cpu) = (
        (statistics.median(t[0] for t in times[k]), statistics.median(t[1] for t in times[k])) for k in calls)
    ratio = full / forward
    metric_work = metrics_only(model, dataset, device, batch_size)
    metrics = statistics.median(timed(metric_work, device)[0] for _ in range(25))
    samples = sum(len(g.val.y) for g in dataset.groups.values())
    ok = ratio <= target
    print(f"{name:<34} {samples:>6} {forward * 1e3:>11.2f} {full * 1e3:>11.2f} {ratio:>7.3f} "
          f"{full_cpu / forward_cpu:>9.3f} {metrics * 1e3:>10.3f} {target:>7.2f}  {'ok' if ok else 'ABOVE TARGET'}")
    return ok


def metrics_only(model: MultiGroupModel, dataset: GroupedDataset, device: torch.device,
                 batch_size: int) -> Callable[[], dict]:
    """The metric work of one evaluation alone (per-group updates and compute) on precomputed logits."""
    out = collect_latents(model, dataset, "val", device, batch_size)
    with torch.inference_mode():
        logits = model.eval().head(torch.from_numpy(out["latents"]).to(device))
    sizes = [len(g.val.y) for g in dataset.groups.values()]
    per_group = list(zip(logits.split(sizes), torch.from_numpy(out["labels"]).to(device).split(sizes)))

    def run() -> dict:
        accumulator = MetricAccumulator(list(dataset.groups), list(dataset.class_names), device)
        for index, (group_logits, labels) in enumerate(per_group):
            accumulator.update(index, group_logits, labels)
        return accumulator.compute()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=512, help="evaluation batch (the config's eval_batch_size)")
    parser.add_argument("--case", choices=("all", "cnn", "tabular"), default="all")
    parser.add_argument("--repeats-cnn", type=int, default=7)
    parser.add_argument("--repeats-tabular", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    print(f"device {device}, {torch.get_num_threads()} CPU threads, eval batch {args.batch_size}; medians")
    print(f"{'case':<34} {'n':>6} {'forward ms':>11} {'eval ms':>11} {'ratio':>7} {'cpu ratio':>9} "
          f"{'metrics ms':>10} {'target':>7}")
    results = []
    if args.case in ("all", "cnn"):
        images = random_dataset({"mnist": (1, 28, 28), "usps": (1, 16, 16)}, 5000, "image", "cnn", 10)
        cnn = random_model(images, {"mnist": {"pool_size": 7}, "usps": {"pool_size": 4}})
        results.append(overhead("(a) cnn 28x28 + 16x16, 2 groups", images, cnn, device, args.batch_size,
                                args.repeats_cnn, 1.02))
    if args.case in ("all", "tabular"):
        tabular = random_dataset({n: (d,) for n, d in HEART_INPUT_DIMS.items()}, 2500, "tabular", "mlp_tabular", 2)
        mlp = random_model(tabular, {n: {"hidden_dim": 64, "dropout": 0.1} for n in HEART_INPUT_DIMS})
        results.append(overhead("(b) mlp_tabular, 4 groups", tabular, mlp, device, args.batch_size,
                                args.repeats_tabular, 1.10))
    raise SystemExit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
