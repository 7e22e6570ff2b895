"""Cost of the anchor losses and GroupDRO per training step, relative to plain ERM (SPEC §9).

Every variant is a full step (forward, loss, backward, Adam step) of two per-group `cnn` encoders
on 28×28 inputs (64 + 64 samples, 10 classes) and a linear head. All variants run in one process,
interleaved: each round runs the variants of one latent size back to back in random order, so load
from other processes hits them alike, and ratios are taken within a round.
Targets with full covariance: anchors + GroupDRO ≤ 1.15× ERM at latent 64, ≤ 1.3× at 256.

    python bench/step_overhead.py [--rounds 25] [--latents 64 128 256] [--threads N]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tdro.models.anchors import GaussianAnchors
from tdro.models.encoders import create_encoder
from tdro.models.heads import create_head
from tdro.objectives.anchor_losses import AnchorLoss
from tdro.objectives.groupdro import GroupDRO, group_mean_losses

NUM_CLASSES, GROUP_BATCH, NUM_GROUPS = 10, 64, 2
INPUT_INFO = {"in_channels": 1, "image_size": (28, 28)}
COVARIANCES = ("full", "diagonal")
# variant name -> (anchor covariance or None, GroupDRO on)
VARIANT_SETTINGS = {
    "erm": (None, False),
    **{f"{c} anchors": (c, False) for c in COVARIANCES},
    **{f"{c} anchors+groupdro": (c, True) for c in COVARIANCES},
}


def make_step(latent_dim: int, covariance: str | None, groupdro: bool, seed: int) -> Callable[[], None]:
    """A closure running one training step of the variant on a fixed batch."""
    torch.manual_seed(seed)
    encoders = [create_encoder("cnn", latent_dim, INPUT_INFO) for _ in range(NUM_GROUPS)]
    head = create_head(latent_dim, NUM_CLASSES)
    modules = [*encoders, head]
    anchors = None
    if covariance is not None:
        anchors = GaussianAnchors(NUM_CLASSES, latent_dim, eps=1e-4, covariance=covariance)
        modules.append(anchors)
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    inputs = [torch.randn(GROUP_BATCH, 1, 28, 28) for _ in range(NUM_GROUPS)]
    labels = torch.randint(0, NUM_CLASSES, (NUM_GROUPS * GROUP_BATCH,))
    group_ids = torch.arange(NUM_GROUPS).repeat_interleave(GROUP_BATCH)
    anchor_loss = AnchorLoss(1e-3, 1e-3, "classifier", samples_per_class=16)
    dro = GroupDRO(NUM_GROUPS, eta=0.01, update_mode="exp_smooth", objective="weighted") if groupdro else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        latents = torch.cat([encoder(x) for encoder, x in zip(encoders, inputs)])
        logits = head(latents)
        if dro is None:
            loss = F.cross_entropy(logits, labels)
        else:
            per_sample = F.cross_entropy(logits, labels, reduction="none")
            group_losses, present = group_mean_losses(per_sample, group_ids, NUM_GROUPS)
            loss = dro.loss(group_losses, present)
        if anchors is not None:
            loss = loss + anchor_loss(latents, labels, group_ids, anchors, head)["total"]
        loss.backward()
        optimizer.step()
        if dro is not None:
            dro.update(group_losses, present, epoch=0)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed round-robin rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--latents", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    names = list(VARIANT_SETTINGS)
    steps = {
        (latent, name): make_step(latent, *VARIANT_SETTINGS[name], seed=0) for latent in args.latents for name in names
    }
    times: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    ratios: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    order = random.Random(0)
    for round_index in range(args.warmup + args.rounds):
        for latent in args.latents:
            shuffled = order.sample(names, len(names))  # no variant always runs right after another
            elapsed = {}
            for name in shuffled:
                start = time.perf_counter()
                steps[latent, name]()
                elapsed[name] = (time.perf_counter() - start) * 1e3
            if round_index >= args.warmup:
                for name, ms in elapsed.items():
                    times[latent, name].append(ms)
                    ratios[latent, name].append(ms / elapsed["erm"])

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {NUM_GROUPS}×{GROUP_BATCH} 28×28, "
        f"{NUM_CLASSES} classes, {args.rounds} rounds, variants of one latent size back to back in random order"
    )
    print("ms: median step time; ratio: median over rounds of (variant / ERM in the same round); min ratio: ratio of")
    print("the fastest steps (least disturbed by other processes)")
    header = f"{'latent':>6} {'anchors':>8} {'variant':>17} {'ms':>7} {'ratio':>6} {'min ratio':>9}"
    print(header)
    print("-" * len(header))
    for latent in args.latents:
        erm_best = min(times[latent, "erm"])
        for name in names:
            covariance, variant = name.split(" ") if " " in name else ("-", name)
            print(
                f"{latent:>6} {covariance:>8} {variant:>17} {statistics.median(times[latent, name]):7.1f} "
                f"{statistics.median(ratios[latent, name]):6.3f} {min(times[latent, name]) / erm_best:9.3f}"
            )


if __name__ == "__main__":
    main()
