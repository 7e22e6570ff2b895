"""ReSample (SubpopBench's ReSample, group_DRO's --reweight_groups sampler): ERM on group-balanced batches."""
from __future__ import annotations

from tdro.algorithms.base import ALGORITHMS, Algorithm


@ALGORITHMS.register("resample")
class Resample(Algorithm):
    """ERM's mean loss over batches that hold every dataset group equally (batch_size // groups each).

    It sets the sampler, so the ``batching`` key does not apply; it balances dataset groups, not
    (group, class) cells (``groupdro_cells`` is not read).
    """

    batching = "balanced"
