"""The stock Centrifugo Python packages against a two-node gateway cluster.

- centrifuge-python (the client SDK): connect with a token, subscribe with recovery,
  receive; disconnect, miss publications, connect again and recover them.
- cent (the server API client): publish, broadcast, history, history_remove, channels and
  info, with the admin token as its API key, on either node.

Run by `make sdk-test` with the interpreter of the venv that `make sdk-tools` fills
(.tools/sdk-venv). Starts its own redis-server (on a random port, retried when taken) and
two `gateway` processes that bind their own ports; never touches port 6379.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

from cent import (
    BroadcastRequest,
    ChannelsRequest,
    Client as ApiClient,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PublishRequest,
)
from cent.exceptions import CentApiResponseError, CentUnauthorizedError
from centrifuge import (
    Client,
    ClientEventHandler,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.environ.get("GATEWAY_BIN", os.path.join(ROOT, "target", "debug", "gateway"))
SECRET = "sdk-python-secret-0123456789-abcdefgh"
API_KEY = "sdk-python-api-key-0123456789"


def jwt(claims):
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def token(sub, ttl=600):
    return jwt({"sub": sub, "exp": int(time.time()) + ttl})


def listening(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Redis:
    """redis-server on a random port in 20000..32000, retried when the port is taken."""

    def __init__(self):
        for _ in range(20):
            port = random.randint(20000, 32000)
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.time() + 5
            while time.time() < deadline and proc.poll() is None and not listening(port):
                time.sleep(0.05)
            if proc.poll() is None and listening(port):
                self.proc, self.url = proc, f"redis://127.0.0.1:{port}"
                return
            proc.kill()
        raise RuntimeError("no port for redis-server")

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Gateway:
    """A gateway process on ports of its own choosing, read from its log."""

    def __init__(self, node_id, redis_url):
        self.node_id = node_id
        self.proc = subprocess.Popen(
            [GATEWAY, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--log-format", "json", "--node-id", node_id, "--redis-url", redis_url,
             "--jwt-secret", SECRET, "--admin-token", API_KEY,
             "--publish-allow", "chat:*,h:*",
             "--channels", "h:*?history_size=100&history_ttl_secs=300",
             "--node-heartbeat-ms", "200", "--node-ttl-ms", "1000", "--rebalance", "false"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.log = []
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                if os.environ.get("GATEWAY_LOGS"):
                    sys.stderr.write(line)
                try:
                    fields = json.loads(line)["fields"]
                except (ValueError, KeyError):
                    continue
                if fields.get("message") == "gateway serving":
                    port = lambda s: int(s.rsplit(":", 1)[1].rstrip(")"))
                    self.port, self.admin = port(fields["listen"]), port(fields["admin"])
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(15):
            self.proc.kill()
            raise RuntimeError(f"{node_id} did not start:\n{''.join(self.log)}")
        deadline = time.time() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz") as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{node_id} not ready")
            time.sleep(0.05)
        self.ws = f"ws://127.0.0.1:{self.port}/connection/websocket"
        self.api = ApiClient(f"http://127.0.0.1:{self.admin}/api", API_KEY)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


async def until(what, check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        await asyncio.sleep(0.02)


class Recorder(SubscriptionEventHandler):
    def __init__(self):
        self.pubs, self.subscribed = [], []

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.append(ctx.pub)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self.subscribed.append(ctx)


class ClientEvents(ClientEventHandler):
    def __init__(self):
        self.events = []

    async def on_connected(self, ctx):
        self.events.append(("connected", ctx))

    async def on_disconnected(self, ctx):
        self.events.append(("disconnected", ctx))


class Cluster(unittest.IsolatedAsyncioTestCase):
    @classmethod
    def setUpClass(cls):
        if not os.path.exists(GATEWAY):
            raise unittest.SkipTest(f"no gateway binary at {GATEWAY}")
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is required (make deps installs it)")
        cls.redis = Redis()
        cls.a = Gateway("a", cls.redis.url)
        cls.b = Gateway("b", cls.redis.url)

    @classmethod
    def tearDownClass(cls):
        for p in (cls.a, cls.b, cls.redis):
            p.stop()

    async def test_sdk_subscribes_receives_and_recovers(self):
        events = ClientEvents()
        client = Client(self.a.ws, events=events, token=token("py-alice"), proxy=None)
        rec = Recorder()
        sub = client.new_subscription("h:py", rec, positioned=True, recoverable=True)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)
        first = rec.subscribed[0]
        self.assertTrue(first.recoverable)
        self.assertFalse(first.was_recovering)

        # Published with cent through node b, delivered by node a.
        published = self.b.api.publish(PublishRequest(channel="h:py", data={"n": 1}))
        self.assertEqual(published.offset, 1)
        await until("the publication", lambda: len(rec.pubs) == 1)
        self.assertEqual((rec.pubs[0].data, rec.pubs[0].offset), ({"n": 1}, 1))

        # Away while two more are published; back, it recovers them.
        await client.disconnect()
        for n in (2, 3):
            self.b.api.publish(PublishRequest(channel="h:py", data={"n": n}))
        await client.connect()
        await until("resubscribed", lambda: len(rec.subscribed) == 2)
        again = rec.subscribed[1]
        self.assertTrue(again.was_recovering)
        self.assertTrue(again.recovered)
        self.assertEqual(again.stream_position.epoch, published.epoch)
        await until("the recovered publications", lambda: len(rec.pubs) == 3)
        self.assertEqual([p.offset for p in rec.pubs], [1, 2, 3])
        self.assertEqual([p.data["n"] for p in rec.pubs], [1, 2, 3])

        # Client publish and history through the SDK.
        await sub.publish({"n": 4})
        await until("its own publication", lambda: len(rec.pubs) == 4)
        history = await sub.history(limit=10)
        self.assertEqual([p.offset for p in history.publications], [1, 2, 3, 4])
        await client.disconnect()

    async def test_cent_publish_broadcast_history_channels_info(self):
        events = ClientEvents()
        client = Client(self.b.ws, events=events, token=token("py-bob"), proxy=None)
        rec = Recorder()
        sub = client.new_subscription("chat:cent", rec)
        await client.connect()
        await sub.subscribe()
        await sub.ready(5)

        result = self.a.api.broadcast(
            BroadcastRequest(channels=["chat:cent", "h:cent", "bad channel"], data={"b": 1})
        )
        ok, history_ch, bad = result.responses
        self.assertIsNone(ok.error)
        self.assertEqual(history_ch.result.offset, 1)
        self.assertEqual(bad.error.code, 102)
        await until("the broadcast", lambda: len(rec.pubs) == 1)
        self.assertEqual(rec.pubs[0].data, {"b": 1})

        history = self.b.api.history(HistoryRequest(channel="h:cent", limit=10))
        self.assertEqual([p.data for p in history.publications], [{"b": 1}])
        self.b.api.history_remove(HistoryRemoveRequest(channel="h:cent"))
        after = self.a.api.history(HistoryRequest(channel="h:cent", limit=10))
        self.assertEqual((after.publications, after.offset), ([], 1))

        with self.assertRaises(CentApiResponseError) as e:
            self.a.api.presence(PresenceRequest(channel="chat:cent"))
        self.assertEqual(e.exception.code, 108)
        with self.assertRaises(CentUnauthorizedError):
            ApiClient(f"http://127.0.0.1:{self.a.admin}/api", "wrong").info(InfoRequest())

        # Counts come with the heartbeats (every 200 ms).
        async def counted():
            info = self.a.api.info(InfoRequest())
            chans = self.a.api.channels(ChannelsRequest(pattern="chat:*")).channels
            return info, chans

        deadline = time.monotonic() + 10
        while True:
            info, chans = await counted()
            nodes = {n.uid: n.num_clients for n in info.nodes}
            if nodes.get("b", 0) >= 1 and "chat:cent" in chans:
                break
            self.assertLess(time.monotonic(), deadline, f"{info} {chans}")
            await asyncio.sleep(0.1)
        self.assertEqual(sorted(nodes), ["a", "b"])
        self.assertEqual(chans["chat:cent"].num_clients, 1)
        await client.disconnect()


if __name__ == "__main__":
    unittest.main(verbosity=2)
