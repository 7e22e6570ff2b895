"""What the fit's small eigenproblem costs per step, at the sizes the Gram route produces (issue 15 §1, GPU).

The fit solves one float64 eigh of the n_max × n_max matrix G per class present in the batch
(n_max: the largest class's sample count, padded). This cost is fixed by LAPACK, not by eager
overhead, so it bounds how close the anchors step can come to ERM. Printed per (classes, n_max):
microseconds for ``torch.linalg.eigh`` and ``eigvalsh`` in float64 and float32, scipy's LAPACK
drivers per matrix (syev, syevd, syevr: a loop, for reference only), and, where CUDA is
available, eigh on the device against the host round trip that ``gaussian.symmetric_eigh`` takes.

    python bench/eigh_floor.py [--threads 1] [--sizes 10:19 20:12 100:5 10:32 8:128]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from scipy.linalg import lapack

DEFAULT_SIZES = ["10:19", "20:12", "100:5", "10:32", "8:128"]  # batch 128 at 10/20/100 classes; batch 1024 at 8


def microseconds(call: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``call`` in µs after a few untimed calls."""
    for _ in range(5):
        call()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="MATRICES:N")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    columns = ["eigh64", "eigvalsh64", "eigh32", "syev", "syevd", "syevr"] + (["cuda eigh", "host trip"] if cuda else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median µs per batch of matrices")
    print(f"{'matrices':>8} {'n':>4} " + " ".join(f"{name:>10}" for name in columns))
    for text in args.sizes:
        count, n = map(int, text.split(":"))
        factor = torch.randn(count, n, 2 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        gram = factor @ factor.transpose(1, 2)
        single = gram.float()
        arrays = list(gram.numpy())
        row = [
            microseconds(lambda: torch.linalg.eigh(gram), args.repeats),
            microseconds(lambda: torch.linalg.eigvalsh(gram), args.repeats),
            microseconds(lambda: torch.linalg.eigh(single), args.repeats),
            microseconds(lambda: [lapack.dsyev(a) for a in arrays], args.repeats),
            microseconds(lambda: [lapack.dsyevd(a) for a in arrays], args.repeats),
            microseconds(lambda: [lapack.dsyevr(a) for a in arrays], args.repeats),
        ]
        if cuda:
            on_device = gram.cuda()
            row.append(microseconds(lambda: torch.linalg.eigh(on_device), args.repeats, torch.cuda.synchronize))
            row.append(microseconds(lambda: [t.cuda() for t in torch.linalg.eigh(on_device.cpu())], args.repeats,
                                    torch.cuda.synchronize))
        print(f"{count:>8} {n:>4} " + " ".join(f"{value:10.0f}" for value in row))


if __name__ == "__main__":
    main()
