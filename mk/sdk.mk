# The stock Centrifugo SDKs against the gateway (docs/sdk.md): the JavaScript SDK runs in
# `make e2e` (e2e/sdk.test.mjs); the Python packages run here, from a venv under .tools/.
.PHONY: sdk-test sdk-tools

SDK_VENV := .tools/sdk-venv
# Pinned: the versions docs/sdk.md was checked against.
SDK_PYTHON_PACKAGES := centrifuge-python==0.7.0 cent==5.2.0

## centrifuge-python (client SDK) and cent (server API client), from PyPI into .tools/.
sdk-tools: $(SDK_VENV)/.ok

$(SDK_VENV)/.ok: mk/sdk.mk
	@mkdir -p .tools
	rm -rf $(SDK_VENV)
	python3 -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install -q $(SDK_PYTHON_PACKAGES)
	touch $@

## centrifuge-python and cent against a two-node cluster (its own redis-server).
sdk-test: sdk-tools
	$(CARGO) build -p gateway $(FEATURES)
	$(SDK_VENV)/bin/python scripts/sdk_test.py
