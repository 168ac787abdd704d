#!/usr/bin/env bash
# Three gateway nodes sharing one Redis, behind nginx, on this machine (`make cluster`).
#
#   ws://127.0.0.1:8000/ws      the load balancer (round-robin; STICKY=1 for ip_hash)
#   127.0.0.1:8081-8083         the nodes' public listeners
#   127.0.0.1:9091-9093         the nodes' admin listeners (probes, metrics, admin API)
#   127.0.0.1:6390              a private Redis (never the shared one on 6379)
#
# Ctrl-C stops everything. Needs redis-server and nginx (make deps-system installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/gateway}
REDIS_PORT=${REDIS_PORT:-6390}
LB_PORT=${LB_PORT:-8000}
DIR=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM

[ -x "$BIN" ] || cargo build -p gateway
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$DIR/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done

# Rebalancing sheds clients from a busy node; behind ip_hash they would come straight back.
rebalance=true
[ "${STICKY:-0}" = 1 ] && rebalance=false
for i in 1 2 3; do
  "$BIN" --node-id "node-$i" --listen "127.0.0.1:808$i" --admin-listen "127.0.0.1:909$i" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --allow-anonymous --publish-allow 'chat:*' \
    --channels 'chat:*?history_size=100&history_ttl_secs=600&presence&join_leave' \
    --trusted-proxies 127.0.0.1/32 --rebalance "$rebalance" &
  pids+=($!)
done

balance=""
[ "${STICKY:-0}" = 1 ] && balance="ip_hash;"
mkdir -p "$DIR/tmp"
cat >"$DIR/nginx.conf" <<CONF
daemon off;
master_process off;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $DIR/tmp; proxy_temp_path $DIR/tmp; fastcgi_temp_path $DIR/tmp;
  uwsgi_temp_path $DIR/tmp; scgi_temp_path $DIR/tmp;
  upstream gateway {
    $balance
    server 127.0.0.1:8081 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8082 max_fails=1 fail_timeout=5s;
    server 127.0.0.1:8083 max_fails=1 fail_timeout=5s;
  }
  server {
    listen 127.0.0.1:$LB_PORT;
    location / {
      proxy_pass http://gateway;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_connect_timeout 1s;
      proxy_read_timeout 3600s;
      proxy_next_upstream error timeout;
    }
  }
}
CONF
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
"$NGINX" -e "$DIR/nginx-error.log" -p "$DIR" -c "$DIR/nginx.conf" &
pids+=($!)
echo "cluster up: ws://127.0.0.1:$LB_PORT/ws (chat demo at http://127.0.0.1:$LB_PORT/), Redis on $REDIS_PORT; Ctrl-C stops"
wait
