"""Result experiments (params/experiments/*.yaml): smoke versions run for real on the shared data, plus the
honesty checks (seeds vs folds, the shared encoder's zero-filled union, no test-set selection)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tdro.data import build_dataset
from tdro.data.heart import FEATURES, HETAGG_MASKS
from tdro.experiments import ExperimentError, load_experiment, plan_experiment, run_experiment
from tdro.models.multigroup import build_model
from tdro.studies import StudyError
from tdro.studies.results import summary_row
from tdro.training.trainer import Trainer

from processes import alive, children, command_line, wait_gone  # tests/processes.py

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_heart = pytest.mark.skipif(not (SHARED_DATA / "uci_heart_disease" / "processed.va.data").is_file(),
                                 reason="the UCI heart files are not in ../shared/data")
needs_digits = pytest.mark.skipif(not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
                                  or not (SHARED_DATA / "usps" / "usps.h5").is_file(),
                                  reason="the MNIST / USPS files are not in ../shared/data")


def test_experiment_files_match_the_issue():
    heart = load_experiment("heart")
    assert heart.seeds == list(range(10)) and heart.folds == 5 and heart.reference == "per_group_erm"
    assert [s.name for s in heart.settings] == ["uncapped", "capped"]
    assert heart.setting("capped").changes["group_max_train_samples"] == [None, None, 20, 25]
    baselines = {"per_group_reweight": "reweight", "per_group_regret_dro": "regret_dro", "per_group_jtt": "jtt",
                 "per_group_dfr": "dfr", "per_group_cvar_dro": "cvar_dro", "per_group_chi2_dro": "chi2_dro",
                 "per_group_coral": "coral"}
    assert len(heart.arms) == 6 + len(baselines)
    for arm, algorithm in baselines.items():
        assert heart.arm(arm).changes["algorithm"] == algorithm and "common_encoder" not in heart.arm(arm).changes
    for arm in ("per_group_anchors_erm", "per_group_anchors_groupdro"):
        assert heart.arm(arm).changes["lambda_fit"] == 0.1 and heart.arm(arm).changes["lambda_sep"] == 0.1
    assert heart.base["lambda_fit"] == 0 and heart.base["lambda_sep"] == 0  # no anchors unless an arm asks
    assert heart.base["val_frac"] == 0.15 and heart.base["feature_mask"] == "hetagg"
    assert len(plan_experiment(heart).runs) == 2 * 13 * 10 * 5
    digits = load_experiment("mnist_usps")
    assert digits.seeds == list(range(5)) and digits.folds is None
    assert [a.name for a in digits.arms] == ["erm", "groupdro", "anchors_erm", "anchors_groupdro", "reweight", "regret_dro",
                                             "jtt", "dfr", "cvar_dro", "chi2_dro", "coral"]
    base = digits.base
    assert (base["mnist_majority"], base["usps_majority"], base["majority_frac"]) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], 0.8)
    assert base["mnist_size"] > base["usps_size"]
    assert len(plan_experiment(digits).runs) == 55
    for spec in (heart, digits):
        assert "VALIDATION" in spec.selection and spec.data
        for run in plan_experiment(spec, smoke=True).runs:
            assert run.config.monitor.startswith("val_") and not run.config.allow_test_selection
            assert run.config.latent_samples_per_group == 0


def test_an_experiment_that_selects_on_test_is_refused(tmp_path):
    data = yaml.safe_load((ROOT / "params" / "experiments" / "heart.yaml").read_text())
    data["base"].update(monitor="test_worst_group_acc", allow_test_selection=True)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ExperimentError, match="test split"):
        load_experiment(path)


def test_a_summary_selected_on_test_is_refused_by_the_tables(tmp_path):
    summary = {"test_selection": True, "selection_split": "test"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(StudyError, match="validation-selected"):
        summary_row(tmp_path)


@needs_heart
def test_two_seeds_of_one_fold_differ_in_initial_weights_and_share_the_split(tmp_path):
    plan = plan_experiment("heart", seeds=2, folds=2, smoke=True, output_dir=tmp_path, settings=["capped"],
                           arms=["per_group_erm"])
    configs = {(r.seed, r.fold): r.config for r in plan.runs}
    trainers = {key: Trainer(config, tmp_path / f"t{key}") for key, config in configs.items()}
    a, b, other_fold = trainers[(0, 0)], trainers[(1, 0)], trainers[(0, 1)]
    for name in a.dataset.groups:
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(a.dataset.groups[name], split).index, getattr(b.dataset.groups[name], split).index)
            assert torch.equal(getattr(a.dataset.groups[name], split).x, getattr(b.dataset.groups[name], split).x)
        assert not torch.equal(a.dataset.groups[name].test.index, other_fold.dataset.groups[name].test.index)
    weights_a, weights_b = a.model.state_dict(), b.model.state_dict()
    assert any(not torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # the batch order differs too
    batch_a, batch_b = next(iter(a.batches)), next(iter(b.batches))
    assert any(not torch.equal(batch_a[g][1], batch_b[g][1]) or not torch.equal(batch_a[g][0], batch_b[g][0])
               for g in batch_a)


@needs_heart
def test_the_shared_encoder_baseline_sees_the_zero_filled_union_of_the_per_group_columns(tmp_path):
    plan = plan_experiment("heart", smoke=True, output_dir=tmp_path, settings=["uncapped"],
                           arms=["shared_erm", "per_group_erm"])
    configs = {r.arm: r.config for r in plan.runs}
    shared, per_group = build_dataset(configs["shared_erm"]), build_dataset(configs["per_group_erm"])
    union = sorted(set().union(*HETAGG_MASKS.values()))
    assert len(union) == len(FEATURES) == 13
    for name, group in shared.groups.items():
        mask = HETAGG_MASKS[name]
        outside = [i for i in range(13) if i not in mask]
        for split in ("train", "val", "test"):
            x_shared, x_own = getattr(group, split).x, getattr(per_group.groups[name], split).x
            assert x_shared.shape[1] == 13 and x_own.shape[1] == len(mask)
            assert torch.equal(x_shared[:, mask], x_own)          # the same values where the hospital has them
            assert torch.count_nonzero(x_shared[:, outside]) == 0  # zero-filled elsewhere
    shared_model = build_model(configs["shared_erm"], shared)
    encoders = list(shared_model.encoders.values()) if hasattr(shared_model, "encoders") else []
    assert encoders and all(e is encoders[0] for e in encoders)
    assert shared_model.parameter_count() < build_model(configs["per_group_erm"], per_group).parameter_count()


# the six original arms and one two-stage baseline (its stage run is trained, and counted in the cost)
SMOKE_ARMS = ["shared_erm", "shared_groupdro", "per_group_erm", "per_group_groupdro", "per_group_anchors_erm",
              "per_group_anchors_groupdro", "per_group_jtt"]


@needs_heart
def test_heart_smoke_experiment_trains_reuses_resumes_and_reports(tmp_path):
    plan = plan_experiment("heart", smoke=True, output_dir=tmp_path, arms=SMOKE_ARMS)
    assert len(plan.runs) == 14 and plan.seeds == [0] and plan.folds == [0]
    result = run_experiment(plan, log=None)
    assert set(result.runs["status"]) == {"trained"}
    metrics = result.metrics()
    assert len(metrics) == 14 and set(metrics["selection_split"]) == {"val"}
    jtt = metrics[metrics["arm"] == "per_group_jtt"].iloc[0]
    jtt_summary = json.loads((Path(jtt["run_dir"]) / "summary.json").read_text())
    stage = jtt_summary["stage_runs"]["identify"]
    assert jtt["wall_seconds"] == pytest.approx(jtt_summary["wall_seconds"] + stage["wall_seconds"])
    assert set(metrics["checkpoint"]) == {"best.pt"} and set(metrics["monitor"]) == {"val_worst_group_acc"}
    assert metrics["worst_group_acc"].between(0, 1).all()
    shared = metrics[metrics["arm"] == "shared_erm"]["parameter_count"].iloc[0]
    own = metrics[metrics["arm"] == "per_group_erm"]["parameter_count"].iloc[0]
    assert shared < own
    # the capped setting trains on 20 Switzerland and 25 VA patients
    sizes = json.loads(metrics[metrics["setting"] == "capped"]["train_sizes"].iloc[0])
    assert sizes["switzerland"] == 20 and sizes["va"] == 25
    # idempotent: everything reused; an interrupted run (no summary) is resumed
    victim = Path(result.runs["run_dir"].iloc[0])
    (victim / "summary.json").unlink()
    again = run_experiment(plan_experiment("heart", smoke=True, output_dir=tmp_path, arms=SMOKE_ARMS), log=None)
    assert sorted(again.runs["status"]) == ["resumed"] + ["reused"] * 13
    tables = [again.summary_table("uncapped"), again.group_table("capped"), again.paired_table("uncapped")]
    assert all(len(t) == 7 for t in tables)
    assert again.paired_table("capped").loc["per-group + ERM"].iloc[1] == "(reference)"
    q = again.q_table("uncapped")
    assert set(q["arm"]) == {"shared_groupdro", "per_group_groupdro", "per_group_anchors_groupdro"}
    assert set(q["group"]) == {"cleveland", "hungarian", "switzerland", "va"}
    report = again.markdown(command="make experiments")
    for text in ("SMOKE RUN", "Setting: capped", "best.pt by val_worst_group_acc", "uci_heart_disease",
                 "Paired difference", "GroupDRO weights", "make experiments", "Runner invocation"):
        assert text in report


@needs_digits
def test_mnist_usps_smoke_experiment_runs_on_the_real_files(tmp_path):
    plan = plan_experiment("mnist_usps", smoke=True, output_dir=tmp_path,
                           arms=["erm", "groupdro", "anchors_erm", "anchors_groupdro"])
    assert len(plan.runs) == 4 and plan.folds == [None]
    result = run_experiment(plan, log=None)
    metrics = result.metrics()
    assert set(metrics["selection_split"]) == {"val"} and len(metrics) == 4
    sizes = json.loads(metrics["train_sizes"].iloc[0])
    assert sizes == {"mnist": 300, "usps": 100}
    assert set(result.groups()) == {"mnist", "usps"}
    assert len(result.summary_table("skewed")) == 4
    assert "usps.h5" in result.markdown() or "usps" in result.markdown()


@needs_heart
@pytest.mark.slow
def test_the_experiment_notebook_runs_under_papermill(tmp_path):
    out = tmp_path / "heart-smoke.ipynb"
    reports = tmp_path / "reports"
    command = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "experiment.ipynb"), str(out), "-k", "tdro",
               "-p", "experiment", "heart", "-p", "smoke", "True", "-p", "output_dir", str(tmp_path / "runs"),
               "-p", "report_dir", str(reports), "-p", "command", "make experiments"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ,
                                                                                   "MPLBACKEND": "agg"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Unable to parse" not in done.stderr and "unknown parameter" not in done.stderr
    report = (reports / "heart-smoke.md").read_text()
    assert "SMOKE RUN" in report and "Setting: uncapped" in report and "### Diagnostics" in report
    figures = sorted(p.name for p in (tmp_path / "runs" / "heart-smoke" / "figures").iterdir())
    assert figures == sorted(f"{kind}_{setting}.{fmt}" for kind in ("paired", "q") for setting in ("uncapped", "capped")
                             for fmt in ("png", "pdf"))
    notebook = json.loads(out.read_text())
    assert not any(o.get("output_type") == "error" for c in notebook["cells"] for o in c.get("outputs", []))


ORPHAN_PARENT = """
import sys
from tdro.experiments import plan_experiment, run_experiment

if __name__ == "__main__":  # the workers are spawned: they import this file
    plan = plan_experiment("heart", smoke=True, output_dir=sys.argv[1], settings=["uncapped"],
                           overrides={"epochs": 5000})
    run_experiment(plan, workers=2, log=None)
"""


@pytest.mark.slow
@needs_heart
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with their parent through Linux's prctl")
def test_experiment_worker_processes_die_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 180
        while len([h for h in (tmp_path / "out").rglob("history.jsonl") if h.read_text().count("\n") >= 1]) < 2:
            assert parent.poll() is None and time.time() < deadline, "two workers never both finished an epoch"
            time.sleep(0.1)
        workers = [pid for pid in children(parent.pid) if "multiprocessing" in command_line(pid)]
        assert len(workers) >= 2, [command_line(pid) for pid in children(parent.pid)]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        assert wait_gone(workers, timeout=5) == [], "worker processes kept training after their parent died"
        assert not list((tmp_path / "out").rglob("summary.json")), "they were killed, not finished"
    finally:
        for pid in [parent.pid, *workers]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
