#!/usr/bin/env python3
"""Reads the JSON results of scripts/bench.sh.

  bench_report.py half-peak DIR S   message rate at half the best 2-node fan-out delivery rate
  bench_report.py check DIR         every expected result present, well-formed and non-zero
  bench_report.py report DIR OUT.md docs/benchmarks.md (+ charts under docs/img/ when
                                    matplotlib can be imported)
"""
import glob
import json
import os
import platform
import re
import subprocess
import sys

REQUIRED = [
    "idle-gateway", "idle-floor", "idle-gateway-tls", "idle-floor-tls", "idle-gateway-2procs",
    "fanout-2nodes-half", "unicast", "storm-plain", "storm-tls", "storm-tls-hs256",
    "storm-tls-rs256", "storm-floor", "storm-floor-tls", "churn", "recovery-storm", "presence-stats",
    "presence-fanout", "presence-churn-on", "presence-churn-off",
    "emulation-rtt-same", "emulation-rtt-forwarded", "idle-gateway-subscribed", "history-memory",
]
# Prefixes of which at least one result must exist (one per rate in the run).
REQUIRED_PREFIXES = ["fanout-gateway-r", "fanout-floor-r", "fanout-2nodes-r", "burst-gateway-r",
                     "burst-floor-r", "history-off-r", "history-on-r", "stomp-r", "stomp-v1-r",
                     "centrifugo-r", "centrifugo-v1-r",
                     "transport-ws-r", "transport-http-stream-r", "transport-sse-r"]


def load(d):
    out = {}
    for p in sorted(glob.glob(os.path.join(d, "*.json"))):
        with open(p) as f:
            out[os.path.basename(p)[:-5]] = json.load(f)
    return out


def ok_delivery(r):
    return r["expected"] > 0 and r["delivered"] >= 0.99 * r["expected"]


def half_peak(d, s):
    runs = [r for k, r in load(d).items() if k.startswith("fanout-2nodes-r")]
    good = [r for r in runs if ok_delivery(r)] or runs
    peak = max(r["deliveries_per_sec"] for r in good)
    print(max(1, round(peak / s / 2)))


def check(d):
    res = load(d)
    passed, failed = 0, []

    def expect(name, cond, why):
        nonlocal passed
        if cond:
            passed += 1
        else:
            failed.append(f"{name}: {why}")

    for name in REQUIRED:
        expect(name, name in res, "missing")
    for pre in REQUIRED_PREFIXES:
        expect(pre + "*", any(k.startswith(pre) for k in res), "missing")
    for name, r in res.items():
        sc = r.get("scenario")
        if sc == "idle":
            expect(name, r["connections"] > 0 and r["failed"] == 0, "connections failed")
            expect(name, r["rss_after_bytes"] > 0 and r["rss_per_conn_bytes"] != 0, "no RSS figure")
            if "redis_bytes_per_conn" in r:
                expect(name, r["redis_bytes_per_conn"] > 0, "no Redis memory figure")
        elif sc == "history-memory":
            expect(name, r["redis_bytes_per_publication"] > 0, "no Redis memory figure")
        elif sc in ("fanout", "unicast", "streams"):
            expect(name, r["delivered"] > 0 and r["deliveries_per_sec"] > 0, "nothing delivered")
            expect(name, r["latency"]["count"] > 0 and r["latency"]["p99_ms"] > 0, "no latency")
            expect(name, r["server_cpu_secs"] >= 0, "no CPU figure")
        elif sc == "connect-storm":
            expect(name, r["handshakes"] > 0 and r["failed"] == 0, "handshakes failed")
            expect(name, r["handshakes_per_sec"] > 0, "no rate")
        elif sc == "recovery-storm":
            expect(name, r["clients"] > 0 and r["complete"] == r["clients"],
                   "not every client recovered every publication")
            expect(name, r["history_reads"] > 0, "no history read counted")
        elif sc == "presence":
            expect(name, r["num_clients_seen"] >= r["members"] - 1, "presence_stats counted too few")
            expect(name, r["stats_p99_ms"] > 0, "no latency")
            expect(name, r["join_leave_delivered"] == r["join_leave_expected"],
                   f"join/leave frames: {r['join_leave_delivered']} of {r['join_leave_expected']}")
        elif sc == "emulation_rtt":
            expect(name, r["posts"] > 0 and r["latency"]["p99_ms"] > 0, "no round trip")
        elif sc == "churn":
            expect(name, r["cycles"] > 0, "no cycle")
            expect(name, r["keys_back_to_baseline"], "Redis keys did not come back")
        else:
            expect(name, False, f"unknown scenario {sc!r}")
    for f in failed:
        print("FAIL", f)
    print(f"bench results: {passed} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def machine():
    cpu = sh("lscpu | sed -n 's/^Model name: *//p'") or platform.processor()
    mem = sh("awk '/MemTotal/ {printf \"%.1f GiB\", $2/1048576}' /proc/meminfo")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical CPUs",
        f"- Memory: {mem}",
        f"- Kernel: {platform.release()}",
        "- " + sh("rustc --version") + ", " + sh("redis-server --version | cut -d' ' -f1-3"),
        "- Load generator, servers and Redis all share this machine (loopback); the load "
        "generator competes with the servers for the same CPUs.",
    ]


def f0(x):
    return f"{x:,.0f}"


def f2(x):
    return f"{x:,.2f}"


def ratio(a, b):
    return f"{a / b:.2f}×" if b else "n/a"


# Targets of issue 19's TLS rows.
IDLE_TLS_TARGET = 6144        # bytes of RSS per idle wss:// connection at 5k connections
STORM_TLS_TARGET = 1.2        # CPU per TLS handshake, gateway vs the TLS floor

# Before/after figures of the fixes recorded in docs/profiling.md (earlier runs, not this one).
HISTORY = [
    ("idle RSS per plain connection, 15k connections (≤ 2,048 B)", "4,060 B (no Redis), "
     "4,071 B (Redis) by hand at 6307d19; 4,231 B (make bench)", "2,294 B (no Redis), "
     "2,473–2,620 B (Redis) by hand (missed)", "one task per connection holding reader and "
     "writer inline; pings and shutdown through a node-wide registry instead of a timer and "
     "a token per connection; rarely used state boxed; one shared connection id"),
    ("idle RSS per wss:// connection, 5k connections (≤ 6,144 B)", "12,144 B (make bench); "
     "12,337–12,860 B by hand", "8,437–8,843 B by hand (missed)", "own TLS stream over rustls' "
     "unbuffered API: no 4 KiB record buffer per idle connection, reader and writer on "
     "clones of one stream instead of tokio's split lock over hyper's boxed `Upgraded`"),
    ("TLS handshake CPU vs the TLS floor (≤ 1.2×)", "1.19× by hand (quiet), 1.25–1.31× "
     "under load", "1.16× by hand (quiet), 1.31–1.36× under load", "two sends fewer per "
     "handshake (TLS 1.3 tickets go with the 101, the close frame with close_notify); "
     "within this shared machine's noise"),
    ("idle RSS per plain connection, 15k connections (≤ 4 KiB)", "17,510 B (29d5ccc)",
     "3,334–3,771 B", "short-lived states boxed; own frame reader with no standing read "
     "buffer; connection futures without duplicated arguments"),
    ("fan-out CPU vs floor at 50 / 100 msg/s (≤ 1.2×)", "1.23–1.32× / 1.25×",
     "1.09–1.16× / 1.14–1.16×", "plain TCP on its own socket with vectored `sendmsg`; "
     "per-connection shutdown token; sampled latency histogram; no write timer unless blocked"),
    ("p99 at half peak, 2 nodes (≤ 10 ms)", "81.3 ms at 83 msg/s (ramp to 400)",
     "9.2–10.6 ms at 339–340 msg/s (ramp to 800)", "load generator: no timer per frame, "
     "one histogram instead of one per receiver; the peak measured at saturation"),
    ("STOMP fan-out CPU vs v1 at 100 / 400 msg/s (≤ 1.1×)", "1.12× / 1.18× (make bench); "
     "medians 1.09× / 1.17× by hand", "medians 1.06× / 1.03× by hand (shared machine)",
     "`message-id` in the shared tail; subscription headers encoded at SUBSCRIBE; alike "
     "subscriptions share one frame per message; no allocation per delivery; the token "
     "clock read only when it moved"),
]


def strace_writes(path):
    """Write-type calls counted by `strace -c` (write, writev, sendto, sendmsg), by name."""
    calls = {}
    try:
        with open(path) as fh:
            for line in fh:
                f = line.split()
                if len(f) >= 5 and f[-1] in ("write", "writev", "sendto", "sendmsg"):
                    calls[f[-1]] = int(f[3])
    except OSError:
        return None
    return calls


def burst_section(res, d):
    rates = sorted({int(m.group(1)) for k in res for m in [re.match(r"burst-gateway-r(\d+)$", k)] if m})
    if not rates:
        return []
    burst = res[f"burst-gateway-r{rates[0]}"].get("burst", "?")
    L = ["", f"### Bursts ({burst} messages per tick, one Redis pipeline)", "",
         f"The publisher sends {burst} messages back to back at each tick (same average rate), so "
         f"several frames queue per socket. The gateway writes a socket's whole queue with one "
         f"vectored `sendmsg`; the floor (fastwebsockets `write_frame`) makes one `send` per "
         f"frame (system call counts below).", "",
         "| rate (msg/s) | server | delivered/s | lost | CPU µs/delivery | vs floor | p50 ms | p99 ms |",
         "|---:|---|---:|---:|---:|---:|---:|---:|"]
    worst = None
    for rate in rates:
        g, f = res.get(f"burst-gateway-r{rate}"), res.get(f"burst-floor-r{rate}")
        for r in (g, f):
            if not r:
                continue
            rt = ""
            if r is g and f:
                rt = ratio(g["cpu_per_delivery_us"], f["cpu_per_delivery_us"])
            L.append(f"| {rate} | {r['label']} | {f0(r['deliveries_per_sec'])} | {f0(r['lost'])} | "
                     f"{f2(r['cpu_per_delivery_us'])} | {rt} | {f2(r['latency']['p50_ms'])} | "
                     f"{f2(r['latency']['p99_ms'])} |")
        if g and f and f["cpu_per_delivery_us"] > 0 and ok_delivery(g) and ok_delivery(f):
            x = g["cpu_per_delivery_us"] / f["cpu_per_delivery_us"]
            worst = x if worst is None else max(worst, x)
    if worst is not None:
        L += ["", f"Target CPU per delivery with ≥ 8 frames queued ≤ 0.5× the floor: "
              f"**{'met' if worst <= 0.5 else 'MISSED'}** (worst ratio {worst:.2f}×)."]
    rows = []
    for who in ("gateway", "floor"):
        calls, r = strace_writes(os.path.join(d, f"syscalls-{who}.txt")), res.get(f"syscalls-{who}")
        if calls is None or not r or not r["delivered"]:
            continue
        total = sum(calls.values())
        by = ", ".join(f"{n} {f0(c)}" for n, c in sorted(calls.items()))
        rows.append(f"| {who} | {f0(r['delivered'])} | {by} | {total / r['delivered']:.3f} |")
    if rows:
        L += ["", "Write system calls counted with `strace -c -f` on each server during a separate "
              "run (200 subscribers, 400 msg/s in bursts of the same size, 2 s; strace slows "
              "every call, so this run gives counts only):", "",
              "| server | deliveries | write-type calls | calls/delivery |", "|---|---:|---|---:|"] + rows
    else:
        L += ["", "Syscall count not run (strace absent; `make bench` installs it)."]
    return L


def round_two_row(name, value, target, unit, met, how):
    return (f"| {name} | {value} | {target} | **{'met' if met else 'MISSED'}** | {how} |")


def round_two_section(res):
    """The targets of performance round two (issue 19), each from this run."""
    L = ["", "## Performance round two: targets", "",
         "Each row is measured in this run; ratios are against a figure of the same run. Where a "
         "row is missed, [profiling.md](profiling.md) has the profile and the explanation.", "",
         "| measure | this run | target | | how |", "|---|---:|---:|---|---|"]
    g = res.get("idle-gateway")
    if g:
        v = g["rss_per_conn_bytes"]
        L.append(round_two_row("idle `ws://`, RSS per connection", f"{f0(v)} B", "≤ 2,048 B", "",
                            v <= 2048, f"`loadtest idle`, {f0(g['connections'])} connections"))
    t = res.get("idle-gateway-tls")
    if t:
        v = t["rss_per_conn_bytes"]
        L.append(round_two_row("idle `wss://`, RSS per connection", f"{f0(v)} B", "≤ 6,144 B", "",
                            v <= 6144, f"`loadtest idle`, {f0(t['connections'])} connections"))
    sub = res.get("idle-gateway-subscribed")
    if g and sub:
        d = sub["rss_per_conn_bytes"] - g["rss_per_conn_bytes"]
        L.append(round_two_row("idle + 1 history & presence subscription", f"{f0(sub['rss_per_conn_bytes'])} B (+{f0(d)} B)",
                            "≤ idle + 512 B", "", d <= 512,
                            "every connection subscribed to one channel with history and presence"))
    sp, sf = res.get("storm-plain"), res.get("storm-floor")
    if sp and sf and sf["cpu_per_handshake_us"]:
        r = sp["cpu_per_handshake_us"] / sf["cpu_per_handshake_us"]
        L.append(round_two_row("plain handshake CPU vs floor", f"{r:.2f}×", "≤ 1.3×", "", r <= 1.3,
                            f"`loadtest connect-storm`, {f0(sp['cpu_per_handshake_us'])} vs "
                            f"{f0(sf['cpu_per_handshake_us'])} µs"))
    st, stf = res.get("storm-tls"), res.get("storm-floor-tls")
    if st and stf and stf["cpu_per_handshake_us"]:
        r = st["cpu_per_handshake_us"] / stf["cpu_per_handshake_us"]
        L.append(round_two_row("TLS handshake CPU vs a TLS floor", f"{r:.2f}×", "≤ 1.2×", "", r <= 1.2,
                            f"{f0(st['cpu_per_handshake_us'])} vs {f0(stf['cpu_per_handshake_us'])} µs"))
    u = res.get("unicast")
    if u:
        ok = (u["deliveries_per_sec"] >= 50000 and u["latency"]["p99_ms"] <= 10
              and u["cpu_per_delivery_us"] <= 10)
        L.append(round_two_row("unicast, 2 nodes", f"{f0(u['deliveries_per_sec'])}/s, p99 "
                            f"{f2(u['latency']['p99_ms'])} ms, {f2(u['cpu_per_delivery_us'])} µs",
                            "≥ 50,000/s, p99 ≤ 10 ms, ≤ 10 µs", "", ok, "`loadtest unicast`"))
    if g and "redis_records_bytes_per_conn" in g:
        v = g["redis_records_bytes_per_conn"]
        L.append(round_two_row("Redis memory per connection (directory records)", f"{f0(v)} B",
                            "≤ 200 B", "", v <= 200,
                            f"`used_memory` growth less the inbound stream's (its connect event: "
                            f"{f0(g['redis_inbound_bytes_per_conn'])} B, capped by `inbound_maxlen`)"))
    if sub and "redis_records_bytes_per_conn" in sub:
        L.append(f"| Redis memory per subscribed connection (records + presence) | "
                 f"{f0(sub['redis_records_bytes_per_conn'])} B | report | | the same, subscribed |")
    h = res.get("history-memory")
    if h:
        L.append(f"| Redis memory per history publication of {h['payload_bytes']} B | "
                 f"{f0(h['redis_bytes_per_publication'])} B | report | | `loadtest history-memory`: "
                 f"{h['channels']} channels × {h['per_channel']} (their full history) |")
    fr = [k for k in res if k.startswith("fanout-gateway-r")]
    worst = None
    for k in fr:
        fk = "fanout-floor-r" + k[len("fanout-gateway-r"):]
        if fk in res and res[fk]["cpu_per_delivery_us"]:
            rr = res[k]["cpu_per_delivery_us"] / res[fk]["cpu_per_delivery_us"]
            worst = rr if worst is None else max(worst, rr)
    if worst is not None:
        L.append(round_two_row("fan-out CPU vs floor, steady (worst rate)", f"{worst:.2f}×",
                            "≤ 1.16× (round one)", "", worst <= 1.16, "fan-out table above"))
    hp = res.get("fanout-2nodes-half")
    if hp:
        v = hp["latency"]["p99_ms"]
        L.append(round_two_row("p99 at half peak, 2 nodes", f"{f2(v)} ms", "≤ 10 ms", "", v <= 10,
                            f"{hp['rate']} msg/s × {f0(hp['receivers'])} subscribers"))
    return L


def history_section(res):
    """History on (FCALL gw_publish, offsets checked per subscriber) against off (PUBLISH)."""
    L = ["", "## History", "",
         "One node, the same subscribers and rate, a plain channel published with `PUBLISH` "
         "against a history channel (`history_size=100`) published with `FCALL gw_publish`. "
         "Latency is publish → client receipt, so the history row includes the function's "
         "append.", "",
         "| rate (msg/s) | history | delivered/s | lost | CPU µs/delivery | on vs off | p50 ms | p99 ms | p99.9 ms |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rates = sorted({int(m.group(1)) for k in res for m in [re.match(r"history-on-r(\d+)$", k)] if m})
    ratios = []
    for rate in rates:
        off, on = res.get(f"history-off-r{rate}"), res.get(f"history-on-r{rate}")
        for r in (off, on):
            if not r:
                continue
            lat = r["latency"]
            rt = ratio(r["cpu_per_delivery_us"], off["cpu_per_delivery_us"]) if (off and r is on) else ""
            L.append(f"| {rate} | {'on' if r is on else 'off'} | {f0(r['deliveries_per_sec'])} | "
                     f"{f0(r['lost'])} | {f2(r['cpu_per_delivery_us'])} | {rt} | {f2(lat['p50_ms'])} | "
                     f"{f2(lat['p99_ms'])} | {f2(lat['p999_ms'])} |")
        if off and on and off["cpu_per_delivery_us"] > 0:
            ratios.append((rate, on["cpu_per_delivery_us"] / off["cpu_per_delivery_us"]))
    if ratios:
        worst = max(x for _, x in ratios)
        L += ["", f"Target CPU per delivery with history ≤ 1.1× without: "
              f"**{'met' if worst <= 1.1 else 'MISSED'}** "
              f"({', '.join(f'{r} msg/s: {x:.2f}×' for r, x in ratios)})."]
    st = res.get("recovery-storm")
    if st:
        L += ["", "### Recovery storm", "",
              f"{f0(st['clients'])} clients of one history channel reconnect at once and each "
              f"recovers {st['missed']} publications.", "",
              "| clients | recovered (all in order) | time until all recovered (s) | history reads | reads/client | Redis commands/client (all) | server CPU ms/client |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {f0(st['clients'])} | {f0(st['complete'])} | {f2(st['secs_until_all_recovered'])} | "
              f"{f0(st['history_reads'])} | {st['history_reads_per_client']:.4f} | "
              f"{f2(st['redis_commands_per_client'])} | {f2(st['server_cpu_ms_per_client'])} |", "",
              f"Target below 0.1 history reads per recovering client: "
              f"**{'met' if st['history_reads_per_client'] < 0.1 else 'MISSED'}**. "
              "\"Redis commands/client (all)\" also counts each reconnect's directory "
              "registration and unregistration, which are not history reads."]
    return L


# The protocols compared with v1 on the same node at the same rates: result prefix, name,
# what its subscribers get.
PROTOCOLS = [
    ("stomp", "STOMP", "STOMP subscribers on `/stomp` get `MESSAGE` frames (the subscription's "
     "own headers joined once per message with the part shared by every STOMP subscriber, see "
     "stomp.md)"),
    ("centrifugo", "Centrifugo", "Centrifugo subscribers on `/connection/websocket` (client "
     "protocol v2, JSON, as the stock SDKs speak it) get `{\"push\":{\"channel\":..,\"pub\":"
     "{\"data\":..}}}`, encoded once per message and shared, and answer the server's `{}` "
     "pings"),
]


def protocols_section(res):
    """Fan-out over each other protocol against v1 on the same node at the same rates."""
    L = []
    for pre, name, what in PROTOCOLS:
        rates = sorted({int(m.group(1)) for k in res
                        for m in [re.match(re.escape(pre) + r"-r(\d+)$", k)] if m})
        if not rates:
            continue
        L += ["", f"## Protocols: {name} against v1", "",
              f"The same node, subscribers and rate; {what}, v1 subscribers the JSON `message` "
              "frame.", "",
              "| rate (msg/s) | protocol | delivered/s | lost | CPU µs/delivery | vs v1 | p50 ms | p99 ms |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
        ratios = []
        for rate in rates:
            p, v1 = res.get(f"{pre}-r{rate}"), res.get(f"{pre}-v1-r{rate}")
            for r, label in ((v1, "v1"), (p, name)):
                if not r:
                    continue
                rt = ratio(r["cpu_per_delivery_us"], v1["cpu_per_delivery_us"]) if (v1 and r is p) else ""
                L.append(f"| {rate} | {label} | {f0(r['deliveries_per_sec'])} | {f0(r['lost'])} | "
                         f"{f2(r['cpu_per_delivery_us'])} | {rt} | {f2(r['latency']['p50_ms'])} | "
                         f"{f2(r['latency']['p99_ms'])} |")
            if p and v1 and v1["cpu_per_delivery_us"] > 0:
                ratios.append((rate, p["cpu_per_delivery_us"] / v1["cpu_per_delivery_us"]))
        if ratios:
            worst = max(x for _, x in ratios)
            L += ["", f"Target {name} CPU per delivery ≤ 1.1× v1: "
                  f"**{'met' if worst <= 1.1 else 'MISSED'}** "
                  f"({', '.join(f'{r} msg/s: {x:.2f}×' for r, x in ratios)})."]
    return L


def transports_section(res):
    """Fan-out over HTTP-streaming and SSE against WebSocket; the emulation round trip."""
    rates = sorted({int(m.group(1)) for k in res
                    for m in [re.match(r"transport-ws-r(\d+)$", k)] if m})
    if not rates:
        return []
    L = ["", "## Transports: HTTP-streaming and SSE against WebSocket", "",
         "The same node, subscribers, rate and protocol (Centrifugo's): over WebSocket on "
         "`/connection/websocket` (`loadtest fanout --proto centrifugo`), and over "
         "`POST /connection/http_stream` and `GET /connection/sse` with the subscribe posted "
         "to `POST /emulation` (`loadtest streams`). Each message is one chunk of the HTTP "
         "response.", "",
         "| rate (msg/s) | transport | delivered/s | lost | CPU µs/delivery | vs WebSocket | p50 ms | p99 ms |",
         "|---:|---|---:|---:|---:|---:|---:|---:|"]
    worst = {}
    for rate in rates:
        ws = res.get(f"transport-ws-r{rate}")
        for name, key in (("WebSocket", "ws"), ("HTTP-streaming", "http-stream"), ("SSE", "sse")):
            r = res.get(f"transport-{key}-r{rate}")
            if not r:
                continue
            rt = ""
            if ws and r is not ws and ws["cpu_per_delivery_us"] > 0:
                x = r["cpu_per_delivery_us"] / ws["cpu_per_delivery_us"]
                worst[name] = max(worst.get(name, 0), x)
                rt = f"{x:.2f}×"
            L.append(f"| {rate} | {name} | {f0(r['deliveries_per_sec'])} | {f0(r['lost'])} | "
                     f"{f2(r['cpu_per_delivery_us'])} | {rt} | {f2(r['latency']['p50_ms'])} | "
                     f"{f2(r['latency']['p99_ms'])} |")
    if worst:
        L += ["", "Worst CPU per delivery against WebSocket: " +
              ", ".join(f"{n} {x:.2f}×" for n, x in worst.items()) + "."]
    same, fwd = res.get("emulation-rtt-same"), res.get("emulation-rtt-forwarded")
    if same and fwd:
        L += ["", "A command's round trip over emulation (`loadtest emulation-rtt`: an `rpc`, "
              "answered at once, posted one at a time; from the post to its reply on the "
              "stream):", "",
              "| posted to | posts | p50 ms | p99 ms | vs same node (p50) |", "|---|---:|---:|---:|---:|"]
        for name, r in (("the stream's node", same), ("another node (forwarded through Redis)", fwd)):
            lat = r["latency"]
            L.append(f"| {name} | {f0(r['posts'])} | {lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} | "
                     f"{ratio(lat['p50_ms'], same['latency']['p50_ms'])} |")
    return L


def presence_section(res):
    """presence_stats cost, join/leave fan-out, and churn CPU with presence on and off."""
    st, fan = res.get("presence-stats"), res.get("presence-fanout")
    on, off = res.get("presence-churn-on"), res.get("presence-churn-off")
    if not (st and fan and on and off):
        return []
    L = ["", "## Presence", "",
         f"`presence_stats` on one channel with {f0(st['members'])} members over "
         f"{st['nodes']} nodes, {f0(st['calls'])} calls from one member: p50 "
         f"{f2(st['stats_p50_ms'])} ms, p99 {f2(st['stats_p99_ms'])} ms, "
         f"{st['redis_commands_per_call']:.2f} Redis commands per call (O(1): two `HLEN`s in one "
         "function call, whatever the member count).", "",
         f"Join/leave fan-out in a {f0(fan['members'])}-member channel (a churner subscribes and "
         f"leaves {fan['cycles']} times): {f0(fan['join_leave_delivered'])} of "
         f"{f0(fan['join_leave_expected'])} frames delivered, "
         f"{f0(fan['join_leave_deliveries_per_sec'])} deliveries/s.", "",
         "| subscribe/unsubscribe churn | cycles | cycles/s | server CPU µs/cycle | vs off |",
         "|---|---:|---:|---:|---:|"]
    for r in (off, on):
        L.append(f"| {r['label']} | {f0(r['cycles'])} | {f0(r['cycles_per_sec'])} | "
                 f"{f2(r['server_cpu_us_per_cycle'])} | "
                 f"{ratio(r['server_cpu_us_per_cycle'], off['server_cpu_us_per_cycle'])} |")
    return L


def target_row(what, target, value, met):
    return f"Target {what} ≤ {target}: **{'met' if met else 'MISSED'}** ({value})."


def idle_tls_target(res):
    """Idle wss:// RSS per connection against its target (and the TLS floor's figure)."""
    t = res.get("idle-gateway-tls")
    if not t:
        return []
    b = t["rss_per_conn_bytes"]
    fl = res.get("idle-floor-tls", {}).get("rss_per_conn_bytes", 0)
    vs = f", {ratio(b, fl)} the TLS floor's {f0(fl)} B" if fl else ""
    return ["", target_row("idle wss:// RSS per connection at 5k connections",
                           f"{IDLE_TLS_TARGET:,} B", f"{f0(b)} B at {f0(t['connections'])} "
                           f"connections, {b / IDLE_TLS_TARGET:.2f}× the target{vs}",
                           b <= IDLE_TLS_TARGET)]


def storm_tls_target(res):
    """CPU per TLS handshake (anonymous), gateway against the TLS floor."""
    g, f = res.get("storm-tls"), res.get("storm-floor-tls")
    if not (g and f and f["cpu_per_handshake_us"] > 0):
        return []
    x = g["cpu_per_handshake_us"] / f["cpu_per_handshake_us"]
    return ["", target_row("TLS handshake CPU vs the TLS floor", f"{STORM_TLS_TARGET}×",
                           f"{x:.2f}×: {f0(g['cpu_per_handshake_us'])} against "
                           f"{f0(f['cpu_per_handshake_us'])} µs/handshake",
                           x <= STORM_TLS_TARGET)]


def report(d, out):
    res = load(d)
    cmd = os.environ.get("BENCH_COMMAND", "make bench")
    L = ["# Benchmarks", "",
         f"Generated by `{cmd}` (`scripts/bench.sh full`; this run took "
         f"{int(os.environ.get('BENCH_SECS', '0')) / 60:.1f} minutes, builds included); raw results in "
         "`docs/bench-results/*.json`. Figures are from one run on the machine below, not "
         "averages; treat differences under ~10 % as noise.", "", "## Machine", ""]
    L += machine()
    L += ["", "## What was run", "",
          "Release builds of `gateway`, `loadtest` and `loadtest/examples/floor.rs` (the floor: "
          "fastwebsockets + tokio + hyper, no auth, limits or broker layer, one PSUBSCRIBE "
          "`gw:ch:*`). A private `redis-server` on a free port. Gateways run with "
          "`--handshake-rate-per-ip 0 --message-rate 0 RUST_LOG=warn`. Server RSS is `VmRSS` "
          "and server CPU is `utime+stime` from `/proc/<pid>`; client-side costs are not "
          "counted. Commands: see `scripts/bench.sh` (every `loadtest` invocation is there "
          "verbatim).", ""]

    # Idle
    L += ["## Idle connections (user-space RSS per connection)", "",
          "| server | connections | client procs | RSS before (MiB) | RSS after (MiB) | bytes/conn | vs floor |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    floor = res.get("idle-floor", {}).get("rss_per_conn_bytes", 0)
    # TLS rows against the TLS floor (tokio-rustls), plain rows against the plain floor.
    floor_tls = res.get("idle-floor-tls", {}).get("rss_per_conn_bytes", 0)
    for k in ["idle-gateway", "idle-gateway-subscribed", "idle-gateway-2procs", "idle-gateway-tls",
              "idle-floor", "idle-floor-tls", "idle-peer"]:
        r = res.get(k)
        if not r:
            continue
        base = floor_tls if r["tls"] else floor
        L.append(f"| {r['label']}{' (TLS)' if r['tls'] else ''} | {f0(r['connections'])} | {r['procs']} | "
                 f"{f2(r['rss_before_bytes'] / 2**20)} | {f2(r['rss_after_bytes'] / 2**20)} | "
                 f"{f0(r['rss_per_conn_bytes'])} | {ratio(r['rss_per_conn_bytes'], base)} |")
    L += ["", "TLS rows are compared with the TLS floor (the floor behind tokio-rustls, same "
          "provider, certificate and settings), plain rows with the plain floor."]
    g = res.get("idle-gateway")
    if g and "idle-peer" in res:
        L += ["", f"Gateway/peer RSS per connection: "
              f"{ratio(g['rss_per_conn_bytes'], res['idle-peer']['rss_per_conn_bytes'])}."]
    if g:
        met = g["rss_per_conn_bytes"] <= 4096
        L += ["", f"Target ≤ 4 KiB/connection at 15k connections per node: "
              f"**{'met' if met else 'MISSED'}** ({f0(g['rss_per_conn_bytes'])} B at "
              f"{f0(g['connections'])} connections)."]
    L += idle_tls_target(res)

    # Fanout
    L += ["", "## Fan-out (one channel, publisher on Redis)", "",
          "One gateway node against the floor at the same offered rates, same subscriber count "
          "(payload: a 64-byte pad plus a send timestamp; latency is publish → client receipt).", "",
          "| rate (msg/s) | server | subscribers | delivered/s | lost | CPU µs/delivery | CPU vs floor | p50 ms | p99 ms | p99.9 ms | max ms |",
          "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rates = sorted({int(m.group(1)) for k in res for m in [re.match(r"fanout-gateway-r(\d+)$", k)] if m})
    ratios = []
    for rate in rates:
        g, f = res.get(f"fanout-gateway-r{rate}"), res.get(f"fanout-floor-r{rate}")
        for r in (g, f):
            if not r:
                continue
            lat = r["latency"]
            rt = ratio(r["cpu_per_delivery_us"], f["cpu_per_delivery_us"]) if (f and r is g) else ""
            L.append(f"| {rate} | {r['label']} | {r['receivers']} | {f0(r['deliveries_per_sec'])} | "
                     f"{f0(r['lost'])} | {f2(r['cpu_per_delivery_us'])} | {rt} | {f2(lat['p50_ms'])} | "
                     f"{f2(lat['p99_ms'])} | {f2(lat['p999_ms'])} | {f2(lat['max_ms'])} |")
        if g and f and f["cpu_per_delivery_us"] > 0 and ok_delivery(g) and ok_delivery(f):
            ratios.append((rate, g["cpu_per_delivery_us"] / f["cpu_per_delivery_us"]))
    if ratios:
        worst = max(x for _, x in ratios)
        L += ["", f"Target CPU per delivery ≤ 1.2× floor: **{'met' if worst <= 1.2 else 'MISSED'}** "
              f"(ratios at rates without loss: {', '.join(f'{r}: {x:.2f}×' for r, x in ratios)})."]

    L += burst_section(res, d)

    L += ["", "### Two gateway nodes", "",
          "| rate (msg/s) | delivered/s | lost | CPU µs/delivery (both nodes) | p50 ms | p99 ms | p99.9 ms | max ms |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted((k for k in res if k.startswith("fanout-2nodes-r")), key=lambda k: res[k]["rate"])
    for k in keys + ["fanout-2nodes-half"]:
        r = res.get(k)
        if not r:
            continue
        lat = r["latency"]
        name = f"{r['rate']} (half peak)" if k.endswith("half") else str(r["rate"])
        L.append(f"| {name} | {f0(r['deliveries_per_sec'])} | {f0(r['lost'])} | {f2(r['cpu_per_delivery_us'])} | "
                 f"{f2(lat['p50_ms'])} | {f2(lat['p99_ms'])} | {f2(lat['p999_ms'])} | {f2(lat['max_ms'])} |")
    h = res.get("fanout-2nodes-half")
    if h:
        good = [res[k] for k in keys if ok_delivery(res[k])]
        peak = max((r["deliveries_per_sec"] for r in good), default=0)
        p99 = h["latency"]["p99_ms"]
        L += ["", f"Peak taken as the best delivered rate of the ramp with < 1 % loss: {f0(peak)} "
              f"deliveries/s (a ramp ceiling, not necessarily saturation when every rate passed). "
              f"Target p99 ≤ 10 ms at half peak with 2 nodes: **{'met' if p99 <= 10 else 'MISSED'}** "
              f"(p99 {f2(p99)} ms at {h['rate']} msg/s × {h['receivers']} subscribers)."]

    peer = sorted((k for k in res if k.startswith("fanout-peer-r")), key=lambda k: res[k]["rate"])
    if peer:
        L += ["", "### Against the Socket.IO peer (2 processes, @socket.io/redis-adapter)", "",
              "Same subscribers and rates as the two-node gateway runs; one peer process bridges "
              "`gw:ch:*` into `io.to(channel).emit`, the adapter carries it to the other. "
              "Server-side costs only (both processes' CPU).", "",
              "| rate (msg/s) | gateway CPU µs/delivery | peer CPU µs/delivery | gateway/peer | gateway p99 ms | peer p99 ms | gateway lost | peer lost |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in peer:
            p_ = res[k]
            g = res.get(f"fanout-2nodes-r{p_['rate']}")
            if not g:
                continue
            L.append(f"| {p_['rate']} | {f2(g['cpu_per_delivery_us'])} | {f2(p_['cpu_per_delivery_us'])} | "
                     f"{ratio(g['cpu_per_delivery_us'], p_['cpu_per_delivery_us'])} | {f2(g['latency']['p99_ms'])} | "
                     f"{f2(p_['latency']['p99_ms'])} | {f0(g['lost'])} | {f0(p_['lost'])} |")

    r = res.get("unicast")
    if r:
        lat = r["latency"]
        rcpu = r.get("redis_cpu_per_delivery_us")
        L += ["", "## Unicast (FCALL gw_send_user, two nodes)", "",
              "A pipelined publisher: one pipeline of `FCALL gw_send_user` per millisecond "
              f"({f0(r.get('batch', 1))} calls), up to {f0(r.get('in_flight', 1))} pipelines awaiting "
              "their replies, round-robin over the users; one connection per user. CPU is both "
              "nodes' together (Redis's beside it, not counted in it).", "",
              "| users | rate (msg/s) | offered/s | delivered/s | lost | node CPU µs/delivery | Redis CPU µs/delivery | p50 ms | p99 ms | p99.9 ms | max ms |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {f0(r['receivers'])} | {r['rate']} | {f0(r.get('offered_per_sec', 0))} | "
              f"{f0(r['deliveries_per_sec'])} | {f0(r['lost'])} | "
              f"{f2(r['cpu_per_delivery_us'])} | {f2(rcpu) if rcpu is not None else '—'} | "
              f"{f2(lat['p50_ms'])} | {f2(lat['p99_ms'])} | "
              f"{f2(lat['p999_ms'])} | {f2(lat['max_ms'])} |"]
        rate, p99, cpu = r["deliveries_per_sec"], lat["p99_ms"], r["cpu_per_delivery_us"]
        met = rate >= 50000 and p99 <= 10 and cpu <= 10 and r["lost"] == 0
        L += ["", "Target ≥ 50,000 deliveries/s at p99 ≤ 10 ms and ≤ 10 µs node CPU per delivery: "
              f"**{'met' if met else 'MISSED'}** ({rate / 50000:.2f}× the rate, p99 {f2(p99)} ms "
              f"= {p99 / 10:.2f}× its bound, {f2(cpu)} µs = {cpu / 10:.2f}× the CPU bound, "
              f"{f0(r['lost'])} lost)."]

    L += ["", "## Connect storm", "",
          "Connect, TLS (if any), upgrade, welcome, close; 50 in flight. CPU is the server's.", "",
          "| variant | handshakes | failed | handshakes/s | CPU µs/handshake | vs floor | p50 ms | p99 ms |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fl = res.get("storm-floor", {}).get("cpu_per_handshake_us", 0)
    fl_tls = res.get("storm-floor-tls", {}).get("cpu_per_handshake_us", 0)
    for k in ["storm-plain", "storm-tls", "storm-tls-hs256", "storm-tls-rs256", "storm-floor",
              "storm-floor-tls"]:
        r = res.get(k)
        if not r:
            continue
        base = fl_tls if ("tls" in k) else fl
        L.append(f"| {r['label']} | {f0(r['handshakes'])} | {r['failed']} | {f0(r['handshakes_per_sec'])} | "
                 f"{f0(r['cpu_per_handshake_us'])} | {ratio(r['cpu_per_handshake_us'], base)} | "
                 f"{f2(r['latency']['p50_ms'])} | {f2(r['latency']['p99_ms'])} |")
    L += ["", "TLS variants are compared with the TLS floor (floor-tls: tokio-rustls, the same "
          "ring provider, certificate, TLS 1.3 and 1.2, ALPN `http/1.1`), plain with the plain "
          "floor. The token variants also verify a JWT, which the floor does not."]
    L += storm_tls_target(res)

    r = res.get("churn")
    if r:
        L += ["", "## Churn", "",
              "Connect (HS256 token, 100 users), subscribe to one of 50 channels, close; 50 in "
              "flight, after a warm-up. RSS after is read once the directory keys are back and "
              "1.5 s have passed.", "",
              "| cycles | cycles/s | failed | Redis keys before → after | RSS before → peak → after (MiB) | RSS growth | keys back |",
              "|---:|---:|---:|---|---|---:|---|",
              f"| {f0(r['cycles'])} | {f0(r['cycles_per_sec'])} | {r['failed']} | {r['keys_before']} → {r['keys_after']} | "
              f"{f2(r['rss_before_bytes'] / 2**20)} → {f2(r['rss_peak_bytes'] / 2**20)} → {f2(r['rss_after_bytes'] / 2**20)} | "
              f"{r.get('rss_growth_pct', 0):+.1f} % | {'yes' if r['keys_back_to_baseline'] else 'NO'} |",
              "", f"Target RSS within 5 % of the start after 100k cycles: "
              f"**{'met' if r['rss_back_to_baseline'] and r['cycles'] >= 100000 else 'MISSED'}** "
              f"({f0(r['cycles'])} cycles, {r.get('rss_growth_pct', 0):+.1f} %)."]

    L += round_two_section(res)
    L += history_section(res)
    L += presence_section(res)
    L += protocols_section(res)
    L += transports_section(res)

    L += ["", "## Caveats (read before quoting a figure)", "",
          "- Two CPUs are shared by the servers, Redis and one `loadtest` process that receives "
          "every delivery (1,000 subscribers). A system-wide `perf record -a` during the 2-node "
          "half-peak run put the load generator at about half of all CPU samples, so latency "
          "figures and the 2-node peak measure this box's client as much as the server.",
          "- CPU per delivery falls as the rate rises (fixed per-wake costs spread over more "
          "messages, and writes coalesce), so compare servers only at equal rates. Where a "
          "server falls behind (p50 in the hundreds of ms), its ratio is not like-for-like.",
          "- /proc CPU times have 10 ms resolution; short runs have a few percent of error.",
          "- Unicast: the load generator (publisher and all receivers), Redis and both nodes "
          "share the two CPUs; Redis runs every `gw_send_user` (its Lua) on one thread, so "
          "the delivered rate is bounded by Redis's CPU per call as much as by the nodes'.",
          "- Idle RSS is the server's whole resident set growth divided by connections: it "
          "includes allocator slack and per-connection task state, not kernel socket buffers.",
          ]
    L += ["", "## Not measured yet", "",
          "- Against the Socket.IO peer: connect storm, unicast and churn (only idle RSS and "
          "fan-out are compared)." if peer else "- The Socket.IO peer was not installed for this run.",
          "- Idle with more than 2 client processes (needed beyond ~19,900 connections); churn "
          "over TLS."]
    L += ["", "## Profiles and fixes (before → after)", "",
          "Where a target was missed, it was profiled and fixed; the profiles, the commands and "
          "every intermediate figure are in [profiling.md](profiling.md). These are earlier "
          "measurements on this machine, not results of this run:", "",
          "| target | before | after | what changed |",
          "|---|---|---|---|"] + [f"| {' | '.join(row)} |" for row in HISTORY]
    charts = make_charts(res, os.path.join(os.path.dirname(out), "img"))
    L += ["", "## Charts", ""]
    L += [f"![{c}](img/{c}.png)" for c in charts] if charts else [
        "Not generated: matplotlib could not be imported (install it with `make bench-tools`)."]
    with open(out, "w") as fh:
        fh.write("\n".join(L) + "\n")


def make_charts(res, img):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(img, exist_ok=True)
    made = []
    series = (("gateway", "fanout-gateway-r", "C0"), ("floor", "fanout-floor-r", "C1"),
              ("2 nodes", "fanout-2nodes-r", "C2"))

    def points(pre, key):
        ks = sorted((k for k in res if re.match(re.escape(pre) + r"\d+$", k)), key=lambda k: res[k]["rate"])
        return [res[k]["deliveries_per_sec"] for k in ks], [key(res[k]) for k in ks]

    if any(k.startswith("fanout-gateway-r") for k in res):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, pre, color in series[:2] + (("gateway, bursts", "burst-gateway-r", "C0"),
                                               ("floor, bursts", "burst-floor-r", "C1")):
            xs, ys = points(pre, lambda r: r["cpu_per_delivery_us"])
            ax.plot(xs, ys, marker="o" if "burst" not in label else "s", color=color,
                    linestyle="-" if "burst" not in label else ":", label=label)
        ax.set_xlabel("deliveries/s"); ax.set_ylabel("server CPU µs / delivery"); ax.legend()
        ax.set_title("Fan-out cost, one node"); fig.tight_layout()
        fig.savefig(os.path.join(img, "fanout-cpu.png"), dpi=100); plt.close(fig)
        made.append("fanout-cpu")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, pre, color in series:
            for q, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p999_ms", "--")):
                xs, ys = points(pre, lambda r: r["latency"][q])
                ax.plot(xs, ys, marker="o", markersize=3, color=color, linestyle=style,
                        label=f"{label} {q[:-3]}")
        ax.axhline(10, color="red", linewidth=0.8, label="10 ms")
        ax.set_xlabel("deliveries/s"); ax.set_ylabel("latency (ms)"); ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=3); ax.set_title("Fan-out latency percentiles (publish → receipt)")
        fig.tight_layout()
        fig.savefig(os.path.join(img, "fanout-latency.png"), dpi=100); plt.close(fig)
        made.append("fanout-latency")
    idle = [res[k] for k in ["idle-gateway", "idle-gateway-tls", "idle-floor", "idle-floor-tls"]
            if k in res]
    if idle:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([r["label"] for r in idle], [r["rss_per_conn_bytes"] for r in idle])
        ax.axhline(4096, color="red", linestyle="--", label="4 KiB target"); ax.legend()
        ax.set_ylabel("server RSS bytes / idle connection"); fig.tight_layout()
        fig.savefig(os.path.join(img, "idle-rss.png"), dpi=100); plt.close(fig)
        made.append("idle-rss")
    return made


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "half-peak":
        half_peak(sys.argv[2], int(sys.argv[3]))
    elif cmd == "check":
        check(sys.argv[2])
    elif cmd == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
