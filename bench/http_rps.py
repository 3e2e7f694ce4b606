#!/usr/bin/env python3
"""Plain-HTTP requests per second through wsbeat, next to nginx and HAProxy, in one run.

The origin is nginx answering `GET /` with a 64-byte body from memory (one worker).
`wrk` (Debian package) loads each target over keep-alive connections; every proxy keeps
a pool of idle connections to the origin (nginx: `keepalive 64`; HAProxy and wsbeat pool
by default). Targets are interleaved round by round so that drift in the machine's load
hits them alike, and the table shows medians with ratios to wsbeat.

    python3 bench/http_rps.py                      # 3 rounds x 10 s, 100 connections
    python3 bench/http_rps.py --rounds 1 --seconds 3 --connections 50
    python3 bench/http_rps.py --connections 1000   # many keep-alive connections
    python3 bench/http_rps.py --body-bytes 65536   # a 64 KiB body (a file, not `return`)

`proxy CPU µs/req`: the CPU time (utime + stime, every process of the target's process
group) during the measured window, divided by the requests wrk counted.
    WSBEAT_BIN=target/release/wsbeat python3 bench/http_rps.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["direct", "wsbeat", "nginx-1", "nginx-auto", "haproxy-1", "haproxy-auto"]
ANCHORS = ["nginx-1", "nginx-auto", "haproxy-1", "haproxy-auto"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = "x" * 63 + "\n"

ORIGIN_CONF = """\
worker_processes 1;
pid {d}/origin.pid;
error_log {d}/origin.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/ob; proxy_temp_path {d}/op; fastcgi_temp_path {d}/of;
    uwsgi_temp_path {d}/ou; scgi_temp_path {d}/os;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        {location}
    }}
}}
"""

PROXY_CONF = """\
worker_processes {workers};
pid {d}/proxy.pid;
error_log {d}/proxy.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/pb; proxy_temp_path {d}/pp; fastcgi_temp_path {d}/pf;
    uwsgi_temp_path {d}/pu; scgi_temp_path {d}/ps;
    keepalive_requests 1000000;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    maxconn 4000
{nbthread}
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    http-reuse always
    server origin 127.0.0.1:{origin}
"""

WSBEAT_CONF = """\
listen: 127.0.0.1:{port}
admin: {{ listen: null }}
upstream: {{ url: "ws://127.0.0.1:{origin}" }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, patience: float = 10.0) -> None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process exited early ({proc.args})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on {port}")


def spawn(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def group_stats(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of every process in the
    process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # field 5, pgrp
            found.append((int(entry), fields))
    return found


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in the process group `pgid`."""
    # fields 14, 15 of stat: utime, stime
    return sum(int(f[11]) + int(f[12]) for _, f in group_stats(pgid)) / CLK_TCK


def start(target: str, origin: int, d: Path, wsbeat: str) -> tuple[subprocess.Popen | None, int]:
    if target == "direct":
        return None, origin
    port = free_port()
    if target == "wsbeat":
        conf = d / "wsbeat.yaml"
        conf.write_text(WSBEAT_CONF.format(port=port, origin=origin))
        proc = spawn([wsbeat, "--config", str(conf)])
    elif target.startswith("nginx"):
        conf = d / f"{target}.conf"
        workers = 1 if target == "nginx-1" else "auto"
        conf.write_text(PROXY_CONF.format(workers=workers, d=d, port=port, origin=origin))
        proc = spawn(["nginx", "-c", str(conf), "-g", "daemon off;"])
    else:
        conf = d / "haproxy.cfg"
        nbthread = "    nbthread 1" if target == "haproxy-1" else ""
        conf.write_text(HAPROXY_CONF.format(port=port, origin=origin, nbthread=nbthread))
        proc = spawn(["haproxy", "-f", str(conf)])
    wait_port(port, proc)
    return proc, port


def wrk(port: int, seconds: int, connections: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency",
         f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": rps, "requests": requests, "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "errors": errors.group(0) if errors else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--body-bytes", type=int, default=64, help="response body size (default 64)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--json", help="write every run here")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    wsbeat = os.environ.get("WSBEAT_BIN")
    if not wsbeat:
        subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=ROOT, check=True)
        wsbeat = str(ROOT / "target/release/wsbeat")
    targets = args.targets.split(",")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="wsbeat-http-") as tmp:
        d = Path(tmp)
        origin = free_port()
        conf = d / "origin.conf"
        if args.body_bytes == len(BODY):
            location = 'location / {{ default_type text/plain; return 200 "{}"; }}'.format(
                BODY.strip() + "\\n")
        else:
            # nginx's workers run unprivileged: the temp dir is 0700.
            d.chmod(0o755)
            (d / "www").mkdir(mode=0o755)
            (d / "www" / "index.html").write_bytes(b"x" * args.body_bytes)
            (d / "www" / "index.html").chmod(0o644)
            location = f"location / {{ root {d}/www; }}"
        conf.write_text(ORIGIN_CONF.format(d=d, port=origin, location=location))
        origin_proc = spawn(["nginx", "-c", str(conf), "-g", "daemon off;"])
        try:
            wait_port(origin, origin_proc)
            for rnd in range(1, args.rounds + 1):
                for target in targets:
                    proc, port = start(target, origin, d, wsbeat)
                    try:
                        wrk(port, 1, args.connections)  # warm the pools
                        pgid = proc.pid if proc else origin_proc.pid
                        cpu0 = group_cpu_seconds(pgid)
                        r = wrk(port, args.seconds, args.connections)
                        r["proxy_cpu_s"] = group_cpu_seconds(pgid) - cpu0
                        r["proxy_us_per_req"] = r["proxy_cpu_s"] * 1e6 / max(1, r["requests"])
                    finally:
                        if proc:
                            stop(proc)
                    r.update(target=target, round=rnd)
                    runs.append(r)
                    print(f"round {rnd} {target:11} {r['rps']:>10,.0f} req/s  "
                          f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                          f"proxy CPU {r['proxy_us_per_req']:.1f} µs/req"
                          + (f"  ({r['errors']})" if r["errors"] else ""), file=sys.stderr)
        finally:
            stop(origin_proc)

    med = {t: {k: statistics.median(r[k] for r in runs if r["target"] == t)
               for k in ("rps", "p50_ms", "p99_ms", "proxy_us_per_req")} for t in targets}
    print(f"\nPlain HTTP, GET {args.body_bytes}-byte body, {args.connections} keep-alive "
          f"connections, wrk -t2, {args.rounds} x {args.seconds} s, medians\n")
    print("| target | req/s | p50 ms | p99 ms | proxy CPU µs/req | wsbeat req/s ÷ target |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in targets:
        m = med[t]
        ratio = med["wsbeat"]["rps"] / m["rps"] if "wsbeat" in med else float("nan")
        print(f"| {t} | {m['rps']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
              f"{m['proxy_us_per_req']:.1f} | {ratio:.2f}× |")
    anchors = [t for t in ANCHORS if t in med]
    if "wsbeat" in med and anchors:
        best_rps = max(anchors, key=lambda t: med[t]["rps"])
        best_cpu = min(anchors, key=lambda t: med[t]["proxy_us_per_req"])
        print(f"\nwsbeat / best anchor: req/s {med['wsbeat']['rps'] / med[best_rps]['rps']:.2f}× "
              f"({best_rps}); proxy CPU µs/req "
              f"{med['wsbeat']['proxy_us_per_req'] / med[best_cpu]['proxy_us_per_req']:.2f}× ({best_cpu})")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
