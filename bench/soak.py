#!/usr/bin/env python3
"""Soak test for wsbeat (not in CI): minutes of connection churn against a release build,
watching for leaks.

What it does, all on 127.0.0.1:
- starts an echo backend (this script in `--backend` mode: Python `websockets`, in its own
  process) that echoes every message and, every `--backend-kill-every` seconds, aborts one
  random backend connection (TCP dropped without a close frame: wsbeat must close that
  client with 1011);
- starts `target/release/wsbeat` (or `--wsbeat BIN`) in front of it with a generated config
  (heartbeat every 1s, PING every 2s, dead after 6s, so the heartbeat machinery runs all
  the time), admin listener on a free port;
- opens `--rate` client connections per second (default 200). Each lives 0.5–5 s, sends a
  message every 0.2–0.6 s (so the echo brings traffic back the other way) and then closes
  normally (1000), or, with `--kill-fraction` (default 0.25), vanishes: its TCP connection
  is aborted without a close frame;
- every `--sample` seconds (10) samples wsbeat's RSS (/proc/PID/status VmRSS), open fds
  (/proc/PID/fd), threads (/proc/PID/status; tokio's task count is not observable without
  tokio_unstable, so `wsbeat_connections_active` from /metrics stands in for the tasks:
  one relay task per open WebSocket), and the clients' counters;
- after `--minutes` stops the churn, waits until wsbeat reports 0 active connections, takes
  a last sample, prints a table and a verdict per resource: flat or growing.

Verdict rules (see `verdict`): RSS follows the peak number of open connections (the
allocator keeps its high-water mark), so peaks are compared: RSS is "growing" when its peak
in the last third of the load phase exceeds its peak in the middle third by more than 10 %
and 8 MiB (a leak keeps setting new peaks at the same load); the least-squares slope over
the second half is printed too. Open fds and threads are compared quiescent-to-quiescent: before any client and
after the drain, they must be back where they started (fds within 2, threads equal or
fewer). Connections active after the drain must be 0.

Usage:
  cargo build --release
  python3 bench/soak.py                     # 30 minutes, 200 connects/s
  python3 bench/soak.py --minutes 2         # a quick look
Python 3.11 with `websockets` (pip install websockets). Linux (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT = "--heartbeat--"
PAYLOAD = "soak " + "x" * 200


# --------------------------------------------------------------------------------------
# backend (separate process)


async def backend(kill_every: float, seed: int) -> None:
    from websockets.asyncio.server import serve

    rng = random.Random(seed)
    conns: set = set()
    killed = 0

    async def echo(ws) -> None:
        conns.add(ws)
        try:
            async for msg in ws:
                await ws.send(msg)
        except Exception:
            pass
        finally:
            conns.discard(ws)

    async def killer() -> None:
        nonlocal killed
        while True:
            await asyncio.sleep(kill_every)
            if conns:
                victim = rng.choice(list(conns))
                victim.transport.abort()
                killed += 1
                print(f"backend-killed {killed}", flush=True)

    async with serve(echo, "127.0.0.1", 0, ping_interval=None, max_size=1 << 20) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening {port}", flush=True)
        if kill_every > 0:
            asyncio.create_task(killer())
        await asyncio.Future()


# --------------------------------------------------------------------------------------
# wsbeat process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_wsbeat(binary: str, backend_port: int, d: Path) -> tuple[subprocess.Popen, int, int]:
    port, admin = free_port(), free_port()
    cfg = d / "wsbeat.yaml"
    cfg.write_text(
        f"""listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin}
upstream:
  url: ws://127.0.0.1:{backend_port}
  connect_timeout: 5s
heartbeat:
  message: "{HEARTBEAT}"
  interval: 1s
liveness:
  ping_interval: 2s
  timeout: 6s
limits:
  max_connections: 20000
"""
    )
    log = open(d / "wsbeat.log", "wb")
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen([binary, "--config", str(cfg)], stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            metrics_text(admin)
            return proc, port, admin
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"wsbeat exited at start: see {d / 'wsbeat.log'}")
            time.sleep(0.05)
    sys.exit("wsbeat did not answer on its admin port within 10 s")


def metrics_text(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        m = re.match(r"(VmRSS|Threads):\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


# --------------------------------------------------------------------------------------
# clients


@dataclass
class Stats:
    attempted: int = 0
    connected: int = 0
    refused: int = 0
    closed_normally: int = 0
    killed: int = 0
    sent: int = 0
    received: int = 0
    heartbeats: int = 0
    close_codes: dict[int | None, int] = field(default_factory=dict)
    inflight: int = 0


async def one_client(url: str, rng: random.Random, st: Stats, kill_fraction: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    st.attempted += 1
    st.inflight += 1
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            try:
                ws = await connect(url, ping_interval=None, open_timeout=10, max_size=1 << 20)
            except (OSError, asyncio.TimeoutError, Exception):
                st.refused += 1
                return
            st.connected += 1

            async def reader() -> None:
                try:
                    async for msg in ws:
                        if msg == HEARTBEAT:
                            st.heartbeats += 1
                        else:
                            st.received += 1
                except ConnectionClosed:
                    pass
                rcvd = ws.protocol.close_rcvd
                code = rcvd.code if rcvd else None
                st.close_codes[code] = st.close_codes.get(code, 0) + 1

            r = asyncio.create_task(reader())
            end = loop.time() + rng.uniform(0.5, 5.0)
            try:
                while loop.time() < end and not r.done():
                    await ws.send(PAYLOAD)
                    st.sent += 1
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
            except ConnectionClosed:
                pass
            if not r.done() and rng.random() < kill_fraction:
                ws.transport.abort()
                st.killed += 1
                r.cancel()
            else:
                await ws.close()
                st.closed_normally += 1
                await r
    except (asyncio.TimeoutError, Exception):
        pass
    finally:
        st.inflight -= 1


async def churn(url: str, rate: float, seconds: float, st: Stats, kill_fraction: float,
                seed: int, max_inflight: int, on_tick) -> None:
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    launched = 0
    while (now := loop.time()) - start < seconds:
        due = int((now - start) * rate) - launched
        for _ in range(max(0, due)):
            launched += 1
            if st.inflight >= max_inflight:
                continue  # bounded: skip rather than pile up
            t = asyncio.create_task(one_client(url, rng, st, kill_fraction))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await on_tick()
        await asyncio.sleep(0.005)
    if tasks:
        await asyncio.wait(tasks, timeout=40)


# --------------------------------------------------------------------------------------
# sampling and verdict


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int
    active: float
    connects: int
    phase: str


def sample(pid: int, admin: int, t0: float, st: Stats, phase: str) -> Sample:
    s = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    active = metric_sum(metrics_text(admin), "wsbeat_connections_active")
    return Sample(time.monotonic() - t0, s["VmRSS"], fds, s["Threads"], active, st.connected, phase)


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds by kind (socket, anon_inode:[eventpoll], /dev/null, ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = re.sub(r"\[\d+\]$", "", target)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def slope_mib_per_hour(points: list[Sample]) -> float:
    """Least-squares slope of RSS over time."""
    if len(points) < 2:
        return 0.0
    ts = [p.t for p in points]
    ys = [p.rss_kib / 1024 for p in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 0.0 if var == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var * 3600


def verdict(samples: list[Sample]) -> list[tuple[str, str, str]]:
    base = samples[0]
    end = samples[-1]
    load = [s for s in samples if s.phase == "load"]
    third = max(1, len(load) // 3)
    middle, last = load[third : 2 * third] or load, load[2 * third :] or load
    # RSS follows the peak number of connections (the allocator keeps its high-water
    # mark), so compare peaks: a leak keeps setting new ones at the same load.
    mid_max = max(s.rss_kib for s in middle)
    last_max = max(s.rss_kib for s in last)
    rss_growing = last_max > mid_max * 1.10 and last_max - mid_max > 8 * 1024
    half = load[len(load) // 2 :]
    out = [
        (
            "RSS peak under load (MiB)",
            f"{mid_max / 1024:.1f} middle third -> {last_max / 1024:.1f} last third "
            f"(2nd half slope {slope_mib_per_hour(half):+.1f} MiB/h)",
            "GROWING" if rss_growing else "flat",
        ),
        (
            "open fds, quiescent",
            f"{base.fds} before -> {end.fds} after the drain",
            "GROWING" if end.fds > base.fds + 2 else "flat",
        ),
        (
            "threads, quiescent",
            f"{base.threads} before -> {end.threads} after the drain",
            "GROWING" if end.threads > base.threads else "flat",
        ),
        (
            "connections active (tasks)",
            f"{base.active:.0f} before -> {end.active:.0f} after the drain",
            "GROWING" if end.active > 0 else "flat",
        ),
    ]
    return out


def print_table(samples: list[Sample]) -> None:
    print(f"{'t (s)':>7} {'phase':>6} {'RSS MiB':>8} {'fds':>6} {'fds-2×active':>12} {'threads':>7} "
          f"{'active':>7} {'connects':>9}")
    for s in samples:
        print(
            f"{s.t:7.0f} {s.phase:>6} {s.rss_kib / 1024:8.1f} {s.fds:6d} {s.fds - 2 * s.active:12.0f} {s.threads:7d} "
            f"{s.active:7.0f} {s.connects:9d}"
        )


# --------------------------------------------------------------------------------------
# main


async def soak(args: argparse.Namespace) -> int:
    binary = args.wsbeat or str(ROOT / "target" / "release" / "wsbeat")
    if not Path(binary).exists():
        sys.exit(f"{binary} not found: run `cargo build --release` first (or pass --wsbeat)")
    d = Path(tempfile.mkdtemp(prefix="wsbeat-soak-"))
    be = subprocess.Popen(
        [sys.executable, __file__, "--backend", "--backend-kill-every", str(args.backend_kill_every),
         "--seed", str(args.seed)],
        stdout=subprocess.PIPE, text=True,
    )
    line = be.stdout.readline()
    if not line.startswith("listening "):
        sys.exit(f"backend did not start: {line!r}")
    backend_port = int(line.split()[1])
    backend_kills = 0
    proc, port, admin = start_wsbeat(binary, backend_port, d)
    print(f"wsbeat pid {proc.pid} on 127.0.0.1:{port} (admin {admin}), backend {backend_port}, "
          f"logs in {d}; {args.minutes} min at {args.rate}/s", flush=True)
    st = Stats()
    t0 = time.monotonic()
    samples = [sample(proc.pid, admin, t0, st, "idle")]
    fds_before = fd_kinds(proc.pid)
    next_sample = time.monotonic() + args.sample

    async def on_tick() -> None:
        nonlocal next_sample
        if time.monotonic() >= next_sample:
            next_sample += args.sample
            s = sample(proc.pid, admin, t0, st, "load")
            samples.append(s)
            print(
                f"[{s.t:6.0f}s] rss {s.rss_kib / 1024:.1f} MiB, fds {s.fds}, threads {s.threads}, "
                f"active {s.active:.0f}, connects {st.connected}/{st.attempted}, "
                f"sent {st.sent}, received {st.received}, killed {st.killed}",
                flush=True,
            )
            if proc.poll() is not None:
                raise SystemExit(f"wsbeat exited with {proc.returncode}: see {d / 'wsbeat.log'}")

    try:
        await churn(f"ws://127.0.0.1:{port}/soak", args.rate, args.minutes * 60, st,
                    args.kill_fraction, args.seed, args.max_inflight, on_tick)
        # Drain: killed clients are found dead by wsbeat after liveness.timeout (6s).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if metric_sum(metrics_text(admin), "wsbeat_connections_active") == 0:
                break
            await asyncio.sleep(0.5)
        samples.append(sample(proc.pid, admin, t0, st, "after"))
        fds_after = fd_kinds(proc.pid)
        m = metrics_text(admin)
    finally:
        proc.send_signal(signal.SIGTERM)
        be.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        be.kill()
        rest = be.stdout.read() if be.stdout else ""
        backend_kills = rest.count("backend-killed")

    print()
    print_table(samples)
    print()
    print(
        f"clients: {st.attempted} attempted, {st.connected} connected, {st.refused} failed to "
        f"connect, {st.closed_normally} closed normally, {st.killed} killed (TCP abort); "
        f"messages sent {st.sent}, echoes received {st.received}, heartbeats {st.heartbeats}; "
        f"close codes received {dict(sorted(st.close_codes.items(), key=str))}; "
        f"backend connections killed {backend_kills}"
    )
    print(
        "wsbeat counters: "
        + ", ".join(
            f"{n} {metric_sum(m, n):.0f}"
            for n in (
                "wsbeat_connections_total",
                "wsbeat_heartbeats_sent_total",
                "wsbeat_liveness_timeouts_total",
                "wsbeat_upstream_errors_total",
            )
        )
    )
    for family, title in (
        ("wsbeat_close_codes_total", "close codes"),
        # Since `reason="lost"` exists, backend kills show here beside the 502/504s.
        ("wsbeat_upstream_errors_total", "upstream errors"),
    ):
        counts: dict[str, float] = {}
        for line in m.splitlines():
            c = re.match(family + r"\{(.*)\} (\S+)", line)
            if c:
                counts[c.group(1)] = counts.get(c.group(1), 0) + float(c.group(2))
        print(f"wsbeat {title}: " + ", ".join(f"{{{k}}} {v:.0f}" for k, v in sorted(counts.items())))
    print(f"wsbeat fds by kind: before {fds_before}, after the drain {fds_after}")
    worst = "flat"
    print()
    for name, figures, v in verdict(samples):
        print(f"{name:30} {figures:45} {v}")
        if v != "flat":
            worst = "GROWING"
    print(f"\nverdict: {worst}")
    return 0 if worst == "flat" else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--rate", type=float, default=200, help="new client connections per second")
    p.add_argument("--kill-fraction", type=float, default=0.25)
    p.add_argument("--backend-kill-every", type=float, default=2.0, help="seconds; 0: never")
    p.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--max-inflight", type=int, default=3000, help="bound on open clients")
    p.add_argument("--wsbeat", help="wsbeat binary (default: target/release/wsbeat)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend:
        asyncio.run(backend(args.backend_kill_every, args.seed))
        return 0
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
