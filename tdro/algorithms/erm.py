"""ERM: the mean per-sample loss (the base class's loss)."""
from __future__ import annotations

from tdro.algorithms.base import ALGORITHMS, Algorithm


@ALGORITHMS.register("erm")
class ERM(Algorithm):
    """Empirical risk minimisation over the group-stratified batch."""
