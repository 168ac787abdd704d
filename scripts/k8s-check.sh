#!/usr/bin/env bash
# Offline checks of the Kubernetes packaging (no cluster needed):
#   1. yamllint on the chart's values files, ci/ values and k8s/
#   2. helm lint --strict with the default values (plus the one value they require,
#      adminToken.existingSecret) and each helm/gateway/ci/*-values.yaml
#   3. helm template for the same sets, and kubectl kustomize for k8s/base and each overlay
#   4. kubernetes-validate --strict of every render against the oldest and newest
#      supported Kubernetes versions; fails unless every resource was reported as validated
#   5. scripts/k8s_assert.py properties on every render; chart behaviour checks (config
#      checksum rolls pods, bad settings refused, no render without an admin token decision,
#      NOTES.txt warnings, the assertions catch an open admin port)
#   6. the helm test script against a local stand-in WebSocket server on 127.0.0.1
# Tools come from scripts/k8s-tools.sh (.tools/, installed when absent).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS="${K8S_VERSIONS:-1.27.0 1.37.0}"
# Custom resources kubernetes-validate has no schema for; k8s_assert.py checks their shape.
CRD_KINDS="ServiceMonitor"

[[ "${K8S_TOOLS_READY:-}" == 1 ]] || bash scripts/k8s-tools.sh
HELM="$PWD/.tools/bin/helm"
KUBECTL="$PWD/.tools/bin/kubectl"
VENV="$PWD/.tools/venv"
PY="$VENV/bin/python"
CHART=helm/gateway
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# Keep helm from reading or writing the user's config and cache.
export HELM_CONFIG_HOME="$OUT/helm/config" HELM_CACHE_HOME="$OUT/helm/cache" HELM_DATA_HOME="$OUT/helm/data"

failures=0
step() { printf '\n== %s\n' "$*"; }
bad() { echo "  FAIL $*"; failures=$((failures + 1)); }
# The chart refuses to render without an admin token decision, so "default" is the default
# values plus a token Secret; the bare defaults are checked to fail under "chart behaviour".
DEFAULT_ARGS=(--set adminToken.existingSecret=gateway-admin)
set_args() { # set_args SET: the helm arguments for a values set, into the array `args`
    if [[ "$1" == default ]]; then args=("${DEFAULT_ARGS[@]}"); else args=(-f "$1"); fi
}

# Count the non-empty YAML documents with a kind, and those of the CRD kinds.
count_resources() {
    "$PY" - "$1" "$CRD_KINDS" <<'EOF'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind")]
crds = set(sys.argv[2].split())
print(len(docs), sum(1 for d in docs if d["kind"] in crds))
EOF
}

# kubernetes-validate exits 0 when it finds no schema for a resource (and, for some
# versions, without validating anything), so check what it says it validated.
validate() {
    local file=$1 versions=${2:-$K8S_VERSIONS} version log total crds passed unknown
    read -r total crds < <(count_resources "$file")
    for version in $versions; do
        log="$OUT/validate.log"
        if ! "$VENV/bin/kubernetes-validate" --strict -k "$version" "$file" >"$log" 2>&1; then
            bad "$(basename "$file"): kubernetes-validate --strict -k $version"
            sed 's/^/       /' "$log"
            continue
        fi
        passed=$(grep -c ' passed for resource ' "$log" || true)
        unknown=$(grep -v -E "Couldn't find schema for kind ($(echo "$CRD_KINDS" | tr ' ' '|')) " "$log" | grep -c -E '^(WARN|ERROR)' || true)
        if [[ "$passed" -ne $((total - crds)) || "$unknown" -ne 0 ]]; then
            bad "$(basename "$file"): k8s $version validated $passed of $((total - crds)) resources"
            sed 's/^/       /' "$log"
            continue
        fi
        echo "  ok   $(basename "$file"): k8s ${version%.0} validated $passed/$total resources$( ((crds)) && echo " ($crds custom resource: no schema)")"
        VALIDATED[$version]=$(( ${VALIDATED[$version]:-0} + passed ))
    done
}
declare -A VALIDATED

step "yamllint"
if "$VENV/bin/yamllint" -s -c scripts/yamllint.yaml "$CHART/values.yaml" "$CHART/Chart.yaml" "$CHART"/ci k8s; then
    echo "  ok   $CHART/values.yaml, $CHART/Chart.yaml, $CHART/ci, k8s/"
else
    bad yamllint
fi

step "helm lint --strict"
sets=(default "$CHART"/ci/*-values.yaml)
for set in "${sets[@]}"; do
    set_args "$set"
    min=$([[ "$set" == default ]] || sed -n 's/^# k8s-check: min-kube-version \([0-9.]*\)$/\1/p' "$set")
    [[ -z "$min" ]] || args+=(--kube-version "$min")
    # In lint mode `fail` is only logged ("[INFO] Fail: ..."), so look for it too.
    if "$HELM" lint --strict "$CHART" "${args[@]}" >"$OUT/lint.log" 2>&1 && ! grep -q 'Fail:' "$OUT/lint.log"; then
        echo "  ok   $(basename "$set")$([[ "$set" == default ]] && echo " (${DEFAULT_ARGS[*]})")"
    else
        bad "helm lint $(basename "$set")"
        sed 's/^/       /' "$OUT/lint.log"
    fi
done

step "helm template + kubernetes-validate + assertions"
for set in "${sets[@]}"; do
    name=$(basename "$set" .yaml)
    set_args "$set"
    render="$OUT/helm-$name.yaml"
    # A values file may need a newer cluster ("# k8s-check: min-kube-version X.Y.Z"): it is
    # rendered for and validated against that version and the newest one.
    versions=$K8S_VERSIONS
    min=$([[ "$set" == default ]] || sed -n 's/^# k8s-check: min-kube-version \([0-9.]*\)$/\1/p' "$set")
    if [[ -n "$min" ]]; then
        versions="$min ${K8S_VERSIONS##* }"
        args+=(--kube-version "$min")
    fi
    if ! "$HELM" template gw "$CHART" --namespace realtime "${args[@]}" >"$render" 2>"$OUT/err.log"; then
        bad "helm template $name"
        sed 's/^/       /' "$OUT/err.log"
        continue
    fi
    validate "$render" "$versions"
    assert_args=()
    case "$name" in
        default | full-features | hpa-custom-metrics | jwks) assert_args+=(--rbac) ;;
    esac
    [[ "$name" == hpa-custom-metrics ]] && assert_args+=(--connections-metric)
    [[ "$name" == default || "$name" == minimal-values ]] && assert_args+=(--default-admin-peers)
    "$PY" scripts/k8s_assert.py "${assert_args[@]}" "$render" || bad "assertions $name"
done

step "kubectl kustomize + kubernetes-validate + assertions"
for dir in k8s/base k8s/overlays/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    render="$OUT/kustomize-$name.yaml"
    if ! "$KUBECTL" kustomize "$dir" >"$render" 2>"$OUT/err.log"; then
        bad "kubectl kustomize $dir"
        sed 's/^/       /' "$OUT/err.log"
        continue
    fi
    validate "$render"
    "$PY" scripts/k8s_assert.py --rbac --default-admin-peers "$render" || bad "assertions $dir"
done

step "chart behaviour"
# Without an admin token Secret, and without the explicit opt-out, nothing renders, and the
# message says what to set.
guidance=("adminToken.existingSecret" "adminToken.disabled=true")
if "$HELM" template gw "$CHART" >/dev/null 2>"$OUT/err.log"; then
    bad "helm template with the default values rendered without an admin token"
else
    missing=()
    for g in "${guidance[@]}"; do grep -qF -- "$g" "$OUT/err.log" || missing+=("$g"); done
    if [[ ${#missing[@]} -eq 0 ]]; then
        echo "  ok   refused: no admin token; the error names ${guidance[*]}"
    else
        bad "helm template without an admin token: the error does not name ${missing[*]}"
        sed 's/^/       /' "$OUT/err.log"
    fi
fi
"$HELM" lint --strict "$CHART" >"$OUT/lint.log" 2>&1 || true
if grep -q 'Fail: adminToken:' "$OUT/lint.log" && grep -qF 'adminToken.disabled=true' "$OUT/lint.log"; then
    echo "  ok   helm lint with the default values reports the missing admin token"
else
    bad "helm lint with the default values does not report the missing admin token"
    sed 's/^/       /' "$OUT/lint.log"
fi
checksum() { "$HELM" template gw "$CHART" "${DEFAULT_ARGS[@]}" "$@" --show-only templates/deployment.yaml | grep 'checksum/config:'; }
if [[ "$(checksum)" != "$(checksum --set config.max_connections=5)" && "$(checksum)" == "$(checksum --set replicaCount=3)" ]]; then
    echo "  ok   a config change (and only that) changes the checksum/config pod annotation"
else
    bad "checksum/config does not follow the ConfigMap"
fi
refuse() { # refuse "why" helm-args...: the chart must refuse to render
    local why=$1
    shift
    if "$HELM" template gw "$CHART" "${DEFAULT_ARGS[@]}" "$@" >/dev/null 2>&1; then bad "rendered although $why"; else echo "  ok   refused: $why"; fi
}
refuse "grace period shorter than preStop + drain + shutdown grace" --set terminationGracePeriodSeconds=30
refuse "unknown config key (deny_unknown_fields)" --set config.max_conections=1
refuse "secret in config" --set config.jwt_secret=0123456789abcdef0123456789abcdef
refuse "no client authentication" --set auth.allowAnonymous=false
refuse "tls without a Secret" --set tls.enabled=true
refuse "listen set in config" --set config.listen=0.0.0.0:1
refuse "native preStop sleep on Kubernetes 1.29" --set lifecycle.preStopMode=sleep --kube-version 1.29.0
refuse "both adminToken.existingSecret and adminToken.disabled=true" --set adminToken.disabled=true
refuse "networkPolicy.adminFrom as a list (the old format)" --set-json 'networkPolicy.adminFrom=[{"podSelector":{}}]'
if "$HELM" template gw "$CHART" "${DEFAULT_ARGS[@]}" --show-only templates/configmap.yaml --set config.max_connections=250000 \
    | grep -q '^    max_connections = 250000$'; then
    echo "  ok   integers render as TOML integers"
else
    bad "max_connections does not render as an integer"
fi

# The assertions must catch an admin port open to the cluster.
assert_rejects() { # assert_rejects "why" helm-args...: k8s_assert.py must fail on that render
    local why=$1
    shift
    if ! "$HELM" template gw "$CHART" --namespace realtime "${DEFAULT_ARGS[@]}" "$@" >"$OUT/open.yaml" 2>"$OUT/err.log"; then
        bad "helm template ($why)"
        sed 's/^/       /' "$OUT/err.log"
    elif "$PY" scripts/k8s_assert.py "$OUT/open.yaml" >"$OUT/assert.log" 2>&1; then
        bad "k8s_assert.py accepted a render with $why"
    else
        echo "  ok   k8s_assert.py catches $why: $(grep -m1 -o 'NetworkPolicy[^:]*: .*\|no NetworkPolicy.*' "$OUT/assert.log" | cut -c1-90)"
    fi
}
assert_rejects "networkPolicy.enabled=false" --set networkPolicy.enabled=false
assert_rejects "an admin port peer matching every namespace" --set-json 'networkPolicy.adminFrom.extra=[{"namespaceSelector":{}}]'
assert_rejects "an admin port peer 0.0.0.0/0" --set-json 'networkPolicy.adminFrom.extra=[{"ipBlock":{"cidr":"0.0.0.0/0"}}]'
# With every admin peer removed, no rule may mention the admin port (a rule without `from`
# would admit everyone).
if "$HELM" template gw "$CHART" "${DEFAULT_ARGS[@]}" --show-only templates/networkpolicy.yaml \
    --set networkPolicy.adminFrom.podLabels=null --set networkPolicy.adminFrom.monitoring.namespaceLabels=null \
    | "$PY" -c 'import sys, yaml; np = yaml.safe_load(sys.stdin); rules = np["spec"]["ingress"]; sys.exit(not (len(rules) == 1 and [p["port"] for p in rules[0]["ports"]] == ["ws"]))'; then
    echo "  ok   no admin peers configured: no rule admits the admin port"
else
    bad "with networkPolicy.adminFrom empty the NetworkPolicy still has an admin port rule"
fi

# NOTES.txt: `helm template` never renders it and `helm install --dry-run` needs a cluster,
# so a copy of the chart renders it into a ConfigMap.
NOTES_CHART="$OUT/notes-chart"
cp -r "$CHART" "$NOTES_CHART"
cp "$CHART/templates/NOTES.txt" "$NOTES_CHART/files/notes-check.txt"
printf '%s\n' 'apiVersion: v1' 'kind: ConfigMap' 'metadata:' '  name: notes-check' 'data:' '  NOTES.txt: |' \
    '    {{- tpl (.Files.Get "files/notes-check.txt") . | nindent 4 }}' >"$NOTES_CHART/templates/zz-notes-check.yaml"
notes() { # notes helm-args...: the rendered NOTES.txt
    "$HELM" template gw "$NOTES_CHART" --show-only templates/zz-notes-check.yaml "$@" \
        | "$PY" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["NOTES.txt"])'
}
notes_check() { # notes_check "what" want|absent "text" helm-args...
    local what=$1 mode=$2 text=$3
    shift 3
    if ! notes "$@" >"$OUT/notes.txt" 2>"$OUT/err.log"; then
        bad "NOTES.txt ($what) does not render"
        sed 's/^/       /' "$OUT/err.log"
    else
        local found=absent
        grep -qF -- "$text" "$OUT/notes.txt" && found=want
        if [[ $found == "$mode" ]]; then
            echo "  ok   NOTES.txt $what"
        else
            bad "NOTES.txt $what: expected $mode: $text"
            sed 's/^/       /' "$OUT/notes.txt"
        fi
    fi
}
notes_check "warns when adminToken.disabled=true" want "WARNING: adminToken.disabled=true" --set adminToken.disabled=true
notes_check "no token warning with a token Secret" absent "WARNING: adminToken" "${DEFAULT_ARGS[@]}"
notes_check "lists the admin port peers" want "labelled gateway-admin=true" "${DEFAULT_ARGS[@]}"
notes_check "warns when the NetworkPolicy is off" want "WARNING: networkPolicy.enabled=false" "${DEFAULT_ARGS[@]}" --set networkPolicy.enabled=false

step "helm test script against a local WebSocket stand-in"
if "$PY" scripts/k8s_ws_test_selftest.py "$CHART/files/ws-smoke-test.py"; then :; else bad "helm test script self-test"; fi

step "summary"
for version in $(printf '%s\n' $K8S_VERSIONS "${!VALIDATED[@]}" | sort -u -V); do
    echo "  kubernetes ${version%.0}: ${VALIDATED[$version]:-0} resources validated (--strict)"
done
if [[ $failures -ne 0 ]]; then
    echo "k8s-check: $failures check(s) failed"
    exit 1
fi
echo "k8s-check: all checks passed"
