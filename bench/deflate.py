#!/usr/bin/env python3
"""permessage-deflate benchmark (issue 18): what compression costs through each proxy.

    python3 bench/deflate.py              # 3 rounds, 15 s windows
    python3 bench/deflate.py --quick      # 1 round, 5 s windows
    WSBEAT_BIN=target/release/wsbeat python3 bench/deflate.py --quick

100 connections (`--conns`) each send a JSON-like message of 1 KiB and wait for its echo,
in a loop, compressed end to end: Python `websockets` on both ends, the client offering
permessage-deflate (its defaults) and the backend accepting it (its defaults:
server_max_window_bits=12, memLevel 5), both compressing every message. Targets:

- `direct`: the client talks to the backend;
- `direct-nct`: the same, the client offering `client_no_context_takeover` itself (what
  wsbeat adds to every offer): the baseline that isolates the cost of that parameter;
- `wsbeat`: wsbeat with `compression: passthrough` (the default);
- `wsbeat-off`: wsbeat with `compression: off` (both legs uncompressed);
- `nginx-1`: nginx, one worker, which passes the extension through untouched.

Reported per target, over the measured window (after a 1 s warm-up): round trips per
second; wire bytes per message on the client leg (TCP bytes sent and received by the
client's sockets, from TCP_INFO `tcpi_bytes_acked` + `tcpi_bytes_received`, divided by
round trips: one message each way plus framing); and proxy CPU per message (the proxy's
utime + stime from /proc, divided by round trips). The generator and the backend are
Python, so they, not the proxy, bound the rate; CPU per message is what compares.
`other CPU s` flags a run where something else used the machine.

Needs Python 3.11 with `websockets`, Linux, Debian's /usr/sbin/nginx. The roles `echo` and
`load` of this script are the backend and the generator (run by the driver).
"""
import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import run as harness  # noqa: E402  (bench/run.py: process, /proc and nginx helpers)

HEARTBEAT = "--heartbeat--"
TARGETS = ["direct", "direct-nct", "wsbeat", "wsbeat-off", "nginx-1"]
MESSAGE_BYTES = 1024
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 each.
TCPI_BYTES_ACKED = 120
TCPI_BYTES_RECEIVED = 128

WSBEAT_CONF = """\
listen: 127.0.0.1:{port}
admin:
  listen: null
upstream:
  url: ws://127.0.0.1:{echo}
compression: {compression}
"""

WORDS = ("alpha beta gamma delta user room chat message online typing status read "
         "delivered hello world price quantity order update event").split()


def message(rng: random.Random, seq: int) -> str:
    """A JSON-like message of exactly MESSAGE_BYTES bytes: repetitive keys, varying values."""
    items = []
    while sum(len(i) for i in items) < MESSAGE_BYTES:
        items.append(json.dumps({
            "id": rng.randrange(10**6), "seq": seq, "user": f"user{rng.randrange(500)}",
            "text": " ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9))),
            "ts": 1765000000 + rng.randrange(10**5),
        }, separators=(",", ":")))
    return ("[" + ",".join(items))[: MESSAGE_BYTES - 1] + "]"


# --------------------------------------------------------------------------------------
# roles: the backend and the generator


async def echo_role(port: int) -> None:
    import websockets

    async def echo(ws) -> None:
        try:
            async for m in ws:
                await ws.send(m)
        except websockets.exceptions.ConnectionClosed:
            pass

    async with websockets.serve(echo, "127.0.0.1", port, ping_interval=None, max_size=None) as s:
        print(f"listening {s.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


def tcp_bytes(sock: socket.socket) -> tuple[int, int]:
    """Bytes the socket sent (and had acknowledged) and received."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked, received = struct.unpack_from("=QQ", info, TCPI_BYTES_ACKED)
    assert TCPI_BYTES_RECEIVED == TCPI_BYTES_ACKED + 8
    return acked, received


async def load_role(url: str, conns: int, secs: float, no_context_takeover: bool) -> None:
    import websockets
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

    # websockets' own default offer, plus client_no_context_takeover when asked.
    offer = {"extensions": [ClientPerMessageDeflateFactory(
        client_no_context_takeover=True, client_max_window_bits=True,
        compress_settings={"memLevel": 5})], "compression": None} if no_context_takeover else {}

    phase = {"measuring": False, "stop": False}
    counts = [0] * conns
    sockets: list[socket.socket] = []
    compressed = []

    async def one(i: int) -> None:
        rng = random.Random(i)
        async with websockets.connect(url, ping_interval=None, max_size=None, **offer) as ws:
            compressed.append(bool(ws.protocol.extensions))
            sockets.append(ws.transport.get_extra_info("socket"))
            seq = 0
            while not phase["stop"]:
                seq += 1
                m = message(rng, seq)
                await ws.send(m)
                while (reply := await ws.recv()) == HEARTBEAT:
                    pass
                assert reply == m
                if phase["measuring"]:
                    counts[i] += 1

    tasks = [asyncio.create_task(one(i)) for i in range(conns)]
    while len(sockets) < conns:
        await asyncio.sleep(0.05)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    await asyncio.sleep(1.0)  # warm-up
    before = [tcp_bytes(s) for s in sockets]
    phase["measuring"] = True
    print("measuring", file=sys.stderr, flush=True)
    start = time.monotonic()
    await asyncio.sleep(secs)
    phase["measuring"] = False
    elapsed = time.monotonic() - start
    after = [tcp_bytes(s) for s in sockets]
    print("done", file=sys.stderr, flush=True)
    phase["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    msgs = sum(counts)
    sent = sum(a[0] - b[0] for a, b in zip(after, before))
    received = sum(a[1] - b[1] for a, b in zip(after, before))
    print(json.dumps({"msgs": msgs, "secs": elapsed, "sent": sent, "received": received,
                      "compressed_conns": sum(compressed)}), flush=True)


# --------------------------------------------------------------------------------------
# the driver


def start_echo(kids: "harness.Children") -> tuple[object, int]:
    p = kids.spawn([sys.executable, __file__, "--role", "echo", "0"], stdout=subprocess.PIPE,
                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    line = harness.read_line(p.stdout, time.monotonic() + 10)
    return p, int(line.split()[1])


def start_proxy(kids, target: str, wsbeat_bin: str, echo_port: int, d: Path):
    if target.startswith("wsbeat"):
        port = harness.free_port()
        conf = d / "wsbeat.yaml"
        conf.write_text(WSBEAT_CONF.format(
            port=port, echo=echo_port,
            compression="off" if target == "wsbeat-off" else "passthrough"))
        log = d / "wsbeat.log"
        with open(log, "wb") as lf:
            p = kids.spawn([wsbeat_bin, "--config", str(conf)], stdin=subprocess.DEVNULL,
                           stdout=lf, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="warn"))
        return p, port
    p, port, _ = harness.start_target(kids, target, wsbeat_bin, echo_port, d)
    return p, port


def run_one(kids, target: str, wsbeat_bin: str, tmp: Path, rnd: int, conns: int, secs: float) -> dict:
    d = tmp / f"r{rnd}-{target}"
    d.mkdir(parents=True)
    echo, echo_port = start_echo(kids)
    harness.wait_port(echo_port, echo)
    proxy = None
    try:
        if target.startswith("direct"):
            port = echo_port
        else:
            proxy, port = start_proxy(kids, target, wsbeat_bin, echo_port, d)
            harness.wait_port(port, proxy)
            harness.wait_settled(proxy, harness.expected_procs(target))
        pids = harness.group_pids(proxy.pid) if proxy else []
        gen = kids.spawn([sys.executable, __file__, "--role", "load", f"ws://127.0.0.1:{port}/",
                          "--conns", str(conns), "--secs", str(secs)]
                         + (["--no-context-takeover"] if target == "direct-nct" else []),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + secs + 60
        assert harness.read_line(gen.stderr, deadline) == "measuring"
        cpu0, m0 = harness.cpu_seconds(pids), harness.machine_cpu_seconds()
        own0 = harness.cpu_seconds([gen.pid, echo.pid])
        assert harness.read_line(gen.stderr, deadline) == "done"
        cpu1, m1 = harness.cpu_seconds(pids), harness.machine_cpu_seconds()
        own1 = harness.cpu_seconds([gen.pid, echo.pid])
        out = json.loads(harness.read_line(gen.stdout, deadline))
        gen.wait(timeout=30)
        proxy_cpu = cpu1 - cpu0
        msgs = out["msgs"]
        return {
            "round": rnd, "target": target, "msgs": msgs, "secs": out["secs"],
            "msgs_per_s": msgs / out["secs"],
            "wire_bytes_per_msg": (out["sent"] + out["received"]) / msgs,
            "sent_per_msg": out["sent"] / msgs, "received_per_msg": out["received"] / msgs,
            "compressed_conns": out["compressed_conns"],
            "proxy_cpu_s": proxy_cpu if proxy else None,
            "proxy_cpu_us_per_msg": proxy_cpu / msgs * 1e6 if proxy else None,
            "other_cpu_s": (m1 - m0) - proxy_cpu - (own1 - own0),
        }
    finally:
        for p in (proxy, echo):
            if p is not None:
                kids.stop(p)


def table(runs: list[dict], conns: int) -> str:
    rows = ["| target | compressed conns | msgs/s | wire bytes/msg (client leg) | sent / received "
            "| vs direct | vs direct-nct | proxy CPU µs/msg | vs nginx-1 | other CPU s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    med = {}
    for t in TARGETS:
        rs = [r for r in runs if r["target"] == t]
        if not rs:
            continue
        m = {k: statistics.median(r[k] for r in rs) if rs[0][k] is not None else None
             for k in ("msgs_per_s", "wire_bytes_per_msg", "proxy_cpu_us_per_msg", "other_cpu_s",
                       "compressed_conns", "sent_per_msg", "received_per_msg")}
        med[t] = m
    def vs(m: dict, base: str) -> str:
        if base not in med:
            return "—"
        return f"{m['wire_bytes_per_msg'] / med[base]['wire_bytes_per_msg']:.3f}×"

    for t, m in med.items():
        cpu = m["proxy_cpu_us_per_msg"]
        nginx = med.get("nginx-1", {}).get("proxy_cpu_us_per_msg")
        rows.append(
            f"| {t} | {m['compressed_conns']:.0f}/{conns} | {m['msgs_per_s']:,.0f} "
            f"| {m['wire_bytes_per_msg']:,.0f} | {m['sent_per_msg']:,.0f} / {m['received_per_msg']:,.0f} "
            f"| {vs(m, 'direct')} | {vs(m, 'direct-nct')} "
            f"| {'—' if cpu is None else f'{cpu:.1f}'} "
            f"| {'—' if cpu is None or not nginx else f'{cpu / nginx:.2f}×'} "
            f"| {m['other_cpu_s']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=["echo", "load"], help=argparse.SUPPRESS)
    ap.add_argument("url_or_port", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round, 5 s windows")
    ap.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    ap.add_argument("--secs", type=float, help="measured window (default 15, 5 with --quick)")
    ap.add_argument("--conns", type=int, default=100, help="connections (default 100)")
    ap.add_argument("--no-context-takeover", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--json", help="write the raw results here")
    a = ap.parse_args()
    if a.role == "echo":
        asyncio.run(echo_role(int(a.url_or_port)))
        return 0
    if a.role == "load":
        asyncio.run(load_role(a.url_or_port, a.conns, a.secs, a.no_context_takeover))
        return 0
    rounds = a.rounds or (1 if a.quick else 3)
    secs = a.secs or (5.0 if a.quick else 15.0)
    targets = a.targets.split(",") if a.targets else TARGETS
    wsbeat_bin = os.environ.get("WSBEAT_BIN")
    if not wsbeat_bin:
        print("building wsbeat (cargo build --release)…", file=sys.stderr)
        if subprocess.run(["cargo", "build", "--release"], cwd=harness.ROOT).returncode != 0:
            sys.exit("deflate.py: cargo build --release failed; set WSBEAT_BIN to a prebuilt wsbeat")
        wsbeat_bin = str(harness.ROOT / "target" / "release" / "wsbeat")
    kids = harness.Children()
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="wsbeat-deflate-") as tmp:
            for rnd in range(rounds):
                for t in targets:
                    r = run_one(kids, t, wsbeat_bin, Path(tmp), rnd, a.conns, secs)
                    print(f"round {rnd} {t}: {r['msgs_per_s']:,.0f} msg/s, "
                          f"{r['wire_bytes_per_msg']:,.0f} B/msg, proxy "
                          f"{r['proxy_cpu_us_per_msg'] or 0:.1f} µs/msg, other CPU "
                          f"{r['other_cpu_s']:.2f} s", file=sys.stderr)
                    runs.append(r)
    finally:
        kids.stop_all()
    print(f"permessage-deflate, {a.conns} connections, 1 KiB JSON-like messages, "
          f"{rounds} round(s) of {secs:g} s; medians\n")
    print(table(runs, a.conns))
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "versions": harness.versions(wsbeat_bin)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
