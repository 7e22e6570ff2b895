"""Command line: `python -m tdro train -f params/x.yaml -p key value`, `--resume RUN_DIR`, `show RUN_DIR`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tdro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one run (papermill's -f / -p semantics)")
    train.add_argument("-f", "--parameters_file", action="append", default=[], metavar="FILE",
                       help="YAML parameter file; several are merged in order")
    train.add_argument("-p", "--parameters", action="append", nargs=2, default=[], metavar=("KEY", "VALUE"),
                       help="one parameter, parsed as YAML (e.g. -p latent_dim 128)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its directory")
    show = commands.add_parser("show", help="print a run's summary table")
    show.add_argument("run_dir")
    return parser


def command_train(args: argparse.Namespace) -> int:
    from tdro.config import Config
    from tdro.training.trainer import resume, train

    if args.resume:
        if args.parameters_file or args.parameters:
            raise ValueError("--resume continues a run with its saved config.yaml; drop -f/-p")
        result = resume(args.resume)
    else:
        config = Config.load(args.parameters_file, dict(args.parameters))
        result = train(config)
    print(summary_table(result.summary))
    print(f"run directory: {result.run_dir}")
    return 0


def summary_table(summary: dict) -> str:
    """A plain-text table of the selected checkpoint's metrics per split and group."""
    lines = [f"selected epoch {summary['selected_epoch']} by {summary['monitor']} "
             f"({summary['selection_split']}) = {summary['monitor_value']}"]
    header = f"{'split':<6} {'acc':>7} {'worst':>7} {'balanced':>9} {'macro_f1':>9}  per-group acc"
    lines.append(header)
    for split in ("val", "test"):
        m = summary[split]
        groups = " ".join(f"{g}={v:.3f}" for g, v in m["group_acc"].items() if v is not None)
        lines.append(f"{split:<6} {m['acc']:>7.3f} {m['worst_group_acc']:>7.3f} {m['balanced_acc']:>9.3f} "
                     f"{m['macro_f1']:>9.3f}  {groups}")
    lines.append(f"wall time {summary['wall_seconds']:.1f}s, {summary['parameter_count']} parameters, "
                 f"device {summary['device']}")
    return "\n".join(lines)


def command_show(args: argparse.Namespace) -> int:
    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the run has not finished (resume it with --resume {args.run_dir})")
    print(summary_table(json.loads(path.read_text())))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": command_train, "show": command_show}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError, ArithmeticError) as err:  # config, files, non-finite losses
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
