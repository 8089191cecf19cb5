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
export NO_MKDOCS_2_WARNING = 1

.PHONY: demo test test-fast install install-test lint docs docs-gen bench bench-peers bench-gpu ui serve clean-demo help

help:
	@echo "make demo   - install, then run the whole pipeline on the synthetic dataset (Prefect + MLflow)"
	@echo "make test   - install test requirements, run the test suite"
	@echo "make test-fast - the suite without the tests marked slow (real servers, trainings, DVC)"
	@echo "make lint   - ruff"
	@echo "make docs   - the manual into site/ (open site/index.html); docs-gen regenerates its generated pages"
	@echo "make bench  - speed benchmarks (JSON in benchmarks/results/)"
	@echo "make bench-peers - densepipe vs smp and torchvision side by side (CPU, about 45 min)"
	@echo "make bench-gpu   - the all-task model and the peers at 512 px in bf16 on one GPU"
	@echo "make ui     - MLflow UI on http://127.0.0.1:$(UI_PORT) over the default store (mlflow.db)"
	@echo "make serve  - retraining on a schedule (CRON=\"$(CRON)\" or INTERVAL=seconds) against"
	@echo "              PREFECT_API_URL, or a local Prefect server on 127.0.0.1:$(PREFECT_PORT) if unset"

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

# Two test processes (pytest-xdist): CI has 2 cores, and many tests wait on servers and
# subprocesses. TEST_WORKERS=0 runs in this process (pdb, -x); more suit a bigger machine.
TEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The developers' lane: everything but `slow` (tests of 2.5 s or more on 2 cores: real Prefect and
# MLflow servers, DVC, multi-process and end-to-end trainings). CI runs `make test`, all of them.
test-fast: install-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: install-test
	$(BIN)/ruff check .

# The manual (mkdocs.yml). --strict: a broken link, anchor or API reference fails the build;
# tests/test_docs.py builds it the same way and fails while a generated page is stale.
docs: install-test
	$(BIN)/mkdocs build --strict -d site

# Rewrite the generated pages: the configuration reference (from pipeline/config.py) and the
# benchmark tables (from benchmarks/results/*.json). docs/bad-inputs.md: docs/bad_inputs.py (3 min).
docs-gen: install-test
	$(BIN)/python docs/gen_reference.py
	$(BIN)/python docs/gen_benchmarks.py

bench: install-test
	$(BIN)/python benchmarks/render_speed.py
	$(BIN)/python benchmarks/read_speed.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/panoptic_speed.py
	$(BIN)/python docs/gen_benchmarks.py

# Side by side with the peers users would pick instead (smp, torchvision): about 45 min on 2 CPU
# cores; bench-gpu: the all-task model and each peer at 512 px, bf16, on one GPU (under 8 min).
bench-peers: install-test
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python docs/gen_benchmarks.py

bench-gpu: install-test
	$(BIN)/python -m pytest -q -m cuda tests/test_peers_bench.py
	$(BIN)/python benchmarks/gpu_peers.py
	$(BIN)/python docs/gen_benchmarks.py

UI_PORT ?= 5000
ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(UI_PORT) --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns

# Prefect cannot schedule on its temporary server: serve against PREFECT_API_URL, or start
# `prefect server start` on loopback for as long as serving lasts (Ctrl-C stops both).
PREFECT_PORT ?= 4200
CRON ?= 0 3 * * *
INTERVAL ?=
SCHEDULE = $(if $(INTERVAL),--interval $(INTERVAL),--cron "$(CRON)")
serve: install
	@if [ -n "$$PREFECT_API_URL" ]; then \
		$(BIN)/densepipe serve $(SCHEDULE); \
	else \
		$(BIN)/python -m flows.server --port $(PREFECT_PORT) -- $(BIN)/densepipe serve $(SCHEDULE); \
	fi

clean-demo:
	rm -rf data runs mlruns mlflow.db metrics.json
