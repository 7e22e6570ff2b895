"""What each of train.ipynb's figures costs, in one process: building it, ``show(fig, save_as=...)`` (the saved
PNG and PDF and the displayed image), ``latent_animation`` and ``LatentExplorer``; with ``--against REV``
the same cells through ``tdro/viz/static.py`` as it was at that git revision, interleaved with today's
(alternating which goes first), so that both see the same load.

Runs on a finished run directory (e.g. one of ``make run``'s). Medians over repeats are printed, in seconds;
with ``--against`` also the ratio. Module imports are not timed here (``bench/startup.py`` times them).

    python bench/report_figures.py RUN_DIR [--repeats 3] [--against HEAD]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import matplotlib

matplotlib.use("agg")
import IPython.display  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from tdro.runs import Run, load_run  # noqa: E402
from tdro.viz import static  # noqa: E402
from tdro.viz.widgets import LatentExplorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# train.ipynb's figure cells, in its order: (name, the figure from a run)
FIGURES: tuple[tuple[str, Callable[[ModuleType, Run], object]], ...] = (
    ("selection", lambda viz, run: viz.plot_selection(run)),
    ("alignment", lambda viz, run: viz.plot_alignment(run)),
    ("losses", lambda viz, run: viz.plot_losses(run)),
    ("group_accuracy", lambda viz, run: viz.plot_group_accuracy(run, split="val")),
    ("group_weights", lambda viz, run: viz.plot_group_weights(run)),
    ("learning_rates", lambda viz, run: viz.plot_learning_rates(run)),
    ("latent_view", lambda viz, run: viz.plot_latent_view(run)),
    ("latent_epochs", lambda viz, run: viz.plot_latent_epochs(run)),
    ("confusions", lambda viz, run: viz.plot_confusions(run, split="test")),
)


def static_at(revision: str) -> ModuleType:
    """``tdro/viz/static.py`` as it was at a git revision, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:tdro/viz/static.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="tdro-static-")) / "static_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("static_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def cells(viz: ModuleType, run: Run, figures: Path) -> dict[str, float]:
    """Seconds of each figure cell of train.ipynb drawn with ``viz`` (figures saved under ``figures``)."""
    clock = time.perf_counter
    seconds = {}
    for name, make in FIGURES:
        begun = clock()
        figure = make(viz, run)
        built = clock()
        viz.show(figure, save_as=figures / name)
        seconds[f"{name}: build"], seconds[f"{name}: show"] = built - begun, clock() - built
    begun = clock()
    viz.latent_animation(run)
    seconds["latent_animation"] = clock() - begun
    begun = clock()
    LatentExplorer(run)
    seconds["LatentExplorer"] = clock() - begun
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="also time tdro/viz/static.py at this git revision")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    IPython.display.display = lambda *objects, **kwargs: None  # show() displays into no notebook here
    versions = {"now": static}
    if args.against:
        versions = {args.against: static_at(args.against), **versions}
    rows: dict[str, dict[str, list[float]]] = {label: {} for label in versions}
    with tempfile.TemporaryDirectory(prefix="tdro-figures-") as scratch:
        cells(static, run, Path(scratch) / "warm-up")  # fonts, caches and first-figure costs, for neither side
        for repeat in range(args.repeats):
            order = list(versions) if repeat % 2 == 0 else list(versions)[::-1]
            for label in order:
                for name, value in cells(versions[label], run, Path(scratch) / label).items():
                    rows[label].setdefault(name, []).append(value)
                plt.close("all")
    labels = list(versions)
    width = max(len(name) for name in rows["now"])
    print(f"{args.repeats} repeats, medians in seconds; run {run.path}")
    print(f"{'':<{width}}" + "".join(f"{label:>10}" for label in labels) + ("     ratio" if len(labels) > 1 else ""))
    totals = dict.fromkeys(labels, 0.0)
    for name in rows["now"]:
        medians = [statistics.median(rows[label][name]) for label in labels]
        totals.update({label: totals[label] + value for label, value in zip(labels, medians)})
        ratio = f"{medians[-1] / medians[0]:10.2f}" if len(labels) > 1 and medians[0] else ""
        print(f"{name:<{width}}" + "".join(f"{value:10.3f}" for value in medians) + ratio)
    ratio = f"{totals['now'] / totals[labels[0]]:10.2f}" if len(labels) > 1 else ""
    print(f"{'total':<{width}}" + "".join(f"{totals[label]:10.3f}" for label in labels) + ratio)


if __name__ == "__main__":
    main()
