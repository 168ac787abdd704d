"""helm test: open a WebSocket to the gateway and expect the welcome frame.

Standard library only. Environment: GATEWAY_HOST, GATEWAY_PORT, GATEWAY_SCHEME (ws|wss),
GATEWAY_PATH (/ws), GATEWAY_TOKEN (optional JWT), GATEWAY_ORIGIN (optional Origin header).
Exits 0 when the first frame is a text frame holding {"type":"welcome",...}.
"""
import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def recv_exact(sock, buf, n):
    while len(buf) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def connect(host, port, scheme, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    if scheme == "wss":
        ctx = ssl.create_default_context()
        # The certificate names the public host, not the in-cluster Service.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=host)
    return sock


def handshake(sock, host, port, path, token, origin):
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET %s HTTP/1.1" % path,
        "Host: %s:%d" % (host, port),
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: " + key,
        "Sec-WebSocket-Version: 13",
        "User-Agent: gateway-helm-test",
    ]
    if token:
        lines.append("Authorization: Bearer " + token)
    if origin:
        lines.append("Origin: " + origin)
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed during the handshake: %r" % buf[:300])
        buf += chunk
        if len(buf) > 65536:
            raise RuntimeError("handshake response too large")
    head, rest = buf.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("iso-8859-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise RuntimeError("expected 101 Switching Protocols, got %r (body %r)" % (status_line, rest[:300]))
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    if headers.get("sec-websocket-accept") != expected:
        raise RuntimeError("bad Sec-WebSocket-Accept %r" % headers.get("sec-websocket-accept"))
    return rest


def read_frame(sock, buf):
    buf = recv_exact(sock, buf, 2)
    b0, b1 = buf[0], buf[1]
    opcode = b0 & 0x0F
    if b1 & 0x80:
        raise RuntimeError("server frame is masked")
    length = b1 & 0x7F
    off = 2
    if length == 126:
        buf = recv_exact(sock, buf, 4)
        length = struct.unpack("!H", buf[2:4])[0]
        off = 4
    elif length == 127:
        buf = recv_exact(sock, buf, 10)
        length = struct.unpack("!Q", buf[2:10])[0]
        off = 10
    buf = recv_exact(sock, buf, off + length)
    return b0 & 0x80, opcode, buf[off:off + length]


def close(sock):
    mask = os.urandom(4)
    payload = struct.pack("!H", 1000)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    try:
        sock.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + masked)
    except OSError:
        pass
    sock.close()


def main():
    host = os.environ["GATEWAY_HOST"]
    port = int(os.environ.get("GATEWAY_PORT", "80"))
    scheme = os.environ.get("GATEWAY_SCHEME", "ws")
    path = os.environ.get("GATEWAY_PATH", "/ws")
    token = os.environ.get("GATEWAY_TOKEN", "")
    origin = os.environ.get("GATEWAY_ORIGIN", "")
    deadline = time.monotonic() + float(os.environ.get("GATEWAY_TEST_TIMEOUT", "60"))
    attempt = 0
    while True:
        attempt += 1
        try:
            sock = connect(host, port, scheme, timeout=10)
            rest = handshake(sock, host, port, path, token, origin)
            fin, opcode, payload = read_frame(sock, rest)
            if not fin or opcode != 0x1:
                raise RuntimeError("first frame: fin=%s opcode=%d, expected a whole text frame" % (bool(fin), opcode))
            frame = json.loads(payload.decode("utf-8"))
            if not isinstance(frame, dict) or frame.get("type") != "welcome":
                raise RuntimeError("first frame is not a welcome: %r" % payload[:300])
            close(sock)
            print("ok: %s://%s:%d%s answered %s" % (scheme, host, port, path, json.dumps(frame)))
            return 0
        except (OSError, RuntimeError, ValueError) as e:
            if time.monotonic() > deadline:
                print("failed after %d attempts: %s" % (attempt, e), file=sys.stderr)
                return 1
            print("attempt %d: %s; retrying" % (attempt, e), file=sys.stderr)
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
