"""Cost of the anchor losses and GroupDRO per training step, relative to plain ERM (SPEC §9).

Every variant is a full step (forward, loss, backward, Adam step) of two per-group `cnn` encoders
on 28×28 inputs (64 + 64 samples, 10 classes) and a linear head. All variants run in one process,
interleaved round-robin, so load from other processes hits them alike; the table shows medians.
Targets with full covariance: anchors + GroupDRO ≤ 1.15× ERM at latent 64, ≤ 1.3× at 256.

    python bench/step_overhead.py [--rounds 25] [--latents 64 128 256]
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args()

    variants: dict[tuple[int, str, str], Callable[[], None]] = {}
    for latent in args.latents:
        variants[latent, "-", "erm"] = make_step(latent, None, False, seed=0)
        for covariance in ("full", "diagonal"):
            variants[latent, covariance, "anchors"] = make_step(latent, covariance, False, seed=0)
            variants[latent, covariance, "anchors+groupdro"] = make_step(latent, covariance, True, seed=0)
    times: dict[tuple[int, str, str], list[float]] = {key: [] for key in variants}
    for round_index in range(args.warmup + args.rounds):
        for key, step in variants.items():
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[key].append(elapsed * 1e3)
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {NUM_GROUPS}×{GROUP_BATCH} 28×28, "
          f"{NUM_CLASSES} classes, median of {args.rounds} interleaved rounds (ms per step)")
    print(f"{'latent':>6} {'anchors':>8} {'ERM':>8} {'+anchors':>8} {'ratio':>6} {'+GroupDRO':>9} {'ratio':>6}")
    for latent in args.latents:
        erm = median[latent, "-", "erm"]
        for covariance in ("full", "diagonal"):
            anchored = median[latent, covariance, "anchors"]
            robust = median[latent, covariance, "anchors+groupdro"]
            print(f"{latent:>6} {covariance:>8} {erm:8.1f} {anchored:8.1f} {anchored / erm:6.3f} "
                  f"{robust:9.1f} {robust / erm:6.3f}")


if __name__ == "__main__":
    main()
