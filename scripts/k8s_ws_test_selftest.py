#!/usr/bin/env python3
"""Runs the chart's `helm test` script (helm/gateway/files/ws-smoke-test.py) against a
stand-in WebSocket server on 127.0.0.1: it must pass on a welcome frame (sent with a
16-bit extended length, token and origin checked) and fail on a non-welcome frame and
on an HTTP 401. Standard library only; bounded (a few connections, short timeouts).
"""
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def serve(listener, mode, seen):
    listener.settimeout(15)
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        return
    with conn:
        conn.settimeout(5)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        head = buf.split(b"\r\n\r\n", 1)[0].decode()
        lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        seen.update(request=lines[0], **headers)
        if mode == "401":
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
            return
        accept = base64.b64encode(hashlib.sha1((headers["sec-websocket-key"] + GUID).encode()).digest()).decode()
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
        if mode == "welcome":
            frame = {"type": "welcome", "conn_id": "n1." + "x" * 150, "node_id": "n1", "user_id": "u1"}
        else:
            frame = {"type": "error", "id": None, "code": "nope", "message": "x"}
        payload = json.dumps(frame).encode()
        if len(payload) < 126:
            header = bytes([0x81, len(payload)])
        else:
            header = bytes([0x81, 126]) + len(payload).to_bytes(2, "big")
        conn.sendall(header + payload)
        try:
            seen["close"] = conn.recv(16)
        except OSError:
            pass


def run(script, mode, token=""):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen = {}
    t = threading.Thread(target=serve, args=(listener, mode, seen), daemon=True)
    t.start()
    env = dict(os.environ, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(listener.getsockname()[1]),
               GATEWAY_TOKEN=token, GATEWAY_ORIGIN="https://app.example.com", GATEWAY_TEST_TIMEOUT="0",
               PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=30)
    t.join(10)
    listener.close()
    return p, seen


def main():
    script = sys.argv[1]
    failures = 0
    p, seen = run(script, "welcome", token="tok123")
    ok = (p.returncode == 0 and seen.get("request") == "GET /ws HTTP/1.1"
          and seen.get("authorization") == "Bearer tok123" and seen.get("origin") == "https://app.example.com"
          and seen.get("sec-websocket-version") == "13" and seen.get("close", b"")[:1] == b"\x88")
    print("  %s welcome frame accepted (token, origin, masked close sent)" % ("ok  " if ok else "FAIL"))
    if not ok:
        print(p.stdout, p.stderr, seen)
        failures += 1
    for mode in ("other", "401"):
        p, _ = run(script, mode)
        ok = p.returncode == 1
        print("  %s %s refused: %s" % ("ok  " if ok else "FAIL", mode, (p.stderr.strip().splitlines() or ["?"])[-1][:110]))
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
