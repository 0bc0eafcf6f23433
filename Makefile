# Every target installs what it needs; `make demo` and `make test` are the two set-up commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench-cpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap
	PY=$(PY) VENV=$(VENV) scripts/bootstrap

demo: venv
	$(BIN)/fluxfleet demo

test: venv
	$(BIN)/python -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 0; exit $$rc

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench-cpu: venv
	$(BIN)/python benchmarks/submit_throughput.py
	$(BIN)/python benchmarks/worker_overhead.py

clean:
	rm -rf $(VENV) outputs .cache
