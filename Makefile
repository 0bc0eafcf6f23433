# Every target installs what it needs; `make demo` and `make test` are the two set-up commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench-cpu clean

# Always run: the script looks for the system packages each time (a fraction of a second) and
# reinstalls the virtualenv only when pyproject.toml is newer than its stamp.
venv:
	@PY=$(PY) VENV=$(VENV) scripts/bootstrap

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
