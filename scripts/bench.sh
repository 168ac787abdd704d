#!/usr/bin/env bash
# Benchmark suite: the gateway against the floor (loadtest/examples/floor.rs).
#
#   scripts/bench.sh smoke   a few seconds, debug build, tiny sizes: every scenario end to end,
#                            JSON outputs checked (well-formed, non-zero). `make bench-smoke`.
#   scripts/bench.sh full    release build, moderate sizes (< 15 min); writes
#                            docs/bench-results/*.json and docs/benchmarks.md. `make bench`.
#
# Everything runs on loopback: a private Redis on a free port (never 6379), gateway nodes and
# the floor on free ports, load from 127.0.0.x source addresses. Stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-smoke}
CARGO=${CARGO:-cargo}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export RUST_LOG=${RUST_LOG:-warn}
PY=python3
[ -x .tools/bench-venv/bin/python ] && PY=.tools/bench-venv/bin/python

case "$MODE" in
  smoke)
    PROFILE=debug; BUILD_FLAGS=()
    IDLE_N=60; IDLE_TLS_N=30; IDLE_PROCS_N=60
    FAN_S=20; FAN_RATES="50"; FAN_SECS=2
    BURST=8; BURST_RATES="80"
    STORM_N=200; STORM_TLS_N=60
    UNI_USERS=20; UNI_RATE=500; UNI_SECS=2
    CHURN_SECS=3; CHURN_CYCLES=0
    HIST_RATES="50"; RECOVER_N=50; STOMP_RATES="50"; CENT_RATES="50"; TRANS_RATES="50"; RTT_N=50
    PRES_N=20; PRES_CALLS=50; PRES_FAN_N=10; PRES_CYCLES=5; PRES_CHURN_CYCLES=200
    OUT=$(mktemp -d)/results ;;
  full)
    PROFILE=release; BUILD_FLAGS=(--release)
    IDLE_N=${IDLE_N:-15000}; IDLE_TLS_N=${IDLE_TLS_N:-5000}; IDLE_PROCS_N=$IDLE_N
    FAN_S=${FAN_S:-1000}; FAN_RATES=${FAN_RATES:-"50 100 200 400 800"}; FAN_SECS=${FAN_SECS:-5}
    BURST=${BURST:-8}; BURST_RATES=${BURST_RATES:-"100 400"}
    STORM_N=${STORM_N:-5000}; STORM_TLS_N=${STORM_TLS_N:-2000}
    UNI_USERS=${UNI_USERS:-2000}; UNI_RATE=${UNI_RATE:-52000}; UNI_SECS=${UNI_SECS:-5}
    CHURN_SECS=${CHURN_SECS:-120}; CHURN_CYCLES=${CHURN_CYCLES:-100000}
    HIST_RATES=${HIST_RATES:-"100 400"}; RECOVER_N=${RECOVER_N:-5000}
    STOMP_RATES=${STOMP_RATES:-"100 400"}; CENT_RATES=${CENT_RATES:-"100 400"}
    TRANS_RATES=${TRANS_RATES:-"100 400"}; RTT_N=${RTT_N:-2000}
    PRES_N=${PRES_N:-10000}; PRES_CALLS=${PRES_CALLS:-2000}; PRES_FAN_N=${PRES_FAN_N:-1000}
    PRES_CYCLES=${PRES_CYCLES:-200}; PRES_CHURN_CYCLES=${PRES_CHURN_CYCLES:-20000}
    OUT=$ROOT/docs/bench-results ;;
  *) echo "usage: $0 smoke|full" >&2; exit 2 ;;
esac

WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

log() { printf '\n== %s\n' "$*"; }
# free_port, wait_port
. scripts/ports.sh

log "building ($PROFILE)"
# The container image's features, so that `make test` reuses its one build.
$CARGO build -q "${BUILD_FLAGS[@]}" -p gateway --bin gateway --features "${GATEWAY_FEATURES:-kube,otlp}"
$CARGO build -q "${BUILD_FLAGS[@]}" -p loadtest --bin loadtest --example floor
# Private copies: the target directory may be shared with other builds.
mkdir -p "$WORK/bin"
cp "$CARGO_TARGET_DIR/$PROFILE/gateway" "$CARGO_TARGET_DIR/$PROFILE/loadtest" \
   "$CARGO_TARGET_DIR/$PROFILE/examples/floor" "$WORK/bin/"
GW=$WORK/bin/gateway; LT=$WORK/bin/loadtest; FLOOR=$WORK/bin/floor
rm -rf "$OUT"; mkdir -p "$OUT"

# Keys: TLS certificate for 127.0.0.1, an RSA key pair for RS256 tokens, an HS256 secret.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/jwt.key" 2>/dev/null
openssl pkey -in "$WORK/jwt.key" -pubout -out "$WORK/jwt.pub" 2>/dev/null
SECRET=bench-secret-bench-secret-bench-secret-0123
HS_TOKEN=$("$LT" token --hs256-secret "$SECRET" --sub bench-hs)
RS_TOKEN=$("$LT" token --rs256-key "$WORK/jwt.key" --sub bench-rs)

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
pids+=("$REDIS_PID")
wait_port "$REDIS_PORT"
REDIS=redis://127.0.0.1:$REDIS_PORT

# start_gateway NAME [extra flags...]: sets GW_PID, GW_PORT and GW_ADMIN.
start_gateway() {
  local name=$1; shift
  GW_PORT=$(free_port); GW_ADMIN=$(free_port); local admin=$GW_ADMIN
  "$GW" --node-id "$name" --listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$admin" \
    --redis-url "$REDIS" --allow-anonymous --jwt-secret "$SECRET" \
    --jwt-public-key "$WORK/jwt.pub" --jwt-allow-any-audience --handshake-rate-per-ip 0 \
    --message-rate 0 --emulation-rate-per-ip 0 --max-connections 200000 \
    --max-connections-per-ip 0 --rebalance false \
    --pre-stop-delay-ms 0 "$@" >>"$WORK/$name.log" 2>&1 &
  GW_PID=$!
  pids+=("$GW_PID")
  wait_port "$GW_PORT"
}
# start_floor [--tls-cert C --tls-key K]: sets FL_PID and FL_PORT.
start_floor() {
  FL_PORT=$(free_port)
  "$FLOOR" "127.0.0.1:$FL_PORT" "$REDIS" "$@" >>"$WORK/floor.log" 2>&1 &
  FL_PID=$!
  pids+=("$FL_PID")
  wait_port "$FL_PORT"
}
stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
TLS=(--tls-cert "$WORK/tls.crt" --tls-key "$WORK/tls.key")
SRC=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5

log "idle"
start_gateway gw-idle
"$LT" idle "ws://127.0.0.1:$GW_PORT/ws" -n "$IDLE_N" --pid "$GW_PID" --sources "$SRC" \
  --redis-url "$REDIS" --label gateway --json "$OUT/idle-gateway.json"
stop "$GW_PID"
# The same with each connection subscribed to one channel with history and presence: what a
# subscription adds, in the node and in Redis (the presence entries).
start_gateway gw-idle-sub --channels 'idlehp:*?history_size=100&history_ttl_secs=600&presence'
"$LT" idle "ws://127.0.0.1:$GW_PORT/ws" -n "$IDLE_N" --pid "$GW_PID" --sources "$SRC" \
  --subscribe idlehp:all --redis-url "$REDIS" --label gateway-subscribed \
  --json "$OUT/idle-gateway-subscribed.json"
stop "$GW_PID"
start_floor
"$LT" idle "ws://127.0.0.1:$FL_PORT/ws" -n "$IDLE_N" --pid "$FL_PID" --sources "$SRC" \
  --label floor --json "$OUT/idle-floor.json"
stop "$FL_PID"
start_gateway gw-idle-tls "${TLS[@]}"
"$LT" idle "wss://127.0.0.1:$GW_PORT/ws" -n "$IDLE_TLS_N" --pid "$GW_PID" --sources "$SRC" \
  --label gateway-tls --json "$OUT/idle-gateway-tls.json"
stop "$GW_PID"
# The TLS floor: the same floor behind tokio-rustls, same certificate and TLS settings.
start_floor "${TLS[@]}"
"$LT" idle "wss://127.0.0.1:$FL_PORT/ws" -n "$IDLE_TLS_N" --pid "$FL_PID" --sources "$SRC" \
  --label floor-tls --json "$OUT/idle-floor-tls.json"
stop "$FL_PID"
start_gateway gw-idle-procs
"$LT" idle "ws://127.0.0.1:$GW_PORT/ws" -n "$IDLE_PROCS_N" --procs 2 --pid "$GW_PID" \
  --sources "$SRC" --label gateway-2procs --json "$OUT/idle-gateway-2procs.json"
stop "$GW_PID"

log "fanout"
# One gateway node and the floor at the same rates (CPU per delivery), then two nodes.
start_gateway gw-fan-1
start_floor
for r in $FAN_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "bench-g$r" --label gateway --json "$OUT/fanout-gateway-r$r.json"
  "$LT" fanout --url "ws://127.0.0.1:$FL_PORT/ws" -s "$FAN_S" --rate "$r" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$FL_PID" --sources "$SRC" \
    --channel "bench-f$r" --label floor --json "$OUT/fanout-floor-r$r.json"
done
# STOMP beside v1 on the same node, same rates: CPU per delivery over each protocol.
for r in $STOMP_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/stomp" -s "$FAN_S" --rate "$r" --proto stomp \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "bench-st$r" --label stomp --json "$OUT/stomp-r$r.json"
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "bench-v1$r" --label v1 --json "$OUT/stomp-v1-r$r.json"
done
# Centrifugo's client protocol (the stock SDKs' /connection/websocket) beside v1 likewise.
for r in $CENT_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/connection/websocket" -s "$FAN_S" --rate "$r" \
    --proto centrifugo --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" \
    --sources "$SRC" --channel "bench-ce$r" --label centrifugo --json "$OUT/centrifugo-r$r.json"
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "bench-cv1$r" --label v1 --json "$OUT/centrifugo-v1-r$r.json"
done
# Bursts: BURST messages published back to back (one Redis pipeline) per tick, so that
# several frames queue per socket. The gateway writes a socket's queue with one writev; the
# floor writes each frame with its own send.
for r in $BURST_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" --burst "$BURST" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "bench-gb$r" --label gateway-burst --json "$OUT/burst-gateway-r$r.json"
  "$LT" fanout --url "ws://127.0.0.1:$FL_PORT/ws" -s "$FAN_S" --rate "$r" --burst "$BURST" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$FL_PID" --sources "$SRC" \
    --channel "bench-fb$r" --label floor-burst --json "$OUT/burst-floor-r$r.json"
done
# Where the saving comes from: count each server's write-type system calls under strace in a
# separate, smaller run (strace slows every call, so this run's CPU figures are not used).
if [ "$MODE" = full ] && command -v strace >/dev/null; then
  for who in gateway floor; do
    if [ "$who" = gateway ]; then P=$GW_PID; PORT=$GW_PORT; else P=$FL_PID; PORT=$FL_PORT; fi
    strace -c -f -e trace=write,writev,sendto,sendmsg -p "$P" -o "$OUT/syscalls-$who.txt" &
    ST=$!
    sleep 1
    "$LT" fanout --url "ws://127.0.0.1:$PORT/ws" -s 200 --rate 400 --burst "$BURST" \
      --duration-secs 2 --redis-url "$REDIS" --pid "$P" --sources "$SRC" \
      --channel "bench-sc-$who" --label "$who-strace" --json "$OUT/syscalls-$who.json"
    kill -INT "$ST"; wait "$ST" || true
  done
fi
stop "$GW_PID" "$FL_PID"
start_gateway gw-fan-a; A_PID=$GW_PID; A_PORT=$GW_PORT
start_gateway gw-fan-b; B_PID=$GW_PID; B_PORT=$GW_PORT
for r in $FAN_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$A_PORT/ws" --url "ws://127.0.0.1:$B_PORT/ws" \
    -s "$FAN_S" --rate "$r" --duration-secs "$FAN_SECS" --redis-url "$REDIS" \
    --pid "$A_PID" --pid "$B_PID" --sources "$SRC" --channel "bench-2n$r" \
    --label gateway-2nodes --json "$OUT/fanout-2nodes-r$r.json"
done
# Half the peak: the best delivered rate of the ramp, halved, as a message rate.
HALF=$("$PY" scripts/bench_report.py half-peak "$OUT" "$FAN_S")
"$LT" fanout --url "ws://127.0.0.1:$A_PORT/ws" --url "ws://127.0.0.1:$B_PORT/ws" \
  -s "$FAN_S" --rate "$HALF" --duration-secs "$FAN_SECS" --redis-url "$REDIS" \
  --pid "$A_PID" --pid "$B_PID" --sources "$SRC" --channel bench-half \
  --label gateway-2nodes-half-peak --json "$OUT/fanout-2nodes-half.json"

log "history"
# The same fan-out with history off (PUBLISH on a plain channel) and on (FCALL gw_publish on a
# history channel): node CPU per delivery, and publish-to-receipt latency of each. Then a
# recovery storm: RECOVER_N clients of one history channel come back at once and recover 100.
start_gateway gw-hist --channels 'hist:*?history_size=100&history_ttl_secs=600'
for r in $HIST_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "plain-h$r" --label history-off --json "$OUT/history-off-r$r.json"
  "$LT" fanout --url "ws://127.0.0.1:$GW_PORT/ws" -s "$FAN_S" --rate "$r" --fcall \
    --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$GW_PID" --sources "$SRC" \
    --channel "hist:h$r" --label history-on --json "$OUT/history-on-r$r.json"
done
# What a full history (history_size publications of 100 bytes) holds in Redis, per publication.
"$LT" history-memory --redis-url "$REDIS" --prefix hist:mem --channels 50 -n 100 \
  --payload-bytes 100 --label gateway --json "$OUT/history-memory.json"
"$LT" recovery-storm --url "ws://127.0.0.1:$GW_PORT/ws" --admin "http://127.0.0.1:$GW_ADMIN" \
  -n "$RECOVER_N" --missed 100 --channel hist:storm --redis-url "$REDIS" --concurrency 200 \
  --pid "$GW_PID" --sources "$SRC" --label gateway --json "$OUT/recovery-storm.json"
stop "$GW_PID"

log "presence"
# presence_stats on a big channel over two nodes (latency, Redis commands per call), join/leave
# fan-out in a smaller one, and the CPU of subscribe/unsubscribe churn with presence on and off.
# The big channel has presence without join/leave: 10,000 joins, each told to every member
# already there, would be a join storm of 50 million frames, not a presence_stats benchmark.
PRES=(--channels 'pres:*?presence&join_leave presbig:*?presence churn:*?presence')
start_gateway gw-pres-a "${PRES[@]}"; PA=$GW_PID; PA_PORT=$GW_PORT
start_gateway gw-pres-b "${PRES[@]}"; PB=$GW_PID; PB_PORT=$GW_PORT
"$LT" presence --url "ws://127.0.0.1:$PA_PORT/ws" --url "ws://127.0.0.1:$PB_PORT/ws" \
  -n "$PRES_N" --calls "$PRES_CALLS" --cycles 0 --channel presbig:stats --redis-url "$REDIS" \
  --concurrency 200 --pid "$PA" --pid "$PB" --sources "$SRC" --label stats \
  --json "$OUT/presence-stats.json"
"$LT" presence --url "ws://127.0.0.1:$PA_PORT/ws" --url "ws://127.0.0.1:$PB_PORT/ws" \
  -n "$PRES_FAN_N" --calls 10 --cycles "$PRES_CYCLES" --channel pres:fan --redis-url "$REDIS" \
  --concurrency 200 --pid "$PA" --pid "$PB" --sources "$SRC" --label fanout \
  --json "$OUT/presence-fanout.json"
"$LT" churn "ws://127.0.0.1:$PA_PORT/ws" --duration-secs 600 --cycles "$PRES_CHURN_CYCLES" \
  --concurrency 50 --redis-url "$REDIS" --jwt-secret "$SECRET" --pid "$PA" --sources "$SRC" \
  --label presence-on --json "$OUT/presence-churn-on.json"
stop "$PA" "$PB"
start_gateway gw-pres-off; POFF=$GW_PID
"$LT" churn "ws://127.0.0.1:$GW_PORT/ws" --duration-secs 600 --cycles "$PRES_CHURN_CYCLES" \
  --concurrency 50 --redis-url "$REDIS" --jwt-secret "$SECRET" --pid "$POFF" --sources "$SRC" \
  --label presence-off --json "$OUT/presence-churn-off.json"
stop "$POFF"

log "unicast"
# A pipelined publisher (one pipeline of FCALL gw_send_user per millisecond, many in
# flight) at UNI_RATE messages/s, one per delivery; Redis CPU is reported beside the nodes'.
"$LT" unicast --url "ws://127.0.0.1:$A_PORT/ws" --url "ws://127.0.0.1:$B_PORT/ws" \
  --users "$UNI_USERS" --jwt-secret "$SECRET" --rate "$UNI_RATE" --duration-secs "$UNI_SECS" \
  --redis-url "$REDIS" --redis-pid "$REDIS_PID" --pid "$A_PID" --pid "$B_PID" \
  --sources "$SRC" --label gateway-2nodes --json "$OUT/unicast.json"
stop "$A_PID" "$B_PID"

log "connect-storm"
start_gateway gw-storm "${TLS[@]}"; TLS_PID=$GW_PID; TLS_PORT=$GW_PORT
start_gateway gw-storm-plain
"$LT" connect-storm "ws://127.0.0.1:$GW_PORT/ws" -n "$STORM_N" --concurrency 50 \
  --pid "$GW_PID" --sources "$SRC" --label plain --json "$OUT/storm-plain.json"
"$LT" connect-storm "wss://127.0.0.1:$TLS_PORT/ws" -n "$STORM_TLS_N" --concurrency 50 \
  --pid "$TLS_PID" --sources "$SRC" --label tls --json "$OUT/storm-tls.json"
"$LT" connect-storm "wss://127.0.0.1:$TLS_PORT/ws" -n "$STORM_TLS_N" --concurrency 50 \
  --pid "$TLS_PID" --sources "$SRC" --token "$HS_TOKEN" --label tls-hs256 \
  --json "$OUT/storm-tls-hs256.json"
"$LT" connect-storm "wss://127.0.0.1:$TLS_PORT/ws" -n "$STORM_TLS_N" --concurrency 50 \
  --pid "$TLS_PID" --sources "$SRC" --token "$RS_TOKEN" --label tls-rs256 \
  --json "$OUT/storm-tls-rs256.json"
stop "$GW_PID" "$TLS_PID"
start_floor
"$LT" connect-storm "ws://127.0.0.1:$FL_PORT/ws" -n "$STORM_N" --concurrency 50 \
  --pid "$FL_PID" --sources "$SRC" --label floor --json "$OUT/storm-floor.json"
stop "$FL_PID"
start_floor "${TLS[@]}"
"$LT" connect-storm "wss://127.0.0.1:$FL_PORT/ws" -n "$STORM_TLS_N" --concurrency 50 \
  --pid "$FL_PID" --sources "$SRC" --label floor-tls --json "$OUT/storm-floor-tls.json"
stop "$FL_PID"

# The Socket.IO peer (bench/peer, installed by `make bench-peer`): skipped when not installed.
if [ -d bench/peer/node_modules ] && command -v node >/dev/null; then
  log "peer (Socket.IO 4 + redis-adapter)"
  start_peer() {
    PEER_PORT=$(free_port)
    node bench/peer/server.js "$PEER_PORT" "$REDIS" "$@" >>"$WORK/peer.log" 2>&1 &
    PEER_PID=$!
    pids+=("$PEER_PID")
    wait_port "$PEER_PORT"
  }
  EIO=/socket.io/?EIO=4\&transport=websocket
  start_peer
  "$LT" idle "ws://127.0.0.1:$PEER_PORT$EIO" -n "$IDLE_N" --pid "$PEER_PID" --sources "$SRC" \
    --proto eio --label peer --json "$OUT/idle-peer.json"
  stop "$PEER_PID"
  start_peer bridge; PA_PID=$PEER_PID; PA_PORT=$PEER_PORT
  start_peer; PB_PID=$PEER_PID; PB_PORT=$PEER_PORT
  for r in $FAN_RATES; do
    "$LT" fanout --url "ws://127.0.0.1:$PA_PORT$EIO" --url "ws://127.0.0.1:$PB_PORT$EIO" \
      -s "$FAN_S" --rate "$r" --duration-secs "$FAN_SECS" --redis-url "$REDIS" \
      --pid "$PA_PID" --pid "$PB_PID" --sources "$SRC" --channel "bench-p$r" --proto eio \
      --label peer-2procs --json "$OUT/fanout-peer-r$r.json"
  done
  stop "$PA_PID" "$PB_PID"
else
  log "peer skipped: run make bench-peer (npm) to install bench/peer"
fi

log "churn"
start_gateway gw-churn
"$LT" churn "ws://127.0.0.1:$GW_PORT/ws" --duration-secs "$CHURN_SECS" --cycles "$CHURN_CYCLES" \
  --concurrency 50 \
  --redis-url "$REDIS" --jwt-secret "$SECRET" --pid "$GW_PID" --sources "$SRC" \
  --label gateway-jwt --json "$OUT/churn.json"
stop "$GW_PID"

log "transports"
# The same subscribers and rates over WebSocket, HTTP-streaming and SSE on one node (CPU per
# delivery); then a command's round trip over /emulation, posted to the stream's node and to
# another node, which forwards it through Redis.
start_gateway gw-trans; T_PID=$GW_PID; T_PORT=$GW_PORT
for r in $TRANS_RATES; do
  "$LT" fanout --url "ws://127.0.0.1:$T_PORT/connection/websocket" -s "$FAN_S" --rate "$r" \
    --proto centrifugo --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$T_PID" \
    --sources "$SRC" --channel "bench-tw$r" --label websocket --json "$OUT/transport-ws-r$r.json"
  for t in http-stream sse; do
    "$LT" streams --addr "127.0.0.1:$T_PORT" --transport "$t" -s "$FAN_S" --rate "$r" \
      --duration-secs "$FAN_SECS" --redis-url "$REDIS" --pid "$T_PID" \
      --channel "bench-t$t$r" --label "$t" --json "$OUT/transport-$t-r$r.json"
  done
done
start_gateway gw-trans-b; TB_PID=$GW_PID; TB_PORT=$GW_PORT
"$LT" emulation-rtt --stream-addr "127.0.0.1:$T_PORT" --post-addr "127.0.0.1:$T_PORT" -n "$RTT_N" \
  --pid "$T_PID" --label same-node --json "$OUT/emulation-rtt-same.json"
"$LT" emulation-rtt --stream-addr "127.0.0.1:$T_PORT" --post-addr "127.0.0.1:$TB_PORT" -n "$RTT_N" \
  --pid "$T_PID" --pid "$TB_PID" --label forwarded --json "$OUT/emulation-rtt-forwarded.json"
stop "$T_PID" "$TB_PID"

log "checking the JSON outputs"
"$PY" scripts/bench_report.py check "$OUT"
if [ "$MODE" = full ]; then
  BENCH_SECS=$SECONDS "$PY" scripts/bench_report.py report "$OUT" docs/benchmarks.md
  echo "wrote docs/benchmarks.md"
fi
