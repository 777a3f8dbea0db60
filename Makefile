# Two commands do all the set-up: `make run` (the default job) and `make test` (the test suite).
# Each creates .venv with the pinned stack when it is missing or when pyproject.toml changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m qwen15_exp $(ARGS)

# The whole suite, as CI runs it (real CPU training, msrun, a Slurm cluster, MLflow, lm-eval): 25-55 min on 2 cores.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# Everything that starts no MindSpore process (compose, validate, plan, estimates, scripts, data), on both
# cores: ~2 min.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) bench/overhead.py

clean-venv:
	rm -rf $(VENV)
