// The HTTP fallback transports behind nginx round-robin (not sticky) over three nodes on one
// Redis: the stock centrifuge SDK over http_stream in Node and over sse in real Chromium
// with window.WebSocket removed (connect, subscribe, publish, receive, presence, with
// /emulation posts that land on other nodes and are forwarded), a drain that moves an
// emulated session to another node with recovery, and a plain EventSource on /sse whose
// node is killed: the browser reconnects through nginx to another node and receives every
// publication it missed, once, in order.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Centrifuge } from "centrifuge";
import {
  startRedis, startGateway, startNginx, launchChromium, recordEvents, recorded, jwt, now, until, sleep, SECRET,
} from "./cluster.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
let redis, nodes, nginx, browser;
const clients = [];

const args = (id) => [
  "--node-id", id, "--redis-url", redis.url, "--jwt-secret", SECRET,
  "--publish-allow", "h:*,p:*", "--allow-anonymous",
  "--channels", "h:*?history_size=100&history_ttl_secs=300 p:*?presence",
  "--node-heartbeat-ms", "200", "--node-ttl-ms", "1000", "--rebalance", "false",
  "--drain-window-ms", "300", "--ping-interval-ms", "2000",
  "--handshake-rate-per-ip", "1000", "--handshake-burst-per-ip", "1000",
];

before(async () => {
  redis = await startRedis();
  nodes = await Promise.all(["a", "b", "c"].map((id) => startGateway(args(id))));
  nginx = await startNginx(nodes.map((n) => n.port));
  browser = await launchChromium();
});

after(async () => {
  for (const c of clients) c.disconnect();
  await browser?.close();
  nginx?.stop();
  for (const n of nodes ?? []) n.stop();
  redis?.stop();
});

const token = (sub, ttl = 600) => jwt({ sub, exp: now() + ttl });

/** The sum over the live nodes of one series of `gateway_emulation_requests_total`. */
async function emulation(outcome) {
  let n = 0;
  for (const node of nodes) {
    if (node.child.exitCode !== null || node.child.signalCode !== null) continue;
    const text = await (await node.admin("GET", "/metrics")).text();
    const line = text.split("\n").find((l) =>
      l.startsWith("gateway_emulation_requests_total{") && l.includes(`outcome="${outcome}"`));
    if (line) n += Number(line.split(" ").at(-1));
  }
  return n;
}

function httpStream(options) {
  const c = new Centrifuge(
    [{ transport: "http_stream", endpoint: `${nginx.http}/connection/http_stream` }],
    { emulationEndpoint: `${nginx.http}/emulation`, ...options },
  );
  clients.push(c);
  return recordEvents(c);
}

test("http_stream: connect, subscribe, publish, receive, presence; posts are forwarded", { timeout: 60000 }, async () => {
  const forwardedBefore = await emulation("forwarded");
  const c = httpStream({ token: token("alice") });
  const sub = recorded(c.newSubscription("p:room"));
  sub.subscribe();
  c.connect();
  await sub.ready(10000);
  const connected = c.events.find(([e]) => e === "connected")[1];
  assert.equal(connected.transport, "http_stream");
  await sub.publish({ from: "sdk" });
  await until("own publication", () => sub.pubs.some((p) => p.data.from === "sdk"));
  await nodes[2].api("publish", { channel: "p:room", data: { from: "api" } });
  await until("admin publication", () => sub.pubs.some((p) => p.data.from === "api"));
  const presence = await sub.presence();
  const clientsIn = Object.values(presence.clients);
  assert.ok(clientsIn.some((ci) => ci.client === connected.client && ci.user === "alice"),
    JSON.stringify(presence));
  const stats = await sub.presenceStats();
  assert.equal(stats.numClients, 1);
  // Three round-robin nodes: most of the posts (subscribe, publish, presence...) land on a
  // node other than the stream's.
  assert.ok(await emulation("forwarded") > forwardedBefore, "no post was forwarded");
  assert.equal(c.events.filter(([e]) => e === "disconnected").length, 0);
});

test("a drained node moves its emulated sessions to other nodes, which recover", { timeout: 60000 }, async () => {
  const c = httpStream({ token: token("dana"), minReconnectDelay: 1500, maxReconnectDelay: 3000 });
  const sub = recorded(c.newSubscription("h:drain", { positioned: true, recoverable: true }));
  sub.subscribe();
  c.connect();
  await sub.ready(10000);
  for (let i = 1; i <= 3; i++) await nodes[0].api("publish", { channel: "h:drain", data: { n: i } });
  await until("live publications", () => sub.pubs.length === 3);
  const first = c.events.find(([e]) => e === "connected")[1].client;
  const held = nodes.find((n) => first.startsWith(`${n.node}.`));
  const other = nodes.find((n) => n !== held);
  assert.equal((await held.admin("POST", "/v1/drain")).status, 202);
  await until("the drain's close", () => c.state === "connecting");
  const closed = c.events.filter(([e]) => e === "connecting").at(-1)[1];
  assert.equal(closed.code, 3001, JSON.stringify(closed));
  for (let i = 4; i <= 6; i++) await other.api("publish", { channel: "h:drain", data: { n: i } });
  await until("resubscribed", () => sub.subscribedCtx.length === 2, 20000);
  const again = sub.subscribedCtx[1];
  assert.equal(again.recovered, true, JSON.stringify(again));
  const second = c.events.filter(([e]) => e === "connected").at(-1)[1].client;
  assert.ok(!second.startsWith(`${held.node}.`), `reconnected to the drained node: ${second}`);
  await other.api("publish", { channel: "h:drain", data: { n: 7 } });
  await until("live again", () => sub.pubs.length === 7);
  assert.deepEqual(sub.pubs.map((p) => p.offset), [1, 2, 3, 4, 5, 6, 7], "each once, in order");
  assert.equal(c.events.filter(([e]) => e === "disconnected").length, 0, "never gave up");
  await held.admin("DELETE", "/v1/drain");
});

test("sse in Chromium without WebSocket: connect, subscribe, publish, receive, presence", { timeout: 60000 }, async () => {
  const page = await browser.newPage();
  await page.addInitScript(() => { delete window.WebSocket; window.WebSocket = undefined; });
  await page.goto(`${nginx.http}/`);
  await page.addScriptTag({ path: path.join(here, "node_modules/centrifuge/dist/centrifuge.js") });
  const forwardedBefore = await emulation("forwarded");
  const result = await page.evaluate(async (tok) => {
    if (typeof window.WebSocket === "function") throw new Error("WebSocket still there");
    const c = new Centrifuge([{ transport: "sse", endpoint: "/connection/sse" }],
      { token: tok, emulationEndpoint: "/emulation" });
    const got = [];
    let transport;
    c.on("connected", (ctx) => { transport = ctx.transport; });
    const sub = c.newSubscription("p:browser");
    sub.on("publication", (ctx) => got.push(ctx.data));
    sub.subscribe();
    c.connect();
    await sub.ready(10000);
    await sub.publish({ from: "browser" });
    const deadline = Date.now() + 10000;
    while (!got.some((d) => d.from === "browser") && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const presence = await sub.presence();
    c.disconnect();
    return { transport, got, members: Object.values(presence.clients).map((ci) => ci.user) };
  }, token("bob"));
  assert.equal(result.transport, "sse");
  assert.ok(result.got.some((d) => d.from === "browser"), JSON.stringify(result));
  assert.deepEqual(result.members, ["bob"]);
  assert.ok(await emulation("forwarded") > forwardedBefore, "no post was forwarded");
  await page.close();
});

test("EventSource on /sse: its node is killed, another node recovers what it missed", { timeout: 60000 }, async () => {
  const page = await browser.newPage();
  await page.goto(`${nginx.http}/`);
  await page.evaluate(() => {
    window.got = [];
    window.welcomes = [];
    window.subscribed = [];
    const es = new EventSource("/sse?channel=h:es&channel=p:es");
    es.onmessage = (e) => {
      const f = JSON.parse(e.data);
      if (f.type === "message") window.got.push(f);
      if (f.type === "welcome") window.welcomes.push(f.node_id);
      if (f.type === "subscribed") window.subscribed.push(f);
    };
  });
  const got = () => page.evaluate(() => window.got.map((f) => f.data.n));
  await until("subscribed", async () => (await page.evaluate(() => window.subscribed.length)) === 2);
  for (let i = 1; i <= 3; i++) await nodes[0].api("publish", { channel: "h:es", data: { n: i } });
  await until("live", async () => (await got()).length === 3);
  const [serving] = await page.evaluate(() => window.welcomes);
  const victim = nodes.find((n) => n.node === serving);
  const survivor = nodes.find((n) => n !== victim && n.child.exitCode === null && n.child.signalCode === null);
  victim.stop();
  // Missed while the browser reconnects.
  for (let i = 4; i <= 6; i++) await survivor.api("publish", { channel: "h:es", data: { n: i } });
  await until("reconnected elsewhere", async () => (await page.evaluate(() => window.welcomes.length)) === 2, 20000);
  const second = (await page.evaluate(() => window.welcomes))[1];
  assert.notEqual(second, serving);
  await until("recovered", async () => (await got()).length >= 6, 10000);
  await survivor.api("publish", { channel: "h:es", data: { n: 7 } });
  await until("live again", async () => (await got()).length >= 7);
  await sleep(300);
  assert.deepEqual(await got(), [1, 2, 3, 4, 5, 6, 7], "each once, in order");
  const resub = (await page.evaluate(() => window.subscribed)).filter((s) => s.channel === "h:es");
  assert.equal(resub.length, 2);
  assert.equal(resub[1].recovered, true, JSON.stringify(resub));
  await page.close();
});
