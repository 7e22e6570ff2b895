"""Hyperparameter sweeps with Optuna: search spaces as data, pruning, embedded or PostgreSQL storage.

- ``tdro.sweep.space``: ``SearchSpace`` (``params/search/*.yaml``, validated against the Config before
  any trial), ``Dimension``, ``SweepError``.
- ``tdro.sweep.study``: ``run_sweep`` / ``create_sweep`` / ``attach`` (``open_sweep``: either, for the
  notebook) → ``Sweep`` (``optimize``,
  ``trials_table``, ``top_trials``, ``best_config``, ``write_best_config``, ``rerun_best``), storages
  (``open_storage``, ``default_storage``), ``build_sampler``, ``build_pruner``, ``Objective``, the checks made
  before anything is created (``check_study_name``, ``check_sweep_options``) and ``reconcile_records``.
- ``tdro.sweep.plots``: ``plot_history``, ``plot_importances`` (``param_importances``),
  ``plot_intermediate_values``.

```python
from tdro.sweep import run_sweep
sweep = run_sweep("params/search/groupdro.yaml", trials=20)            # outputs/sweeps/groupdro/
sweep.top_trials(5); sweep.write_best_config(); sweep.rerun_best(seeds=[0, 1, 2])
```
The command line is ``python -m tdro sweep -f params/search/groupdro.yaml --trials 20`` (see README).
"""
from tdro.sweep.space import Dimension, SearchSpace, SweepError, load_search_space, search_path
from tdro.sweep.study import (DEFAULT_SWEEPS_DIR, Objective, Sweep, attach, build_pruner, build_sampler,
                              check_study_name, check_sweep_options, create_sweep, default_storage, describe_storage,
                              open_storage, open_sweep, reconcile_records, run_sweep, trial_run_name)

__all__ = [
    "DEFAULT_SWEEPS_DIR", "Dimension", "Objective", "SearchSpace", "Sweep", "SweepError", "attach", "build_pruner",
    "build_sampler", "check_study_name", "check_sweep_options", "create_sweep", "default_storage", "describe_storage",
    "load_search_space", "open_storage", "open_sweep", "reconcile_records", "run_sweep", "search_path", "trial_run_name",
]
