"""Where the start-up of `python -m tdro train` and `make run` goes, on the digits default (issue 15 §3).

Each repeat runs, in fresh processes:

* ``python -c pass`` (the interpreter alone);
* one child that times, in order: ``import torch``, the tdro imports of the trainer, the config,
  the data build, the model, the optimiser build, and training (epochs, evaluation, checkpoints,
  summary); it lists which heavy modules training pulled in;
* ``python -m tdro train`` (the whole command, wall clock);
* with ``--make-run``: ``python -m tdro report --train`` (what ``make run`` runs), split into its
  notebook cells (papermill's per-cell durations), the HTML export (timed in a child of its own,
  once its exporter is built: make run builds it while the kernel works) and the rest: papermill,
  kernel start and warm-up (the notebook's imports, before its first cell), the wait for the figures' background
  PDFs (tdro.viz.wait_for_figures) and stop.

Runs are written under a temporary folder. Medians over repeats are printed, in seconds.

    python bench/startup.py [--repeats 3] [--make-run] [-p key value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("sklearn", "pandas", "matplotlib", "scipy", "torch._dynamo", "torchvision", "tqdm")

CHILD = r"""
import json, resource, sys, time
clock = time.perf_counter
marks = [("start", clock())]
import torch
marks.append(("import torch", clock()))
from tdro.config import Config
from tdro.data import build_dataset
from tdro.training import trainer as T
marks.append(("tdro imports", clock()))
config = Config.load([], json.loads(sys.argv[1]))
device = T.resolve_device(config.device)
T.seed_everything(config.seed, config.deterministic)
marks.append(("config", clock()))
dataset = build_dataset(config)
marks.append(("data build", clock()))
optimiser_seconds = []
create_optimizer = T.create_optimizer
def timed_optimizer(*args, **kwargs):
    begun = clock()
    result = create_optimizer(*args, **kwargs)
    optimiser_seconds.append(clock() - begun)
    return result
T.create_optimizer = timed_optimizer
parts = T.build_parts(config, device, dataset)
built = clock()
marks.append(("model build", built - optimiser_seconds[0]))
marks.append(("optimiser build", built))
trainer = T.Trainer(config, parts=parts)
trainer.start()
trainer.fit()
trainer.close()
marks.append(("training", clock()))
seconds = {name: marks[i][1] - marks[i - 1][1] for i, (name, _) in enumerate(marks) if i}
heavy = [m for m in HEAVY if m in sys.modules]
print(json.dumps({"seconds": seconds, "heavy": heavy,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

EXPORT = r"""
import sys, time
from tdro.reports import export_html, offline_exporter
offline_exporter()  # make run builds it while the kernel works
begun = time.perf_counter()
export_html(sys.argv[1], sys.argv[2])
print(time.perf_counter() - begun)
"""


def run(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds and stdout of a command run from the project root; fails loudly on a non-zero exit."""
    begun = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - begun
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def notebook_split(report_dir: Path) -> tuple[float, float]:
    """(sum of cell durations, papermill's total) from an executed report.ipynb's metadata."""
    notebook = json.loads((report_dir / "report.ipynb").read_text())
    cells = sum(cell["metadata"].get("papermill", {}).get("duration") or 0.0 for cell in notebook["cells"])
    return cells, notebook["metadata"]["papermill"]["duration"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--make-run", action="store_true", help="also time `make run` (tdro report --train)")
    parser.add_argument("-p", "--parameters", action="append", nargs=2, default=[], metavar=("KEY", "VALUE"))
    args = parser.parse_args()
    env = {**os.environ, "MPLBACKEND": "agg"}
    python = sys.executable
    rows: dict[str, list[float]] = {}
    heavy: list[str] = []
    rss: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tdro-startup-") as scratch:
        for repeat in range(args.repeats):
            overrides = {"progress": False, "output_dir": f"{scratch}/runs", **dict(args.parameters)}
            cli = [item for name, value in overrides.items() for item in ("-p", name, str(value))]
            seconds, _ = run([python, "-c", "pass"], env)
            rows.setdefault("python -c pass", []).append(seconds)
            child = CHILD.replace("HEAVY", repr(HEAVY_MODULES))
            _, out = run([python, "-c", child, json.dumps({**overrides, "run_name": f"child{repeat}"})], env)
            record = json.loads(out.strip().splitlines()[-1])
            for name, value in record["seconds"].items():
                rows.setdefault(f"  {name}", []).append(value)
            heavy, _ = record["heavy"], rss.append(record["peak_rss_mb"])
            seconds, _ = run([python, "-m", "tdro", "train", *cli, "-p", "run_name", f"cli{repeat}"], env)
            rows.setdefault("python -m tdro train", []).append(seconds)
            if args.make_run:
                name = f"report{repeat}"
                seconds, _ = run([python, "-m", "tdro", "report", "--train", *cli, "-p", "run_name", name], env)
                report_dir = Path(scratch) / "runs" / name
                cells, papermill_total = notebook_split(report_dir)
                html = report_dir / "export-check.html"
                _, out = run([python, "-c", EXPORT, str(report_dir / "report.ipynb"), str(html)], env)
                export = float(out.strip().splitlines()[-1])
                rows.setdefault("make run (tdro report --train)", []).append(seconds)
                rows.setdefault("  notebook cells", []).append(cells)
                rows.setdefault("  HTML export (nbconvert)", []).append(export)
                rows.setdefault("  papermill + kernel start/stop + imports", []).append(seconds - cells - export)
                rows.setdefault("  (papermill's own total)", []).append(papermill_total)
    print(f"{args.repeats} repeats, medians in seconds (min in brackets); load average {os.getloadavg()[0]:.2f}")
    width = max(map(len, rows))
    for name, values in rows.items():
        print(f"{name:<{width}} {statistics.median(values):7.2f}  [{min(values):.2f}]")
    print(f"heavy modules loaded by training: {', '.join(heavy) or 'none'}; child peak RSS {statistics.median(rss):.0f} MB")


if __name__ == "__main__":
    main()
