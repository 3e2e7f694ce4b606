#!/usr/bin/env python3
"""Writes the seed corpus of the `frame` fuzz target into fuzz/corpus/frame/.

    python3 fuzz/seeds/frame.py

Each seed is 4 setup bytes then a byte stream (see fuzz_targets/frame.rs):
byte 0 = client (bit 0) | message limit + 65536 (bit 1) | largest read << 2 (0: all
at once), bytes 1-2 = message limit (little endian), byte 3 = seed of the read sizes
(bits 0-6) | permessage-deflate negotiated (bit 7).
Deterministic: running it again rewrites the same files (and removes no others).
"""
import os
import struct
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus", "frame")
MASK = b"\x37\xfa\x21\x3d"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def setup(client=True, max_message=1 << 16, max_read=0, seed=1, deflate=False):
    """`deflate`: permessage-deflate negotiated (byte 3, bit 7)."""
    big = max_message >= 1 << 16
    assert max_message < 1 << 17 and 0 <= max_read < 64 and 0 <= seed < 128
    b0 = int(client) | int(big) << 1 | max_read << 2
    return bytes([b0]) + struct.pack("<H", max_message & 0xFFFF) + bytes([seed | deflate << 7])


def frame(opcode, payload=b"", fin=True, mask=MASK, rsv=0, length=None, form=None):
    """One frame; `length` overrides the declared length, `form` forces 7/16/64 bits."""
    n = len(payload) if length is None else length
    out = bytearray([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask is not None else 0
    form = form or (7 if n < 126 else 16 if n < 1 << 16 else 64)
    if form == 7:
        out.append(bit | n)
    elif form == 16:
        out.append(bit | 126)
        out += struct.pack(">H", n)
    else:
        out.append(bit | 127)
        out += struct.pack(">Q", n)
    if mask is not None:
        out += mask
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(out) + payload


def server(opcode, payload=b"", fin=True, **kw):
    return frame(opcode, payload, fin, mask=None, **kw)


def close(code, reason=b""):
    return struct.pack(">H", code) + reason


SEEDS = {}


def seed(name, data):
    assert name not in SEEDS
    SEEDS[name] = data


# Valid streams.
seed("text", setup() + frame(TEXT, "hello ✓".encode()))
seed("binary-16bit-length-server", setup(client=False, max_read=7)
     + server(BINARY, bytes(range(256)) + b"x" * 44))
seed("binary-64bit-length", setup(max_message=(1 << 16) + 100, max_read=63)
     + frame(BINARY, b"\xab" * (1 << 16)))
seed("non-minimal-lengths", setup(max_read=3)
     + frame(TEXT, b"abc", form=16) + frame(BINARY, b"de", form=64))
text = "héllo wörld ✓ 𝄞".encode()
seed("fragmented-multibyte-1-byte-reads", setup(max_read=1)
     + frame(TEXT, text[:2], fin=False) + frame(CONT, text[2:9], fin=False)
     + frame(CONT, text[9:]))
seed("control-between-fragments", setup(max_read=5)
     + frame(TEXT, b"he", fin=False) + frame(PING, b"p")
     + frame(CONT, b"", fin=False) + frame(PONG, b"")
     + frame(CONT, b"llo") + frame(BINARY, b"\x00\xff"))
seed("control-between-fragments-server", setup(client=False, max_read=2)
     + server(BINARY, b"ab", fin=False) + server(PING, b"x" * 125)
     + server(CONT, b"cd") + server(PONG, b"y"))
seed("empty-frames", setup()
     + frame(TEXT, b"") + frame(BINARY, b"", fin=False) + frame(CONT, b""))
seed("many-pings", setup(max_read=9, seed=7) + b"".join(frame(PING, bytes([i])) for i in range(40)))
seed("close-with-reason-then-garbage", setup()
     + frame(TEXT, b"bye") + frame(CLOSE, close(1000, "done ✓".encode())) + b"\xff\xff\xff")
seed("close-empty", setup(client=False) + server(CLOSE))
seed("close-1014-4999", setup(max_read=4)
     + frame(CLOSE, close(1014)) + frame(CLOSE, close(4999, b"x")))
seed("exact-limit", setup(max_message=10)
     + frame(BINARY, b"\x01" * 6, fin=False) + frame(CONT, b"\x01" * 4))
seed("truncated-mid-payload", setup(max_read=2) + frame(TEXT, b"abcdef")[:-3])
seed("truncated-mid-header", setup() + frame(BINARY, b"z" * 300)[:3])

# Too big (1009).
seed("too-big-single", setup(max_message=10) + frame(BINARY, b"\x02" * 11))
seed("too-big-fragmented", setup(max_message=10)
     + frame(BINARY, b"\x01" * 6, fin=False) + frame(CONT, b"\x01" * 5))
seed("too-big-declared-only", setup(max_message=1000) + frame(TEXT, length=1 << 40)[:16])
seed("too-big-limit-0-ping-ok", setup(max_message=0) + frame(PING, b"ping") + frame(TEXT, b"a"))

# Protocol errors (1002).
seed("rsv-bits", setup() + frame(TEXT, b"x", rsv=4))
seed("rsv-bits-and-too-big", setup(max_message=2) + frame(BINARY, b"xyz", rsv=1))
seed("reserved-data-opcode", setup() + frame(0x3, b"x"))
seed("reserved-control-opcode", setup() + frame(0xB))
seed("unmasked-from-client", setup() + server(TEXT, b"x"))
seed("masked-from-server", setup(client=False) + frame(TEXT, b"x"))
seed("length-top-bit", setup() + frame(BINARY, length=1 << 63)[:14])
seed("ping-126-bytes", setup() + frame(PING, b"p" * 126))
seed("fragmented-ping", setup() + frame(PING, b"", fin=False))
seed("continuation-alone", setup() + frame(CONT, b"x"))
seed("text-inside-a-message", setup() + frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"))
seed("close-1-byte", setup() + frame(CLOSE, b"\x03"))
seed("close-1005", setup() + frame(CLOSE, close(1005)))
seed("close-999-bad-reason", setup() + frame(CLOSE, close(999, b"\xff")))

# Invalid UTF-8 (1007), cut at every boundary into two fragments.
bad = b"a\xf0\x9f\x98A"  # a 4-byte sequence missing its last byte
for cut in range(len(bad) + 1):
    seed(f"bad-utf8-cut-{cut}", setup(max_read=cut + 1)
         + frame(TEXT, bad[:cut], fin=False) + frame(CONT, bad[cut:]))
seed("utf8-incomplete-at-end", setup(max_read=1) + frame(TEXT, b"ok\xce"))
seed("utf8-incomplete-then-empty-final", setup()
     + frame(TEXT, b"a\xce", fin=False) + frame(CONT, b""))
seed("utf8-surrogate", setup(client=False) + server(TEXT, b"\xed\xa0\x80"))
seed("utf8-overlong", setup(max_read=2) + frame(TEXT, b"\xe0\x80\x80"))
seed("close-reason-bad-utf8", setup() + frame(CLOSE, close(1000, b"\xc3")))
seed("binary-not-checked", setup() + frame(BINARY, b"\xff\xfe"))

# permessage-deflate negotiated (RFC 7692): RSV1 = rsv=4.


def deflated(data):
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


D = dict(deflate=True)
seed("deflate-text", setup(**D) + frame(TEXT, deflated(b"hello hello hello"), rsv=4))
seed("deflate-heartbeat", setup(max_read=3, **D) + frame(TEXT, deflated(b"--heartbeat--"), rsv=4))
seed("deflate-text-not-utf8", setup(**D) + frame(TEXT, b"\xff\xfe\x00", rsv=4))
seed("deflate-plain-text-still-checked", setup(**D) + frame(TEXT, b"\xff"))
seed("deflate-fragmented-with-controls", setup(max_read=4, **D)
     + frame(TEXT, b"\xc3", fin=False, rsv=4) + frame(PING, b"p")
     + frame(CONT, b"\xff", fin=False) + frame(CONT, b"") + frame(BINARY, b"\x01", rsv=4))
seed("deflate-server", setup(client=False, max_read=2, **D)
     + server(TEXT, deflated(b"x" * 300), rsv=4) + server(BINARY, b"\x00\x01", rsv=4))
seed("deflate-rsv1-on-continuation", setup(**D)
     + frame(TEXT, b"a", fin=False, rsv=4) + frame(CONT, b"b", rsv=4))
seed("deflate-rsv1-on-ping", setup(**D) + frame(PING, b"p", rsv=4))
seed("deflate-rsv1-on-close", setup(**D) + frame(CLOSE, close(1000), rsv=4))
seed("deflate-rsv1-inside-a-message", setup(**D)
     + frame(BINARY, b"a", fin=False) + frame(TEXT, b"b", rsv=4))
seed("deflate-rsv2", setup(**D) + frame(TEXT, b"x", rsv=6))
seed("deflate-too-big-on-the-wire", setup(max_message=10, **D)
     + frame(BINARY, b"\x01" * 6, fin=False, rsv=4) + frame(CONT, b"\x01" * 5))
seed("deflate-reserved-opcode", setup(**D) + frame(0x3, b"x", rsv=4))


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, data in SEEDS.items():
        assert len(data) <= 70000, name
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    print(f"{len(SEEDS)} seeds in {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
