"""parse never raises: random and mutated bytes (hypothesis), raw bytes stay available."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailpipe.plugins.parse import (
    PAYLOADS_KEY,
    MessageRecord,
    ParseProcessor,
    parse_message,
)

from mailpipe.message import Message
from mailpipe.processor import ProcessorContext

SEEDS = [
    p.read_bytes()
    for p in sorted(
        (Path(__file__).resolve().parents[1] / "data" / "parse").glob("*.eml")
    )
]

# Fragments that stress the parser: boundaries, encoded-words, charsets, folding.
FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"--",
    b"--b1",
    b"--b1--",
    b"\x00",
    b"\xff",
    b"=?utf-8?B?",
    b"=?iso-2022-jp?q?",
    b"?=",
    b"=?x?Q?=FF?=",
    b"\x1b$B",
    b"\x1b(B",
    b"Content-Type: multipart/mixed; boundary=b1\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"begin 644 f\r\n",
    b"end\r\n",
    b"Content-Disposition: attachment; filename*0*=utf-8''%E3%81; filename*1=x\r\n",
    b'From: <<@@>>, "unterminated\r\n',
    b"Date: 99 Foo 99999 99:99 +9999\r\n",
    b'Content-Type: text/plain; charset="charset=x"\r\n',
    b"\t",
    b" ",
]


def _check(raw: bytes) -> None:
    record, payloads = parse_message(raw)
    assert record.sha256 == hashlib.sha256(raw).hexdigest()
    assert record.size == len(raw)
    assert len(payloads) == len(record.attachments)
    MessageRecord.model_validate_json(record.model_dump_json())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 40), st.sampled_from(FRAGMENTS)),
        max_size=8,
    ),
)
def test_mutated_fixtures(seed: bytes, edits: list[tuple[float, int, bytes]]) -> None:
    raw = bytearray(seed)
    for where, cut, fragment in edits:
        at = int(where * len(raw))
        raw[at : at + cut] = fragment
    _check(bytes(raw))


def test_deep_nesting_and_many_parts() -> None:
    depth = 300
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    _check(b"Subject: deep\r\n" + head + b"\r\nleaf\r\n")
    many = (
        b"Content-Type: multipart/mixed; boundary=m\r\n\r\n"
        + b"".join(
            b"--m\r\nContent-Type: application/octet-stream\r\n\r\nx%d\r\n" % i
            for i in range(3000)
        )
        + b"--m--\r\n"
    )
    record, payloads = parse_message(many)
    assert len(record.attachments) == 3000
    assert payloads[2999] == b"x2999"


def test_processor_keeps_raw_bytes_of_bad_input() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n\xff\xfe garbage"
    message = Message.from_bytes(raw)
    ParseProcessor(ParseProcessor.Options(), ProcessorContext()).process(message)
    assert message.raw == raw
    assert isinstance(message.record, MessageRecord)
    assert message.meta[PAYLOADS_KEY] == []
