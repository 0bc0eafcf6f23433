# Every target installs what it needs; `make demo` and `make test` are the two set-up commands.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench-cpu clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@# Debian packages the demo and tests use for real (redis-server, prometheus/promtool, docker-compose)
	@# and python3-venv, which Debian ships apart from python3.
	@missing=""; \
	for tool in redis-server:redis-server prometheus:prometheus promtool:prometheus docker-compose:docker-compose; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool##*:}"; \
	done; \
	$(PY) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  sudo=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing with apt-get:$$missing"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  $$sudo systemctl disable --now redis-server prometheus prometheus-node-exporter >/dev/null 2>&1 || true; \
	  $$sudo service redis-server stop >/dev/null 2>&1 || true; \
	  $$sudo pkill -x prometheus >/dev/null 2>&1 || true; $$sudo pkill -f prometheus-node-exporter >/dev/null 2>&1 || true; \
	fi
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
