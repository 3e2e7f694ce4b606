#!/usr/bin/env python3
"""Where a proxied plain-HTTP request's CPU goes: counters, system calls and a call-graph
profile of one target under `wrk`, with the origin and configurations of `http_rps.py`.

For each target, three windows of `--seconds` each, every one under its own `wrk` run:
1. `perf stat` on the target's processes: system calls (`raw_syscalls:sys_enter`, cheap:
   no ptrace), context switches, CPU migrations, task-clock; divided by the requests wrk
   counted in that window;
2. `strace -c -f`: which system calls (slows the target: only the mix is meant, per
   request of that window);
3. `perf record -g` (saved as `<out>/<target>.perf.data`, reported with `--no-children`
   by symbol and by shared object).

    python3 bench/http_profile.py --targets wsbeat,haproxy-auto --out /tmp/httpprof
    WSBEAT_BIN=target/release/wsbeat python3 bench/http_profile.py --connections 1000

Needs root (perf on another process, strace), `perf`, `strace`, `wrk`, nginx, HAProxy.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_rps  # noqa: E402  (same directory)


def group_pids(pgid: int) -> list[int]:
    return sorted(pid for pid, _ in http_rps.group_stats(pgid))


def under_wrk(port: int, seconds: int, connections: int, tool: list[str]) -> tuple[dict, str]:
    """Runs `tool` (which attaches to the target) while wrk loads it for `seconds`."""
    proc = subprocess.Popen(tool, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # attached
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(http_rps.wrk(port, seconds, connections)))
    t.start()
    t.join()
    proc.send_signal(2)  # SIGINT: perf and strace print their summary and exit
    _, err = proc.communicate(timeout=120)
    return result, err


def perf_stat(port: int, pids: list[int], a: argparse.Namespace) -> dict:
    events = "raw_syscalls:sys_enter,context-switches,cpu-migrations,task-clock"
    r, err = under_wrk(port, a.seconds, a.connections,
                       ["perf", "stat", "-e", events, "-p", ",".join(map(str, pids))])
    out = {"requests": r["requests"], "rps": r["rps"]}
    for name in ("raw_syscalls:sys_enter", "context-switches", "cpu-migrations", "task-clock"):
        m = re.search(rf"^\s*([\d,.]+)\s+(?:msec\s+)?{re.escape(name)}", err, re.M)
        if m:
            out[name] = float(m.group(1).replace(",", ""))
    # The window is wrk's plus ~0.5 s of attach and detach on either side: idle time.
    n = max(1, r["requests"])
    out["syscalls_per_req"] = out.get("raw_syscalls:sys_enter", 0) / n
    out["cs_per_req"] = out.get("context-switches", 0) / n
    out["migrations_per_req"] = out.get("cpu-migrations", 0) / n
    out["cpu_us_per_req"] = out.get("task-clock", 0) * 1e3 / n
    return out


def allocs(port: int, pids: list[int], a: argparse.Namespace) -> dict:
    """libc allocations per request, counted by uprobes (`perf probe -x <libc> malloc`, and
    `calloc`, `realloc`, made beforehand)."""
    events = "probe_libc:malloc,probe_libc:calloc,probe_libc:realloc"
    r, err = under_wrk(port, a.seconds, a.connections,
                       ["perf", "stat", "-e", events, "-p", ",".join(map(str, pids))])
    n = max(1, r["requests"])
    counts = {m.group(2): float(m.group(1).replace(",", "")) for m in
              re.finditer(r"^\s*([\d,.]+)\s+probe_libc:(\w+)", err, re.M)}
    return {"requests": r["requests"], "rps": r["rps"],
            "per_req": {k: v / n for k, v in counts.items()},
            "total_per_req": sum(counts.values()) / n}


def strace_c(port: int, pids: list[int], a: argparse.Namespace) -> dict:
    argv = ["strace", "-c", "-f"] + [x for p in pids for x in ("-p", str(p))]
    r, err = under_wrk(port, a.seconds, a.connections, argv)
    n = max(1, r["requests"])
    calls = {}
    for line in err.splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total" and f[3].isdigit():
            calls[f[-1]] = int(f[3])
    return {"requests": r["requests"], "rps": r["rps"],
            "per_req": {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
            "total_per_req": sum(calls.values()) / n}


def perf_record(port: int, pids: list[int], a: argparse.Namespace, data: Path) -> dict:
    argv = ["perf", "record", "-g", "-o", str(data), "-p", ",".join(map(str, pids))]
    r, _ = under_wrk(port, a.seconds, a.connections, argv)
    def report(sort: str, limit: int) -> str:
        out = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                              "--stdio", "-g", "none", "--percent-limit", "0.7"],
                             capture_output=True, text=True).stdout
        rows = [l for l in out.splitlines() if l.strip() and not l.startswith("#")]
        return "\n".join(rows[:limit])
    return {"requests": r["requests"], "rps": r["rps"], "dso": report("dso", 12),
            "symbols": report("symbol", 40)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="wsbeat,haproxy-auto")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=100)
    ap.add_argument("--body-bytes", type=int, default=64)
    ap.add_argument("--out", default="/tmp/wsbeat-httpprof")
    ap.add_argument("--allocs", action="store_true",
                    help="a fourth window: libc allocations per request (uprobes on libc)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wsbeat = os.environ.get("WSBEAT_BIN", str(http_rps.ROOT / "target/release/wsbeat"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="wsbeat-httpprof-") as tmp:
        d = Path(tmp)
        d.chmod(0o755)
        origin = http_rps.free_port()
        if args.body_bytes == len(http_rps.BODY):
            location = 'location / {{ default_type text/plain; return 200 "{}"; }}'.format(
                http_rps.BODY.strip() + "\\n")
        else:
            (d / "www").mkdir(mode=0o755)
            (d / "www" / "index.html").write_bytes(b"x" * args.body_bytes)
            (d / "www" / "index.html").chmod(0o644)
            location = f"location / {{ root {d}/www; }}"
        (d / "origin.conf").write_text(http_rps.ORIGIN_CONF.format(d=d, port=origin,
                                                                   location=location))
        origin_proc = http_rps.spawn(["nginx", "-c", str(d / "origin.conf"), "-g", "daemon off;"])
        try:
            http_rps.wait_port(origin, origin_proc)
            for target in args.targets.split(","):
                proc, port = http_rps.start(target, origin, d, wsbeat)
                try:
                    http_rps.wrk(port, 1, args.connections)  # warm the pools
                    pids = group_pids(proc.pid)
                    if target.startswith("nginx") and len(pids) > 1:
                        pids = [p for p in pids if p != proc.pid]  # the workers
                    res = {"stat": perf_stat(port, pids, args),
                           "strace": strace_c(port, pids, args),
                           "perf": perf_record(port, pids, args, out / f"{target}.perf.data")}
                    if args.allocs:
                        res["allocs"] = allocs(port, pids, args)
                finally:
                    http_rps.stop(proc)
                results[target] = res
                s = res["stat"]
                print(f"\n## {target}: {s['rps']:,.0f} req/s under perf stat; per request: "
                      f"{s['syscalls_per_req']:.2f} system calls, {s['cs_per_req']:.3f} context "
                      f"switches, {s['migrations_per_req']:.4f} migrations, "
                      f"{s['cpu_us_per_req']:.1f} µs task-clock")
                st = res["strace"]
                print(f"strace -c -f ({st['rps']:,.0f} req/s under strace): "
                      f"{st['total_per_req']:.2f} calls/request: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in st["per_req"].items() if v >= 0.01))
                if "allocs" in res:
                    al = res["allocs"]
                    print(f"libc allocations ({al['rps']:,.0f} req/s under uprobes): "
                          f"{al['total_per_req']:.2f}/request: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in al["per_req"].items()))
                print(f"perf record ({res['perf']['rps']:,.0f} req/s), by shared object:\n"
                      f"{res['perf']['dso']}\nby symbol:\n{res['perf']['symbols']}")
        finally:
            http_rps.stop(origin_proc)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
