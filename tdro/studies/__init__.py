"""Studies: planned runs (phases, experiments, a sweep's re-runs) run once each, here or on a Dask cluster."""
from tdro.studies.runner import (METADATA_FILE, PlannedRun, StudyError, ensure_run, find_run, index_runs,
                                 run_study)

__all__ = ["METADATA_FILE", "PlannedRun", "StudyError", "ensure_run", "find_run", "index_runs", "run_study"]
