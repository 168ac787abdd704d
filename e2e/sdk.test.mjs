// The stock Centrifugo JavaScript SDK (`centrifuge` 5.x from npm, over the `ws` package)
// against a two-node cluster behind nginx: connect with a token, subscribe, an admin
// publish, a client publish, history, token refresh through getToken, a v1 client and an
// SDK client in one channel, and a drained node whose clients reconnect through nginx and
// recover every publication they missed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";
import {
  startRedis, startGateway, startNginx, recordEvents, recorded, jwt, now, until, sleep, SECRET,
} from "./cluster.mjs";

let redis, a, b, nginx;
const clients = [];

before(async () => {
  redis = await startRedis();
  const args = (id) => [
    "--node-id", id, "--redis-url", redis.url, "--jwt-secret", SECRET,
    "--publish-allow", "chat:*,h:*", "--channels", "h:*?history_size=100&history_ttl_secs=300",
    "--node-heartbeat-ms", "200", "--node-ttl-ms", "1000", "--rebalance", "false",
    "--drain-window-ms", "300", "--token-grace-ms", "1000",
    "--handshake-rate-per-ip", "1000", "--handshake-burst-per-ip", "1000",
  ];
  [a, b] = await Promise.all([startGateway(args("a")), startGateway(args("b"))]);
  nginx = await startNginx([a.port, b.port]);
});

after(() => {
  for (const c of clients) c.disconnect();
  nginx?.stop();
  a?.stop();
  b?.stop();
  redis?.stop();
});

/** An SDK client that records its events. */
function sdk(url, options) {
  const c = new Centrifuge(url, { websocket: WebSocket, ...options });
  clients.push(c);
  return recordEvents(c);
}

const token = (sub, ttl = 600) => jwt({ sub, exp: now() + ttl });

test("connect with a token, subscribe, admin publish, client publish, history", { timeout: 30000 }, async () => {
  const c = sdk(a.sdkUrl, { token: token("alice") });
  c.connect();
  const ctx = await new Promise((resolve) => c.once("connected", resolve));
  assert.match(ctx.client, /^a\./, "the conn_id of node a");
  const sub = recorded(c.newSubscription("h:basic", { positioned: true, recoverable: true }));
  sub.subscribe();
  await sub.ready(5000);
  assert.equal(sub.subscribedCtx[0].recoverable, true);

  // Published through node b's server API, delivered by node a.
  const r = await b.api("publish", { channel: "h:basic", data: { text: "from the api" } });
  assert.equal(r.result.offset, 1);
  await until("admin publication", () => sub.pubs.length === 1);
  assert.deepEqual(sub.pubs[0].data, { text: "from the api" });
  assert.equal(sub.pubs[0].offset, 1);

  await sub.publish({ text: "from the sdk" });
  await until("own publication", () => sub.pubs.length === 2);
  assert.equal(sub.pubs[1].offset, 2);

  const h = await c.history("h:basic", { limit: 10 });
  assert.deepEqual(h.publications.map((p) => p.data.text), ["from the api", "from the sdk"]);
  assert.equal(h.offset, 2);
  assert.equal(h.epoch, r.result.epoch);

  await assert.rejects(c.rpc("nothing", {}), (e) => e.code === 104);
  await assert.rejects(c.presence("h:basic"), (e) => e.code === 108);
  await assert.rejects(c.publish("news", {}), (e) => e.code === 103);
});

test("an expiring token is refreshed through getToken without a disconnect", { timeout: 30000 }, async () => {
  let fetched = 0;
  const c = sdk(a.sdkUrl, {
    token: token("bob", 2),
    getToken: async () => { fetched++; return token("bob", 600); },
  });
  const sub = recorded(c.newSubscription("chat:refresh"));
  sub.subscribe();
  c.connect();
  await sub.ready(5000);
  // Past the first token's expiry and the node's grace period (1 s): still connected.
  await sleep(4500);
  assert.ok(fetched >= 1, "getToken was called");
  assert.equal(c.state, "connected");
  assert.deepEqual(c.events.map(([e]) => e), ["connecting", "connected"], JSON.stringify(c.events));
  await a.api("publish", { channel: "chat:refresh", data: "still here" });
  await until("publication after the refresh", () => sub.pubs.length === 1);
});

test("a v1 client and an SDK client exchange messages in one channel", { timeout: 30000 }, async () => {
  const v1 = new WebSocket(a.v1Url, { headers: { Authorization: `Bearer ${token("v1-user")}` } });
  const v1got = [];
  v1.on("message", (m) => v1got.push(JSON.parse(m)));
  await new Promise((resolve) => v1.once("open", resolve));
  v1.send(JSON.stringify({ type: "subscribe", channel: "chat:mixed", id: 1 }));
  await until("v1 subscribed", () => v1got.some((f) => f.type === "ack" && f.id === 1));

  const c = sdk(b.sdkUrl, { token: token("sdk-user") });
  const sub = recorded(c.newSubscription("chat:mixed"));
  sub.subscribe();
  c.connect();
  await sub.ready(5000);

  await sub.publish({ from: "sdk" });
  await until("v1 got the SDK's message", () =>
    v1got.some((f) => f.type === "message" && f.data.from === "sdk"));
  v1.send(JSON.stringify({ type: "publish", channel: "chat:mixed", data: { from: "v1" }, id: 2 }));
  await until("SDK got the v1 message", () => sub.pubs.some((p) => p.data.from === "v1"));
  v1.close();
});

test("a drained node: the SDK reconnects through nginx and recovers what it missed", { timeout: 60000 }, async () => {
  // A long enough first reconnect delay to publish into the gap.
  const c = sdk(nginx.url, { token: token("dana"), minReconnectDelay: 1500, maxReconnectDelay: 3000 });
  const sub = recorded(c.newSubscription("h:drain", { positioned: true, recoverable: true }));
  sub.subscribe();
  c.connect();
  await sub.ready(5000);
  for (let i = 1; i <= 3; i++) await a.api("publish", { channel: "h:drain", data: { n: i } });
  await until("live publications", () => sub.pubs.length === 3);

  const first = c.events.find(([e]) => e === "connected")[1].client;
  const [held, other] = first.startsWith("a.") ? [a, b] : [b, a];
  const drained = await held.admin("POST", "/v1/drain");
  assert.equal(drained.status, 202);
  await until("the drain's close", () => c.state === "connecting");
  const closed = c.events.filter(([e]) => e === "connecting").at(-1)[1];
  assert.equal(closed.code, 3001, JSON.stringify(closed));
  assert.match(closed.reason, /retry_after_ms=\d+/);
  // Missed while the client is away.
  for (let i = 4; i <= 6; i++) await other.api("publish", { channel: "h:drain", data: { n: i } });

  await until("resubscribed", () => sub.subscribedCtx.length === 2, 15000);
  const again = sub.subscribedCtx[1];
  assert.equal(again.wasRecovering, true);
  assert.equal(again.recovered, true, JSON.stringify(again));
  assert.equal(again.hasRecoveredPublications, true);
  const second = c.events.filter(([e]) => e === "connected").at(-1)[1].client;
  assert.ok(second.startsWith(`${other.node}.`), `reconnected to ${second}`);
  assert.equal(c.events.filter(([e]) => e === "disconnected").length, 0, "never gave up");

  await other.api("publish", { channel: "h:drain", data: { n: 7 } });
  await until("live again", () => sub.pubs.length === 7);
  assert.deepEqual(sub.pubs.map((p) => p.offset), [1, 2, 3, 4, 5, 6, 7], "each once, in order");
  assert.deepEqual(sub.pubs.map((p) => p.data.n), [1, 2, 3, 4, 5, 6, 7]);
  await held.admin("DELETE", "/v1/drain");
});

test("an operator disconnect stops the SDK", { timeout: 30000 }, async () => {
  const c = sdk(a.sdkUrl, { token: token("erin") });
  c.connect();
  await c.ready(5000);
  const r = await b.api("disconnect", { user: "erin" });
  assert.deepEqual(r, { result: {} });
  await until("disconnected", () => c.state === "disconnected");
  const [, ctx] = c.events.find(([e]) => e === "disconnected");
  assert.equal(ctx.code, 3503);
  await sleep(1500);
  assert.equal(c.state, "disconnected", "no reconnect");
});
