# `make run` and `make test` create .venv on first use; later calls reuse it.
VENV ?= .venv
PY := $(VENV)/bin/python
SPACE ?= wrn_widths
PROFILE ?= quick
ARGS ?=

.PHONY: install run test test-fast report clean

install: $(VENV)/.installed

# pip takes torch/torchvision from the capped releases on disk (<=2.14.1 / <=0.29.1).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(PY) -m search.run --space $(SPACE) --profile $(PROFILE) $(ARGS)

report: install
	$(PY) -m analysis.report --space $(SPACE)

# Two workers, one test file each at a time: the end-to-end files mostly wait on Ray and subprocess
# start-up, so two of them overlap well on 2 cores; whole files keep their module fixtures in one worker.
# Everything CI runs: the fast tier plus the end-to-end (slow-marked) tests. `python -m pytest` alone
# runs the fast tier only (pyproject.toml's addopts).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "slow or not slow"

test-fast: install
	$(PY) -m pytest -q -n 2

clean:
	rm -rf results reports mlflow.db mlruns ray_results
