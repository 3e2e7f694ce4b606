#!/usr/bin/env python3
"""Counts the system calls an idle connection costs: opens N WebSockets through a target
(wsbeat, or the limit baseline `wsbaseline`), waits until they are all open, then
attaches `strace -c -f` to the target for SECS seconds and prints its table together with
the write calls (sendto + writev + write) and all calls per connection per minute.

    python3 bench/idle_syscalls.py --target wsbeat --bin target/release/wsbeat --conns 200 --secs 60
    python3 bench/idle_syscalls.py --target baseline --conns 200 --secs 60

Counts, not timings: usable on a loaded machine. Needs strace and the bench package built
(`cd bench && cargo build --release`). wsbeat runs with the defaults (heartbeat 4 s, PING
10 s); the clients (wsload idle) answer PINGs and send nothing else.
"""

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REL = BENCH / "target" / "release"
WRITES = ("sendto", "writev", "write")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    import socket
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.025)
    sys.exit(f"port {port} never accepted")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["wsbeat", "baseline"], default="wsbeat")
    ap.add_argument("--bin", default=str(BENCH.parent / "target" / "release" / "wsbeat"))
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--secs", type=float, default=60.0)
    ap.add_argument("--json", help="append one JSON line with the counts here")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    d = Path(tempfile.mkdtemp(prefix="wsbeat-idle-"))
    procs = []
    try:
        echo = subprocess.Popen([str(REL / "wsecho"), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        procs.append(echo)
        echo_addr = echo.stdout.readline().decode().split()[-1]
        port = free_port()
        if args.target == "wsbeat":
            conf = d / "wsbeat.yaml"
            conf.write_text(f"listen: 127.0.0.1:{port}\nadmin:\n  listen: null\nupstream:\n"
                            f"  url: ws://{echo_addr}\n")
            argv = [args.bin, "--config", str(conf)]
        else:
            argv = [str(REL / "wsbaseline"), "--listen", f"127.0.0.1:{port}"]
        tgt = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               env=dict(os.environ, RUST_LOG="warn"))
        procs.append(tgt)
        wait_port(port)
        # The generator holds a little longer than strace watches.
        gen = subprocess.Popen([str(REL / "wsload"), "idle", "--url", f"ws://127.0.0.1:{port}/",
                                "--conns", str(args.conns), "--secs", str(args.secs + 5),
                                "--interval-ms", "4000"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(gen)
        for raw in gen.stderr:
            if raw.startswith(b"holding"):
                break
        else:
            sys.exit("wsload ended before holding")
        time.sleep(1.0)  # past the ramp's last handshakes
        out = d / "strace.txt"
        st = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(out), "-p", str(tgt.pid)])
        time.sleep(args.secs)
        st.send_signal(signal.SIGINT)
        st.wait(timeout=30)
        table = out.read_text()
        print(table)
        calls: dict[str, int] = {}
        for line in table.splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)$", line)
            if m and m.group(3) != "total":
                calls[m.group(3)] = int(m.group(1))
        conn_min = args.conns * args.secs / 60
        writes = sum(calls.get(w, 0) for w in WRITES)
        total = sum(calls.values())
        res = {"target": args.target, "bin": args.bin if args.target == "wsbeat" else "wsbaseline",
               "conns": args.conns, "secs": args.secs, "calls": calls,
               "writes_per_conn_min": writes / conn_min, "syscalls_per_conn_min": total / conn_min}
        print(f"{args.target}: {writes / conn_min:.2f} writes and {total / conn_min:.2f} system calls "
              f"per connection-minute ({args.conns} connections, {args.secs:.0f} s)")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        gen.wait(timeout=args.secs + 60)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
