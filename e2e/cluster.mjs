// A small cluster for the SDK tests: a private redis-server, gateway processes that bind
// their own ports (read from their `gateway serving` log line), and nginx round-robin in
// front of them. Servers that cannot be told to pick a port (redis-server, nginx) retry on
// random ports until one binds; nothing here binds a port to release it for someone else.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync, readFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const gatewayBin = process.env.GATEWAY_BIN || path.join(root, "target/debug/gateway");
export const SECRET = "sdk-e2e-secret-0123456789-abcdefghij";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A port in 20000..32000: below Linux's ephemeral range, away from 6379. */
function randomPort() {
  return 20000 + Math.floor(Math.random() * 12000);
}

async function until(what, check, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await check();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await sleep(50);
  }
}

function listening(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.on("connect", () => { s.destroy(); resolve(true); });
    s.on("error", () => resolve(false));
  });
}

function exited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

/** redis-server on a random port; retried when the port is taken. */
export async function startRedis() {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = randomPort();
    const child = spawn("redis-server", [
      "--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
    ], { stdio: "ignore" });
    const up = await until("redis", async () => exited(child) ? "exited" : (await listening(port)) && "up", 5000)
      .catch(() => "slow");
    if (up === "up") return { port, url: `redis://127.0.0.1:${port}`, stop: () => child.kill("SIGKILL") };
    child.kill("SIGKILL");
  }
  throw new Error("no port for redis-server");
}

/** A gateway process on ports of its own choosing. */
export async function startGateway(args) {
  const child = spawn(gatewayBin, [
    "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json", ...args,
  ], { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  const addrs = await new Promise((resolve, reject) => {
    let buf = "";
    child.stderr.on("data", (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (process.env.GATEWAY_LOGS) process.stderr.write(line + "\n");
        log += line + "\n";
        try {
          const f = JSON.parse(line).fields;
          if (f.message === "gateway serving") {
            const port = (s) => Number(/:(\d+)\)$/.exec(s)[1]);
            resolve({ port: port(f.listen), admin: port(f.admin), node: f.node });
          }
        } catch {}
      }
    });
    child.on("exit", () => reject(new Error(`gateway exited:\n${log}`)));
  });
  const g = {
    ...addrs,
    child,
    api: (method, body) => api(addrs.admin, method, body),
    admin: (method, p, body) => fetch(`http://127.0.0.1:${addrs.admin}${p}`, { method, body }),
    sdkUrl: `ws://127.0.0.1:${addrs.port}/connection/websocket`,
    v1Url: `ws://127.0.0.1:${addrs.port}/ws`,
    stop: () => child.kill("SIGKILL"),
  };
  await until("gateway ready", async () => {
    try { return (await fetch(`http://127.0.0.1:${addrs.admin}/readyz`)).ok; } catch { return false; }
  });
  return g;
}

/** Centrifugo's server API on a node's admin port. */
export async function api(adminPort, method, body) {
  const r = await fetch(`http://127.0.0.1:${adminPort}/api/${method}`, {
    method: "POST", body: JSON.stringify(body ?? {}),
  });
  return r.json();
}

function nginxBinary() {
  return existsSync("/usr/sbin/nginx") ? "/usr/sbin/nginx" : "nginx";
}

/** nginx round-robin over `upstreams` (public ports); retried when its port is taken. */
export async function startNginx(upstreams) {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = randomPort();
    const dir = mkdtempSync(path.join(tmpdir(), "gw-sdk-nginx-"));
    const servers = upstreams.map((p) => `    server 127.0.0.1:${p} max_fails=0;\n`).join("");
    const id = `${dir}:${port}`;
    writeFileSync(path.join(dir, "nginx.conf"), `daemon off;
master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path ${dir}; proxy_temp_path ${dir}; fastcgi_temp_path ${dir};
  uwsgi_temp_path ${dir}; scgi_temp_path ${dir};
  # Upgrade only what asks to be upgraded: the HTTP transports' posts and streams are
  # plain requests (docs/sdk.md, "nginx").
  map $http_upgrade $connection_upgrade { default upgrade; "" ""; }
  upstream gateway {
${servers}    keepalive 16;
  }
  server {
    listen 127.0.0.1:${port};
    location = /id { return 200 "${id}"; }
    location / {
      proxy_pass http://gateway;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_connect_timeout 1s;
      proxy_read_timeout 3600s;
      # A draining node answers the upgrade 503: the next node takes it.
      proxy_next_upstream error timeout http_503;
    }
  }
}
`);
    const errorLog = path.join(dir, "error.log");
    const child = spawn(nginxBinary(), ["-e", errorLog, "-p", dir, "-c", path.join(dir, "nginx.conf")],
      { stdio: "ignore" });
    const up = await until("nginx", async () => {
      const log = existsSync(errorLog) ? readFileSync(errorLog, "utf8") : "";
      if (log.includes("bind() to") || exited(child)) return "refused";
      try {
        const r = await fetch(`http://127.0.0.1:${port}/id`);
        return (await r.text()) === id && "up";
      } catch { return false; }
    }, 5000).catch(() => "slow");
    if (up === "up") {
      return {
        port,
        url: `ws://127.0.0.1:${port}/connection/websocket`,
        http: `http://127.0.0.1:${port}`,
        stop: () => child.kill("SIGKILL"),
      };
    }
    child.kill("SIGKILL");
  }
  throw new Error("no port for nginx");
}

/** An HS256 token for `claims`. */
export function jwt(claims, secret = SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64(claims);
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

export const now = () => Math.floor(Date.now() / 1000);

/** Debian's headless chromium, driven by playwright-core. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
    timeout: 30000,
  });
}

/** Records an SDK client's state events in `c.events` as `[name, ctx]`. */
export function recordEvents(c) {
  c.events = [];
  for (const e of ["connecting", "connected", "disconnected", "error"]) {
    c.on(e, (ctx) => c.events.push([e, ctx]));
  }
  return c;
}

/** Records a subscription's publications (`sub.pubs`) and `subscribed` contexts. */
export function recorded(sub) {
  sub.pubs = [];
  sub.subscribedCtx = [];
  sub.on("publication", (ctx) => sub.pubs.push(ctx));
  sub.on("subscribed", (ctx) => sub.subscribedCtx.push(ctx));
  return sub;
}

export { until, sleep };
