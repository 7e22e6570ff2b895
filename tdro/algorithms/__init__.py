"""Training algorithms, registered by name: ``ALGORITHMS.get(config.algorithm)`` builds the objective.

Adding one is one module here plus its import below (see docs/ARCHITECTURE.md, "Adding an algorithm").
"""
from __future__ import annotations

from tdro.algorithms.base import ALGORITHMS, Algorithm, BatchLosses, Grouper
from tdro.algorithms import erm, groupdro  # noqa: F401  (registration)
from tdro.algorithms import chi2_dro, cvar_dro, resample, reweight  # noqa: F401
from tdro.algorithms import coral, latent_l2, mmd  # noqa: F401
from tdro.algorithms import dfr, jtt  # noqa: F401
from tdro.algorithms import regret_dro  # noqa: F401

__all__ = ["ALGORITHMS", "Algorithm", "BatchLosses", "Grouper", "algorithm_key_blocks", "algorithm_key_owners"]


def algorithm_key_blocks() -> list[type]:
    """Every registered algorithm's ``Keys`` dataclass (each once), for Config's fields."""
    blocks: list[type] = []
    for name in ALGORITHMS.names():
        block = ALGORITHMS.get(name).Keys
        if block is not None and block not in blocks:
            blocks.append(block)
    return blocks


def algorithm_key_owners() -> dict[str, list[str]]:
    """{algorithm key: the algorithms that read it}."""
    owners: dict[str, list[str]] = {}
    for name in ALGORITHMS.names():
        for key_name in ALGORITHMS.get(name).key_names():
            owners.setdefault(key_name, []).append(name)
    return owners
