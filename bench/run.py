#!/usr/bin/env python3
"""Benchmark driver for wsbeat: compares it with a direct connection, nginx and HAProxy.

Every run starts a fresh echo backend (wsecho) and a fresh target in front of it, drives it
with wsload, samples the processes' CPU time and RSS from /proc, then stops both. Runs are
interleaved: for each round, for each scenario, for each target. See bench/README.md.

Python 3.11, standard library only. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"

TARGETS = ["direct", "wsbeat", "nginx-1", "nginx-auto", "haproxy-1", "haproxy-auto", "baseline"]
ANCHORS = ["nginx-1", "nginx-auto", "haproxy-1", "haproxy-auto"]
# Targets that send heartbeats and PINGs on idle connections: they hold the full idle
# window and their CPU is reported. `baseline` (wsbaseline) runs only where a scenario
# names it in `only_targets`.
SENDERS = ("wsbeat", "baseline")

HEARTBEAT_INTERVAL_MS = 4000
PING_INTERVAL_S = 10


# --------------------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    key: str
    title: str
    kind: str  # pingpong | idle | handshakes
    conns: int = 0
    size: int = 0
    secs: float = 10.0
    concurrency: int = 0
    tls: bool = False  # wss:// to the proxy (ws:// behind it); not run against `direct`
    only_targets: tuple[str, ...] | None = None  # None: every target but `baseline`


def runs_against(sc: Scenario, target: str) -> bool:
    if sc.tls and target == "direct":
        return False  # wsecho speaks no TLS
    if sc.only_targets is not None:
        return target in sc.only_targets
    return target != "baseline"


def scenarios(quick: bool) -> list[Scenario]:
    w = 3.0 if quick else 10.0
    hold = 10.0 if quick else 30.0
    out = [
        Scenario("a", "(a) ping-pong, 100 connections, 64 B", "pingpong", conns=100, size=64, secs=w),
        Scenario("b", "(b) ping-pong, 1000 connections, 64 B", "pingpong", conns=1000, size=64, secs=w),
        Scenario("c", "(c) ping-pong, 10 connections, 64 KiB", "pingpong", conns=10, size=65536, secs=w),
        Scenario("d1k", "(d) idle, 1,000 connections", "idle", conns=1000, secs=hold),
        Scenario("d3k", "(d) idle, 3,000 connections", "idle", conns=3000, secs=hold),
    ]
    if not quick:
        out.append(Scenario("d9k", "(d) idle, 9,000 connections", "idle", conns=9000, secs=hold))
    out.append(Scenario("idle-cost", "(i) idle cost at the limit: wsbeat vs the limit baseline, "
                        + ("1,000 connections held 20 s" if quick else "9,000 connections held 60 s"),
                        "idle", conns=1000 if quick else 9000, secs=20.0 if quick else 60.0,
                        only_targets=SENDERS))
    out.append(Scenario("e", "(e) handshakes, concurrency 50", "handshakes", secs=w, concurrency=50))
    out.append(Scenario("tls-handshakes", "(t) TLS handshakes (wss:// to the proxy, ws:// behind it), "
                        "concurrency 50", "handshakes", secs=w, concurrency=50, tls=True))
    out.append(Scenario("tls-d1k", "(t) idle over TLS, 1,000 connections", "idle", conns=1000,
                        secs=10.0, tls=True))
    return out


def select_scenarios(all_s: list[Scenario], only: str | None) -> list[Scenario]:
    if not only:
        return all_s
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    out = []
    for s in all_s:
        for w in wanted:
            if s.key == w or (w == "d" and s.kind == "idle" and not s.tls
                                                and s.only_targets is None) or w == s.kind \
                    or (w == "tls" and s.tls):
                out.append(s)
                break
    unknown = [w for w in wanted if not any(
        s.key == w or (w == "d" and s.kind == "idle") or w == s.kind or (w == "tls" and s.tls)
        for s in all_s)]
    if unknown:
        sys.exit(f"run.py: unknown scenario(s) {unknown}; known: "
                 f"{[s.key for s in all_s]}, d, pingpong, idle, handshakes, tls")
    return out


# --------------------------------------------------------------------------------------
# child processes


class Children:
    """Every process the driver starts; each leads its own process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, grace: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while group members (nginx workers) linger.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            print(f"run.py: warning: pid {p.pid} did not exit after SIGKILL", file=sys.stderr)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(reversed(self.procs)):
            self.stop(p, grace=2.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, tries: int = 200, pause: float = 0.025) -> None:
    """Polls a TCP connect to 127.0.0.1:port, at most `tries` times."""
    for _ in range(tries):
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(pause)
    raise RuntimeError(f"nothing accepts on 127.0.0.1:{port} after {tries} tries")


def read_line(stream, deadline: float) -> str:
    """One line from a pipe, giving up at `deadline` (time.monotonic())."""
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, min(0.2, deadline - time.monotonic())))
        if not r:
            continue
        ch = os.read(fd, 1)
        if not ch:
            break
        if ch == b"\n":
            return buf.decode(errors="replace")
        buf += ch
    raise RuntimeError(f"no complete line before the deadline (got {buf!r})")


# --------------------------------------------------------------------------------------
# /proc sampling


def group_pids(pgid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # state ppid pgrp ...
            pids.append(int(name))
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # utime stime (fields 14, 15)
    return ticks / CLK_TCK


def machine_cpu_seconds() -> float:
    """user + nice + system CPU time of the whole machine (/proc/stat), all CPUs."""
    with open("/proc/stat") as f:
        v = f.readline().split()[1:]
    return (int(v[0]) + int(v[1]) + int(v[2])) / CLK_TCK


def time_wait_sockets() -> int | None:
    """TCP sockets in TIME_WAIT machine-wide (/proc/net/sockstat `tw`)."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    v = line.split()
                    return int(v[v.index("tw") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------------------
# targets


@dataclass
class Running:
    name: str
    url: str
    proc: subprocess.Popen  # the process group leader
    pids: list[int]
    log: Path


NGINX_CONF = """\
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 20000;
}}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream echo {{
        server 127.0.0.1:{echo};
    }}
    server {{
        listen 127.0.0.1:{port}{tls};
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""

# maxconn: each proxied connection takes two descriptors and the hard open-files limit is
# 20,000, so HAProxy refuses to start with maxconn 20000 ("Cannot raise FD limit to
# 40014"); 9980 is the most that fits (it needs 2 * maxconn + ~28).
# TLS listeners (the tls-* scenarios): the same certificate and key for every target.
NGINX_TLS = """ ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3"""

HAPROXY_CONF = """\
global
    maxconn 9980
{nbthread}
defaults
    mode http
    maxconn 9980
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout tunnel 3600s
    timeout client-fin 5s
    timeout server-fin 5s
frontend fe
    bind 127.0.0.1:{port}{tls}
    default_backend be
backend be
    server echo 127.0.0.1:{echo}
"""

WSBEAT_CONF = """\
listen: 127.0.0.1:{port}
admin:
  listen: null
upstream:
  url: ws://127.0.0.1:{echo}
heartbeat:
  interval: {hb_ms}ms
liveness:
  ping_interval: {ping_s}s
{tls}"""


@dataclass
class Certs:
    """A CA and a server certificate for 127.0.0.1 (ECDSA P-256), made with openssl."""
    ca: Path
    cert: Path
    key: Path
    combined: Path  # certificate then key, for HAProxy's `crt`


def make_certs(d: Path) -> Certs:
    def openssl(*args: str) -> None:
        p = subprocess.run(["openssl", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"openssl {args[0]}: {p.stderr.strip()}")
    c = Certs(d / "ca.crt", d / "tls.crt", d / "tls.key", d / "combined.pem")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(c.ca),
            "-days", "2", "-subj", "/CN=wsbeat bench CA")
    openssl("req", *ec, "-keyout", str(c.key), "-out", str(d / "tls.csr"), "-subj", "/CN=127.0.0.1")
    ext = d / "ext.cnf"
    ext.write_text("basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(c.ca), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(c.cert))
    c.combined.write_text(c.cert.read_text() + c.key.read_text())
    return c


def expected_procs(target: str) -> int:
    return {"nginx-1": 2, "nginx-auto": 1 + NCPU}.get(target, 1)


def start_target(kids: Children, target: str, wsbeat_bin: str, echo_port: int, d: Path,
                 certs: Certs | None = None) -> tuple[subprocess.Popen, int, Path]:
    """Starts `target` in front of the echo backend; with `certs`, its listener speaks TLS."""
    port = free_port()
    log = d / f"{target}.log"
    if target == "wsbeat":
        conf = d / "wsbeat.yaml"
        tls = f"tls:\n  cert: {certs.cert}\n  key: {certs.key}\n" if certs else ""
        conf.write_text(WSBEAT_CONF.format(port=port, echo=echo_port, hb_ms=HEARTBEAT_INTERVAL_MS,
                                           ping_s=PING_INTERVAL_S, tls=tls)
                        # e.g. WSBEAT_YAML='runtime: { workers: 1 }' to compare settings
                        + os.environ.get("WSBEAT_YAML", "") + "\n")
        argv = [wsbeat_bin, "--config", str(conf), "--listen", f"127.0.0.1:{port}",
                "--upstream", f"ws://127.0.0.1:{echo_port}", "--admin-listen", "off"]
        # One log line per closed WebSocket at `info`; nginx and HAProxy log nothing either.
        env = dict(os.environ, RUST_LOG="warn")
    elif target.startswith("nginx"):
        conf = d / "nginx.conf"
        tls = NGINX_TLS.format(cert=certs.cert, key=certs.key) if certs else ""
        conf.write_text(NGINX_CONF.format(workers=1 if target == "nginx-1" else "auto", d=d,
                                          port=port, echo=echo_port, tls=tls))
        argv = [NGINX, "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf),
                "-g", "daemon off;"]
        env = None
    elif target.startswith("haproxy"):
        conf = d / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(nbthread="    nbthread 1" if target == "haproxy-1" else "",
                                            port=port, echo=echo_port,
                                            tls=f" ssl crt {certs.combined}" if certs else ""))
        argv = [HAPROXY, "-f", str(conf), "-db"]
        env = None
    elif target == "baseline":
        argv = [str(BENCH / "target" / "release" / "wsbaseline"), "--listen", f"127.0.0.1:{port}",
                "--heartbeat-ms", str(HEARTBEAT_INTERVAL_MS), "--ping-ms", str(PING_INTERVAL_S * 1000)]
        env = None
    else:
        raise ValueError(target)
    with open(log, "wb") as lf:
        p = kids.spawn(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT, env=env)
    return p, port, log


def wait_settled(proc: subprocess.Popen, want: int) -> list[int]:
    """Waits (bounded) until the group has `want` processes and its RSS stops moving."""
    pids = group_pids(proc.pid)
    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        pids = group_pids(proc.pid)
        if len(pids) >= want:
            break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"only {len(pids)} of {want} processes appeared")
    last = rss_bytes(pids)
    for _ in range(20):
        time.sleep(0.05)
        now = rss_bytes(pids)
        if abs(now - last) < 64 * 1024:
            break
        last = now
    return pids


def start_attached(template: str, pids: list[int], d: Path) -> subprocess.Popen:
    """`BENCH_ATTACH`, e.g. `perf stat -e context-switches -p {pids}` or
    `strace -c -f -p {pid}` or `perf record -g -o {dir}/perf.data -p {pids}`: run from the
    generator's start marker to its `done`, then stopped with SIGINT; what it prints goes
    into the run's record (`attached`)."""
    argv = template.format(pids=",".join(map(str, pids)), pid=pids[0], dir=d).split()
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop_attached(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGINT)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------------------
# one run


@dataclass
class Ctx:
    kids: Children
    wsbeat_bin: str
    wsecho_bin: str
    wsload_bin: str
    tmp: Path
    gen_threads: int
    echo_threads: int
    anchor_hold: float
    verbose: bool
    certs: Certs | None = None  # made once per run, for the tls-* scenarios


def run_one(ctx: Ctx, sc: Scenario, target: str, rnd: int) -> dict:
    d = ctx.tmp / f"r{rnd}-{sc.key}-{target}"
    d.mkdir(parents=True)
    rec: dict[str, Any] = {"round": rnd, "scenario": sc.key, "target": target, "ok": False}
    echo = tgt = gen = attach = None
    try:
        # Fresh backend: 64 KiB reads when the messages are large, 4 KiB otherwise.
        read_buf = 65536 if sc.size > 4096 else 4096
        with open(d / "wsecho.log", "wb") as elog:
            echo = ctx.kids.spawn([ctx.wsecho_bin, "--listen", "127.0.0.1:0",
                                   "--threads", str(ctx.echo_threads), "--read-buffer", str(read_buf)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=elog)
        line = read_line(echo.stdout, time.monotonic() + 10)
        if not line.startswith("listening on "):
            raise RuntimeError(f"wsecho said {line!r}")
        echo_addr = line.split()[-1]
        echo_port = int(echo_addr.rsplit(":", 1)[1])
        echo_pids = [echo.pid]

        if target == "direct":
            url = f"ws://{echo_addr}/"
            proxy_pids = echo_pids
            proxy_log = d / "wsecho.log"
        else:
            tls = sc.tls
            if tls and ctx.certs is None:
                ctx.certs = make_certs(ctx.tmp)
            tgt, port, proxy_log = start_target(ctx.kids, target, ctx.wsbeat_bin, echo_port, d,
                                                ctx.certs if tls else None)
            wait_port(port, tgt)
            url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/"
        proxy_proc = tgt or echo
        proxy_pids = wait_settled(proxy_proc, expected_procs(target))
        rec["proxy_procs"] = len(proxy_pids)

        hold = sc.secs
        if sc.kind == "pingpong":
            argv = ["pingpong", "--url", url, "--conns", str(sc.conns), "--size", str(sc.size),
                    "--secs", str(sc.secs)]
            start_marker = "measuring"
            budget = 1 + sc.secs + sc.conns / 50 + 30
        elif sc.kind == "idle":
            if target not in SENDERS:
                hold = min(sc.secs, ctx.anchor_hold)  # only RSS is reported for these
            argv = ["idle", "--url", url, "--conns", str(sc.conns), "--secs", str(hold),
                    "--interval-ms", str(HEARTBEAT_INTERVAL_MS)]
            if sc.tls:
                argv += ["--ca", str(ctx.certs.ca)]
            start_marker = "holding"
            budget = sc.conns / 500 + 10 + hold + 30
        else:
            argv = ["handshakes", "--url", url, "--secs", str(sc.secs),
                    "--concurrency", str(sc.concurrency)]
            if sc.tls:
                argv += ["--ca", str(ctx.certs.ca)]
            start_marker = "measuring"
            budget = 1 + sc.secs + 30
        argv = [ctx.wsload_bin, "--threads", str(ctx.gen_threads)] + argv
        rec["argv"] = argv

        rss_before = rss_bytes(proxy_pids)
        rec["time_wait_before"] = time_wait_sockets()
        gen = ctx.kids.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        lines: queue.Queue[str | None] = queue.Queue()
        err_lines: list[str] = []
        out_chunks: list[bytes] = []

        def pump_err() -> None:
            for raw in gen.stderr:
                s = raw.decode(errors="replace").rstrip("\n")
                err_lines.append(s)
                lines.put(s)
            lines.put(None)

        def pump_out() -> None:
            out_chunks.append(gen.stdout.read())

        threads = [threading.Thread(target=pump_err, daemon=True),
                   threading.Thread(target=pump_out, daemon=True)]
        for t in threads:
            t.start()

        pids_all = {"proxy": proxy_pids, "backend": echo_pids, "generator": [gen.pid]}
        deadline = time.monotonic() + budget
        marks: dict[str, dict] = {}
        # BENCH_ATTACH: a profiler attached to the proxy for the measured window only.
        attach_cmd = os.environ.get("BENCH_ATTACH")
        while time.monotonic() < deadline:
            try:
                s = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if s is None:
                break
            word = s.split(" ", 1)[0]
            if word in (start_marker, "done") and word not in marks:
                if word == start_marker and attach_cmd:
                    attach = start_attached(attach_cmd, proxy_pids, d)
                if word == "done" and attach is not None:
                    rec["attached"] = stop_attached(attach)
                    attach = None
                marks[word] = {
                    "t": time.monotonic(),
                    "cpu": {k: cpu_seconds(v) for k, v in pids_all.items()},
                    "ours": cpu_seconds(sorted({p for v in pids_all.values() for p in v})),
                    "machine": machine_cpu_seconds(),
                    "rss": rss_bytes(proxy_pids),
                }
        try:
            gen.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"wsload still running after {budget:.0f} s; killed")
        for t in threads:
            t.join(timeout=5)
        if gen.returncode != 0:
            raise RuntimeError(f"wsload exited {gen.returncode}: {' | '.join(err_lines[-3:])}")
        out = b"".join(out_chunks).decode().strip().splitlines()
        res = json.loads(out[-1])
        rec["gen"] = res
        rec["gen_stderr"] = [l for l in err_lines if l.split(" ", 1)[0] not in (start_marker, "done")]
        if start_marker not in marks or "done" not in marks:
            raise RuntimeError(f"markers missing from wsload's stderr: {sorted(marks)}")
        if proxy_proc.poll() is not None:
            raise RuntimeError(f"{target} exited with {proxy_proc.returncode} during the run")

        a, b = marks[start_marker], marks["done"]
        rec["window_secs"] = b["t"] - a["t"]
        rec["cpu_s"] = {k: b["cpu"][k] - a["cpu"][k] for k in pids_all}
        # CPU used during the window by anything but the benchmark's own processes
        # (another build, a test suite…): such runs are not comparable.
        other = max(0.0, (b["machine"] - a["machine"]) - (b["ours"] - a["ours"]))
        rec["cpu_s"]["other"] = other
        warnings = []
        # (Idle runs of the other targets only report RSS, which other load does not move.)
        cpu_matters = sc.kind != "idle" or target in SENDERS
        if cpu_matters and other > 0.05 * NCPU * rec["window_secs"] + 0.05:
            warnings.append(f"other processes used {other:.2f} CPU-s during the window")
        metrics: dict[str, float] = {}
        if sc.kind == "pingpong":
            metrics["msgs_per_sec"] = res["msgs_per_sec"]
            metrics["mib_per_sec"] = res["mib_per_sec"]
            metrics["p50_us"] = res["lat_us_p50"]
            metrics["p99_us"] = res["lat_us_p99"]
            if res["msgs"]:
                metrics["proxy_us_per_msg"] = rec["cpu_s"]["proxy"] * 1e6 / res["msgs"]
            if res["errors"] or res["connect_failed"]:
                warnings.append(f"{res['errors']} errors, {res['connect_failed']} failed connects: "
                                f"{res['first_error']}")
        elif sc.kind == "handshakes":
            metrics["handshakes_per_sec"] = res["handshakes_per_sec"]
            metrics["p50_us"] = res["setup_us_p50"]
            metrics["p99_us"] = res["setup_us_p99"]
            if res["handshakes"]:
                metrics["proxy_us_per_handshake"] = rec["cpu_s"]["proxy"] * 1e6 / res["handshakes"]
            if res["errors"]:
                warnings.append(f"{res['errors']} errors: {res['first_error']}")
        else:
            n = res["conns_open"]
            rec["rss_before"] = rss_before
            rec["rss_holding"] = a["rss"]
            rec["rss_done"] = b["rss"]
            metrics["ramp_secs"] = res["ramp_secs"]
            if n:
                metrics["rss_per_conn"] = (a["rss"] - rss_before) / n
                metrics["rss_per_conn_end"] = (b["rss"] - rss_before) / n
            if target in SENDERS:
                events = res["heartbeats_received"] + res["pings_seen"]
                metrics["events"] = events
                if events:
                    metrics["cpu_us_per_event"] = rec["cpu_s"]["proxy"] * 1e6 / events
                if n:
                    conn_min = n * rec["window_secs"] / 60
                    metrics["cpu_us_per_conn_min"] = rec["cpu_s"]["proxy"] * 1e6 / conn_min
                    metrics["events_per_conn_min"] = events / conn_min
                metrics["lateness_p99_ms"] = res["lateness_ms_p99"]
                metrics["lateness_max_ms"] = res["lateness_ms_max"]
            if n != sc.conns or res["dropped_during_hold"]:
                warnings.append(f"{n}/{sc.conns} open, {res['dropped_during_hold']} dropped: "
                                f"{res['first_error'] or res['first_drop']}")
        metrics["proxy_cpu_s"] = rec["cpu_s"]["proxy"]
        metrics["backend_cpu_s"] = rec["cpu_s"]["backend"]
        metrics["gen_cpu_s"] = rec["cpu_s"]["generator"]
        metrics["other_cpu_s"] = other
        rec["metrics"] = metrics
        if warnings:
            rec["warning"] = "; ".join(warnings)
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001 - one failed run must not end the benchmark
        rec["error"] = str(e)
        for name in ("wsecho.log", f"{target}.log", "error.log"):
            t = tail(d / name)
            if t:
                rec.setdefault("logs", {})[name] = t
    finally:
        if attach is not None:
            stop_attached(attach)
        for p in (gen, tgt, echo):
            if p is not None:
                ctx.kids.stop(p)
        for p in (echo,):
            if p is not None and p.stdout:
                p.stdout.close()
    return rec


# --------------------------------------------------------------------------------------
# reporting


def fmt_int(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def fmt_f(digits: int) -> Callable[[float | None], str]:
    return lambda v: "—" if v is None else f"{v:,.{digits}f}"


@dataclass
class Col:
    key: str
    head: str
    fmt: Callable[[float | None], str]
    better: str | None = None  # "high" | "low" | None (no ratio)


def columns(sc: Scenario) -> list[Col]:
    cpu = [Col("proxy_cpu_s", "proxy CPU s", fmt_f(2)),
           Col("backend_cpu_s", "backend CPU s", fmt_f(2)),
           Col("gen_cpu_s", "gen CPU s", fmt_f(2)),
           Col("other_cpu_s", "other CPU s", fmt_f(2))]
    if sc.kind == "pingpong":
        main = ([Col("mib_per_sec", "MiB/s", fmt_f(1), "high"), Col("msgs_per_sec", "msgs/s", fmt_int, "high")]
                if sc.size > 4096 else
                [Col("msgs_per_sec", "msgs/s", fmt_int, "high")])
        return main + [Col("p50_us", "p50 µs", fmt_int, "low"), Col("p99_us", "p99 µs", fmt_int, "low")] + cpu + [
            Col("proxy_us_per_msg", "proxy CPU µs/msg", fmt_f(1), "low")]
    if sc.kind == "handshakes":
        return [Col("handshakes_per_sec", "handshakes/s", fmt_int, "high"),
                Col("p50_us", "setup p50 µs", fmt_int, "low"), Col("p99_us", "setup p99 µs", fmt_int, "low")
                ] + cpu + [Col("proxy_us_per_handshake", "proxy CPU µs/handshake", fmt_f(1), "low")]
    return [Col("rss_per_conn", "RSS/conn B", fmt_int, "low"),
            Col("rss_per_conn_end", "RSS/conn B (end of hold)", fmt_int, "low"),
            Col("ramp_secs", "ramp s", fmt_f(2)),
            Col("lateness_p99_ms", "hb lateness p99 ms", fmt_f(1)),
            Col("lateness_max_ms", "hb lateness max ms", fmt_f(1)),
            Col("events", "heartbeats+PINGs", fmt_int),
            Col("cpu_us_per_event", "proxy CPU µs/event", fmt_f(1)),
            Col("events_per_conn_min", "events/conn-min", fmt_f(1)),
            Col("cpu_us_per_conn_min", "proxy CPU µs/conn-min", fmt_f(1), "low"),
            Col("proxy_cpu_s", "proxy CPU s (hold)", fmt_f(2)),
            Col("other_cpu_s", "other CPU s", fmt_f(2))]


def medians(runs: list[dict], sc: Scenario, target: str) -> tuple[dict[str, float], int, int]:
    mine = [r for r in runs if r["scenario"] == sc.key and r["target"] == target]
    ok = [r for r in mine if r["ok"]]
    keys = {k for r in ok for k in r["metrics"]}
    med = {k: statistics.median([r["metrics"][k] for r in ok if k in r["metrics"]]) for k in keys}
    return med, len(ok), len(mine)


def ratio_cell(col: Col, wsb: dict, ref: dict[str, dict], names: list[str]) -> str:
    v = wsb.get(col.key)
    cands = [(n, ref[n][col.key]) for n in names if n in ref and ref[n].get(col.key) is not None]
    if v is None or not cands:
        return "n/a"
    pick = max if col.better == "high" else min
    name, best = pick(cands, key=lambda c: c[1])
    if not best:
        return "n/a"
    label = f" ({name})" if len(names) > 1 else ""
    return f"{v / best:.2f}×{label}"


def table(runs: list[dict], sc: Scenario, targets: list[str]) -> str:
    cols = columns(sc)
    meds = {}
    lines = [f"### {sc.title}", ""]
    lines.append("| target | " + " | ".join(c.head for c in cols) + " | runs ok |")
    lines.append("|---|" + "---:|" * len(cols) + "---:|")
    for t in targets:
        med, n_ok, n = medians(runs, sc, t)
        if n == 0:
            continue
        meds[t] = med
        cells = []
        for c in cols:
            show = c.key in med
            if sc.kind == "idle" and t not in SENDERS and c.key not in (
                    "rss_per_conn", "rss_per_conn_end", "ramp_secs", "other_cpu_s"):
                show = False
            cells.append(c.fmt(med[c.key]) if show else "—")
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {n_ok}/{n} |")
    if "wsbeat" in meds:
        wsb = meds["wsbeat"]
        ref = {k: v for k, v in meds.items() if k != "wsbeat"}
        for label, names in (("wsbeat / best anchor", ANCHORS), ("wsbeat / direct", ["direct"]),
                             ("wsbeat / baseline", ["baseline"])):
            if not any(n in ref for n in names):
                continue
            cells = [ratio_cell(c, wsb, ref, names) if c.better else "" for c in cols]
            lines.append(f"| *{label}* | " + " | ".join(cells) + " | |")
    problems = [r for r in runs if r["scenario"] == sc.key and (not r["ok"] or r.get("warning"))]
    if problems:
        lines.append("")
    for r in problems:
        what = r.get("error") or r.get("warning")
        lines.append(f"- round {r['round']} {r['target']}: {'FAILED: ' if not r['ok'] else ''}{what}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# main


def build(wsbeat_env: str | None) -> tuple[str, str, str]:
    if wsbeat_env:
        wsbeat = wsbeat_env
        if not os.access(wsbeat, os.X_OK):
            sys.exit(f"run.py: WSBEAT_BIN={wsbeat} is not executable")
    else:
        print("building wsbeat (cargo build --release)…", file=sys.stderr)
        if subprocess.run(["cargo", "build", "--release"], cwd=ROOT).returncode != 0:
            sys.exit(f"run.py: cargo build --release failed in {ROOT}; "
                     "set WSBEAT_BIN=/path/to/wsbeat to use a prebuilt binary")
        wsbeat = str(ROOT / "target" / "release" / "wsbeat")
    print("building the bench package (cargo build --release)…", file=sys.stderr)
    if subprocess.run(["cargo", "build", "--release"], cwd=BENCH).returncode != 0:
        sys.exit(f"run.py: cargo build --release failed in {BENCH}")
    rel = BENCH / "target" / "release"
    return wsbeat, str(rel / "wsecho"), str(rel / "wsload")


def versions(wsbeat: str) -> dict[str, str]:
    def first(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            return "?"
    return {"wsbeat": first([wsbeat, "--version"]), "nginx": first([NGINX, "-v"]),
            "haproxy": first([HAPROXY, "-v"]), "kernel": platform.release(),
            "cpus": str(NCPU)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="1 round, 3 s windows, idle 1k/3k held 10 s (development)")
    ap.add_argument("--only", help="scenarios, comma-separated: a,b,c,d (plain idle),d1k,d3k,d9k,"
                                   "idle-cost,e,tls-handshakes,tls-d1k,tls (both)")
    ap.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--gen-threads", type=int, default=1, help="wsload tokio worker threads")
    ap.add_argument("--echo-threads", type=int, default=1, help="wsecho tokio worker threads")
    ap.add_argument("--anchor-hold", type=float, default=3.0,
                    help="idle hold in seconds for targets other than wsbeat, which only "
                         "report RSS/conn (default 3; wsbeat holds the full 30 s)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1 or rounds > 20:
        sys.exit("run.py: --rounds must be 1..20")
    targets = TARGETS
    if args.targets:
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            sys.exit(f"run.py: unknown target(s) {bad}; known: {TARGETS}")
    scs = select_scenarios(scenarios(args.quick), args.only)
    for exe in (NGINX, HAPROXY):
        needed = any(t.startswith(Path(exe).name) for t in targets)
        if needed and not os.access(exe, os.X_OK):
            sys.exit(f"run.py: {exe} not found")

    # Children inherit this: every socket the generator and proxies hold needs a descriptor.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 19000 and any(s.key == "d9k" for s in scs):
        print(f"run.py: warning: open-files hard limit {hard} is too low for 9,000 connections",
              file=sys.stderr)

    wsbeat, wsecho, wsload = build(os.environ.get("WSBEAT_BIN"))
    kids = Children()
    tmp = Path(tempfile.mkdtemp(prefix="wsbeat-bench-"))
    ctx = Ctx(kids, wsbeat, wsecho, wsload, tmp, args.gen_threads, args.echo_threads,
              args.anchor_hold, args.verbose)

    def on_term(signum, frame):  # SIGTERM: clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Also when started in the background, where the shell has SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runs: list[dict] = []
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rounds": rounds, "quick": args.quick,
            "targets": targets, "scenarios": [s.__dict__ for s in scs], "gen_threads": args.gen_threads,
            "echo_threads": args.echo_threads, "anchor_hold": args.anchor_hold,
            "versions": versions(wsbeat), "wsbeat_bin": wsbeat, "nofile": hard}
    t0 = time.monotonic()
    interrupted = False
    try:
        total = rounds * sum(len([t for t in targets if runs_against(s, t)]) for s in scs)
        i = 0
        for rnd in range(1, rounds + 1):
            for sc in scs:
                for t in targets:
                    if not runs_against(sc, t):
                        continue
                    i += 1
                    rec = run_one(ctx, sc, t, rnd)
                    runs.append(rec)
                    print(f"[{i}/{total} {time.monotonic() - t0:5.0f}s] round {rnd} {sc.key} {t}: "
                          + progress(rec), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\nrun.py: interrupted; stopping every child", file=sys.stderr)
    finally:
        kids.stop_all()
        if args.keep_tmp:
            print(f"run.py: configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    meta["elapsed_secs"] = round(time.monotonic() - t0, 1)
    print(f"\n## wsbeat benchmark ({rounds} round{'s' if rounds > 1 else ''}"
          f"{', quick' if args.quick else ''}; medians; {NCPU} CPUs shared by generator, backend "
          f"and proxy; loopback)\n")
    print("  ".join(f"{k}: {v}" for k, v in meta["versions"].items()) + "\n")
    for sc in scs:
        if any(r["scenario"] == sc.key for r in runs):
            print(table(runs, sc, targets))
    print(f"elapsed: {meta['elapsed_secs']:.0f} s")
    if args.json:
        summary = {sc.key: {t: medians(runs, sc, t)[0] for t in targets} for sc in scs}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
        print(f"raw results: {args.json}")
    failed = sum(1 for r in runs if not r["ok"])
    if interrupted:
        return 130
    return 1 if failed else 0


def progress(rec: dict) -> str:
    if not rec["ok"]:
        return "FAILED: " + rec.get("error", "?")
    m = rec["metrics"]
    if "msgs_per_sec" in m:
        s = f"{m['msgs_per_sec']:,.0f} msg/s {m['mib_per_sec']:,.1f} MiB/s p50 {m['p50_us']} µs p99 {m['p99_us']} µs"
    elif "handshakes_per_sec" in m:
        s = f"{m['handshakes_per_sec']:,.0f} handshakes/s p50 {m['p50_us']} µs p99 {m['p99_us']} µs"
    else:
        s = f"RSS/conn {m.get('rss_per_conn', 0):,.0f} B ramp {m['ramp_secs']:.2f} s"
        if "cpu_us_per_event" in m:
            s += f" lateness p99 {m['lateness_p99_ms']:.1f} ms CPU {m['cpu_us_per_event']:.1f} µs/event"
    s += (f"  cpu proxy {m['proxy_cpu_s']:.2f} backend {m['backend_cpu_s']:.2f}"
          f" gen {m['gen_cpu_s']:.2f} other {m['other_cpu_s']:.2f}")
    if rec.get("warning"):
        s += f"  WARNING: {rec['warning']}"
    return s


if __name__ == "__main__":
    sys.exit(main())
