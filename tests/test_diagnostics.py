"""Diagnostics (tdro.training.diagnostics): W₂ alignment against an independent float64 scipy computation,
whether GroupDRO acted (runs where it does and where it cannot), and the selected-in-warm-up flag."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from algorithm_runs import small_config
from tdro.config import Config
from tdro.models.anchors import GaussianAnchors
from tdro.runs import load_summaries, read_jsonl
from tdro.training.diagnostics import (Q_MOVED_THRESHOLD, active_warmups, alignment, diagnostic_notes, q_deviation,
                                       summarize)
from tdro.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
GROUPS, CLASSES = ["a", "b"], ["x", "y"]


def scipy_w2(m1: np.ndarray, s1: np.ndarray, m2: np.ndarray, s2: np.ndarray) -> float:
    """W₂ between N(m1, s1) and N(m2, s2) by the textbook formula with scipy's sqrtm, in float64."""
    root = np.real(scipy.linalg.sqrtm(s1))
    cross = np.real(scipy.linalg.sqrtm(root @ s2 @ root))
    squared = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross)
    return float(np.sqrt(max(squared, 0.0)))


def hand_made(k: int, n: int, seed: int = 0):
    """Latents of 2 groups × 2 classes (n per cell, each cell shifted and scaled differently)."""
    rng = np.random.default_rng(seed)
    latents, labels, groups = [], [], []
    for g in range(2):
        for c in range(2):
            mix = rng.normal(size=(k, k)) * (0.5 + g + c)
            latents.append(rng.normal(size=(n, k)) @ mix + 3.0 * c - 1.5 * g)
            labels += [c] * n
            groups += [g] * n
    return np.concatenate(latents), np.array(labels), np.array(groups)


def anchors_with(k: int, covariance: str, seed: int = 1) -> GaussianAnchors:
    torch.manual_seed(seed)
    anchors = GaussianAnchors(2, k, eps=1e-3, covariance=covariance)
    with torch.no_grad():
        anchors.means.copy_(torch.randn(2, k))
        if covariance == "full":
            anchors.L.copy_(torch.randn(2, k, k) * 0.7)
        else:
            anchors.raw_scale.copy_(torch.randn(2, k))
    return anchors


@pytest.mark.parametrize("k, n", [(3, 12), (6, 4)], ids=["more-samples-than-dims", "fewer-samples-than-dims"])
@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_alignment_matches_scipy_sqrtm_w2(k, n, covariance):
    """Both factor routes (eigen-root when n > k, sample factor when n ≤ k: singular covariances) and both anchors."""
    latents, labels, groups = hand_made(k, n)
    anchors = anchors_with(k, covariance)
    got = alignment(torch.tensor(latents, dtype=torch.float32), labels, groups, anchors, GROUPS, CLASSES)
    latents = torch.tensor(latents, dtype=torch.float32).double().numpy()  # what alignment sees, in float64
    means = anchors.means.detach().double().numpy()
    covariances = anchors.covariance(torch.float64).detach().numpy()
    fits = {}
    for g in range(2):
        for c in range(2):
            x = latents[(groups == g) & (labels == c)]
            fits[g, c] = x.mean(0), np.cov(x, rowvar=False)
    for g, group in enumerate(GROUPS):
        per_class = [scipy_w2(means[c], covariances[c], *fits[g, c]) for c in range(2)]
        assert got["to_anchor_per_class"][group] == pytest.approx(dict(zip(CLASSES, per_class)), rel=1e-7)
        assert got["to_anchor"][group] == pytest.approx(np.mean(per_class), rel=1e-7)
    between = np.mean([scipy_w2(*fits[0, c], *fits[1, c]) for c in range(2)])
    assert got["between_groups"] == {"a|b": pytest.approx(between, rel=1e-6)}


def test_alignment_of_identical_groups_is_zero_between_them_and_skips_small_cells():
    latents, labels, groups = hand_made(3, 8)
    first = groups == 0
    twin = np.concatenate([latents[first], latents[first], latents[first][:1]])
    got = alignment(twin, np.concatenate([labels[first], labels[first], [0]]),
                    np.array([0] * first.sum() + [1] * first.sum() + [2]), None, ["a", "b", "c"], CLASSES)
    assert "to_anchor" not in got
    assert got["between_groups"]["a|b"] == pytest.approx(0.0, abs=1e-4)
    assert got["between_groups"]["a|c"] is None, "group c has one sample: no covariance, no distance"


def test_summary_scalars_and_the_warmup_flag():
    history = [{"epoch": e, "q": {"a": 0.5 + 0.1 * (e - 1), "b": 0.5 - 0.1 * (e - 1)},
                "alignment": {"to_anchor": {"a": 4.0 - e, "b": 6.0 - e}, "between_groups": {"a|b": 2.0 / e}}}
               for e in (1, 2, 3)]
    steps = [{"step": 7, "epoch": 3, "q": {"a": 0.95, "b": 0.05}}]
    initial = {"a": 0.5, "b": 0.5}
    out = summarize(history, steps, 2, initial, {"groupdro_warmup_epochs": 2, "lr_warmup_epochs": 1})
    assert out["alignment_to_anchor_first"] == 4.0 and out["alignment_to_anchor_selected"] == 3.0
    assert out["alignment_to_anchor_last"] == 2.0 and out["alignment_to_anchor_worst_group_selected"] == 4.0
    assert out["alignment_between_groups_selected"] == 1.0
    assert out["q_max_deviation"] == pytest.approx(0.45) and out["q_deviation_selected"] == pytest.approx(0.1)
    assert out["q_moved"] is True
    assert out["selected_in_warmup"] is True and out["selected_in_warmup_of"] == "groupdro_warmup_epochs"
    assert not summarize(history, steps, 3, initial, {"groupdro_warmup_epochs": 2})["selected_in_warmup"]
    assert q_deviation(None, initial) is None


def test_active_warmups_only_count_what_the_run_has():
    config = Config(algorithm="groupdro", lr_warmup_epochs=1, freeze_backbone_epochs=1)
    assert active_warmups(config, has_backbone=False) == {"groupdro_warmup_epochs": 2, "lr_warmup_epochs": 1}
    assert active_warmups(config, has_backbone=True)["freeze_backbone_epochs"] == 1
    assert active_warmups(Config(), has_backbone=False) == {}, "ERM has no q to hold"


# ------------------------------------------------------------------------------------------- on real runs
def test_groupdro_that_acts_and_groupdro_that_cannot(tmp_path):
    acting = train(small_config(tmp_path, run_name="acting", algorithm="groupdro", groupdro_eta=1.0,
                                groupdro_warmup_epochs=0, groupdro_update_mode="exp")).summary
    frozen = train(small_config(tmp_path, run_name="frozen", algorithm="groupdro", groupdro_eta=1e-9,
                                groupdro_warmup_epochs=0)).summary
    erm = train(small_config(tmp_path, run_name="erm")).summary
    moved, still = acting["diagnostics"], frozen["diagnostics"]
    assert moved["q_max_deviation"] > 0.05 and moved["q_moved"] is True
    assert moved["q_max_deviation"] >= moved["q_deviation_selected"] > 0
    final = max(abs(acting["final_q"][g] - acting["initial_q"][g]) for g in acting["groups"])
    history = read_jsonl(tmp_path / "runs" / "acting" / "history.jsonl")
    assert final == pytest.approx(q_deviation(history[-1]["q"], acting["initial_q"]))
    assert still["q_max_deviation"] < 1e-6 and still["q_moved"] is False
    assert frozen["initial_q"] == {g: 0.5 for g in frozen["groups"]}
    notes = " ".join(diagnostic_notes(frozen))
    assert "GroupDRO's weights never moved from uniform" in notes and f"below {Q_MOVED_THRESHOLD}" in notes
    assert "GroupDRO's weights moved from uniform" in " ".join(diagnostic_notes(acting))
    assert erm["diagnostics"]["q_max_deviation"] is None and "GroupDRO" not in " ".join(diagnostic_notes(erm))
    table = load_summaries([tmp_path / "runs" / name for name in ("acting", "frozen", "erm")]).set_index("run_id")
    assert table.loc["acting", "diagnostics.q_moved"] and not table.loc["frozen", "diagnostics.q_moved"]
    assert table.loc["erm", "diagnostics.alignment_to_anchor_selected"] == erm["diagnostics"][
        "alignment_to_anchor_selected"]


def test_alignment_is_recorded_every_epoch_and_summarised(tmp_path):
    result = train(small_config(tmp_path, run_name="aligned", lambda_fit=0.5))
    history = read_jsonl(result.run_dir / "history.jsonl")
    groups, classes = result.summary["groups"], result.summary["classes"]
    for record in history:
        assert set(record["alignment"]["to_anchor"]) == set(groups)
        assert all(v > 0 for v in record["alignment"]["to_anchor"].values())
        assert set(record["alignment"]["to_anchor_per_class"][groups[0]]) == set(classes)
        assert list(record["alignment"]["between_groups"]) == [f"{groups[0]}|{groups[1]}"]
    diagnostics = result.summary["diagnostics"]
    selected = next(r for r in history if r["epoch"] == result.summary["selected_epoch"])
    assert diagnostics["alignment_to_anchor_selected"] == pytest.approx(np.mean(list(
        selected["alignment"]["to_anchor"].values())))
    assert diagnostics["alignment_to_anchor_first"] == pytest.approx(np.mean(list(
        history[0]["alignment"]["to_anchor"].values())))


def test_a_selection_inside_the_warmup_is_flagged_in_summary_and_show(tmp_path):
    """GroupDRO's default 2-epoch warm-up covers a 2-epoch run: whatever epoch is selected, q was held."""
    result = train(small_config(tmp_path, run_name="warm", algorithm="groupdro"))
    diagnostics = result.summary["diagnostics"]
    assert diagnostics["selected_in_warmup"] is True
    assert diagnostics["selected_in_warmup_of"] == "groupdro_warmup_epochs"
    assert diagnostics["groupdro_warmup_epochs"] == 2
    shown = subprocess.run([sys.executable, "-m", "tdro", "show", str(result.run_dir)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "WARNING: the selected epoch" in shown.stdout and "groupdro_warmup_epochs = 2" in shown.stdout
    later = train(small_config(tmp_path, run_name="later", algorithm="groupdro", groupdro_warmup_epochs=0))
    assert later.summary["diagnostics"]["selected_in_warmup"] is False
    assert json.loads((later.run_dir / "summary.json").read_text())["diagnostics"] == later.summary["diagnostics"]
