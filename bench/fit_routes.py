"""Which of the fit's two routes is faster at which sizes: the n×n Gram matrix or the k×k one (issue 15, GPU).

``lowrank_bures_wasserstein_sq`` takes the cross term tr (S^½ Ŝ S^½)^½ from the n×n matrix
G = X S Xᵀ/(n−1) when n_max − 1 ≤ k (``gaussian.gram_route``), else from the k×k matrix
chol(S)ᵀ Ŝ chol(S). This times both, forward + backward in the training dtype (float32), for
C classes of exactly n samples each, and prints which one the rule picks. On CUDA each route is
also timed with its eigenproblem on the device instead of the host round trip that
``gaussian.symmetric_eigh`` takes (cuSOLVER's batched eigh is fast only up to n = 32).

    python bench/fit_routes.py [--threads 2] [--device cuda] [--sizes 10:64:32 10:64:65 ...]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from eigh_floor import microseconds  # bench/ is on sys.path when this runs as a script

import tdro.objectives.gaussian as gaussian
from tdro.models.anchors import GaussianAnchors
from tdro.objectives.gaussian import class_moments, lowrank_bures_wasserstein_sq

GRAM_ROUTE = gaussian.gram_route  # the rule, kept while the routes are forced in turn
# classes:k:n — n around k on both sides (the rule's crossover, 1.25·k, among them), at the latent sizes users run
DEFAULT_SIZES = [f"10:{k}:{n}" for k in (32, 64, 128, 256) for n in (k // 2, k + 1, 5 * k // 4, 3 * k // 2, 2 * k)] + [
    "100:256:5", "100:256:40", "8:256:128", "8:64:128"]


def fit_step(classes: int, k: int, n: int, covariance: str, device: str) -> tuple[Callable[[], None], bool]:
    """Forward + backward of the fit's distances for ``classes`` classes of ``n`` samples in dimension ``k``.

    Also whether ``gaussian.gram_route`` picks the n×n route for these moments.
    """
    torch.manual_seed(0)
    rank = {"rank": 16} if covariance == "lowrank" else {}
    anchors = GaussianAnchors(classes, k, covariance=covariance, **rank).to(device)
    latents = torch.randn(classes * n, k, device=device, requires_grad=True)
    labels = torch.arange(classes, device=device).repeat_interleave(n)

    def step() -> None:
        moments = class_moments(latents, labels, classes)
        parts = anchors.factor_parts()
        distances = lowrank_bures_wasserstein_sq(moments, anchors.means, parts.raw, anchors.eps, parts.scale,
                                                 parts.diagonal, parts.norm_sq)
        distances.sum().backward()
        latents.grad = None
        anchors.zero_grad(set_to_none=True)

    return step, GRAM_ROUTE(class_moments(latents.detach(), labels, classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="CLASSES:K:N")
    parser.add_argument("--covariance", choices=("full", "lowrank"), default="full")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host_eigh = gaussian.symmetric_eigh
    eighs = {"host eigh": host_eigh, "device eigh": lambda matrix, vectors=True: (
        torch.linalg.eigh if vectors else torch.linalg.eigvalsh)(matrix)} if cuda else {"": host_eigh}
    routes = {"n×n": True, "k×k": False}
    columns = {f"{route} {name}".strip(): (gram, eigh) for route, gram in routes.items() for name, eigh in eighs.items()}
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s), {args.covariance} anchors, "
          f"float32, median ms of fit forward + backward over {args.repeats} calls")
    print(f"{'classes':>7} {'k':>4} {'n':>4} " + " ".join(f"{name:>16}" for name in columns) + "  rule picks  fastest")
    try:
        for text in args.sizes:
            classes, k, n = map(int, text.split(":"))
            step, gram_picked = fit_step(classes, k, n, args.covariance, args.device)
            row = {}
            for column, (gram, eigh) in columns.items():
                gaussian.gram_route, gaussian.symmetric_eigh = (lambda moments, gram=gram: gram), eigh
                row[column] = microseconds(step, args.repeats, sync) / 1e3
            picked = "n×n" if gram_picked else "k×k"
            fastest = min(row, key=row.get)
            print(f"{classes:>7} {k:>4} {n:>4} " + " ".join(f"{row[name]:16.2f}" for name in columns)
                  + f"  {picked:>10}  {fastest}")
    finally:
        gaussian.gram_route, gaussian.symmetric_eigh = GRAM_ROUTE, host_eigh


if __name__ == "__main__":
    main()
