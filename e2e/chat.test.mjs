// The demo page in a real browser: Debian's headless chromium, driven by playwright-core.
// Pages open the chat served by a real gateway binary whose chat:* channels keep history:
// a message typed in one must show up in the other, carried by the browser's native
// WebSocket; a page opened later shows the last messages; and a page whose node drains
// (close 1012) waits the hinted retry_after_ms, reconnects and recovers what was said
// while it was away, once.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { launchChromium } from "./cluster.mjs";


const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const gatewayBin = process.env.GATEWAY_BIN || path.join(root, "target/debug/gateway");
let gateway, browser, port, adminPort;

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

async function waitHealthy(adminPort) {
  const deadline = Date.now() + 15000;
  while (Date.now() < deadline) {
    try {
      const r = await fetch(`http://127.0.0.1:${adminPort}/readyz`);
      if (r.ok) return;
    } catch {}
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("gateway did not become ready");
}

before(async () => {
  port = await freePort();
  adminPort = await freePort();
  gateway = spawn(gatewayBin, [
    "--allow-anonymous", "--publish-allow", "chat:*",
    "--channels", "chat:*?history_size=100&history_ttl_secs=600",
    // a drain closes within 0.8 s, with retry_after_ms hints of 500-1000 ms
    "--drain-window-ms", "1000",
    "--listen", `127.0.0.1:${port}`, "--admin-listen", `127.0.0.1:${adminPort}`,
  ], { stdio: ["ignore", "inherit", "inherit"] });
  await waitHealthy(adminPort);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  gateway?.kill("SIGTERM");
});

test("two tabs chat through the gateway", { timeout: 60000 }, async () => {
  const [a, b] = await Promise.all([browser.newPage(), browser.newPage()]);
  for (const p of [a, b]) {
    await p.goto(`http://127.0.0.1:${port}/`);
    await p.waitForFunction(() => document.getElementById("status").textContent.startsWith("connected"));
  }
  // The subscribe ack has arrived once a publish from the same page echoes back; send a
  // probe from b first so that a's later message is sure to find b subscribed.
  await b.fill("#name", "bob");
  await b.fill("#text", "probe");
  await b.click("#send");
  await b.waitForFunction(() => document.getElementById("log").textContent.includes("bob: probe"));

  await a.fill("#name", "alice");
  await a.fill("#text", "hello from tab A");
  await a.click("#send");
  await b.waitForFunction(
    () => document.getElementById("log").textContent.includes("alice: hello from tab A"),
    null, { timeout: 10000 },
  );
  assert.match(await b.textContent("#log"), /alice: hello from tab A/);
  assert.match(await a.textContent("#log"), /alice: hello from tab A/);
});

const logOf = (p) => p.textContent("#log");
const statusOf = (p) => p.textContent("#status");

async function admin(method, path, body) {
  const r = await fetch(`http://127.0.0.1:${adminPort}${path}`, {
    method,
    body: body && JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

test("a new tab shows the last messages", { timeout: 60000 }, async () => {
  const c = await browser.newPage();
  await c.goto(`http://127.0.0.1:${port}/`);
  await c.waitForFunction(() => document.getElementById("status").textContent.includes("subscribed"));
  const log = await logOf(c);
  assert.match(log, /— the last \d+ messages —/);
  assert.match(log, /alice: hello from tab A/, "said before this tab opened");
  await c.close();
});

test("a drained tab honours retry_after_ms and recovers what it missed", { timeout: 60000 }, async () => {
  const p = await browser.newPage();
  await p.goto(`http://127.0.0.1:${port}/`);
  await p.waitForFunction(() => document.getElementById("status").textContent.includes("subscribed"));

  // the node drains: every page gets 1012 with a hint, and the node refuses new ones
  assert.equal((await admin("POST", "/v1/drain")).status, 202);
  await p.waitForFunction(() => document.getElementById("status").textContent.startsWith("closed (1012"));
  const closed = await statusOf(p);
  const m = /retry_after_ms=(\d+)\); reconnecting in (\d+) ms/.exec(closed);
  assert.ok(m, closed);
  const [hint, delay] = [Number(m[1]), Number(m[2])];
  assert.ok(hint >= 500 && delay >= hint && delay <= hint + 1000, closed);

  // said while the page is away
  const published = await admin("POST", "/v1/channels/chat:lobby/publish",
    { data: { user: "backend", text: "said while away" } });
  assert.equal(published.status, 200);
  assert.ok(published.body.offset > 0, JSON.stringify(published.body));
  assert.equal((await admin("DELETE", "/v1/drain")).status, 200);

  await p.waitForFunction(
    () => document.getElementById("log").textContent.includes("backend: said while away"),
    null, { timeout: 20000 },
  );
  await p.waitForFunction(() => document.getElementById("status").textContent.includes("recovered"));
  const log = await logOf(p);
  assert.equal(log.split("backend: said while away").length - 1, 1, "recovered once");
  assert.match(log, /— recovered 1 message —/);
  await p.close();
});
