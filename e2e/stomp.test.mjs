// STOMP with real clients: @stomp/stompjs over the `ws` package against the debug gateway
// binary, next to protocol v1 clients (also on `ws`), with a redis-server of its own on a
// free port (unicast and the inbound stream go through Redis).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import { once } from "node:events";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "@stomp/stompjs";
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

// stompjs opens `new WebSocket(brokerURL, ["v12.stomp", "v11.stomp", "v10.stomp"])`; Node 20
// has no global WebSocket.
Object.assign(globalThis, { WebSocket });

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const gatewayBin = process.env.GATEWAY_BIN || path.join(root, "target/debug/gateway");
const SECRET = "e2e-stomp-secret-0123456789-abcdef";
// Our heart-beat offer (the ping interval): a client's own interval wins when longer.
const PING_MS = 500;
let gateway, redis, port, adminPort, redisPort, brokerURL;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });
}

async function eventually(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/// One Redis command over a fresh connection (RESP, enough of it for replies we read).
async function redisCommand(...args) {
  const sock = net.connect(redisPort, "127.0.0.1");
  await once(sock, "connect");
  sock.write(`*${args.length}\r\n` + args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join(""));
  let buf = Buffer.alloc(0);
  try {
    for await (const chunk of sock) {
      buf = Buffer.concat([buf, chunk]);
      const r = parseResp(buf, 0);
      if (r) return r.value;
    }
  } finally {
    sock.destroy();
  }
  throw new Error("redis closed the connection");
}

function parseResp(buf, i) {
  const eol = buf.indexOf("\r\n", i);
  if (eol < 0) return null;
  const line = buf.toString("utf8", i + 1, eol);
  switch (String.fromCharCode(buf[i])) {
    case "+": return { value: line, next: eol + 2 };
    case "-": throw new Error(line);
    case ":": return { value: Number(line), next: eol + 2 };
    case "$": {
      const n = Number(line);
      if (n < 0) return { value: null, next: eol + 2 };
      if (buf.length < eol + 2 + n + 2) return null;
      return { value: buf.toString("utf8", eol + 2, eol + 2 + n), next: eol + 4 + n };
    }
    case "*": {
      const out = [];
      let at = eol + 2;
      for (let k = 0; k < Number(line); k++) {
        const r = parseResp(buf, at);
        if (!r) return null;
        out.push(r.value);
        at = r.next;
      }
      return { value: out, next: at };
    }
    default: throw new Error(`unexpected RESP type in ${line}`);
  }
}

/// An HS256 JWT for `sub`, valid for ten minutes.
function jwt(sub) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub, exp: Math.floor(Date.now() / 1000) + 600 });
  const sig = crypto.createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/// A queue of things arriving from callbacks, awaited one at a time.
function inbox() {
  const items = [];
  const waiters = [];
  return {
    push(x) {
      items.push(x);
      for (const w of waiters.splice(0)) w();
    },
    async next(pred = () => true, ms = 10000) {
      const deadline = Date.now() + ms;
      for (;;) {
        const i = items.findIndex(pred);
        if (i >= 0) return items.splice(i, 1)[0];
        const left = deadline - Date.now();
        if (left <= 0) throw new Error("nothing arrived in time");
        await new Promise((r) => {
          waiters.push(r);
          setTimeout(r, left);
        });
      }
    },
  };
}

/// A protocol v1 client: welcome consumed, JSON frames in an inbox.
async function v1Client(token) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws?access_token=${token}`);
  const frames = inbox();
  ws.on("message", (d) => frames.push(JSON.parse(d.toString())));
  await once(ws, "open");
  const welcome = await frames.next();
  assert.equal(welcome.type, "welcome");
  return {
    ws,
    frames,
    async request(req) {
      ws.send(JSON.stringify(req));
      const reply = await frames.next((f) => f.id === req.id);
      assert.deepEqual(reply, { type: "ack", id: req.id });
    },
  };
}

/// Activates `client` and resolves with its CONNECTED frame.
function connect(client) {
  return new Promise((resolve, reject) => {
    client.onConnect = resolve;
    client.onStompError = (f) => reject(new Error(`ERROR ${f.headers.message}`));
    client.onWebSocketClose = (e) => reject(new Error(`closed ${e.code} before CONNECTED`));
    client.activate();
  });
}

function receipt(client, id) {
  return new Promise((resolve) => client.watchForReceipt(id, resolve));
}

before(async () => {
  [port, adminPort, redisPort] = await Promise.all([freePort(), freePort(), freePort()]);
  brokerURL = `ws://127.0.0.1:${port}/ws`;
  redis = spawn("redis-server", [
    "--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
  ], { stdio: "ignore" });
  await eventually("redis-server", async () => (await redisCommand("PING")) === "PONG");
  gateway = spawn(gatewayBin, [
    "--jwt-secret", SECRET, "--publish-allow", "chat:*",
    "--redis-url", `redis://127.0.0.1:${redisPort}`,
    "--ping-interval-ms", String(PING_MS),
    "--listen", `127.0.0.1:${port}`, "--admin-listen", `127.0.0.1:${adminPort}`,
  ], { stdio: ["ignore", "inherit", "inherit"] });
  await eventually("the gateway", async () => (await fetch(`http://127.0.0.1:${adminPort}/readyz`)).ok);
});

after(async () => {
  // The gateway first: its last inbound events still find Redis.
  if (gateway && gateway.exitCode === null) {
    gateway.kill("SIGTERM");
    await once(gateway, "exit");
  }
  redis?.kill("SIGKILL");
});

test("stompjs on /topic/chat:1 gets admin and v1 publishes; its SEND reaches v1; receipts", { timeout: 60000 }, async () => {
  // Default settings, a JWT in connectHeaders.
  const client = new Client({ brokerURL, connectHeaders: { passcode: jwt("alice") } });
  const connected = await connect(client);
  assert.equal(connected.headers.version, "1.2");
  assert.equal(connected.headers["user-name"], "alice");
  assert.match(connected.headers.session, /\./);

  const got = inbox();
  const subscribed = receipt(client, "sub-chat");
  client.subscribe("/topic/chat:1", (m) => got.push(m), { receipt: "sub-chat" });
  await subscribed; // the subscription is live once its RECEIPT is in

  const r = await fetch(`http://127.0.0.1:${adminPort}/v1/channels/chat:1/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ data: { from: "admin" } }),
  });
  assert.equal(r.status, 200);
  const fromAdmin = await got.next();
  assert.deepEqual(JSON.parse(fromAdmin.body), { from: "admin" });
  assert.equal(fromAdmin.headers.destination, "/topic/chat:1");
  assert.equal(fromAdmin.headers["content-type"], "application/json");

  const v1 = await v1Client(jwt("bob"));
  await v1.request({ type: "publish", channel: "chat:1", data: { from: "v1" }, id: 1 });
  const fromV1 = await got.next();
  assert.deepEqual(JSON.parse(fromV1.body), { from: "v1" });
  // A stock centrifuge-SDK client publishes on the same channel, over the Centrifugo protocol.
  const centrifuge = new Centrifuge(`ws://127.0.0.1:${port}/connection/websocket`, {
    websocket: WebSocket,
    token: jwt("carol"),
  });
  centrifuge.connect();
  await new Promise((resolve) => centrifuge.once("connected", resolve));
  await centrifuge.publish("chat:1", { from: "centrifuge" });
  const fromSdk = await got.next();
  assert.deepEqual(JSON.parse(fromSdk.body), { from: "centrifuge" });
  centrifuge.disconnect();

  await v1.request({ type: "subscribe", channel: "chat:1", id: 2 });
  client.publish({
    destination: "/topic/chat:1",
    body: JSON.stringify({ from: "stomp" }),
    headers: { "content-type": "application/json" },
  });
  const atV1 = await v1.frames.next((f) => f.type === "message" && f.data.from === "stomp");
  assert.deepEqual(atV1, { type: "message", channel: "chat:1", data: { from: "stomp" } });
  assert.deepEqual(JSON.parse((await got.next()).body), { from: "stomp" }, "and to itself");

  // DISCONNECT carries a receipt; stompjs closes once the RECEIPT is in.
  const disconnected = new Promise((resolve) => (client.onDisconnect = resolve));
  await client.deactivate();
  const bye = await disconnected;
  assert.equal(bye.command, "RECEIPT");
  assert.match(bye.headers["receipt-id"], /^close-/);
  v1.ws.close();
});

test("/user/queue/replies gets the user's unicast; SEND /app/orders lands in gw:inbound", { timeout: 60000 }, async () => {
  const client = new Client({
    brokerURL,
    connectHeaders: { Authorization: `Bearer ${jwt("carol")}` },
  });
  const connected = await connect(client);
  const conn = connected.headers.session;
  const replies = inbox();
  const subscribed = receipt(client, "sub-replies");
  client.subscribe("/user/queue/replies", (m) => replies.push(m), { receipt: "sub-replies" });
  await subscribed;

  const r = await fetch(`http://127.0.0.1:${adminPort}/v1/users/carol/send`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ data: { reply: 1 } }),
  });
  assert.deepEqual(await r.json(), { delivered: 1 });
  const m = await replies.next();
  assert.equal(m.headers.destination, "/user/queue/replies");
  assert.deepEqual(JSON.parse(m.body), { reply: 1 });

  const stored = receipt(client, "order-42");
  client.publish({
    destination: "/app/orders",
    body: JSON.stringify({ order: 42 }),
    headers: { receipt: "order-42" },
  });
  await stored; // sent once the entry is in Redis
  const entries = await redisCommand("XRANGE", "gw:inbound", "-", "+");
  const fields = entries.map(([, kv]) => Object.fromEntries(
    kv.flatMap((v, i) => (i % 2 ? [] : [[v, kv[i + 1]]])),
  ));
  const order = fields.find((f) => f.event === "message" && f.conn_id === conn);
  assert.ok(order, JSON.stringify(fields));
  assert.equal(order.destination, "/app/orders");
  assert.equal(order.user_id, "carol");
  assert.deepEqual(JSON.parse(order.data), { order: 42 });
  await client.deactivate();
});

test("heart-beats flow both ways; a client that stops sending them is closed", { timeout: 60000 }, async () => {
  const beatMs = 1000; // longer than our offer (PING_MS), so it is the agreed interval
  const received = [];
  const sent = [];
  let mute = false;
  const client = new Client({
    connectHeaders: { passcode: jwt("dave") },
    heartbeatIncoming: beatMs,
    heartbeatOutgoing: beatMs,
    reconnectDelay: 0,
    // brokerURL's socket, with its outgoing heart-beats observed (and, later, dropped)
    webSocketFactory: () => {
      const ws = new WebSocket(brokerURL, ["v12.stomp", "v11.stomp", "v10.stomp"]);
      const send = ws.send.bind(ws);
      ws.send = (data) => {
        if (data === "\n") {
          if (mute) return;
          sent.push(Date.now());
        }
        send(data);
      };
      return ws;
    },
  });
  client.onHeartbeatReceived = () => received.push(Date.now());
  const connected = await connect(client);
  assert.equal(connected.headers["heart-beat"], `${PING_MS},${PING_MS}`);

  await new Promise((r) => setTimeout(r, 4500));
  assert.ok(client.connected, "client beats keep the connection open");
  assert.ok(received.length >= 3, `server beats: ${received.length}`);
  for (let i = 1; i < received.length; i++) {
    const gap = received[i] - received[i - 1];
    assert.ok(gap > beatMs * 0.7 && gap < beatMs * 1.5, `server beat gap ${gap} ms`);
  }
  assert.ok(sent.length >= 3, `client beats: ${sent.length}`);

  const closed = new Promise((resolve) => (client.onWebSocketClose = resolve));
  const error = new Promise((resolve) => (client.onStompError = resolve));
  mute = true;
  const t0 = Date.now();
  const ev = await closed;
  assert.equal(ev.code, 4001);
  const waited = Date.now() - t0;
  // closed two intervals after the last beat, checked every half interval
  assert.ok(waited > beatMs * 0.9 && waited < beatMs * 4, `closed after ${waited} ms`);
  assert.equal((await error).headers.message, "no frame within heartbeat timeout");
  await client.deactivate();
});
