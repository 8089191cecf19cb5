# The README's commands. `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
STAMP  := $(VENV)/.densepipe

export MLFLOW_DISABLE_TELEMETRY = true
export DVC_NO_ANALYTICS = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_LOGGING_LEVEL = WARNING

.PHONY: demo test install install-test lint bench ui clean-demo help

help:
	@echo "make demo   - install, then run the whole pipeline on the synthetic dataset (Prefect + MLflow)"
	@echo "make test   - install test requirements, run the test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - speed benchmarks (JSON in benchmarks/results/)"
	@echo "make ui     - MLflow UI on http://127.0.0.1:$(UI_PORT) over the default store (mlflow.db)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP)-runtime: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(STAMP)-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $@ $(STAMP)-runtime

install: $(STAMP)-runtime
install-test: $(STAMP)-test

demo: install
	$(BIN)/densepipe run

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .

bench: install-test
	$(BIN)/python benchmarks/render_speed.py
	$(BIN)/python benchmarks/read_speed.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/panoptic_speed.py

UI_PORT ?= 5000
ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns

clean-demo:
	rm -rf data runs mlruns mlflow.db metrics.json
