"""A compressing client nobody on this project wrote: Python `websockets`, through wsbeat
to a backend that compresses.

Usage: deflate_client.py URL MODE
  MODE ok: checks that permessage-deflate was negotiated with client_no_context_takeover,
    waits for a heartbeat, sends one (compressed, as every message), then messages of
    many sizes (tiny, 1 KiB JSON, 64 KiB, non-ASCII) and checks each echo; closes with
    4002 and prints OK.
  MODE takeover: compresses WITH context takeover although the server said not to, and
    prints `CLOSED <code> <reason>` with the close the client received.
"""
import asyncio
import sys
import zlib

import websockets
from websockets.exceptions import ConnectionClosed

HEARTBEAT = "--heartbeat--"


async def recv_data(ws):
    while True:
        m = await asyncio.wait_for(ws.recv(), 10)
        if m != HEARTBEAT:
            return m


async def ok(url: str) -> None:
    async with websockets.connect(url, ping_interval=None, max_size=None) as ws:
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in ext and "client_no_context_takeover" in ext, ext
        first = await asyncio.wait_for(ws.recv(), 10)
        assert first == HEARTBEAT, f"expected a heartbeat first, got {first!r}"
        await ws.send(HEARTBEAT)
        messages = ["hi", "x", HEARTBEAT + "!", "héllo wörld ✓"]
        messages += ['{"id":%d,"text":"%s"}' % (i, "abc" * (i * 30)) for i in range(12)]
        messages += ["z" * 65536, bytes(range(256)) * 4]
        for m in messages:
            await ws.send(m)
            reply = await recv_data(ws)
            assert reply == m, (m[:40], reply[:40])
        await ws.close(code=4002, reason="python done")
    print("OK", ext)


async def takeover(url: str) -> None:
    async with websockets.connect(url, ping_interval=None) as ws:
        deflate = ws.protocol.extensions[0]
        assert deflate.local_no_context_takeover, "the server asked for no context takeover"
        # Misbehave: one compressor for every message, so each refers to the last.
        deflate.local_no_context_takeover = False
        deflate.encoder = zlib.compressobj(
            wbits=-deflate.local_max_window_bits, **deflate.compress_settings
        )
        try:
            for _ in range(5):
                await ws.send("the same words, again and again and again")
                await recv_data(ws)
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        try:
            await asyncio.wait_for(ws.wait_closed(), 10)
        except asyncio.TimeoutError:
            pass
        rcvd = ws.protocol.close_rcvd
        print("CLOSED", rcvd.code if rcvd else None, rcvd.reason if rcvd else "")


if __name__ == "__main__":
    url, mode = sys.argv[1], sys.argv[2]
    asyncio.run(ok(url) if mode == "ok" else takeover(url))
