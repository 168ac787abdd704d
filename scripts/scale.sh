#!/usr/bin/env bash
# Scale run (issue 19): NODES gateway processes sharing one private Redis, PER_NODE idle
# WebSocket connections on each (100k in all by default), held for HOLD_SECS, with what the
# cluster costs while it idles: RSS, Redis memory, keys, commands and CPU, and the nodes' CPU.
#
#   scripts/scale.sh            `make scale` (not part of `make test`); about 4 minutes
#   scripts/scale.sh costs      `make scale-costs`: what one operation costs Redis (CPU and
#                               commands) on two nodes: a fan-out PUBLISH, an FCALL gw_publish
#                               on a history channel, a unicast FCALL gw_send_user, and a
#                               connect/subscribe/disconnect cycle; about 1 minute.
#                               Writes docs/scale-results/redis-costs.json (COSTS_OUT).
#
# KEEP_LOGS=DIR keeps the nodes', clients' and Redis' logs there.
#
# Knobs (environment): NODES (5), PER_NODE (20000, or ulimit -n minus 50 when that is lower), PROCS_PER_NODE (2 client processes per
# node: one holds at most ~19,900 sockets), HOLD_SECS (90), EMPTY_SECS (20: the window with
# no connections, for the heartbeat/janitor cost alone), HEARTBEAT_MS / NODE_TTL_MS (empty:
# the gateway's defaults, 2000 / 10000), OUT (docs/scale-results/scale.json), GATEWAY_ARGS
# (more flags for every node).
#
# Everything runs on loopback: a private redis-server on a free port (never 6379), the nodes
# on free ports, the clients bound to 127.0.0.2... so that no (source, destination) pair runs
# out of ephemeral ports. Stops by itself and cleans up (trap), whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-run}
case "$MODE" in run|costs) ;; *) echo "usage: $0 [run|costs]" >&2; exit 2 ;; esac
COSTS_OUT=${COSTS_OUT:-$ROOT/docs/scale-results/redis-costs.json}
CARGO=${CARGO:-cargo}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export RUST_LOG=${RUST_LOG:-warn}
NODES=${NODES:-5}
# 20,000 per node unless the file limit is lower: a node needs ~15 descriptors of its own
# (listeners, Redis, epoll) plus one per admin scrape, so it gets ulimit -n minus 50.
NOFILE=$(ulimit -n)
PER_NODE=${PER_NODE:-$((NOFILE - 50 < 20000 ? NOFILE - 50 : 20000))}
PROCS_PER_NODE=${PROCS_PER_NODE:-2}
HOLD_SECS=${HOLD_SECS:-90}
EMPTY_SECS=${EMPTY_SECS:-20}
RAMP_STALL_SECS=${RAMP_STALL_SECS:-30}
HEARTBEAT_MS=${HEARTBEAT_MS:-}
NODE_TTL_MS=${NODE_TTL_MS:-}
OUT=${OUT:-$ROOT/docs/scale-results/scale.json}
CLK_TCK=$(getconf CLK_TCK)

WORK=$(mktemp -d)
pids=()        # everything this script started, stopped in reverse order
lt_pids=()     # the load generators (parents; their workers exit when these do)
cleanup() {
  local i p
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  # A node drains on SIGTERM; after 20 s whatever is left is killed.
  for _ in $(seq 40); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP_LOGS:-}" ] && mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$WORK"/*.err "$WORK"/*.txt "$KEEP_LOGS"/ 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

log() { printf '== %s %s\n' "$(date +%T)" "$*"; }
# free_port, wait_port
. scripts/ports.sh
# cpu_ticks PID...: utime+stime of the processes, in clock ticks (0 for a process gone).
cpu_ticks() {
  local t=0 p s
  for p in "$@"; do
    s=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null) || s="0 0"
    t=$((t + ${s% *} + ${s#* }))
  done
  echo "$t"
}
rss_kib() {
  local t=0 p r
  for p in "$@"; do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || r=0
    t=$((t + ${r:-0}))
  done
  echo "$t"
}
fds() { local t=0 p; for p in "$@"; do t=$((t + $(ls "/proc/$p/fd" 2>/dev/null | wc -l))); done; echo "$t"; }
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
rinfo() { rcli INFO "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k {print $2}'; }
# open_total: the nodes' own count of open connections (gateway_connections_open).
open_total() {
  local t=0 a v
  for a in "${admins[@]}"; do
    v=$(curl -s --max-time 2 "http://127.0.0.1:$a/metrics" \
      | awk '$1 == "gateway_connections_open" {print $2}') || v=0
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

# The per-process file limit bounds both sides: a node holds PER_NODE sockets plus ~15 of
# its own, a client process PER_NODE / PROCS_PER_NODE.
per_proc=$(((PER_NODE + PROCS_PER_NODE - 1) / PROCS_PER_NODE))
if [ "$per_proc" -gt 19900 ] || [ "$per_proc" -gt $((NOFILE - 100)) ]; then
  echo "PER_NODE / PROCS_PER_NODE = $per_proc sockets per client process: over the limit" \
    "(ulimit -n $NOFILE); raise PROCS_PER_NODE" >&2
  exit 2
fi
if [ $((PER_NODE + 20)) -gt "$NOFILE" ]; then
  log "note: ulimit -n is $NOFILE, a node needs PER_NODE + ~15 descriptors ($((PER_NODE + 15))):" \
    "expect about $((PER_NODE + 15 - NOFILE)) refused connections per node"
fi
# Source addresses: one per client process, 127.0.0.2 upwards.
nsrc=$((NODES * PROCS_PER_NODE))
[ "$nsrc" -le 250 ] || { echo "too many client processes" >&2; exit 2; }

log "building (release)"
$CARGO build -q --release -p gateway --bin gateway --features "${GATEWAY_FEATURES:-kube,otlp}"
$CARGO build -q --release -p loadtest --bin loadtest
mkdir -p "$WORK/bin"
cp "$CARGO_TARGET_DIR/release/gateway" "$CARGO_TARGET_DIR/release/loadtest" "$WORK/bin/"
GW=$WORK/bin/gateway; LT=$WORK/bin/loadtest

REDIS_PORT=$(free_port)
[ "$REDIS_PORT" != 6379 ] || REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
pids+=("$REDIS_PID")
wait_port "$REDIS_PORT" 400
REDIS=redis://127.0.0.1:$REDIS_PORT
REDIS_VERSION=$(rinfo server redis_version)

if [ "$MODE" = costs ]; then
  SECRET=scale-secret-scale-secret-scale-secret-0123
  SRC=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
  cpids=(); cports=()
  for i in 1 2; do
    port=$(free_port); admin=$(free_port)
    "$GW" --node-id "cost-$i" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
      --redis-url "$REDIS" --allow-anonymous --jwt-secret "$SECRET" --handshake-rate-per-ip 0 \
      --message-rate 0 --max-connections 200000 --max-connections-per-ip 0 --rebalance false \
      --pre-stop-delay-ms 0 \
      --channels 'hist:*?history_size=100&history_ttl_secs=600 pres:*?presence' \
      >"$WORK/cost-$i.log" 2>&1 &
    cpids+=($!); pids+=($!); cports+=("$port")
  done
  for p in "${cports[@]}"; do wait_port "$p" 400; done
  sleep 3
  U1=ws://127.0.0.1:${cports[0]}/ws; U2=ws://127.0.0.1:${cports[1]}/ws
  : >"$WORK/costs.txt"
  # measure NAME OPS_FIELD CMD...: Redis CPU and commands over one loadtest run; OPS_FIELD
  # is the field of the loadtest's JSON that counts the operations.
  measure() {
    local name=$1 field=$2; shift 2
    rcli CONFIG RESETSTAT >/dev/null
    local r0 g0 t0 r1 g1 t1
    r0=$(cpu_ticks "$REDIS_PID"); g0=$(cpu_ticks "${cpids[@]}"); t0=$(date +%s.%N)
    "$@" --json "$WORK/$name.json" >"$WORK/$name.out" 2>&1 || { cat "$WORK/$name.out" >&2; exit 1; }
    r1=$(cpu_ticks "$REDIS_PID"); g1=$(cpu_ticks "${cpids[@]}"); t1=$(date +%s.%N)
    rcli INFO commandstats | tr -d '\r' >"$WORK/$name.cmdstats"
    echo "$name $field $r0 $r1 $g0 $g1 $t0 $t1" >>"$WORK/costs.txt"
    log "$name: $(tail -1 "$WORK/$name.out")"
  }
  log "Redis cost per operation (2 nodes)"
  measure fanout published "$LT" fanout --url "$U1" --url "$U2" -s 1000 --rate 400 \
    --duration-secs 10 --redis-url "$REDIS" --sources "$SRC" --channel costs-fan --label fanout
  measure history published "$LT" fanout --url "$U1" --url "$U2" -s 1000 --rate 400 \
    --duration-secs 10 --redis-url "$REDIS" --sources "$SRC" --channel hist:costs --fcall \
    --label history
  measure unicast delivered "$LT" unicast --url "$U1" --url "$U2" --users 2000 \
    --jwt-secret "$SECRET" --rate 5000 --duration-secs 10 --redis-url "$REDIS" --sources "$SRC" \
    --label unicast
  measure churn cycles "$LT" churn "$U1" --duration-secs 600 --cycles 20000 --concurrency 50 \
    --redis-url "$REDIS" --jwt-secret "$SECRET" --sources "$SRC" --label churn
  # Memory: what a subscription to a presence channel, and a kept publication, hold in Redis.
  # Each measurement starts once the previous one's connections are gone from Redis.
  base_keys=$(rcli DBSIZE)
  keys_back() {
    for _ in $(seq 60); do [ "$(rcli DBSIZE)" -le "$base_keys" ] && return 0; sleep 0.5; done
    echo "Redis keys did not come back to $base_keys" >&2
  }
  "$LT" idle "$U1" -n 10000 --subscribe pres:costs --redis-url "$REDIS" --pid "${cpids[0]}" \
    --sources "$SRC" --label presence-member --json "$WORK/mem-presence.json" >"$WORK/mem-presence.out"
  log "presence members: $(tail -1 "$WORK/mem-presence.out")"
  keys_back
  "$LT" idle "$U1" -n 10000 --subscribe plain:costs --redis-url "$REDIS" --pid "${cpids[0]}" \
    --sources "$SRC" --label plain-member --json "$WORK/mem-plain.json" >"$WORK/mem-plain.out"
  log "plain subscribers: $(tail -1 "$WORK/mem-plain.out")"
  keys_back
  "$LT" history-memory --redis-url "$REDIS" --prefix hist:mem --channels 50 -n 100 \
    --payload-bytes 100 --label history --json "$WORK/mem-history.json" >"$WORK/mem-history.out"
  log "history: $(tail -1 "$WORK/mem-history.out")"
  export WORK COSTS_OUT CLK_TCK REDIS_VERSION
  python3 - <<'EOF2'
import json, os, re
env = os.environ
tck = int(env["CLK_TCK"])
out = {"scenario": "redis-costs", "nodes": 2, "redis_version": env["REDIS_VERSION"]}
for line in open(os.path.join(env["WORK"], "costs.txt")):
    name, field, r0, r1, g0, g1, t0, t1 = line.split()
    j = json.load(open(os.path.join(env["WORK"], name + ".json")))
    ops = j[field]
    cs = {}
    for l in open(os.path.join(env["WORK"], name + ".cmdstats")):
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", l)
        if m and not m.group(1).startswith(("config", "info", "dbsize")):
            cs[m.group(1)] = {"calls": int(m.group(2)), "usec": int(m.group(3))}
    if name == "churn":
        # The loadtest counts cycles after its warm-up; Redis saw the warm-up's too. Each
        # connection is registered with one FCALL, so that is the count of cycles here.
        ops, field = cs["fcall"]["calls"], "connections registered (FCALL), warm-up included"
    calls = sum(v["calls"] for v in cs.values())
    usec = sum(v["usec"] for v in cs.values())
    secs = float(t1) - float(t0)
    out[name] = {
        "ops": ops, "ops_field": field, "secs": round(secs, 2),
        "redis_cpu_us_per_op": round((int(r1) - int(r0)) / tck * 1e6 / ops, 2),
        "redis_command_us_per_op": round(usec / ops, 2),
        "redis_commands_per_op": round(calls / ops, 3),
        "gateways_cpu_us_per_op": round((int(g1) - int(g0)) / tck * 1e6 / ops, 2),
        "commandstats": cs,
        "loadtest": {k: v for k, v in j.items() if not isinstance(v, (list, dict))},
    }
for name in ("presence", "plain", "history"):
    j = json.load(open(os.path.join(env["WORK"], f"mem-{name}.json")))
    out[f"memory_{name}"] = {k: v for k, v in j.items() if not isinstance(v, (list, dict))}
os.makedirs(os.path.dirname(env["COSTS_OUT"]), exist_ok=True)
with open(env["COSTS_OUT"], "w") as f:
    json.dump(out, f, indent=2)
    f.write("\n")
print()
for k, v in out.items():
    if isinstance(v, dict) and "ops" in v:
        print(f"  {k:8} {v['ops']:>8} {v['ops_field']}: Redis CPU {v['redis_cpu_us_per_op']} us/op "
              f"(commands {v['redis_command_us_per_op']} us/op, {v['redis_commands_per_op']} commands/op); "
              f"nodes CPU {v['gateways_cpu_us_per_op']} us/op")
print(f"  wrote {env['COSTS_OUT']}")
EOF2
  exit 0
fi

LIVENESS=()
[ -n "$HEARTBEAT_MS" ] && LIVENESS+=(--node-heartbeat-ms "$HEARTBEAT_MS")
[ -n "$NODE_TTL_MS" ] && LIVENESS+=(--node-ttl-ms "$NODE_TTL_MS")
gw_pids=(); ports=(); admins=()
for i in $(seq 1 "$NODES"); do
  port=$(free_port); admin=$(free_port)
  # shellcheck disable=SC2086
  "$GW" --node-id "scale-$i" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --redis-url "$REDIS" --allow-anonymous --handshake-rate-per-ip 0 --message-rate 0 \
    --max-connections 200000 --max-connections-per-ip 0 --rebalance false \
    --pre-stop-delay-ms 0 "${LIVENESS[@]}" ${GATEWAY_ARGS:-} >"$WORK/gw-$i.log" 2>&1 &
  gw_pids+=($!); pids+=($!); ports+=("$port"); admins+=("$admin")
done
for p in "${ports[@]}" "${admins[@]}"; do wait_port "$p" 400; done
log "redis $REDIS_VERSION on $REDIS_PORT (pid $REDIS_PID); $NODES nodes on ${ports[*]}"

# sample NAME: CPU of the nodes and of Redis, Redis commands, memory and keys, now.
declare -A S
sample() {
  S[$1.t]=$(date +%s.%N)
  S[$1.gw_ticks]=$(cpu_ticks "${gw_pids[@]}")
  S[$1.redis_ticks]=$(cpu_ticks "$REDIS_PID")
  S[$1.cmds]=$(rinfo stats total_commands_processed)
  S[$1.redis_mem]=$(rinfo memory used_memory)
  S[$1.keys]=$(rcli DBSIZE)
  S[$1.rss_kib]=$(rss_kib "${gw_pids[@]}")
  S[$1.redis_rss_kib]=$(rss_kib "$REDIS_PID")
  S[$1.open]=$(open_total)
  S[$1.fds]=$(fds "${gw_pids[@]}")
  # Kernel side, machine-wide (both ends of every loopback connection are here): slab
  # memory and the pages TCP buffers hold.
  S[$1.slab_kib]=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
  S[$1.tcp_mem_pages]=$(awk '$1 == "TCP:" {for (i = 2; i < NF; i++) if ($i == "mem") print $(i+1)}' /proc/net/sockstat)
  S[$1.tcp_inuse]=$(awk '$1 == "TCP:" {print $3}' /proc/net/sockstat)
}
# ops_series SECS FILE: INFO stats instantaneous_ops_per_sec every 5 s for SECS.
ops_series() {
  local end=$(($(date +%s) + $1))
  : >"$2"
  while [ "$(date +%s)" -lt "$end" ]; do
    sleep 5
    echo "$(rinfo stats instantaneous_ops_per_sec)" >>"$2"
  done
}

sleep 3   # the nodes' first heartbeats and janitor passes
log "empty cluster: ${EMPTY_SECS}s with no connections (heartbeat and janitor only)"
rcli CONFIG RESETSTAT >/dev/null
sample e0
sleep "$EMPTY_SECS"
sample e1
rcli INFO commandstats | tr -d '\r' >"$WORK/commandstats-empty.txt"
sample before

log "opening $((NODES * PER_NODE)) connections: $PER_NODE per node, $PROCS_PER_NODE client processes per node"
ramp_start=$(date +%s.%N)
for i in $(seq 1 "$NODES"); do
  srcs=()
  for j in $(seq 1 "$PROCS_PER_NODE"); do srcs+=("127.0.0.$((1 + (i - 1) * PROCS_PER_NODE + j))"); done
  # Held far longer than needed: this script ends the clients once it has measured.
  "$LT" idle "ws://127.0.0.1:${ports[i-1]}/ws" -n "$PER_NODE" --procs "$PROCS_PER_NODE" \
    --sources "$(IFS=,; echo "${srcs[*]}")" --concurrency 100 --hold-secs 86400 \
    --pid "${gw_pids[i-1]}" --label "scale-$i" >"$WORK/lt-$i.out" 2>"$WORK/lt-$i.err" &
  lt_pids+=($!); pids+=($!)
done
TARGET=$((NODES * PER_NODE))
last=-1; last_change=$(date +%s); ramp_log=()
while :; do
  sleep 2
  now=$(open_total)
  ramp_log+=("$(printf '%.0f' "$(echo "$(date +%s.%N) - $ramp_start" | bc)"):$now")
  [ "$now" -ge "$TARGET" ] && break
  if [ "$now" -ne "$last" ]; then last=$now; last_change=$(date +%s); fi
  if [ $(($(date +%s) - last_change)) -ge "$RAMP_STALL_SECS" ]; then
    log "the count stopped at $now of $TARGET for ${RAMP_STALL_SECS}s: measuring what is open"
    break
  fi
done
ramp_secs=$(echo "$(date +%s.%N) - $ramp_start" | bc)
# When the ramp stalled, the time of the last progress is the ramp's end.
log "$(open_total) open after ${ramp_secs}s"
sleep 5   # settle: the last registrations land, allocator settles
sample after
# Where Redis's memory went: the inbound stream (a `connect` entry per connection), the
# per-connection string keys, the per-node hashes.
{
  echo "inbound_xlen=$(rcli XLEN gw:inbound)"
  echo "inbound_bytes=$(rcli MEMORY USAGE gw:inbound SAMPLES 0)"
  t=0; for i in $(seq 1 "$NODES"); do
    t=$((t + $(rcli MEMORY USAGE "gw:nodeconns:{scale-$i}" SAMPLES 0))); done
  echo "nodeconns_bytes=$t"
  # 200 connection keys, sampled
  mapfile -t ck < <(rcli --scan --pattern 'gw:conn:*' | head -200)
  t=0; for k in "${ck[@]}"; do t=$((t + $(rcli MEMORY USAGE "$k"))); done
  echo "conn_key_bytes_avg=$((t / ${#ck[@]}))"
} >"$WORK/breakdown.txt"

log "holding for ${HOLD_SECS}s"
rcli CONFIG RESETSTAT >/dev/null
sample h0
ops_series "$HOLD_SECS" "$WORK/ops.txt" &
ops_pid=$!; pids+=("$ops_pid")
lt_all=("${lt_pids[@]}")
for p in "${lt_pids[@]}"; do
  while read -r c; do lt_all+=("$c"); done < <(ps -o pid= --ppid "$p")
done
lt_t0=$(cpu_ticks "${lt_all[@]}")
sleep "$HOLD_SECS"
lt_t1=$(cpu_ticks "${lt_all[@]}")
sample h1
wait "$ops_pid" 2>/dev/null || true
rcli INFO commandstats | tr -d '\r' >"$WORK/commandstats-hold.txt"
lt_alive=0
for p in "${lt_pids[@]}"; do kill -0 "$p" 2>/dev/null && lt_alive=$((lt_alive + 1)); done
gw_alive=0
for p in "${gw_pids[@]}"; do kill -0 "$p" 2>/dev/null && gw_alive=$((gw_alive + 1)); done

problem_count() {
  local t=0 i
  for i in $(seq 1 "$NODES"); do t=$((t + $(grep -cE 'WARN|ERROR' "$WORK/gw-$i.log" || true))); done
  echo "$t"
}
problems_before_close=$(problem_count)
log "closing the clients (all at once)"
for p in "${lt_pids[@]}"; do kill "$p" 2>/dev/null || true; done
for p in "${lt_pids[@]}"; do wait "$p" 2>/dev/null || true; done
for _ in $(seq 60); do [ "$(open_total)" -eq 0 ] && break; sleep 1; done
sleep 3
sample closed

# Logs: lines above INFO from the nodes, the clients' complaints, Redis warnings.
: >"$WORK/problems.txt"
for i in $(seq 1 "$NODES"); do
  grep -E 'WARN|ERROR' "$WORK/gw-$i.log" | sed "s/^/gw-$i: /" >>"$WORK/problems.txt" || true
  sed "s/^/client-$i: /" "$WORK/lt-$i.err" >>"$WORK/problems.txt" || true
done
grep -E '# WARNING|Error|error' "$WORK/redis.log" | grep -v overcommit | sed 's/^/redis: /' >>"$WORK/problems.txt" || true

mkdir -p "$(dirname "$OUT")"
S_DUMP=$(for k in "${!S[@]}"; do echo "$k=${S[$k]}"; done)
export S_DUMP WORK OUT NODES PER_NODE PROCS_PER_NODE HOLD_SECS EMPTY_SECS HEARTBEAT_MS \
  NODE_TTL_MS CLK_TCK REDIS_VERSION NOFILE ramp_secs lt_t0 lt_t1 lt_alive gw_alive \
  problems_before_close
export RAMP_LOG="${ramp_log[*]}"
python3 - <<'EOF'
import json, os, re, subprocess

env = os.environ
S = {}
for line in env["S_DUMP"].splitlines():
    k, v = line.split("=", 1)
    name, field = k.split(".", 1)
    S.setdefault(name, {})[field] = float(v) if v else 0.0
tck = int(env["CLK_TCK"])
nodes = int(env["NODES"])

def window(a, b):
    secs = S[b]["t"] - S[a]["t"]
    cmds = S[b]["cmds"] - S[a]["cmds"]
    return {
        "secs": round(secs, 2),
        "redis_commands": int(cmds),
        "redis_commands_per_sec": round(cmds / secs, 1),
        "redis_commands_per_node_per_sec": round(cmds / secs / nodes, 2),
        "redis_cpu_secs_per_sec": round((S[b]["redis_ticks"] - S[a]["redis_ticks"]) / tck / secs, 4),
        "gateways_cpu_secs_per_sec": round((S[b]["gw_ticks"] - S[a]["gw_ticks"]) / tck / secs, 4),
        "gateways_cpu_secs_per_sec_per_node": round(
            (S[b]["gw_ticks"] - S[a]["gw_ticks"]) / tck / secs / nodes, 4),
    }

def commandstats(path):
    out = {}
    for line in open(path):
        m = re.match(r"cmdstat_([^:]+):calls=(\d+),usec=(\d+)", line)
        if m:
            out[m.group(1)] = {"calls": int(m.group(2)), "usec": int(m.group(3))}
    return out

empty, hold = window("e0", "e1"), window("h0", "h1")
for w, path in ((empty, "commandstats-empty.txt"), (hold, "commandstats-hold.txt")):
    cs = commandstats(os.path.join(env["WORK"], path))
    # CONFIG RESETSTAT and this script's own INFO/DBSIZE calls are not the cluster's.
    ours = ("config", "info", "dbsize")
    w["commandstats"] = {k: v for k, v in sorted(cs.items())}
    per = {k: round(v["calls"] / w["secs"] / nodes, 3) for k, v in sorted(cs.items())
           if not k.startswith(ours)}
    w["cluster_commands_per_node_per_sec"] = per
    w["cluster_commands_per_node_per_sec_total"] = round(sum(per.values()), 2)
ops = [int(x) for x in open(os.path.join(env["WORK"], "ops.txt")).read().split() if x.strip()]
hold["instantaneous_ops_per_sec_samples"] = ops
hold["client_cpu_secs_per_sec"] = round(
    (int(env["lt_t1"]) - int(env["lt_t0"])) / tck / hold["secs"], 4)

b, a, c = S["before"], S["after"], S["closed"]
opened = int(a["open"])
per = lambda x: round(x / opened, 1) if opened else None
target = nodes * int(env["PER_NODE"])
strip = re.compile(r"\x1b\[[0-9;]*m")
problems = [strip.sub("", l) for l in
            open(os.path.join(env["WORK"], "problems.txt")).read().splitlines()]
breakdown = {}
for line in open(os.path.join(env["WORK"], "breakdown.txt")):
    k, _, v = line.strip().partition("=")
    breakdown[k] = int(v) if v.strip().lstrip("-").isdigit() else v
if opened:
    breakdown["inbound_bytes_per_conn"] = round(breakdown.get("inbound_bytes", 0) / opened, 1)
    breakdown["nodeconns_bytes_per_conn"] = round(breakdown.get("nodeconns_bytes", 0) / opened, 1)
result = {
    "scenario": "scale",
    "nodes": nodes,
    "connections_target": target,
    "connections_open_after_ramp": opened,
    "connections_open_after_hold": int(S["h1"]["open"]),
    "connections_refused_or_failed": target - opened,
    "closed_during_hold": opened - int(S["h1"]["open"]),
    "client_processes": nodes * int(env["PROCS_PER_NODE"]),
    "ulimit_nofile": int(env["NOFILE"]),
    "node_heartbeat_ms": int(env["HEARTBEAT_MS"] or 2000),
    "node_ttl_ms": int(env["NODE_TTL_MS"] or 10000),
    "redis_version": env["REDIS_VERSION"],
    "ramp_secs": round(float(env["ramp_secs"]), 1),
    "ramp_open_by_second": [list(map(int, x.split(":"))) for x in env["RAMP_LOG"].split()],
    "gateways_rss_before_bytes": int(b["rss_kib"]) * 1024,
    "gateways_rss_after_bytes": int(a["rss_kib"]) * 1024,
    "gateways_rss_after_hold_bytes": int(S["h1"]["rss_kib"]) * 1024,
    "gateways_rss_after_close_bytes": int(c["rss_kib"]) * 1024,
    "gateways_rss_per_conn_bytes": per((a["rss_kib"] - b["rss_kib"]) * 1024),
    "gateways_fds_after": int(a["fds"]),
    "kernel_tcp_sockets_before": int(b["tcp_inuse"]),
    "kernel_tcp_sockets_after": int(a["tcp_inuse"]),
    "kernel_slab_before_bytes": int(b["slab_kib"]) * 1024,
    "kernel_slab_after_bytes": int(a["slab_kib"]) * 1024,
    # Per socket: both ends of each connection are sockets on this machine.
    "kernel_slab_per_socket_bytes": round((a["slab_kib"] - b["slab_kib"]) * 1024
                                          / max(a["tcp_inuse"] - b["tcp_inuse"], 1), 1),
    "kernel_tcp_buffer_pages_after": int(a["tcp_mem_pages"]),
    "redis_used_memory_before": int(b["redis_mem"]),
    "redis_used_memory_after": int(a["redis_mem"]),
    "redis_used_memory_after_close": int(c["redis_mem"]),
    "redis_bytes_per_conn": per(a["redis_mem"] - b["redis_mem"]),
    "redis_rss_before_bytes": int(b["redis_rss_kib"]) * 1024,
    "redis_rss_after_bytes": int(a["redis_rss_kib"]) * 1024,
    "redis_keys_before": int(b["keys"]),
    "redis_keys_after": int(a["keys"]),
    "redis_keys_after_close": int(c["keys"]),
    "redis_keys_per_conn": round((a["keys"] - b["keys"]) / opened, 3) if opened else None,
    "empty_window": empty,
    "hold_window": hold,
    "gateways_alive_after_hold": int(env["gw_alive"]),
    "clients_alive_after_hold": int(env["lt_alive"]),
    "redis_breakdown_after": breakdown,
    "node_warnings_before_close": int(env["problems_before_close"]),
    "node_warnings_at_close": {
        "inbound_event_lost": sum("inbound event lost" in l for l in problems),
        "redis_unreachable": sum("Redis is unreachable" in l for l in problems),
        "all": sum(l.startswith("gw-") for l in problems) - int(env["problems_before_close"]),
    },
    "problems": problems[:40],
    "problem_lines": len(problems),
}
os.makedirs(os.path.dirname(env["OUT"]), exist_ok=True)
with open(env["OUT"], "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")

M = 1 << 20
print(f"""
scale: {opened:,} of {target:,} connections open over {nodes} nodes after {result['ramp_secs']} s \
({result['connections_refused_or_failed']:,} short); {result['closed_during_hold']:,} closed during the {hold['secs']:.0f} s hold
  gateways RSS   {b['rss_kib']*1024/M:,.1f} -> {a['rss_kib']*1024/M:,.1f} MiB (all {nodes}) = {result['gateways_rss_per_conn_bytes']} B/connection
  Redis memory   {b['redis_mem']/M:,.1f} -> {a['redis_mem']/M:,.1f} MiB used_memory = {result['redis_bytes_per_conn']} B/connection; \
keys {int(b['keys']):,} -> {int(a['keys']):,} ({result['redis_keys_per_conn']}/connection); after close {c['redis_mem']/M:,.1f} MiB, {int(c['keys'])} keys
  empty cluster  Redis {empty['redis_commands_per_sec']} cmd/s = {empty['cluster_commands_per_node_per_sec_total']} per node/s; \
Redis CPU {empty['redis_cpu_secs_per_sec']} s/s; gateways CPU {empty['gateways_cpu_secs_per_sec']} s/s
  holding {opened:,}  Redis {hold['redis_commands_per_sec']} cmd/s = {hold['cluster_commands_per_node_per_sec_total']} per node/s \
(instantaneous_ops_per_sec {ops}); Redis CPU {hold['redis_cpu_secs_per_sec']} s/s; \
gateways CPU {hold['gateways_cpu_secs_per_sec']} s/s ({hold['gateways_cpu_secs_per_sec_per_node']} per node); clients CPU {hold['client_cpu_secs_per_sec']} s/s
  per node/s     {hold['cluster_commands_per_node_per_sec']}
  kernel         TCP sockets {int(b['tcp_inuse']):,} -> {int(a['tcp_inuse']):,}; slab {b['slab_kib']/1024:,.1f} -> {a['slab_kib']/1024:,.1f} MiB \
= {result['kernel_slab_per_socket_bytes']} B/socket (machine-wide, both ends); TCP buffer pages {int(a['tcp_mem_pages'])}
  Redis split    inbound stream {breakdown.get('inbound_xlen')} entries = {breakdown.get('inbound_bytes_per_conn')} B/connection; \
nodeconns hashes {breakdown.get('nodeconns_bytes_per_conn')} B/connection; a conn key {breakdown.get('conn_key_bytes_avg')} B
  problems       {result['node_warnings_before_close']} node warnings before the close; at the close {result['node_warnings_at_close']}\
{'; first: ' + problems[0] if problems else ''}
  wrote {env['OUT']}""")
EOF
