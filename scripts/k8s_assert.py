#!/usr/bin/env python3
"""Property checks on rendered Kubernetes manifests (helm template / kubectl kustomize output).

Usage: k8s_assert.py [--connections-metric] [--rbac] [--default-admin-peers] RENDERED.yaml

Needs PyYAML (installed with kubernetes-validate in .tools/venv). Prints one line per
failed property and exits 1 when any failed. The gateway's settings file keys are checked
against the settings table (`macro_rules! settings`) in gateway/src/config/mod.rs, which
generates `struct Config`, so the ConfigMap cannot carry a key the gateway would refuse
(deny_unknown_fields).
"""
import argparse
import os
import re
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY_NAME = "gateway"
# Settings the gateway reads from env only (coming features); their ConfigMap keys do
# not exist yet, so they must not appear in the TOML file.
ENV_ONLY = {"redis_url", "redis_password", "redis_prefix", "drain_window_ms", "pre_stop_delay_ms"}
MIN_MARGIN_MS = 5000
# Marks a Deployment whose admin API runs without a token on purpose (the chart's
# adminToken.disabled=true, the dev overlay).
ADMIN_TOKEN_DISABLED = ("gateway.example.io/admin-token", "disabled")
# The peers the chart and the kustomize base admit to the admin port by default.
DEFAULT_ADMIN_POD_LABEL = ("gateway-admin", "true")
DEFAULT_MONITORING_NS = ("kubernetes.io/metadata.name", "monitoring")

errors = []


def fail(msg):
    errors.append(msg)


CONFIG_RS = "gateway/src/config/mod.rs"


def config_fields():
    """Field names and Rust types of `Config`, read from the settings table in CONFIG_RS.

    Entries are `name: Type = default;`, `name: Option<Type>;` or `name: switch;` (a bool).
    """
    src = open(os.path.join(ROOT, CONFIG_RS), encoding="utf-8").read()
    body = src.split("macro_rules! settings {", 1)[1].split("\nmacro_rules! ", 1)[0]
    entries = re.findall(r"^\s*(\w+): (switch|Option<[^;]*>|[^=;]*?) *[=;]", body, re.M)
    return {name: "bool" if ty == "switch" else ty for name, ty in entries}


def is_gateway(obj):
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/name") == GATEWAY_NAME


def pod_spec(obj):
    kind = obj["kind"]
    if kind == "Pod":
        return obj["spec"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def env_map(container):
    return {e["name"]: e for e in container.get("env") or []}


def check_security(name, spec):
    psc = spec.get("securityContext") or {}
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        csc = c.get("securityContext") or {}
        where = "%s/%s" % (name, c["name"])
        non_root = csc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            fail("%s: runAsNonRoot is not true" % where)
        if csc.get("readOnlyRootFilesystem") is not True:
            fail("%s: readOnlyRootFilesystem is not true" % where)
        if csc.get("allowPrivilegeEscalation") is not False:
            fail("%s: allowPrivilegeEscalation is not false" % where)
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            fail("%s: capabilities do not drop ALL" % where)
        if (csc.get("capabilities") or {}).get("add"):
            fail("%s: capabilities are added" % where)
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            fail("%s: seccompProfile is %r, want RuntimeDefault" % (where, seccomp))
        if csc.get("privileged"):
            fail("%s: privileged" % where)
        res = c.get("resources") or {}
        if not (res.get("requests") or {}).get("memory") or not (res.get("limits") or {}).get("memory"):
            fail("%s: memory request and limit must be set" % where)
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        fail("%s: uses host namespaces" % name)


def port_number(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    fail("container %s: no port named %r" % (container["name"], port))
    return None


def listen_port(container, var):
    e = env_map(container).get(var)
    if not e or "value" not in e:
        fail("%s: env %s is not set" % (container["name"], var))
        return None
    return int(e["value"].rsplit(":", 1)[1])


def toml_of(configmaps, spec):
    """The gateway.toml the pod mounts, parsed."""
    for v in spec.get("volumes") or []:
        cm = (v.get("configMap") or {}).get("name")
        if cm and cm in configmaps:
            data = configmaps[cm].get("data") or {}
            if "gateway.toml" in data:
                return cm, data["gateway.toml"]
    return None, None


def check_config_file(cm_name, text, fields):
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail("ConfigMap %s: gateway.toml is not valid TOML: %s" % (cm_name, e))
        return {}
    for key, value in cfg.items():
        if key in ENV_ONLY:
            fail("ConfigMap %s: %s is env-only for now (GATEWAY_%s)" % (cm_name, key, key.upper()))
        elif key not in fields:
            fail("ConfigMap %s: unknown setting %r (not a setting in %s)" % (cm_name, key, CONFIG_RS))
            continue
        rust = fields[key]
        if rust in ("usize", "u64", "u32") and (isinstance(value, bool) or not isinstance(value, int)):
            fail("ConfigMap %s: %s = %r must be an integer (%s)" % (cm_name, key, value, rust))
        if rust == "bool" and not isinstance(value, bool):
            fail("ConfigMap %s: %s must be a boolean" % (cm_name, key))
        if rust.startswith("Vec<") and not isinstance(value, list):
            fail("ConfigMap %s: %s must be a list" % (cm_name, key))
    for key in ("listen", "admin_listen", "node_id"):
        if key in cfg:
            fail("ConfigMap %s: %s must come from the Deployment's env" % (cm_name, key))
    return cfg


def prestop_seconds(container):
    pre = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    if "exec" in pre:
        cmd = pre["exec"]["command"]
        if len(cmd) == 2 and cmd[0].endswith("/sleep"):
            return int(cmd[1])
        fail("%s: preStop exec is not a plain sleep: %r" % (container["name"], cmd))
        return 0
    return 0


def selector_is_empty(sel):
    return not (sel.get("matchLabels") or sel.get("matchExpressions"))


def selector_requires(sel, key, value):
    """True when the LabelSelector `sel` only matches objects with label key=value."""
    if (sel.get("matchLabels") or {}).get(key) == value:
        return True
    return any(e.get("key") == key and e.get("operator") == "In" and e.get("values") == [value]
               for e in sel.get("matchExpressions") or [])


def peer_problem(peer):
    """Why this NetworkPolicyPeer admits too much, or None."""
    if "ipBlock" in peer:
        cidr = peer["ipBlock"].get("cidr", "")
        if cidr.endswith("/0"):
            return "ipBlock %s admits every address" % cidr
        return None
    ns, pods = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns is None and pods is None:
        return "empty peer"
    if ns is not None and selector_is_empty(ns) and (pods is None or selector_is_empty(pods)):
        return "admits every pod of every namespace"
    if ns is None and selector_is_empty(pods):
        return "admits every pod of the namespace"
    return None


def rule_ports(rule, c):
    """Container port numbers a NetworkPolicy ingress rule covers; None = every port."""
    if not rule.get("ports"):
        return None
    return {port_number(c, p["port"]) for p in rule["ports"] if "port" in p}


def check_network_policy(name, pod_labels, c, docs, opts):
    """A NetworkPolicy selects the gateway pods; the admin port admits only restricted peers
    (never everyone); the WebSocket port stays reachable."""
    def selects(sel):
        ml = sel.get("matchLabels") or {}
        return not sel.get("matchExpressions") and all(pod_labels.get(k) == v for k, v in ml.items())

    policies = [d for d in docs if d["kind"] == "NetworkPolicy" and selects(d["spec"].get("podSelector") or {})]
    if not policies:
        fail("%s: no NetworkPolicy selects its pods (the admin port would be open to the cluster)" % name)
        return
    admin, ws = port_number(c, "admin"), port_number(c, "ws")
    ws_reachable = False
    for np in policies:
        where = "NetworkPolicy/%s" % np["metadata"]["name"]
        spec = np["spec"]
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            fail("%s: does not restrict ingress" % where)
            continue
        admin_peers = []
        for rule in spec.get("ingress") or []:
            ports = rule_ports(rule, c)
            if ports is None or ws in ports:
                ws_reachable = True
            if ports is not None and admin not in ports:
                continue
            peers = rule.get("from")
            if not peers:
                fail("%s: a rule admits everyone to the admin port" % where)
                continue
            for peer in peers:
                why = peer_problem(peer)
                if why:
                    fail("%s: admin port peer %r %s" % (where, peer, why))
            admin_peers += peers
        if not any("namespaceSelector" in p for p in admin_peers):
            fail("%s: no namespace (Prometheus) may reach the admin port: /metrics would not be scrapeable" % where)
        if opts.default_admin_peers:
            key, value = DEFAULT_ADMIN_POD_LABEL
            if not any("namespaceSelector" not in p and selector_requires(p.get("podSelector") or {}, key, value)
                       for p in admin_peers):
                fail("%s: pods labelled %s=%s may not reach the admin port" % (where, key, value))
            key, value = DEFAULT_MONITORING_NS
            if not any(selector_requires(p.get("namespaceSelector") or {}, key, value) for p in admin_peers):
                fail("%s: the namespace %s=%s may not reach the admin port" % (where, key, value))
            if len(admin_peers) != 2:
                fail("%s: admin port peers %r, want only the labelled pods and the monitoring namespace"
                     % (where, admin_peers))
    if not ws_reachable:
        fail("%s: no NetworkPolicy rule admits the WebSocket port" % name)


def check_admin_token(name, dep, env):
    """GATEWAY_ADMIN_TOKEN comes from a Secret, unless the Deployment says it is off on purpose."""
    e = env.get("GATEWAY_ADMIN_TOKEN")
    ref = ((e or {}).get("valueFrom") or {}).get("secretKeyRef")
    key, value = ADMIN_TOKEN_DISABLED
    disabled = ((dep["metadata"].get("annotations") or {}).get(key) == value)
    if ref and disabled:
        fail("%s: has an admin token and the %s: %s annotation" % (name, key, value))
    elif ref:
        if ref.get("optional"):
            fail("%s: the admin token Secret is optional (the pod would start without it)" % name)
    elif not disabled:
        fail("%s: GATEWAY_ADMIN_TOKEN does not come from a Secret, and the Deployment is not annotated %s: %s"
             % (name, key, value))


def check_gateway_deployment(dep, docs, configmaps, fields, opts):
    name = "Deployment/" + dep["metadata"]["name"]
    tpl = dep["spec"]["template"]
    spec = tpl["spec"]
    containers = [c for c in spec["containers"] if c["name"] == "gateway"]
    if len(containers) != 1:
        fail("%s: expected one container named gateway" % name)
        return
    c = containers[0]
    psc = spec.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    if uid != 10001:
        fail("%s: runAsUser is %r, want 10001" % (name, uid))

    admin = listen_port(c, "GATEWAY_ADMIN_LISTEN")
    ws = listen_port(c, "GATEWAY_LISTEN")
    if admin is not None and port_number(c, "admin") != admin:
        fail("%s: container port 'admin' does not match GATEWAY_ADMIN_LISTEN" % name)
    if ws is not None and port_number(c, "ws") != ws:
        fail("%s: container port 'ws' does not match GATEWAY_LISTEN" % name)
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        p = c.get(probe)
        if not p or "httpGet" not in p:
            fail("%s: %s missing or not httpGet" % (name, probe))
            continue
        if port_number(c, p["httpGet"]["port"]) != admin:
            fail("%s: %s does not target the admin port" % (name, probe))
        if p["httpGet"].get("path") != path:
            fail("%s: %s path is %r, want %s" % (name, probe, p["httpGet"].get("path"), path))

    env = env_map(c)
    for var, field in (("GATEWAY_POD_NAME", "metadata.name"), ("GATEWAY_POD_NAMESPACE", "metadata.namespace"),
                       ("GATEWAY_NODE_ID", "metadata.name")):
        got = ((env.get(var) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
        if got != field:
            fail("%s: env %s should come from the Downward API %s" % (name, var, field))
    for var, e in env.items():
        if "value" in e and any(s in var for s in ("SECRET", "PASSWORD", "TOKEN")):
            fail("%s: %s is a literal value; reference a Secret" % (name, var))

    check_admin_token(name, dep, env)

    cm_name, text = toml_of(configmaps, spec)
    if text is None:
        fail("%s: mounts no ConfigMap with gateway.toml" % name)
        cfg = {}
    else:
        cfg = check_config_file(cm_name, text, fields)
        if not (tpl.get("metadata", {}).get("annotations") or {}).get("checksum/config") and \
                not re.search(r"-[a-z0-9]{10}$", cm_name):
            fail("%s: a config change would not roll the pods (no checksum/config annotation, no hashed ConfigMap name)" % name)
    if env.get("GATEWAY_CONFIG", {}).get("value", "").rsplit("/", 1)[-1] != "gateway.toml":
        fail("%s: GATEWAY_CONFIG does not point at gateway.toml" % name)

    # Termination budget: preStop sleep + in-process delay + drain window + close grace + margin.
    grace_s = spec.get("terminationGracePeriodSeconds", 30)
    pre_ms = prestop_seconds(c) * 1000
    delay_ms = int((env.get("GATEWAY_PRE_STOP_DELAY_MS") or {}).get("value", "0"))
    drain_ms = int((env.get("GATEWAY_DRAIN_WINDOW_MS") or {}).get("value", "0"))
    close_ms = int(cfg.get("shutdown_grace_ms", 5000))
    if "GATEWAY_DRAIN_WINDOW_MS" not in env:
        fail("%s: GATEWAY_DRAIN_WINDOW_MS is not set" % name)
    if pre_ms == 0 and delay_ms == 0:
        fail("%s: no preStop sleep and no GATEWAY_PRE_STOP_DELAY_MS" % name)
    if pre_ms and delay_ms:
        fail("%s: both a preStop sleep and GATEWAY_PRE_STOP_DELAY_MS wait; the delay would apply twice" % name)
    need = pre_ms + delay_ms + drain_ms + close_ms + MIN_MARGIN_MS
    if need > grace_s * 1000:
        fail("%s: preStop %d ms + delay %d ms + drain %d ms + shutdown_grace %d ms + margin %d ms = %d ms > terminationGracePeriodSeconds %d s"
             % (name, pre_ms, delay_ms, drain_ms, close_ms, MIN_MARGIN_MS, need, grace_s))

    strategy = dep["spec"].get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate" or \
            str((strategy.get("rollingUpdate") or {}).get("maxUnavailable", "25%")) not in ("0", "0%"):
        fail("%s: rolling update should keep maxUnavailable 0" % name)
    keys = {t.get("topologyKey") for t in spec.get("topologySpreadConstraints") or []}
    for k in ("topology.kubernetes.io/zone", "kubernetes.io/hostname"):
        if k not in keys:
            fail("%s: no topologySpreadConstraint on %s" % (name, k))
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    for m in mounts.values():
        if m.get("subPath"):
            fail("%s: subPath mount %s would not see Secret/ConfigMap updates" % (name, m["mountPath"]))

    selector = dep["spec"]["selector"]["matchLabels"]
    pod_labels = tpl["metadata"]["labels"]
    if any(pod_labels.get(k) != v for k, v in selector.items()):
        fail("%s: selector does not match the pod labels" % name)

    def selects(sel):
        return bool(sel) and all(pod_labels.get(k) == v for k, v in sel.items())

    check_network_policy(name, pod_labels, c, docs, opts)

    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and selects((d["spec"].get("selector") or {}).get("matchLabels"))]
    if not pdbs:
        fail("%s: no PodDisruptionBudget selects its pods" % name)

    services = [d for d in docs if d["kind"] == "Service" and selects(d["spec"].get("selector"))]
    admin_svcs, public_svcs = [], []
    for svc in services:
        targets = [port_number(c, p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]]
        (admin_svcs if admin in targets else public_svcs).append(svc)
        if admin in targets and len(targets) > 1:
            fail("Service/%s: mixes the admin port with other ports" % svc["metadata"]["name"])
    if not public_svcs:
        fail("%s: no public Service for the WebSocket port" % name)
    for svc in public_svcs:
        if any(p["port"] == admin or p.get("name") == "admin" for p in svc["spec"]["ports"]):
            fail("Service/%s: public Service exposes the admin port" % svc["metadata"]["name"])
    if not admin_svcs:
        fail("%s: no internal Service for the admin port" % name)
    for svc in admin_svcs:
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            fail("Service/%s: the admin Service must be ClusterIP" % svc["metadata"]["name"])

    admin_names = {s["metadata"]["name"] for s in admin_svcs}
    for ing in (d for d in docs if d["kind"] == "Ingress"):
        for rule in ing["spec"].get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                if p["backend"]["service"]["name"] in admin_names:
                    fail("Ingress/%s routes to the admin Service" % ing["metadata"]["name"])
        ann = ing["metadata"].get("annotations") or {}
        if ing["spec"].get("ingressClassName") == "nginx":
            for a in ("proxy-read-timeout", "proxy-send-timeout"):
                v = ann.get("nginx.ingress.kubernetes.io/" + a)
                if v is None or int(v) < 3600:
                    fail("Ingress/%s: nginx %s should be >= 3600 for long-lived WebSockets" % (ing["metadata"]["name"], a))

    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        eps = sm["spec"]["endpoints"]
        if not eps or any(e.get("port") != "admin" or e.get("path", "/metrics") != "/metrics" for e in eps):
            fail("ServiceMonitor/%s: must scrape /metrics on the admin port" % sm["metadata"]["name"])

    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
            and d["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
    for hpa in hpas:
        if hpa["apiVersion"] != "autoscaling/v2":
            fail("HPA/%s: use autoscaling/v2" % hpa["metadata"]["name"])
        if "replicas" in dep["spec"]:
            fail("%s: sets replicas although an HPA scales it" % name)
    if opts.connections_metric:
        names = [m["pods"]["metric"]["name"] for h in hpas for m in h["spec"]["metrics"] if m["type"] == "Pods"]
        if "gateway_connections_open" not in names:
            fail("%s: no HPA Pods metric gateway_connections_open" % name)

    if opts.rbac:
        sa = spec.get("serviceAccountName")
        bindings = [b for b in docs if b["kind"] == "RoleBinding"
                    and any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in b["subjects"])]
        if not bindings:
            fail("%s: no RoleBinding for ServiceAccount %r" % (name, sa))
        if not any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs):
            fail("%s: ServiceAccount %r is not rendered" % (name, sa))
        if spec.get("automountServiceAccountToken") is False:
            fail("%s: the kube feature needs the ServiceAccount token" % name)
        for b in bindings:
            role = next((d for d in docs if d["kind"] == b["roleRef"]["kind"] and d["metadata"]["name"] == b["roleRef"]["name"]), None)
            if role is None:
                fail("RoleBinding/%s: role not rendered" % b["metadata"]["name"])
                continue
            got = sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"]))) for r in role["rules"])
            want = sorted([(("",), ("pods",), ("get", "watch")),
                           (("coordination.k8s.io",), ("leases",), tuple(sorted(["get", "create", "update"])))])
            if got != want:
                fail("Role/%s: rules %r, want exactly %r" % (role["metadata"]["name"], got, want))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--connections-metric", action="store_true", help="require the gateway_connections_open HPA metric")
    ap.add_argument("--rbac", action="store_true", help="require the ServiceAccount, Role and RoleBinding")
    ap.add_argument("--default-admin-peers", action="store_true",
                    help="require exactly the default admin port peers (gateway-admin=true pods, monitoring namespace)")
    opts = ap.parse_args()

    with open(opts.file, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    fields = config_fields()
    if len(fields) < 20:
        fail("could not read the Config fields from %s" % CONFIG_RS)

    for d in docs:
        if d["kind"] in ("Secret", "SealedSecret"):
            fail("%s/%s is rendered: secrets must be referenced, never created" % (d["kind"], d["metadata"]["name"]))
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            fail("%s/%s: cluster-wide RBAC is not needed" % (d["kind"], d["metadata"]["name"]))
        spec = pod_spec(d)
        if spec is not None:
            check_security("%s/%s" % (d["kind"], d["metadata"]["name"]), spec)

    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    gateways = [d for d in docs if d["kind"] == "Deployment" and is_gateway(d)]
    if len(gateways) != 1:
        fail("expected one gateway Deployment, found %d" % len(gateways))
    for dep in gateways:
        check_gateway_deployment(dep, docs, configmaps, fields, opts)

    kinds = sorted({d["kind"] for d in docs})
    if errors:
        for e in errors:
            print("  FAIL %s: %s" % (opts.file, e))
        return 1
    print("  ok   %s: %d resources (%s)" % (os.path.basename(opts.file), len(docs), ", ".join(kinds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
