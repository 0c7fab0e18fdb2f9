"""parse_file (issue 20.6): the same record and bytes as parse_message, with the long
base64 runs decoded from the file into SpooledPayloads instead of memory."""

from __future__ import annotations

import base64
import io
import random

import pytest
from mailpipe.plugins.parse import SpooledPayload, parse_file, parse_message

_RNG = random.Random(20)


def b64(n: int, nl: bytes = b"\r\n") -> bytes:
    return base64.encodebytes(_RNG.randbytes(n)).replace(b"\n", nl)


H = (
    b"From: a@b.example\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=zz\r\n\r\npre\r\n"
)


def pdf(body: bytes) -> bytes:
    return (
        b"--zz\r\nContent-Type: application/pdf; name=a.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body
    )


INNER = (
    b"From: c@d.example\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=yy\r\n\r\n--yy\r\n"
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
)
CASES = {
    "attachment": (H + pdf(b64(600_000)) + b"--zz--\r\n", 1),
    "no line end before the boundary": (H + pdf(b64(600_000)[:-2]) + b"--zz--\r\n", 1),
    "padding inside": (H + pdf(b64(300_001) + b64(300_001)) + b"--zz--\r\n", 0),
    "length not a multiple of 4": (H + pdf(b64(600_000)[:-7] + b"\r\n") + b"--zz--\r\n", 1),
    "other text around": (H + pdf(b"junk!\r\n" + b64(600_000) + b"tail!\r\n") + b"--zz--\r\n", 1),
    "bare LF": (H + pdf(b64(600_000, b"\n")) + b"--zz--\r\n", 1),
    "base64 text body": (
        H + b"--zz\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64(600_000) + b"--zz--\r\n", 0,
    ),
    "plain text that looks like base64": (
        H + b"--zz\r\nContent-Type: text/plain\r\n\r\n" + b64(600_000) + b"--zz--\r\n", 0
    ),
    "nested message": (
        H + b"--zz\r\nContent-Type: message/rfc822\r\n\r\n" + INNER + b64(600_000)
        + b"--yy--\r\n--zz--\r\n", 0,
    ),
    "epilogue": (H + pdf(b64(600_000)) + b"--zz--\r\n" + b64(400_000), 1),
    "single part": (
        b"From: a@b.example\r\nContent-Type: image/png\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(600_000), 1,
    ),
    "no MIME": (b"From: a@b.example\r\n\r\n" + b64(600_000), 0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parse_file_matches_parse_message(name: str) -> None:
    raw, spooled = CASES[name]
    want, want_payloads = parse_message(raw)
    got, got_payloads = parse_file(io.BytesIO(raw))
    assert got.model_dump() == want.model_dump()
    assert [bytes(p) for p in got_payloads] == [bytes(p) for p in want_payloads]
    assert sum(isinstance(p, SpooledPayload) for p in got_payloads) == spooled
