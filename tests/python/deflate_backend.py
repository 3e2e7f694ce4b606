"""A backend that compresses: Python `websockets` with permessage-deflate (its default).

Usage: deflate_backend.py PORT [--busy] [--quiet]   (PORT 0 picks a free port)
Echoes every message, and with --busy also sends a 1 KiB JSON-like message every 20 ms.
With --quiet nothing is printed after `listening PORT` (for runs nobody reads reports of).
Prints `listening PORT` once it accepts connections, then one JSON object per line for
each connection that ends:
  {"offer": "<Sec-WebSocket-Extensions it was offered>", "accepted": "<what it answered>",
   "messages": N, "heartbeats": N, "close_sent": [code, reason], "close_rcvd": [code, reason],
   "error": "<the exception that ended it, if any>"}
`heartbeats` counts messages equal to `--heartbeat--`, which wsbeat must have dropped.
Runs until killed.
"""
import asyncio
import json
import sys

import websockets

HEARTBEAT = "--heartbeat--"


def payload(n: int) -> str:
    body = ",".join(f'{{"id":{n},"user":"user{n % 97}","text":"message number {i}"}}' for i in range(20))
    return f'{{"seq":{n},"items":[{body}]}}'[:1024]


async def serve_one(ws, busy: bool, quiet: bool) -> None:
    stats = {"messages": 0, "heartbeats": 0, "error": None}

    async def ticks() -> None:
        n = 0
        while True:
            n += 1
            await ws.send(payload(n))
            await asyncio.sleep(0.02)

    ticker = asyncio.create_task(ticks()) if busy else None
    try:
        async for message in ws:
            stats["messages"] += 1
            if message == HEARTBEAT:
                stats["heartbeats"] += 1
            await ws.send(message)
    except websockets.exceptions.ConnectionClosed as e:
        # A close without 1000/1001 is an "error" to websockets; only a failure of the
        # backend's own (inflater, protocol) counts here.
        if e.sent and e.sent.code in (1002, 1007, 1011) and not e.rcvd_then_sent:
            stats["error"] = f"{type(e).__name__}: {e}"
    except Exception as e:
        stats["error"] = f"{type(e).__name__}: {e}"
    finally:
        if ticker:
            ticker.cancel()
    if quiet:
        return
    close = lambda c: [c.code, c.reason] if c else None
    print(
        json.dumps(
            {
                "offer": ws.request.headers.get("Sec-WebSocket-Extensions"),
                "accepted": ws.response.headers.get("Sec-WebSocket-Extensions"),
                "messages": stats["messages"],
                "heartbeats": stats["heartbeats"],
                "close_sent": close(ws.protocol.close_sent),
                "close_rcvd": close(ws.protocol.close_rcvd),
                "error": stats["error"],
            }
        ),
        flush=True,
    )


async def main(port: int, busy: bool, quiet: bool) -> None:
    async with websockets.serve(
        lambda ws: serve_one(ws, busy, quiet), "127.0.0.1", port, ping_interval=None, max_size=None
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening {bound}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "--busy" in sys.argv[2:], "--quiet" in sys.argv[2:]))
