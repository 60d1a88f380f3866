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

.PHONY: venv demo test bench serve stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p var
	$(DEMO_ENV) $(VENV)/bin/xray demo --fresh --sample $(SAMPLE)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/embed_efficiency.py
	$(PY) bench/retrain_vs_tutorial.py

clean:
	rm -rf var .pytest_cache .hypothesis
