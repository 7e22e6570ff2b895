"""CPU training steps with glibc's malloc defaults against ``tdro.training.host_memory.keep_freed_memory`` (the trainer's).

The setting is process-wide, so each variant runs in a fresh child process; children alternate (default,
kept, default, kept, ...) so that load from other processes hits both alike. Each child times steps of
``bench/step_overhead.py`` (two CNN encoders, batch 2×64 28×28, Adam) for ERM and full anchors + GroupDRO
and counts the minor page faults and kernel time per step. Medians over rounds are printed.

    python bench/host_memory.py [--rounds 3] [--steps 20] [--threads 2] [--settings 64:10 256:10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
kept = sys.argv[1] == "kept"
if kept:
    from tdro.training.host_memory import keep_freed_memory
    assert keep_freed_memory(), "glibc's mallopt was refused"
import torch
sys.path.insert(0, "bench")
from step_overhead import Step, parse_setting
torch.set_num_threads(int(sys.argv[2]))
steps, out = int(sys.argv[3]), {}
for setting in sys.argv[4:]:
    for name, covariance, groupdro in (("erm", None, False), ("anchors+groupdro", "full", True)):
        step = Step(*parse_setting(setting), covariance, groupdro, seed=0)
        for _ in range(3):
            step()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
        out[f"{setting} {name}"] = {"ms": wall / steps * 1e3, "faults": (after.ru_minflt - before.ru_minflt) / steps,
                                    "kernel_ms": (after.ru_stime - before.ru_stime) / steps * 1e3}
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant in a child")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["64:10", "256:10"], metavar="LATENT:CLASSES")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    results: dict[str, list[dict]] = {"default": [], "kept": []}
    for _ in range(args.rounds):
        for mode in results:
            done = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.threads), str(args.steps), *args.settings],
                                  cwd=root, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"{args.threads} threads, {args.steps} steps per variant and child, {args.rounds} children per mode "
          "(alternating); medians")
    print(f"{'step':>26} {'malloc':>8} {'ms':>7} {'faults':>8} {'kernel ms':>9} {'ms ÷ default':>12}")
    for key in [k for k in results["default"][0] if k != "peak_rss_mb"]:
        default_ms = statistics.median(r[key]["ms"] for r in results["default"])
        for mode, runs in results.items():
            ms = statistics.median(r[key]["ms"] for r in runs)
            print(f"{key:>26} {mode:>8} {ms:7.1f} {statistics.median(r[key]['faults'] for r in runs):8.0f} "
                  f"{statistics.median(r[key]['kernel_ms'] for r in runs):9.2f} {ms / default_ms:12.3f}")
    for mode, runs in results.items():
        print(f"peak RSS, {mode}: {statistics.median(r['peak_rss_mb'] for r in runs):.0f} MB")


if __name__ == "__main__":
    main()
