"""A WebSocket backend in its own process, for tests that kill it: Python `websockets`.

Usage: echo_backend.py PORT   (0 picks a free port)
Echoes every message and sends `tick N` every 10 ms on each connection. Prints
`listening PORT` once it accepts connections. Runs until killed.
"""
import asyncio
import sys

import websockets


async def serve_one(ws) -> None:
    async def ticks() -> None:
        n = 0
        while True:
            n += 1
            await ws.send(f"tick {n}")
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(ticks())
    try:
        async for message in ws:
            await ws.send(message)
    finally:
        ticker.cancel()


async def main(port: int) -> None:
    async with websockets.serve(serve_one, "127.0.0.1", port, ping_interval=None) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening {bound}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
