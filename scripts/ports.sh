# Sourced by scripts/bench.sh and scripts/scale.sh: loopback ports for the servers they start.

# A port free right now on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [TRIES]: waits until something listens on PORT, 50 ms per try (200 tries).
wait_port() {
  for _ in $(seq "${2:-200}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2; return 1
}
