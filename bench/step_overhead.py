"""Cost of the anchor losses and GroupDRO per training step, relative to plain ERM (SPEC §9, issue 15).

Every variant is a full step (forward, loss, backward, Adam step as the trainer builds it) of two
per-group `cnn` encoders on 28×28 inputs (64 + 64 samples) and a linear head, J = 16 separation
samples per class, λ_fit = λ_sep = 1e-3. All
variants run in one process, interleaved: each round runs the variants of one (latent, classes)
setting back to back in random order, so load from other processes hits them alike, and ratios
are taken within a round.
Targets (issue 15), anchors (full) + GroupDRO: ≤ 1.05× ERM at latent 64 and 128, ≤ 1.10× at 256
with 10 classes, ≤ 1.15× at 256 with 20 classes; lowrank (rank 16) ≤ 1.2× at 256 with 100 classes.

    python bench/step_overhead.py [--rounds 25] [--settings 64:10 256:100 ...] [--threads N]
    python bench/step_overhead.py --device cuda --group-batch 512   # on a GPU at batch 1024
    python bench/step_overhead.py --profile 256:10 --threads 1   # where the anchors' milliseconds go
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tdro.config import Config
from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import create_encoder
from tdro.models.heads import create_head
from tdro.objectives.anchor_losses import AnchorLoss, classifier_separation_loss, fit_loss
from tdro.objectives.gaussian import class_moments, lowrank_bures_wasserstein_sq
from tdro.objectives.groupdro import GroupDRO, group_mean_losses
from tdro.training.host_memory import keep_freed_memory
from tdro.training.optim import create_optimizer

GROUP_BATCH, NUM_GROUPS, SAMPLES_PER_CLASS, RANK = 64, 2, 16, 16
INPUT_INFO = {"in_channels": 1, "image_size": (28, 28)}
# variant name -> (anchor covariance or None, GroupDRO on)
VARIANT_SETTINGS = {
    "erm": (None, False),
    "full anchors": ("full", False),
    "full anchors+groupdro": ("full", True),
    "lowrank anchors+groupdro": ("lowrank", True),
    "diagonal anchors+groupdro": ("diagonal", True),
}
DEFAULT_VARIANTS = ["erm", "full anchors+groupdro", "lowrank anchors+groupdro", "diagonal anchors+groupdro"]
DEFAULT_SETTINGS = ["64:10", "128:10", "256:10", "384:10", "512:10", "256:20", "256:50", "256:100"]


def parse_setting(text: str) -> tuple[int, int]:
    """'256:10' → (latent 256, 10 classes)."""
    latent, classes = text.split(":")
    return int(latent), int(classes)


class Step:
    """One variant's model, optimiser and fixed batch; calling it runs one training step."""

    def __init__(self, latent_dim: int, num_classes: int, covariance: str | None, groupdro: bool, seed: int,
                 device: str = "cpu", group_batch: int = GROUP_BATCH) -> None:
        torch.manual_seed(seed)
        self.encoders = [create_encoder("cnn", latent_dim, INPUT_INFO).to(device) for _ in range(NUM_GROUPS)]
        self.head = create_head(latent_dim, num_classes).to(device)
        modules = [*self.encoders, self.head]
        self.anchors = None
        if covariance is not None:
            rank = {"rank": RANK} if covariance == "lowrank" else {}
            self.anchors = GaussianAnchors(num_classes, latent_dim, eps=1e-4, covariance=covariance, **rank).to(device)
            modules.append(self.anchors)
        self.optimizer = create_optimizer(Config(), {"new": [p for module in modules for p in module.parameters()]})
        self.inputs = [torch.randn(group_batch, 1, 28, 28, device=device) for _ in range(NUM_GROUPS)]
        self.labels = torch.randint(0, num_classes, (NUM_GROUPS * group_batch,), device=device)
        self.group_ids = torch.arange(NUM_GROUPS, device=device).repeat_interleave(group_batch)
        self.anchor_loss = AnchorLoss(1e-3, 1e-3, "classifier", samples_per_class=SAMPLES_PER_CLASS)
        self.dro = GroupDRO(NUM_GROUPS, eta=0.01, update_mode="exp_smooth", objective="weighted") if groupdro else None

    def latents(self) -> torch.Tensor:
        return torch.cat([encoder(x) for encoder, x in zip(self.encoders, self.inputs)])

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        latents = self.latents()
        logits = self.head(latents)
        if self.dro is None:
            loss = F.cross_entropy(logits, self.labels)
        else:
            per_sample = F.cross_entropy(logits, self.labels, reduction="none")
            group_losses, present = group_mean_losses(per_sample, self.group_ids, NUM_GROUPS)
            loss = self.dro.loss(group_losses, present)
        if self.anchors is not None:
            loss = loss + self.anchor_loss(latents, self.labels, self.group_ids, self.anchors, self.head)["total"]
        loss.backward()
        self.optimizer.step()
        if self.dro is not None:
            self.dro.update(group_losses, present, epoch=0)
        if self.labels.is_cuda:
            torch.cuda.synchronize()  # time the work, not its queueing


def interleaved(closures: dict[str, Callable[[], None]], rounds: int, warmup: int, reference: str,
                seed: int = 0) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ms per call and ratio to ``reference`` per round, running the closures in a fresh random order each round."""
    names = list(closures)
    times: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(seed)
    for round_index in range(warmup + rounds):
        elapsed = {}
        for name in order.sample(names, len(names)):
            start = time.perf_counter()
            closures[name]()
            elapsed[name] = (time.perf_counter() - start) * 1e3
        if round_index >= warmup:
            for name, ms in elapsed.items():
                times[name].append(ms)
                ratios[name].append(ms / elapsed[reference])
    return times, ratios


def profile(latent_dim: int, num_classes: int, rounds: int) -> None:
    """Where the anchors' milliseconds go: each piece forward + backward on its own, and the op counts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    erm = Step(latent_dim, num_classes, None, False, seed=0)
    full = Step(latent_dim, num_classes, "full", True, seed=0)
    anchors, head = full.anchors, full.head
    latents = full.latents().detach().requires_grad_()
    labels, group_ids = full.labels, full.group_ids
    anchor_optimizer = create_optimizer(Config(), {"new": list(anchors.parameters())})
    batch = class_moments(latents.detach(), labels, num_classes)
    moments = dataclasses.replace(batch, means=batch.means.requires_grad_(), centred=batch.centred.requires_grad_())

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        latents.grad = None
        anchors.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)

    def bures() -> None:
        parts = anchors.factor_parts()
        distances = lowrank_bures_wasserstein_sq(moments, anchors.means, parts.raw, anchors.eps, parts.scale,
                                                 factor_norm_sq=parts.norm_sq)
        backward(distances.mean())

    def moments_piece() -> None:
        backward(class_moments(latents, labels, num_classes).centred.square().sum())

    def adam() -> None:
        for parameter in anchors.parameters():
            parameter.grad = torch.zeros_like(parameter)
        anchor_optimizer.step()

    def groupdro() -> None:
        per_sample = F.cross_entropy(head(latents), labels, reduction="none")
        group_losses, present = group_mean_losses(per_sample, group_ids, NUM_GROUPS)
        backward(full.dro.loss(group_losses, present))
        full.dro.update(group_losses.detach(), present, epoch=0)

    def ce() -> None:
        backward(F.cross_entropy(head(latents), labels))

    pieces = {
        "ERM step": erm,
        "anchors+GroupDRO step": full,
        "fit (fwd+bwd)": lambda: backward(fit_loss(latents, labels, group_ids, anchors)),
        "  moments": moments_piece,
        "  Bures term": bures,
        "separation (fwd+bwd)": lambda: backward(classifier_separation_loss(anchors, head, SAMPLES_PER_CLASS)),
        "GroupDRO − CE (fwd+bwd+update)": groupdro,
        "  CE alone": ce,
        "Adam on the anchors": adam,
    }
    times, _ = interleaved(pieces, rounds, 3, "ERM step")
    median = {name: statistics.median(values) for name, values in times.items()}
    median["GroupDRO − CE (fwd+bwd+update)"] -= median.pop("  CE alone")
    print(f"profile at latent {latent_dim}, {num_classes} classes, {torch.get_num_threads()} thread(s), "
          f"{rounds} interleaved rounds, median ms (each piece on its own)")
    for name, ms in median.items():
        print(f"  {name:<32} {ms:8.2f}")
    print(f"  {'added by anchors+GroupDRO':<32} {median['anchors+GroupDRO step'] - median['ERM step']:8.2f}")
    counts = {}
    for name, step in (("ERM", erm), ("anchors+GroupDRO", full)):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        events = prof.key_averages()
        counts[name] = {event.key: event.count / 5 for event in events}
        self_ms = {event.key: event.self_cpu_time_total / 5e3 for event in events}
        if name == "ERM":
            erm_self_ms = self_ms
        else:
            added = {key: count - counts["ERM"].get(key, 0.0) for key, count in counts[name].items()}
            extra_ms = {key: ms - erm_self_ms.get(key, 0.0) for key, ms in self_ms.items()}
            top = sorted(extra_ms, key=extra_ms.get, reverse=True)[:15]
            print(f"torch ops per step: ERM {sum(counts['ERM'].values()):.0f}, anchors+GroupDRO "
                  f"{sum(counts[name].values()):.0f} (profiler events, nested ones included)")
            print("ops adding the most self CPU time over the ERM step (ms/step, profiled, so inflated), calls added:")
            for key in top:
                print(f"  {key:<40} {extra_ms[key]:+7.2f} ms  {added[key]:+6.0f} calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="LATENT:CLASSES")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANT_SETTINGS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--profile", metavar="LATENT:CLASSES", help="print where the anchors' time goes, then stop")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (steps end in a synchronize there)")
    parser.add_argument("--group-batch", type=int, default=GROUP_BATCH, help="samples per group in a batch")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the trainer does (bench/host_memory.py: with glibc's defaults instead)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(*parse_setting(args.profile), args.rounds)
        return
    settings = [parse_setting(text) for text in args.settings]
    names = ["erm", *(name for name in args.variants if name != "erm")]
    results = {}
    for latent, classes in settings:
        steps = {name: Step(latent, classes, *VARIANT_SETTINGS[name], seed=0, device=args.device,
                            group_batch=args.group_batch) for name in names}
        results[latent, classes] = interleaved(steps, args.rounds, args.warmup, "erm")

    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch "
          f"{NUM_GROUPS}×{args.group_batch} 28×28, "
          f"J = {SAMPLES_PER_CLASS}, lowrank rank {RANK}, {args.rounds} rounds, variants of one setting back to "
          f"back in random order, freed host memory kept: {kept}")
    print("ms: median step time; ratio: median over rounds of (variant / ERM in the same round); min ratio: ratio of")
    print("the fastest steps (least disturbed by other processes)")
    header = f"{'latent':>6} {'classes':>7} {'variant':>26} {'ms':>7} {'ratio':>6} {'min ratio':>9}"
    print(header)
    print("-" * len(header))
    for (latent, classes), (times, ratios) in results.items():
        erm_best = min(times["erm"])
        for name in names:
            print(f"{latent:>6} {classes:>7} {name:>26} {statistics.median(times[name]):7.1f} "
                  f"{statistics.median(ratios[name]):6.3f} {min(times[name]) / erm_best:9.3f}")


if __name__ == "__main__":
    main()
