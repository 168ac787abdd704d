// The demo page in a real browser: Debian's headless chromium, driven by playwright-core.
// Two pages open the chat served by a real gateway binary; a message typed in one must show
// up in the other, carried by the browser's native WebSocket.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const gatewayBin = process.env.GATEWAY_BIN || path.join(root, "target/debug/gateway");
let gateway, browser, port;

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
  const adminPort = await freePort();
  gateway = spawn(gatewayBin, [
    "--allow-anonymous", "--publish-allow", "chat:*",
    "--listen", `127.0.0.1:${port}`, "--admin-listen", `127.0.0.1:${adminPort}`,
  ], { stdio: ["ignore", "inherit", "inherit"] });
  await waitHealthy(adminPort);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 30000,
  });
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
