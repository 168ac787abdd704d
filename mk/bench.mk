# Benchmarks (scripts/bench.sh): `make bench-smoke` (seconds, debug build, every scenario end
# to end, JSON checked) and `make bench` (release, < 15 min, writes docs/benchmarks.md).
.PHONY: bench bench-smoke bench-tools bench-peer bench-strace scale scale-costs

BENCH_VENV := .tools/bench-venv

bench-smoke:
	bash scripts/bench.sh smoke

bench: bench-tools bench-peer bench-strace
	bash scripts/bench.sh full

## matplotlib for the charts, from PyPI into .tools/; charts are skipped if this fails.
bench-tools: $(BENCH_VENV)/.ok

$(BENCH_VENV)/.ok:
	@mkdir -p .tools
	@if python3 -m venv $(BENCH_VENV) && $(BENCH_VENV)/bin/pip install -q matplotlib; then \
		touch $@; \
	else \
		echo "matplotlib could not be installed: charts will be skipped"; \
	fi

## The Socket.IO peer's packages, from npm into bench/peer/node_modules (ignored).
bench-peer: bench/peer/node_modules/.package-lock.json

bench/peer/node_modules/.package-lock.json: bench/peer/package.json bench/peer/package-lock.json
	cd bench/peer && npm ci --no-audit --no-fund
	touch $@

## strace, to count the servers' write system calls in the burst run; skipped if absent.
bench-strace:
	@command -v strace >/dev/null || { $(APT_GET) update -qq && \
		DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq strace; } || \
		echo "strace could not be installed: the burst syscall count will be skipped"

## Five nodes, one private Redis, 100k idle connections (20k per node, or the file limit
## minus 50), held 90 s: RSS, Redis memory, commands and CPU (scripts/scale.sh; about 4
## minutes; writes docs/scale-results/scale.json). Not part of `make test`.
scale:
	bash scripts/scale.sh

## What one fan-out publish, history publish, unicast and connect/subscribe/disconnect cycle
## cost Redis, on two nodes (scripts/scale.sh costs; about 1 minute). Not part of `make test`.
scale-costs:
	bash scripts/scale.sh costs
