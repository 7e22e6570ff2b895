"""Statistics and table formatting shared by every study's results (phases, experiments, collect)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def paired_difference(arm: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
                      ) -> tuple[float, float, float]:
    """Mean of arm − baseline over paired seeds and its t confidence interval (NaN bounds below 2 pairs)."""
    from scipy import stats

    d = np.asarray(arm, dtype=float) - np.asarray(baseline, dtype=float)
    if len(d) == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if len(d) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, mean - half, mean + half


def markdown_table(table: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    if index:
        table = table.reset_index()

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "—" if math.isnan(value) else f"{value:g}"
        return str(value).replace("|", "\\|").replace("\n", " ")
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)
