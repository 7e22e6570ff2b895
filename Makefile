# One entry point: `make run` (notebooks/train.ipynb on the embedded digits default, with its HTML
# report in the run's directory) and `make test`. Both create the virtual environment on first use, install tdro and register
# the Jupyter kernel `tdro`; later calls reuse them (idempotent).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tdro-installed
KERNEL := $(VENV)/share/jupyter/kernels/tdro/kernel.json
PAPERMILL := MPLBACKEND=agg $(PY) -m papermill -k tdro
# reports: executed notebooks -> HTML that reads with no network and no kernel (tdro/reports.py)
REPORT := MPLBACKEND=agg $(PY) -m tdro report
# extra papermill arguments for `make phases`, e.g. PHASE_ARGS="-p smoke True -p seeds 1"
PHASE_ARGS ?=

.PHONY: install test test-fast run report phases bench clean

install: $(STAMP) $(KERNEL)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# the kernel papermill runs the notebooks with (-k tdro): this venv's Python
$(KERNEL): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name tdro --display-name "tdro (.venv)" >/dev/null

test: $(STAMP) $(KERNEL)
	MPLBACKEND=agg $(PY) -m pytest -q

test-fast: $(STAMP)
	MPLBACKEND=agg $(PY) -m pytest -q -m "not slow"

# train.ipynb on the digits default, executed into the new run's own directory: outputs/runs/<run_id>/
# report.ipynb, report.html and figures/*.png|pdf; prints the summary and the report's path
run: $(STAMP) $(KERNEL)
	$(REPORT) --train -p progress False

# the seed's three phases in order, each starting from the previous phase's chosen config
phases: $(STAMP) $(KERNEL)
	mkdir -p outputs
	$(PAPERMILL) notebooks/phase1_quick_wins.ipynb outputs/phase1_quick_wins.ipynb $(PHASE_ARGS)
	$(PAPERMILL) notebooks/phase2_architecture.ipynb outputs/phase2_architecture.ipynb $(PHASE_ARGS) \
		-p start_from outputs/phases/phase1_quick_wins/chosen.yaml
	$(PAPERMILL) notebooks/phase3_finetuning.ipynb outputs/phase3_finetuning.ipynb $(PHASE_ARGS) \
		-p start_from outputs/phases/phase2_architecture/chosen.yaml
	$(MAKE) report

# compare.ipynb over every run under outputs/ (figures in outputs/compare/figures), then it and every executed
# notebook in outputs/ -> offline HTML
# (one run's report: .venv/bin/python -m tdro report outputs/runs/<run_id>)
report: $(STAMP) $(KERNEL)
	test -d outputs || { echo "nothing to report: run make run (or make phases) first"; exit 1; }
	mkdir -p outputs/compare
	$(PAPERMILL) --no-progress-bar notebooks/compare.ipynb outputs/compare/compare.ipynb -p runs_root outputs
	$(REPORT) outputs/compare/compare.ipynb $(wildcard outputs/*.ipynb)

# Result experiments on real data (params/experiments/*.yaml): runs in outputs/experiments (finished
# runs reused, interrupted ones resumed), the executed notebook as offline HTML and a Markdown report in
# reports/. EXPERIMENT_WORKERS local worker processes, or EXPERIMENT_SCHEDULER=tcp://host:8786 for a Dask cluster.
EXPERIMENTS ?= heart mnist_usps
EXPERIMENT_WORKERS ?= 2
EXPERIMENT_SCHEDULER ?=
experiments: $(STAMP) $(KERNEL)
	mkdir -p reports outputs/experiments
	for e in $(EXPERIMENTS); do \
	  run="$(VENV)/bin/papermill notebooks/experiment.ipynb outputs/experiments/$$e.ipynb -k tdro -p experiment $$e -p workers $(EXPERIMENT_WORKERS) $(if $(EXPERIMENT_SCHEDULER),-p scheduler $(EXPERIMENT_SCHEDULER)) -p output_dir outputs/experiments -p report_dir reports"; \
	  html="$(VENV)/bin/python -m tdro report outputs/experiments/$$e.ipynb && cp outputs/experiments/$$e.html reports/$$e.html"; \
	  MPLBACKEND=agg $$run -p command "make experiments EXPERIMENTS=$$e   # = $$run && $$html" || exit 1; \
	  MPLBACKEND=agg sh -c "$$html" || exit 1; \
	done

bench: $(STAMP)
	$(PY) bench/step_overhead.py

clean:
	rm -rf outputs
