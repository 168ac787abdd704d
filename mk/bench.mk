# Benchmarks (scripts/bench.sh): `make bench-smoke` (seconds, debug build, every scenario end
# to end, JSON checked) and `make bench` (release, < 15 min, writes docs/benchmarks.md).
.PHONY: bench bench-smoke bench-tools

BENCH_VENV := .tools/bench-venv

bench-smoke:
	bash scripts/bench.sh smoke

bench: bench-tools
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
