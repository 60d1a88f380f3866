# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SAMPLE ?= ../shared/data/cxr-sample

.PHONY: venv demo test bench serve stop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

demo: $(STAMP)
	XRAY_BACKBONE_WEIGHTS=$${XRAY_BACKBONE_WEIGHTS:-random} $(VENV)/bin/xray demo --sample $(SAMPLE)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/embed_efficiency.py
	$(PY) bench/retrain_vs_tutorial.py

clean:
	rm -rf var .pytest_cache .hypothesis
