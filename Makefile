# Every target installs what it needs; `make demo` and `make test` are the two set-up commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench-cpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server with apt-get"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1 || true; }
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing prometheus (for the metrics tests) with apt-get"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true; \
	  pkill -x prometheus >/dev/null 2>&1 || true; pkill -f prometheus-node-exporter >/dev/null 2>&1 || true; }
	@command -v docker-compose >/dev/null 2>&1 || { \
	  echo "installing docker-compose (validates docker-compose.yml in the tests) with apt-get"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null || true; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, pinned: a plain `torch` would pull several GB of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[worker,dev,report,torchao,quanto,gguf,bitsandbytes]'
	touch $(STAMP)

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
