"""A client nobody on this project wrote: Python `websockets`, through wsbeat.

Usage: client.py URL HEARTBEAT [CA_FILE]
With CA_FILE (for a wss:// URL), the client trusts that CA bundle only.
Waits for a heartbeat, checks the echo of a text and a binary message, sends a heartbeat
of its own (which wsbeat must drop), then closes with 4002. Prints OK on success.
"""
import asyncio
import ssl
import sys

import websockets


async def main(url: str, heartbeat: str, ca_file: str | None) -> None:
    # With a cafile, create_default_context loads that bundle and not the system roots.
    tls = {"ssl": ssl.create_default_context(cafile=ca_file)} if ca_file else {}
    async with websockets.connect(url, ping_interval=None, **tls) as ws:
        first = await asyncio.wait_for(ws.recv(), 10)
        assert first == heartbeat, f"expected a heartbeat first, got {first!r}"
        await ws.send(heartbeat)
        await ws.send("hello from python")
        reply = await asyncio.wait_for(ws.recv(), 10)
        while reply == heartbeat:
            reply = await asyncio.wait_for(ws.recv(), 10)
        assert reply == "hello from python", reply
        await ws.send(b"\x00\x01binary")
        reply = await asyncio.wait_for(ws.recv(), 10)
        while reply == heartbeat:
            reply = await asyncio.wait_for(ws.recv(), 10)
        assert reply == b"\x00\x01binary", reply
        await ws.close(code=4002, reason="python done")
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
