# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE ?= ../shared/data/cxr-sample
# The demo has its own home (var/demo; its Prefect in var/demo-prefect, outside the home that --fresh
# deletes) so it never touches a real catalogue; offline settings, said on screen. The shortcut audit
# blocks by default: arrival 3 (the adult COVID-19 site, found beside SAMPLE) must not be promoted. Its
# runs do not wait for a reviewer (XRAY_REVIEW=off): the demo plays the reviewer itself, with xray promote.
# One linear head (no recipe search: XRAY_HEAD_L2_GRID is one value) keeps it near 2 minutes on 2
# cores. Telemetry off, as for `make serve`.
DEMO_ENV := XRAY_HOME=var/demo PREFECT_HOME=$(CURDIR)/var/demo-prefect \
	PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
	XRAY_BACKBONE_WEIGHTS=$${XRAY_BACKBONE_WEIGHTS:-random} XRAY_INPUT_SIZE=$${XRAY_INPUT_SIZE:-64} \
	XRAY_VIEWS=$${XRAY_VIEWS:-2} XRAY_MIN_TEST_PER_CLASS=$${XRAY_MIN_TEST_PER_CLASS:-4} \
	XRAY_FLOOR_MACRO_AUROC=$${XRAY_FLOOR_MACRO_AUROC:-0.7} XRAY_FLOOR_SENSITIVITY=$${XRAY_FLOOR_SENSITIVITY:-0.6} \
	XRAY_SHORTCUT_POLICY=$${XRAY_SHORTCUT_POLICY:-block} XRAY_REVIEW=$${XRAY_REVIEW:-off} \
	XRAY_HEAD_RECIPE=$${XRAY_HEAD_RECIPE:-linear} \
	XRAY_HEAD_L2_GRID=$${XRAY_HEAD_L2_GRID:-0.1}
# `make serve` settings (override on the command line). prefect.yaml deploys with the same defaults;
# `make deploy` then sets INCOMING, SCHEDULE and TIMEZONE on the deployments (`flows.serve override`).
# An XRAY_INCOMING already in the environment is the default folder.
INCOMING ?= $(or $(XRAY_INCOMING),/data/incoming)
SCHEDULE ?= 0 2 * * *
TIMEZONE ?= Europe/Zurich
SERVE_PORT ?= 4200
SERVE_HOME ?= $(CURDIR)/var/prefect
SERVE_URL := http://127.0.0.1:$(SERVE_PORT)
# Telemetry off: the server's usage heartbeat (every 10 min) and the client SDK's usage events.
SERVE_ENV := PREFECT_HOME='$(SERVE_HOME)' PREFECT_API_URL=$(SERVE_URL)/api \
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(SERVE_PORT) \
	PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 \
	XRAY_INCOMING='$(INCOMING)' XRAY_SCHEDULE='$(SCHEDULE)' XRAY_TIMEZONE='$(TIMEZONE)'

.PHONY: venv demo test test-fast test-postgres lint bench serve deploy stop ui-screenshot clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dask,dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p var
	$(DEMO_ENV) $(VENV)/bin/xray demo --fresh --sample $(SAMPLE)

# The whole suite on three pytest-xdist workers, one file per worker at a time (a module's fixtures are
# built once), each on one OpenMP thread (two workers with two threads each spun against each other on
# two cores: user time 17 min instead of 8). Three on two cores because many files mostly wait on a
# real Prefect server or on subprocesses: the third worker uses the core they leave idle (measured: 502 s
# wall with 3 workers, 609 s with 2, same commit).
# Files go out in collection order (--no-loadscope-reorder; xdist's default sends files with the most
# tests first, so a one-test file that waits came last): tests/conftest.py puts those first.
# `make test PYTEST_WORKERS=0 TEST_THREADS=2` runs it in one process on two threads.
PYTEST_WORKERS ?= 3
TEST_THREADS ?= 1
test: $(STAMP)
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The fast lane: pure unit tests (no backbone run, subprocess, server, fork or Prefect flow run), well under a
# minute. tests/unit/conftest.py enforces it: such a call fails, saying to move the test to tests/integration.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The catalogue, split, registry and concurrency tests again, against a real PostgreSQL server
# (installed from the system's packages when missing, started on 127.0.0.1, removed afterwards).
PG_PORT ?= 54329
PG_LANE := tests/unit/test_db.py tests/unit/test_split.py tests/unit/test_ingest.py tests/unit/test_registry.py \
	tests/unit/test_split_manifests.py tests/unit/test_admission.py tests/unit/test_near_pairs.py tests/unit/test_sequester.py \
	tests/integration/test_retrain_steps.py tests/integration/test_ingest_concurrency.py \
	tests/integration/test_concurrency.py tests/integration/test_rescore.py \
	tests/integration/test_registry_race.py
test-postgres: $(STAMP)
	scripts/postgres.sh start $(PG_PORT)
	XRAY_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$(PG_PORT)/postgres \
		$(PY) -m pytest -q $(PG_LANE); rc=$$?; scripts/postgres.sh stop; exit $$rc

# ruff (the rules in pyproject.toml, lines <= 110) over the whole tree, then mypy on xray_core/ and flows/;
# see docs/testing.md "Lint and types". `$(PY) -m ruff check --fix .` sorts imports and modernises syntax.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/embed_efficiency.py
	$(PY) bench/retrain_vs_tutorial.py

clean:
	rm -rf var .pytest_cache .hypothesis .mypy_cache .ruff_cache

# A local Prefect server on 127.0.0.1:$(SERVE_PORT) (SQLite under $(SERVE_HOME)), the process pool with a
# one-at-a-time retrain queue, every deployment in prefect.yaml, and a worker. `make stop` ends them.
# e.g. make serve INCOMING=/data/incoming SCHEDULE="0 2 * * *" TIMEZONE=Europe/Zurich
serve: $(STAMP)
	@$(SERVE_ENV) $(PY) -m flows.serve check-deploy > /dev/null  # a bad value stops here, before the server
	mkdir -p '$(SERVE_HOME)'
	$(SERVE_ENV) nohup $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(SERVE_PORT) > '$(SERVE_HOME)/server.log' 2>&1 & echo $$! > '$(SERVE_HOME)/server.pid'
	$(SERVE_ENV) $(PY) -m flows.serve wait-for-server
	$(SERVE_ENV) $(VENV)/bin/prefect work-pool create xray-process --type process --overwrite
	$(SERVE_ENV) $(VENV)/bin/prefect work-queue create retrain --pool xray-process --limit 1 || \
		$(SERVE_ENV) $(VENV)/bin/prefect work-queue set-concurrency-limit retrain 1 --pool xray-process
	$(MAKE) --no-print-directory deploy
	$(SERVE_ENV) nohup $(VENV)/bin/prefect worker start --pool xray-process > '$(SERVE_HOME)/worker.log' 2>&1 & echo $$! > '$(SERVE_HOME)/worker.pid'
	@echo "Prefect UI: $(SERVE_URL)  (export PREFECT_API_URL=$(SERVE_URL)/api to use it from this shell)"

# Deploy prefect.yaml again, e.g. with another schedule, to the server `make serve` started (same
# variables): the file as it is (its defaults), then INCOMING, SCHEDULE and TIMEZONE set through the API.
# The check prints what it sets and stops on a bad value before anything is deployed.
deploy: $(STAMP)
	$(SERVE_ENV) $(PY) -m flows.serve check-deploy
	$(SERVE_ENV) $(VENV)/bin/prefect --no-prompt deploy --all
	$(SERVE_ENV) $(PY) -m flows.serve override

stop:
	@for name in worker server; do \
		f='$(SERVE_HOME)'/$$name.pid; test -f "$$f" || continue; pid=$$(cat "$$f"); \
		kill $$pid 2>/dev/null; for i in $$(seq 20); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
		kill -9 $$pid 2>/dev/null; rm -f "$$f"; echo "stopped prefect $$name ($$pid)"; \
	done

# With `make serve` running: headless-Chromium screenshots of the flow-runs page, where each retrain's
# final state (Promoted, Kept, Skipped, ...) shows, of the newest retrain's deployment page and of the newest
# paused run's review form (var/ui/runs.png, deployment.png, review-form.png); see docs/operations.md
# "The Prefect UI path" and "Your first week".
ui-screenshot: $(STAMP)
	$(PY) scripts/ui_screenshot.py --url $(SERVE_URL)/runs --out-dir var/ui
