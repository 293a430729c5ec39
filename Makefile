# ingest_stream — one place for the project's commands. `make help` lists them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: help setup setup-browser dev test unit integration lint typecheck bench fuzz clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

# promtool (checks /metrics, alert rules, dashboards' PromQL) from Debian's prometheus package,
# unpacked into the venv: no root, no service installed or started.
$(VENV)/bin/promtool: | $(STAMP)
	tmp=$$(mktemp -d) && cd $$tmp && \
	  (apt-get download prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get download prometheus)) && \
	  dpkg-deb -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$(VENV)/bin/promtool && \
	  cd / && rm -rf $$tmp

# Debian's chromium for the operator page's browser test (headless; never a downloaded browser).
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -q --no-install-recommends chromium)

setup: $(STAMP)  ## create .venv: the package, embedded servers, test tools

setup-browser: $(CHROMIUM)  ## install Debian's chromium (apt-get) for the page test

dev: setup  ## run the whole pipeline on embedded servers (Ctrl-C stops everything)
	$(VENV)/bin/ingest-stream dev

test: setup $(VENV)/bin/promtool $(CHROMIUM) lint typecheck  ## lint, type-check, then every test (unit + integration on real servers)
	$(PY) -m pytest --durations=15 -rfEs

unit: setup  ## the fast unit tests only
	$(PY) -m pytest tests/unit

integration: setup $(VENV)/bin/promtool $(CHROMIUM)  ## the integration tests only
	$(PY) -m pytest tests/integration

lint: setup  ## ruff
	$(VENV)/bin/ruff check ingest_stream tests bench

typecheck: setup  ## mypy (strict on core/)
	$(VENV)/bin/mypy ingest_stream

BENCH_ARGS ?= --records 100000 --sinks postgres,typesense --two-workers --latency-seconds 30 --soak-seconds 600 --soak-rate 1500 --outage typesense:60

bench: setup  ## throughput, latency, a 10-minute soak, Typesense down 60 s (~40 min): bench/results/*.json
	$(PY) -m bench.run $(BENCH_ARGS)

FUZZ_ARGS ?= --records 10000

fuzz: setup  ## hostile records of every class through a worker on the real servers; all accounted for
	$(PY) -m bench.fuzz $(FUZZ_ARGS)

clean:  ## remove the virtualenv, dev data and caches
	rm -rf $(VENV) .devstack data .mypy_cache .ruff_cache .pytest_cache
