"""Command line: `python -m tdro train -f params/x.yaml -p key value`, `--resume RUN_DIR`, `show RUN_DIR`,
`report RUN_DIR|NOTEBOOK ...`, `report --train [-f FILE] [-p key value]`,
`sweep -f params/search/x.yaml --trials N [--storage URL --study NAME]`,
`study heart|phase1_quick_wins|FILE [--workers N | --scheduler tcp://HOST:8786] [--threads T]`,
`collect RUNS_DIR [--out DIR]`, `strip-notebooks [NOTEBOOK ...]`."""
from __future__ import annotations

import argparse
import gc
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
    add_report_parser(commands)
    add_sweep_parser(commands)
    add_study_parsers(commands)
    strip = commands.add_parser("strip-notebooks", help="remove outputs, execution counts and widget state from "
                                                        "notebooks before committing them")
    strip.add_argument("notebooks", nargs="*", type=Path, metavar="NOTEBOOK",
                       help="notebook files (default: notebooks/*.ipynb)")
    return parser


def add_report_parser(commands) -> None:
    report = commands.add_parser(
        "report", help="write a run's report (RUN_DIR/report.html, offline, no kernel needed) and print its path",
        description="A run directory: execute notebooks/train.ipynb on it (-p render_run, no training) into "
                    "RUN_DIR/report.ipynb, export RUN_DIR/report.html and save the figures in RUN_DIR/figures/ "
                    "(PNG and PDF). An executed notebook (.ipynb): export it to offline HTML beside it. --train: "
                    "train a new run through the notebook, straight into its run directory's report (make run).")
    report.add_argument("paths", nargs="*", type=Path, metavar="RUN_DIR|NOTEBOOK")
    report.add_argument("--train", action="store_true", help="train a new run (with -f/-p) and write its report")
    report.add_argument("-f", "--parameters_file", action="append", default=[], metavar="FILE",
                        help="with --train: YAML parameter file; several are merged in order")
    report.add_argument("-p", "--parameters", action="append", nargs=2, default=[], metavar=("KEY", "VALUE"),
                        help="with --train: one Config key, parsed as YAML")
    report.add_argument("--kernel", default="tdro", help="Jupyter kernel that executes the notebook (default tdro)")


def add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="run Optuna trials over a search space (one worker; start it on several machines with one "
                      "--storage and --study to share a study)",
        description="Run --trials trials of a study in this process, then print the top trials, write best.yaml "
                    "(for `train -f`) and, with --rerun-seeds, re-run the best config over seeds and evaluate it on "
                    "test once. Without -f it attaches to an existing study (its search space is stored on it).")
    sweep.add_argument("-f", "--search_file", metavar="FILE",
                       help="search space YAML (params/search/<name>.yaml, or just <name>)")
    sweep.add_argument("-p", "--parameters", action="append", nargs=2, default=[], metavar=("KEY", "VALUE"),
                       help="fix one Config key (parsed as YAML); a searched key given here is no longer searched")
    sweep.add_argument("--trials", type=int, default=10, help="trials this worker runs (0: only report; default 10)")
    sweep.add_argument("--study", help="study name (default: the search file's name)")
    sweep.add_argument("--storage", metavar="URL",
                       help="sqlite:///file.db, postgresql://user@host:port/db, or journal:FILE "
                            "(default: sqlite:///<sweeps-dir>/<study>/optuna.db)")
    sweep.add_argument("--sweeps-dir", default="outputs/sweeps",
                       help="folder of <study>/runs/trial_<n>, best.yaml and tables (default outputs/sweeps)")
    sweep.add_argument("--sampler", choices=("tpe", "random", "grid"), help="default: the search file's (tpe)")
    sweep.add_argument("--seed", type=int, help="sampler seed (reproducible on one worker; give each worker its own)")
    sweep.add_argument("--pruner", choices=("median", "successive_halving", "hyperband", "none"),
                       help="default: the search file's (median)")
    sweep.add_argument("--smoke", action="store_true", help="apply the search file's smoke section (tiny runs)")
    sweep.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    sweep.add_argument("--max-trials", type=int,
                       help="stop once the study holds this many complete, pruned or running trials (all workers)")
    sweep.add_argument("--heartbeat-interval", type=int, default=60,
                       help="seconds between a running trial's heartbeats (SQL storages; 0: off; default 60)")
    sweep.add_argument("--grace-period", type=int,
                       help="seconds without a heartbeat before a trial counts as failed (default 2 x interval)")
    sweep.add_argument("--max-retry", type=int, default=1,
                       help="re-queue a failed-by-heartbeat trial with the same parameters this many times (default 1)")
    sweep.add_argument("--top", type=int, default=10, help="rows of the top-trials table (default 10)")
    sweep.add_argument("--rerun-seeds", type=int, nargs="+", metavar="SEED",
                       help="re-run the best config with these seeds and evaluate each on test once")


def add_study_parsers(commands) -> None:
    study = commands.add_parser(
        "study", help="run an experiment (params/experiments) or a phase (params/phases): finished runs reused, "
                      "interrupted ones resumed; here, on N local worker processes or on a Dask cluster",
        description="Plan every run of the study, train what is missing and print its tables. The same command "
                    "runs on a laptop (--workers N: a local Dask cluster) and on a cluster (--scheduler: an "
                    "existing Dask scheduler whose workers share the output folder).")
    study.add_argument("spec", help="experiment or phase name (params/experiments/<name>.yaml, "
                                    "params/phases/<name>.yaml) or a YAML file")
    study.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: this process)")
    study.add_argument("--threads", type=int, default=1,
                       help="torch threads per run (default 1; workers x threads must fit the cores)")
    study.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler, e.g. tcp://head-node:8786")
    study.add_argument("--seeds", type=int, nargs="+", help="seeds (one number: the first n)")
    study.add_argument("--folds", type=int, nargs="+", help="experiment folds (one number: the first n)")
    study.add_argument("--smoke", action="store_true", help="tiny runs (the spec's smoke section)")
    study.add_argument("--output-dir", help="default outputs/experiments or outputs/phases")
    study.add_argument("--dataset", default="digits", help="phases only: the dataset (default digits)")
    study.add_argument("-p", "--parameters", action="append", nargs=2, default=[], metavar=("KEY", "VALUE"),
                       help="a Config key on top of every run (parsed as YAML), e.g. -p data_root /data")
    collect = commands.add_parser(
        "collect", help="tables over any folder of runs: one per metric, grouped by the config keys that differ",
        description="Mean ± std and a 95%% t interval over seeds and folds, grouped by every config key that "
                    "differs between the finished runs under RUNS_DIR; printed as Markdown, and with --out written "
                    "as <metric>.md, .csv and .tex.")
    collect.add_argument("root", type=Path, metavar="RUNS_DIR")
    collect.add_argument("--metrics", nargs="+", help="summary columns, e.g. test.worst_group_acc val.acc")
    collect.add_argument("--out", type=Path, metavar="DIR", help="write the tables here")
    collect.add_argument("--format", nargs="+", default=["md", "csv", "tex"], choices=("md", "csv", "tex"))


def _count_or_list(values: list[int] | None) -> int | list[int] | None:
    return None if values is None else values[0] if len(values) == 1 else values


def command_study(args: argparse.Namespace) -> int:
    import yaml

    from tdro.config import coerce_overrides
    from tdro.experiments import EXPERIMENTS_DIR, plan_experiment, run_experiment
    from tdro.phases import PHASES_DIR, plan_phase, run_phase
    from tdro.studies.runner import check_workers
    from tdro.studies.tables import markdown_table

    check_workers(args.workers, args.threads, args.scheduler)
    overrides = coerce_overrides(dict(args.parameters))
    name = args.spec
    is_experiment = (EXPERIMENTS_DIR / f"{name}.yaml").is_file()
    is_phase = (PHASES_DIR / f"{name}.yaml").is_file()
    if not (is_experiment or is_phase):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"study {name!r}: no params/experiments/{name}.yaml, params/phases/{name}.yaml or "
                             f"file {path}; give an experiment or phase name, or a YAML file")
        data = yaml.safe_load(path.read_text()) or {}
        is_experiment = isinstance(data, dict) and "reference" in data
    if is_experiment:
        plan = plan_experiment(name, _count_or_list(args.seeds), _count_or_list(args.folds), args.smoke,
                               args.output_dir or "outputs/experiments", overrides)
        result = run_experiment(plan, args.workers, args.threads, scheduler=args.scheduler)
        for setting in plan.spec.settings:
            print(f"\n## {setting.label}\n")
            print(markdown_table(result.summary_table(setting.name)))
    else:
        if args.folds:
            raise ValueError("--folds applies to experiments; a phase has seeds only")
        plan = plan_phase(name, args.dataset, _count_or_list(args.seeds) or 3, smoke=args.smoke,
                          output_dir=args.output_dir or "outputs/phases", overrides=overrides)
        result = run_phase(plan, workers=args.workers, threads=args.threads, scheduler=args.scheduler)
        print(markdown_table(result.formatted_impact()))
        print(f"chosen config: {result.save_chosen()}")
    return 0


def command_collect(args: argparse.Namespace) -> int:
    from tdro.studies.collect import DEFAULT_METRICS, collect

    collected = collect(args.root, args.metrics or DEFAULT_METRICS)
    print(f"{len(collected.runs)} finished runs under {args.root}, grouped by: "
          f"{', '.join(collected.group_keys) or '(no differing keys)'}\n")
    print(collected.markdown())
    if args.out:
        for path in collected.write(args.out, args.format):
            print(f"wrote {path}")
    return 0


def command_train(args: argparse.Namespace) -> int:
    """One run; under torchrun (WORLD_SIZE > 1) one run over all its processes, rank 0 printing and writing."""
    from tdro.config import Config
    from tdro.training.distributed import Distributed, shutdown
    from tdro.training.trainer import resume, train

    if args.resume:
        if args.parameters_file or args.parameters:
            raise ValueError("--resume continues a run with its saved config.yaml; drop -f/-p")
        config = Config.load([Path(args.resume) / "config.yaml"])
    else:
        config = Config.load(args.parameters_file, dict(args.parameters))
    distributed = Distributed.from_environment(config.device)
    try:
        result = resume(args.resume, distributed=distributed) if args.resume else train(config, distributed=distributed)
    finally:
        shutdown()
    if distributed is None or distributed.is_writer:
        print(summary_table(result.summary))
        print(f"run directory: {result.run_dir}")
    return 0


def summary_table(summary: dict) -> str:
    """A plain-text table of the selected checkpoint's metrics per split and group, then the run's diagnostics."""
    from tdro.training.diagnostics import diagnostic_notes

    lines = [f"selected epoch {summary['selected_epoch']} of {summary['epochs_run']} by {summary['monitor']} "
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
    return "\n".join(lines + diagnostic_notes(summary))


def command_show(args: argparse.Namespace) -> int:
    from tdro.runs import read_summary

    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the run has not finished (resume it with --resume {args.run_dir})")
    print(summary_table(read_summary(path)))
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    import pandas as pd

    from tdro.sweep import SweepError, attach, create_sweep, load_search_space

    check_sweep_arguments(args)
    storage_options = dict(heartbeat_interval=args.heartbeat_interval or None, grace_period=args.grace_period,
                           max_retry=args.max_retry)
    if args.search_file:
        space = load_search_space(args.search_file, dict(args.parameters), smoke=args.smoke)
        sweep = create_sweep(space, args.study, args.storage, args.sweeps_dir, **storage_options)
    else:
        if not args.study:
            raise SweepError("give a search file (-f params/search/<name>.yaml) or the --study to attach to")
        if args.parameters or args.smoke:
            raise SweepError("-p and --smoke shape a new study's search space; they need -f")
        sweep = attach(args.study, args.storage, args.sweeps_dir, **storage_options)
    print(f"study {sweep.name!r} in {describe(sweep.storage)}; {sweep.space.direction} {sweep.space.monitor}")
    sweep.optimize(args.trials, args.sampler, args.seed, args.pruner, args.timeout, args.max_trials)
    counts = sweep.state_counts()
    print("trials: " + (", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "none"))
    top = sweep.top_trials(args.top)
    if not len(top):
        print("no complete trial yet: no best config")
        return 0
    sweep.folder.mkdir(parents=True, exist_ok=True)
    sweep.trials_table().to_csv(sweep.folder / "trials.csv", index=False)
    shown = [c for c in top.columns if c in ("rank", "number", "value", "epochs_reported", "seconds")
             or c.startswith("param.")]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"top {len(top)} trials by {sweep.space.monitor} (validation):")
        print(top[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    best_file = sweep.write_best_config()
    print(f"best config: {best_file}  (python -m tdro train -f {best_file})")
    if args.rerun_seeds:
        table = sweep.rerun_best(args.rerun_seeds, log=print)
        with pd.option_context("display.width", 200, "display.max_columns", 50):
            print("best config over seeds (test evaluated once per seed, on the checkpoint selected on validation):")
            print(table.drop(columns=["run_dir"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def check_sweep_arguments(args: argparse.Namespace) -> None:
    """Refuse impossible sweep arguments before a study, storage or folder is created."""
    from tdro.sweep import SweepError, check_study_name, check_sweep_options

    if args.study is not None:
        check_study_name(args.study, "--study")
    check_sweep_options(args.trials, args.timeout, args.max_trials, args.seed, args.heartbeat_interval,
                        args.grace_period, args.max_retry)
    if args.top < 1:
        raise SweepError(f"--top must be an integer >= 1 (rows of the top-trials table); got {args.top}")
    seeds = args.rerun_seeds or []
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--rerun-seeds must be distinct integers >= 0; got {' '.join(map(str, seeds))}")


def describe(storage: str) -> str:
    from tdro.sweep import describe_storage

    return describe_storage(storage)


def command_report(args: argparse.Namespace) -> int:
    from tdro.reports import REPORT_NOTEBOOK, export_html, render_report, train_report  # before papermill: see there
    from tdro.runs import read_summary

    from papermill.exceptions import PapermillExecutionError

    if args.train == bool(args.paths):
        raise ValueError("give run directories or executed notebooks to report on, or --train to train a new run")
    if (args.parameters_file or args.parameters) and not args.train:
        raise ValueError("-f/-p configure a new run: they need --train (a finished run renders with its own config)")
    try:
        if args.train:
            reports = [train_report(args.parameters_file, dict(args.parameters), args.kernel)]
        else:
            reports = [export_html(path) if path.suffix == ".ipynb" else render_report(path, args.kernel)
                       for path in args.paths]
    except PapermillExecutionError as err:
        print(f"error: the notebook stopped in cell {err.exec_count}: {err.ename}: {err.evalue} (traceback in the "
              f"run directory's {REPORT_NOTEBOOK})", file=sys.stderr)
        return 2
    for html in reports:
        if (html.parent / "summary.json").is_file():
            print(summary_table(read_summary(html.parent / "summary.json")))
        print(f"report: {html}")
    return 0


def command_strip_notebooks(args: argparse.Namespace) -> int:
    from tdro.viz.notebook import strip_notebook

    paths = args.notebooks or sorted(Path("notebooks").glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks in {Path('notebooks').resolve()}; run it from the project root or "
                                "name the notebooks")
    for path in paths:
        print(f"{'stripped' if strip_notebook(path) else 'clean   '} {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"train": command_train, "show": command_show, "report": command_report, "sweep": command_sweep,
               "study": command_study, "collect": command_collect, "strip-notebooks": command_strip_notebooks}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError, ArithmeticError) as err:  # config, files, non-finite losses
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    status = main()
    gc.freeze()  # the interpreter's last collection would walk every object torch made (~0.7 s of exit); not needed
    sys.exit(status)
