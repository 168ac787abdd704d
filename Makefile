# Entry point for everything. `make run` and `make test` are the quick start.
SHELL := /bin/bash
CARGO ?= cargo
# One build for everything: the features of the container image (kube, otlp) are on, so
# their tests run too.
FEATURES ?= --features gateway/kube,gateway/otlp
APT_GET := $(if $(filter 0,$(shell id -u)),apt-get,sudo apt-get)

.PHONY: run cluster test lint unit e2e deps deps-system deps-node conformance check-config clean-tools

## One node with the embedded broker; chat demo at http://127.0.0.1:8080/ (chat:* keeps history)
run:
	$(CARGO) run -p gateway -- --allow-anonymous --publish-allow 'chat:*' \
		--channels 'chat:*?history_size=100&history_ttl_secs=600&presence&join_leave' \
		--listen 127.0.0.1:8080 --admin-listen 127.0.0.1:9090

## Everything CI runs: install what is missing, lint, Rust tests, browser and SDK tests.
test: deps lint unit e2e sdk-test bench-smoke k8s-check

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets $(FEATURES) -- -D warnings

unit:
	$(CARGO) test --workspace $(FEATURES)

## Headless Chromium drives the demo page; stompjs and ws clients test STOMP; the Centrifugo
## JavaScript SDK runs against two nodes behind nginx, and over http_stream and sse (and a plain
## EventSource on /sse) against three nodes behind nginx round-robin (needs the debug gateway binary,
## redis-server and nginx).
e2e: deps-node
	$(CARGO) build -p gateway $(FEATURES)
	cd e2e && node --test

## System packages the tests need; installed only when absent.
deps: deps-system deps-node

deps-system:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v node >/dev/null || missing="$$missing nodejs npm"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq $$missing; \
	fi

deps-node: e2e/node_modules/.package-lock.json

e2e/node_modules/.package-lock.json: e2e/package.json e2e/package-lock.json
	cd e2e && npm ci --no-audit --no-fund
	touch $@

## Three nodes + Redis (port 6390) behind nginx on ws://127.0.0.1:8000/ws (STICKY=1: ip_hash).
cluster:
	$(CARGO) build -p gateway
	bash scripts/cluster.sh

## Autobahn fuzzingclient (cases 1-10) against gateway/examples/echo.rs. Not part of `make test`.
conformance:
	bash scripts/conformance.sh

check-config:
	$(CARGO) run -q -p gateway -- --allow-anonymous --check-config

# Kubernetes packaging: k8s-tools, k8s-check, image.
include mk/k8s.mk

# Load generator scenarios and benchmarks: bench-smoke (in make test), bench, scale.
include mk/bench.mk

# The Centrifugo SDKs in Python: sdk-tools, sdk-test (in make test).
include mk/sdk.mk
