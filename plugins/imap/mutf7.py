"""Modified UTF-7 mailbox names (RFC 3501 §5.1.3; IC-23), encoded and decoded exactly.

Printable ASCII other than ``&`` stands for itself, ``&`` is ``&-``, anything else is
UTF-16BE in base64 with ``,`` for ``/`` and no padding between ``&`` and ``-``. The
standard ``utf-7`` codec is never used: it treats ``+`` as a shift (IC-23).
"""

from __future__ import annotations

import base64
import binascii


def encode(name: str) -> bytes:
    """The wire form of a display name (``Entwürfe`` → ``Entw&APw-rfe``)."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            b64 = base64.b64encode(raw).rstrip(b"=").replace(b"/", b",")
            out.extend(b"&" + b64 + b"-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def decode(wire: bytes) -> str:
    """The display name of a wire name; ValueError when it is not valid mUTF-7
    (the caller then keeps the raw bytes, IC-23)."""
    out: list[str] = []
    i, n = 0, len(wire)
    while i < n:
        c = wire[i]
        if c < 0x20 or c > 0x7E:
            raise ValueError("8-bit or control byte in a modified UTF-7 name")
        if c != 0x26:  # &
            out.append(chr(c))
            i += 1
            continue
        end = wire.find(b"-", i + 1)
        if end < 0:
            raise ValueError("modified UTF-7 shift without '-'")
        chunk = wire[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(b",", b"/")
            try:
                raw = base64.b64decode(b64 + b"=" * (-len(b64) % 4), validate=True)
                text = raw.decode("utf-16-be")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"bad modified UTF-7: {exc}") from None
            if any(0x20 <= ord(ch) <= 0x7E for ch in text):
                raise ValueError("printable ASCII encoded in modified UTF-7")
            out.append(text)
        i = end + 1
    return "".join(out)
