#!/usr/bin/env python3
"""Writes the seed corpus of the `heartbeat_inflate` fuzz target into
fuzz/corpus/heartbeat_inflate/.

    python3 fuzz/seeds/heartbeat_inflate.py

Each seed is a mode byte (even: a compressed payload; odd: a message to compress), then
the data (see fuzz_targets/heartbeat_inflate.rs). The zip bombs inflate to far more than
the heartbeat's length + 1 from a few bytes: the cap must stop them. Deterministic.
"""
import os
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "heartbeat_inflate")
HB = b"--heartbeat--"


def deflated(data, level=6, finish=False, strategy=zlib.Z_DEFAULT_STRATEGY):
    """One message as a permessage-deflate sender makes it (tail removed), or ended with
    a final block when `finish`."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, strategy)
    out = c.compress(data) + c.flush(zlib.Z_FINISH if finish else zlib.Z_SYNC_FLUSH)
    if not finish:
        assert out.endswith(b"\x00\x00\xff\xff")
        out = out[:-4]
    return out


SEEDS = {
    "heartbeat": b"\x00" + deflated(HB),
    "heartbeat-final-block": b"\x00" + deflated(HB, finish=True),
    "heartbeat-stored": b"\x00" + deflated(HB, level=0),
    "heartbeat-fixed-huffman": b"\x00" + deflated(HB, strategy=zlib.Z_FIXED),
    "heartbeat-plus-one": b"\x00" + deflated(HB + b"-"),
    "heartbeat-short-one": b"\x00" + deflated(HB[:-1]),
    "heartbeat-then-garbage": b"\x00" + deflated(HB, finish=True) + b"\xff\xff",
    "not-deflate": b"\x00\xff\xff\xff\xff\xff",
    "empty": b"\x00",
    "bomb-4k-fits-64-bytes": b"\x00" + deflated(b"-" * 4000),
    "bomb-of-heartbeats": b"\x00" + deflated(HB * 2000),
    "bomb-1m-over-64-bytes": b"\x00" + deflated(b"\x00" * (1 << 20)),
    "bomb-fixed-huffman": b"\x00" + deflated(b"-" * 8000, strategy=zlib.Z_FIXED)[:64],
    "message-heartbeat": b"\x01" + HB,
    "message-json": b"\x01" + b'{"id":1,"user":"a","text":"hello"}',
    "message-incompressible": b"\x01" + bytes(range(200)),
    "message-empty": b"\x01",
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
