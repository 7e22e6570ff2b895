# One entry point: `make run` (main job on the embedded digits default) and `make test`.
# Both create the virtual environment on first use; later calls reuse it (idempotent).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tdro-installed

.PHONY: install test test-fast run report bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name tdro --display-name "tdro (.venv)" >/dev/null
	touch $(STAMP)

test: $(STAMP)
	MPLBACKEND=agg $(PY) -m pytest -q

test-fast: $(STAMP)
	MPLBACKEND=agg $(PY) -m pytest -q -m "not slow"

run: $(STAMP)
	$(PY) -m tdro train

bench: $(STAMP)
	$(PY) bench/step_overhead.py

clean:
	rm -rf outputs
