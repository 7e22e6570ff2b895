"""One results object for every study (phases, experiments): per-run numbers of the validation-selected
checkpoints and the tables over them — summary, per-group, paired differences with t intervals, cost,
GroupDRO weights, and the measured impact beside the seed's expected impact.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from tdro.studies.runner import StudyError
from tdro.studies.spec import BASELINE, StudySpec
from tdro.studies.tables import paired_difference

HEADLINE = (("worst_group_acc", "worst-group acc"), ("acc", "acc"), ("macro_f1", "macro-F1"),
            ("worst_group_loss", "worst-group loss"))


def summary_row(run_dir: str | Path) -> dict:
    """A finished run's numbers for study tables (only validation-selected checkpoints are reported)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    if summary.get("test_selection") or summary.get("selection_split") != "val":
        raise StudyError(f"{run_dir} selected its checkpoint on {summary.get('selection_split')!r}; "
                              "study tables only report validation-selected checkpoints")
    test, val = summary["test"], summary["val"]
    row = {f"{m}": test[m] for m, _ in HEADLINE}
    row.update({f"val_{m}": val[m] for m, _ in HEADLINE})
    row.update({f"group_acc.{g}": v for g, v in test["group_acc"].items()})
    row.update({f"val_group_acc.{g}": v for g, v in val["group_acc"].items()})
    row.update(worst_group=test["worst_group"], selected_epoch=summary["selected_epoch"],
               epochs_run=summary["epochs_run"], checkpoint=summary.get("selected_checkpoint", "best.pt"),
               monitor=summary["monitor"], selection_split=summary["selection_split"],
               wall_seconds=summary["wall_seconds"] + sum(s["wall_seconds"] for s in summary.get("stage_runs", {}).values()),
               parameter_count=summary["parameter_count"],
               train_sizes=json.dumps({g: s["train"] for g, s in summary["group_sizes"].items()}),
               peak_memory_mb=_peak_memory(Path(run_dir), "peak_memory_mb"),
               run_memory_mb=_peak_memory(Path(run_dir), "run_memory_mb"))
    row.update({f"diagnostics.{k}": v for k, v in (summary.get("diagnostics") or {}).items()})
    return row


def _peak_memory(run_dir: Path, key: str) -> float:
    """The largest per-epoch memory figure ``key`` a run recorded (NaN without one): ``peak_memory_mb`` is the
    process's peak (RSS on CPU), ``run_memory_mb`` the run's own memory above the process baseline."""
    from tdro.runs import read_jsonl

    values = [r[key] for r in read_jsonl(run_dir / "history.jsonl") if r.get(key) is not None]
    return float(max(values)) if values else math.nan


def _mean_std(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    values = values.astype(float).dropna()
    if not len(values):
        return "—"
    mean = scale * values.mean()
    if len(values) < 2:
        return f"{mean:.{digits}f} (1 run)"
    return f"{mean:.{digits}f} ± {scale * values.std(ddof=1):.{digits}f}"


IMPACT_METRICS = ("worst_group_acc", "acc")


def _pairs(metrics: pd.DataFrame) -> list[tuple]:
    """What pairs two arms' runs: the same seed and fold (no fold: -1)."""
    folds = metrics["fold"].astype(object).where(metrics["fold"].notna(), -1) if "fold" in metrics else [-1] * len(metrics)
    return list(zip(metrics["seed"], folds))


def impact_table(metrics: pd.DataFrame, arms: pd.DataFrame, baseline: str = BASELINE,
                 confidence: float = 0.95) -> pd.DataFrame:
    """The measured impact per arm (index: arm, in the order of ``arms``).

    ``metrics``: one row per run with columns arm, seed (and fold), worst_group_acc, acc (test),
    wall_seconds, peak_memory_mb. ``arms``: one row per arm with arm, label, applicable, reason,
    notes, expected, risk (``PhasePlan.table()``). Per metric: mean and std over runs, the paired
    difference to the baseline (same seed and fold) with its t confidence interval; time and memory
    ratios are ratios of means. Arms that do not apply keep a row with the reason.
    """
    metrics = metrics.assign(pair=_pairs(metrics))
    base = metrics[metrics["arm"] == baseline].set_index("pair")
    rows = []
    for info in arms.to_dict("records"):
        name = info["arm"]
        row = {"arm": name, "label": info.get("label", name), "expected": info.get("expected", ""),
               "risk": info.get("risk", "")}
        if not info.get("applicable", True):
            row.update(status="not applicable", seeds=0, notes=info.get("reason", ""))
            rows.append(row)
            continue
        runs = metrics[metrics["arm"] == name].set_index("pair")
        row.update(status="baseline" if name == baseline else "measured", seeds=len(runs), notes=info.get("notes", ""))
        paired = runs.index.intersection(base.index)
        for metric in IMPACT_METRICS:
            values = runs[metric].astype(float)
            row[metric] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            if name == baseline:
                continue
            diff, low, high = paired_difference(runs.loc[paired, metric], base.loc[paired, metric], confidence)
            row.update({f"{metric}_diff": diff, f"{metric}_ci_low": low, f"{metric}_ci_high": high,
                        "paired_seeds": len(paired)})
        if len(runs) and len(base):
            row["time_ratio"] = runs["wall_seconds"].mean() / base["wall_seconds"].mean()
            own = "run_memory_mb" in runs and runs["run_memory_mb"].notna().all() and base["run_memory_mb"].notna().all()
            memory = "run_memory_mb" if own else "peak_memory_mb"  # the run's own memory where recorded (RSS: torch)
            base_memory = base[memory].mean()  # a tiny run's own memory can round to 0 MB: no ratio then
            row["memory_ratio"] = runs[memory].mean() / base_memory if base_memory > 0 else math.nan
        rows.append(row)
    columns = ["arm", "label", "status", "seeds", "paired_seeds"]
    for metric in IMPACT_METRICS:
        columns += [metric, f"{metric}_std", f"{metric}_diff", f"{metric}_ci_low", f"{metric}_ci_high"]
    columns += ["time_ratio", "memory_ratio", "expected", "risk", "notes"]
    return pd.DataFrame(rows).reindex(columns=columns).set_index("arm")


def _pct(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _pct_mean_std(mean: float, std: float) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "—"
    return f"{_pct(mean)} ± {_pct(std)} %" if not math.isnan(std) else f"{_pct(mean)} % (1 seed)"


def _signed_pp(value: float) -> str:
    return f"{100 * value:+.1f}"


def _difference(diff: float, low: float, high: float) -> str:
    if isinstance(diff, float) and math.isnan(diff):
        return "—"
    if math.isnan(low):
        return f"{_signed_pp(diff)} pp (1 seed: no CI)"
    return f"{_signed_pp(diff)} pp [{_signed_pp(low)}, {_signed_pp(high)}]"


def _ratio(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}×"


def format_impact(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The impact table as display strings: accuracies in %, differences in percentage points (pp)
    with their confidence interval, ratios to the baseline, beside the seed's expected impact."""
    level = f"{confidence:.0%}"
    titles = {"worst_group_acc": "worst-group acc", "acc": "acc"}
    rows = []
    for _, r in table.iterrows():
        row = {"arm": r["label"], "status": r["status"], "seeds": int(r["seeds"])}
        for metric, title in titles.items():
            if r["status"] == "not applicable":
                row[f"{title} (test)"], row[f"Δ {title} [{level} CI]"] = "not applicable", "—"
                continue
            row[f"{title} (test)"] = _pct_mean_std(r[metric], r[f"{metric}_std"])
            row[f"Δ {title} [{level} CI]"] = ("(reference)" if r["status"] == "baseline" else
                                              _difference(r[f"{metric}_diff"], r[f"{metric}_ci_low"], r[f"{metric}_ci_high"]))
        row["time ×"] = _ratio(r["time_ratio"])
        row["peak memory ×"] = _ratio(r["memory_ratio"])
        row["expected impact (seed)"] = r["expected"] or "—"
        row["risk (seed)"] = r["risk"] or "—"
        row["notes"] = r["notes"] if isinstance(r["notes"], str) else ""
        rows.append(row)
    return pd.DataFrame(rows).set_index("arm")


class StudyResult:
    """A study's runs (one row each: labels setting/arm/seed/fold, run_dir, status, config_hash) and its tables."""

    def __init__(self, spec: StudySpec, runs: pd.DataFrame) -> None:
        self.spec = spec
        self.runs = runs
        self._metrics: pd.DataFrame | None = None

    def labels(self) -> dict[str, str]:
        return {a.name: a.label for a in self.spec.arms}

    def metrics(self) -> pd.DataFrame:
        """One row per run: its labels, test headline metrics, per-group test accuracy, the same on val,
        selected epoch and checkpoint, wall seconds (stage runs included), parameter count, peak memory."""
        if self._metrics is None:
            rows = [{**r, **summary_row(r["run_dir"])} for r in self.runs.to_dict("records")]
            self._metrics = pd.DataFrame(rows)
        return self._metrics

    def impact_table(self, setting: str | None = None, arms: pd.DataFrame | None = None,
                     confidence: float = 0.95) -> pd.DataFrame:
        """The measured impact of each arm beside the seed's expected impact (``impact_table``), in one setting."""
        m = self.metrics()
        m = m[m["setting"] == (setting or self.spec.settings[0].name)]
        if arms is None:
            arms = pd.DataFrame([{"arm": a.name, "label": a.label, "applicable": True, "reason": "", "notes": "",
                                  "expected": a.expected, "risk": a.risk} for a in self.spec.arms])
        return impact_table(m, arms, self.spec.reference, confidence)

    def formatted_impact(self, setting: str | None = None, confidence: float = 0.95) -> pd.DataFrame:
        return format_impact(self.impact_table(setting, confidence=confidence), confidence)

    def run_dirs(self, arm: str | None = None) -> list[Path]:
        rows = self.runs if arm is None else self.runs[self.runs["arm"] == arm]
        return [Path(p) for p in rows["run_dir"]]

    def groups(self) -> list[str]:
        return [c.split(".", 1)[1] for c in self.metrics().columns if c.startswith("group_acc.")]

    def _arm_order(self, table: pd.DataFrame) -> list[str]:
        present = set(table["arm"])
        return [a.name for a in self.spec.arms if a.name in present]

    def summary_table(self, setting: str) -> pd.DataFrame:
        """Per arm: headline test metrics (%, loss in nats) as mean ± std over all seed×fold runs."""
        m = self.metrics()
        m = m[m["setting"] == setting]
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm]
            row = {"arm": self.labels()[arm], "runs": len(runs)}
            for metric, title in HEADLINE:
                if metric.endswith("loss"):
                    row[title] = _mean_std(runs[metric], 1.0, 3)
                else:
                    row[f"{title} %"] = _mean_std(runs[metric])
            row["val worst-group acc %"] = _mean_std(runs["val_worst_group_acc"])
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def group_table(self, setting: str) -> pd.DataFrame:
        """Per arm: test accuracy of each group (%) as mean ± std, and how often each group was the worst."""
        m = self.metrics()
        m = m[m["setting"] == setting]
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm]
            row = {"arm": self.labels()[arm]}
            for g in self.groups():
                row[f"{g} %"] = _mean_std(runs[f"group_acc.{g}"])
            counts = runs["worst_group"].value_counts()
            row["worst group (runs)"] = ", ".join(f"{g} {n}" for g, n in counts.items())
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def paired_table(self, setting: str, confidence: float = 0.95) -> pd.DataFrame:
        """Per arm: mean paired difference to the reference arm (same seed and fold) in percentage points
        with its t confidence interval, for worst-group accuracy, accuracy and macro-F1 (and loss)."""
        m = self.metrics()
        m = m[m["setting"] == setting].copy()
        m["pair"] = _pairs(m)
        base = m[m["arm"] == self.spec.reference].set_index("pair")
        level = f"{confidence:.0%}"
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm].set_index("pair")
            row = {"arm": self.labels()[arm]}
            if arm == self.spec.reference:
                row.update({"pairs": len(runs)}, **{f"Δ {t} [{level} CI]": "(reference)" for _, t in HEADLINE})
                rows.append(row)
                continue
            pairs = runs.index.intersection(base.index)
            row["pairs"] = len(pairs)
            for metric, title in HEADLINE:
                diff, low, high = paired_difference(runs.loc[pairs, metric], base.loc[pairs, metric], confidence)
                if metric.endswith("loss"):
                    text = f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"
                else:
                    text = f"{100 * diff:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"
                row[f"Δ {title} [{level} CI]"] = text if not math.isnan(low) else text.split(" [")[0] + " (1 pair: no CI)"
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def paired_numbers(self, setting: str, metric: str = "worst_group_acc", confidence: float = 0.95) -> pd.DataFrame:
        """Numeric paired differences to the reference (index arm): diff, ci_low, ci_high, pairs."""
        m = self.metrics()
        m = m[m["setting"] == setting].copy()
        m["pair"] = _pairs(m)
        base = m[m["arm"] == self.spec.reference].set_index("pair")
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm].set_index("pair")
            pairs = runs.index.intersection(base.index)
            diff, low, high = paired_difference(runs.loc[pairs, metric], base.loc[pairs, metric], confidence)
            rows.append({"arm": arm, "label": self.labels()[arm], "diff": diff, "ci_low": low, "ci_high": high,
                         "pairs": len(pairs)})
        return pd.DataFrame(rows).set_index("arm")

    def diagnostics_table(self, setting: str) -> pd.DataFrame:
        """Per arm, what explains a result: W₂ of the groups' class latents to their anchors and between
        groups (validation, selected epoch), whether GroupDRO's q moved from q₀, selections inside a warm-up."""
        m = self.metrics()
        m = m[m["setting"] == setting]
        rows = []
        for arm in self._arm_order(m):
            runs = m[m["arm"] == arm]
            def column(name: str, runs: pd.DataFrame = runs) -> pd.Series:
                return runs[f"diagnostics.{name}"] if f"diagnostics.{name}" in runs else pd.Series(dtype=float)
            row = {"arm": self.labels()[arm]}
            row["W₂ to anchors (selected)"] = _mean_std(column("alignment_to_anchor_selected"), 1.0, 3)
            row["W₂ between groups (selected)"] = _mean_std(column("alignment_between_groups_selected"), 1.0, 3)
            moved = column("q_moved").dropna()
            row["max |q − q₀|"] = _mean_std(column("q_max_deviation"), 1.0, 3)
            row["q moved (runs)"] = f"{int(moved.astype(bool).sum())}/{len(moved)}" if len(moved) else "—"
            warm = column("selected_in_warmup").dropna()
            row["selected in warm-up (runs)"] = f"{int(warm.astype(bool).sum())}/{len(warm)}" if len(warm) else "—"
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def cost_table(self, setting: str | None = None) -> pd.DataFrame:
        """Per (setting,) arm: parameter count, wall seconds per run (mean, max) and summed, epochs run and
        selected epoch (mean), and the checkpoint the numbers come from."""
        m = self.metrics()
        if setting is not None:
            m = m[m["setting"] == setting]
        rows = []
        for (s, arm), runs in m.groupby(["setting", "arm"], sort=False):
            rows.append({"setting": s, "arm": self.labels()[arm],
                         "parameters": ", ".join(str(v) for v in sorted(set(runs["parameter_count"]))),
                         "wall s/run (mean)": round(float(runs["wall_seconds"].mean()), 2),
                         "wall s/run (max)": round(float(runs["wall_seconds"].max()), 2),
                         "wall s (sum)": round(float(runs["wall_seconds"].sum()), 1),
                         "epochs run (mean)": round(float(runs["epochs_run"].mean()), 1),
                         "selected epoch (mean)": round(float(runs["selected_epoch"].mean()), 1),
                         "checkpoint": ", ".join(sorted(set(runs["checkpoint"]))) + " by " +
                                       ", ".join(sorted(set(runs["monitor"])))})
        return pd.DataFrame(rows).set_index(["setting", "arm"])

    def q_table(self, setting: str | None = None) -> pd.DataFrame:
        """GroupDRO weights at the end of each epoch, long: setting, arm, seed, fold, epoch, group, q."""
        from tdro.runs import load_run

        parts = []
        runs = self.runs if setting is None else self.runs[self.runs["setting"] == setting]
        for r in runs.to_dict("records"):
            history = load_run(r["run_dir"]).history
            q_columns = [c for c in history.columns if c.startswith("q.")]
            if not q_columns:
                continue
            long = history[["epoch", *q_columns]].melt(id_vars="epoch", var_name="group", value_name="q")
            long["group"] = long["group"].str[2:]
            parts.append(long.dropna().assign(setting=r["setting"], arm=r["arm"], seed=r["seed"], fold=r["fold"]))
        if not parts:
            return pd.DataFrame(columns=["setting", "arm", "seed", "fold", "epoch", "group", "q"])
        return pd.concat(parts, ignore_index=True)

    def final_q_table(self, setting: str) -> pd.DataFrame:
        """Per GroupDRO arm: the weight of each group at the selected epoch's end, mean ± std over runs."""
        q = self.q_table(setting)
        if q.empty:
            return pd.DataFrame()
        m = self.metrics()[["setting", "arm", "seed", "fold", "selected_epoch"]]
        q = q.merge(m, on=["setting", "arm", "seed", "fold"])
        q = q[q["epoch"] == q["selected_epoch"]]
        rows = []
        for arm, part in q.groupby("arm", sort=False):
            row = {"arm": self.labels()[arm]}
            for g, values in part.groupby("group", sort=False)["q"]:
                row[f"q {g}"] = f"{values.mean():.3f} ± {values.std(ddof=1):.3f}" if len(values) > 1 else f"{values.mean():.3f}"
            rows.append(row)
        return pd.DataFrame(rows).set_index("arm")

    def plot_q(self, setting: str):
        """GroupDRO weight per group over epochs, mean over seed×fold runs (band: ± one std), one panel per arm."""
        import matplotlib.pyplot as plt

        q = self.q_table(setting)
        arms = [a for a in self._arm_order(q)] if not q.empty else []
        fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(5.2 * max(len(arms), 1), 3.4),
                                 constrained_layout=True, squeeze=False)
        if not arms:
            axes[0, 0].text(0.5, 0.5, "no GroupDRO arm", ha="center", va="center")
            axes[0, 0].set_axis_off()
            return fig
        for ax, arm in zip(axes[0], arms):
            part = q[q["arm"] == arm]
            for group, values in part.groupby("group", sort=False):
                stats = values.groupby("epoch")["q"].agg(["mean", "std"]).fillna(0.0)
                ax.plot(stats.index + 1, stats["mean"], label=group)
                ax.fill_between(stats.index + 1, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.2)
            runs = part.groupby(["seed", "fold"], dropna=False).ngroups
            ax.set(title=f"{self.labels()[arm]} ({runs} runs)", xlabel="epoch", ylabel="q (end of epoch)", ylim=(0, 1))
            ax.legend(fontsize=8)
        fig.suptitle(f"GroupDRO weights over training — {setting}")
        return fig

    def plot_paired(self, setting: str, metric: str = "worst_group_acc"):
        """Paired difference to the reference arm with its 95 % CI, one bar per arm."""
        import matplotlib.pyplot as plt

        table = self.paired_numbers(setting, metric)
        table = table[table.index != self.spec.reference]
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(table)), constrained_layout=True)
        y = np.arange(len(table))
        lows = 100 * (table["diff"] - table["ci_low"]).fillna(0)
        highs = 100 * (table["ci_high"] - table["diff"]).fillna(0)
        ax.errorbar(100 * table["diff"], y, xerr=[lows, highs], fmt="o", capsize=3)
        ax.axvline(0, color="0.5", lw=1)
        ax.set_yticks(y, table["label"])
        ax.invert_yaxis()
        ref = self.labels()[self.spec.reference]
        ax.set(xlabel=f"Δ test {metric.replace('_', ' ')} vs {ref} (pp, 95 % CI)", title=setting)
        return fig

