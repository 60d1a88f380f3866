# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE ?= ../shared/data/cxr-sample
# The demo has its own home so it never touches a real catalogue; offline settings, said on screen.
DEMO_ENV := XRAY_HOME=var/demo PREFECT_HOME=$(CURDIR)/var/demo-prefect \
	XRAY_BACKBONE_WEIGHTS=$${XRAY_BACKBONE_WEIGHTS:-random} XRAY_INPUT_SIZE=$${XRAY_INPUT_SIZE:-64} \
	XRAY_VIEWS=$${XRAY_VIEWS:-2} XRAY_MIN_TEST_PER_CLASS=$${XRAY_MIN_TEST_PER_CLASS:-4} \
	XRAY_FLOOR_MACRO_AUROC=$${XRAY_FLOOR_MACRO_AUROC:-0.7} XRAY_FLOOR_SENSITIVITY=$${XRAY_FLOOR_SENSITIVITY:-0.6}
SERVE_ENV := PREFECT_HOME=$(CURDIR)/var/prefect PREFECT_API_URL=http://127.0.0.1:4200/api \
	PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=4200

.PHONY: venv demo test test-fast test-postgres bench serve stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dask]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p var
	$(DEMO_ENV) $(VENV)/bin/xray demo --fresh --sample $(SAMPLE)

test: $(STAMP)
	$(PY) -m pytest -q

# The fast lane: pure unit tests (no backbone run, no subprocess, no Prefect), well under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The catalogue, split, registry and concurrency tests again, against a real PostgreSQL server
# (installed from the system's packages when missing, started on 127.0.0.1, removed afterwards).
PG_PORT ?= 54329
PG_LANE := tests/unit/test_db.py tests/unit/test_split.py tests/unit/test_ingest.py tests/unit/test_registry.py \
	tests/integration/test_retrain_steps.py tests/integration/test_ingest_concurrency.py \
	tests/integration/test_concurrency.py
test-postgres: $(STAMP)
	scripts/postgres.sh start $(PG_PORT)
	XRAY_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$(PG_PORT)/postgres \
		$(PY) -m pytest -q $(PG_LANE); rc=$$?; scripts/postgres.sh stop; exit $$rc

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/embed_efficiency.py
	$(PY) bench/retrain_vs_tutorial.py

clean:
	rm -rf var .pytest_cache .hypothesis

# A local Prefect server on 127.0.0.1:4200 (SQLite under var/prefect), the process pool with a
# one-at-a-time retrain queue, every deployment in prefect.yaml, and a worker. `make stop` ends them.
serve: $(STAMP)
	mkdir -p var/prefect
	$(SERVE_ENV) nohup $(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 > var/prefect/server.log 2>&1 & echo $$! > var/prefect/server.pid
	$(SERVE_ENV) $(PY) -m flows.serve wait-for-server
	$(SERVE_ENV) $(VENV)/bin/prefect work-pool create xray-process --type process --overwrite
	$(SERVE_ENV) $(VENV)/bin/prefect work-queue create retrain --pool xray-process --limit 1 || \
		$(SERVE_ENV) $(VENV)/bin/prefect work-queue set-concurrency-limit retrain 1 --pool xray-process
	$(SERVE_ENV) XRAY_PROJECT_DIR=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --all
	$(SERVE_ENV) XRAY_PROJECT_DIR=$(CURDIR) nohup $(VENV)/bin/prefect worker start --pool xray-process > var/prefect/worker.log 2>&1 & echo $$! > var/prefect/worker.pid
	@echo "Prefect UI: http://127.0.0.1:4200  (export PREFECT_API_URL=http://127.0.0.1:4200/api to use it from this shell)"

stop:
	@for name in worker server; do \
		f=var/prefect/$$name.pid; test -f $$f || continue; pid=$$(cat $$f); \
		kill $$pid 2>/dev/null; for i in $$(seq 20); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
		kill -9 $$pid 2>/dev/null; rm -f $$f; echo "stopped prefect $$name ($$pid)"; \
	done
