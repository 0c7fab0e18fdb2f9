"""Review of issue 18's parse changes (h-parse): the in-memory parse of a large message
from its skeleton must give the plain parse's tree on adversarial input, keep no second
copy of a message it elides nothing from, and say when its scan failed."""

from __future__ import annotations

import io
import tracemalloc
from typing import Any

import pytest
from mailpipe.plugins.parse import parse_file, parse_message, parser
from structlog.testing import capture_logs

from .test_parse_scan import tree  # what the record is built from

NL = b"\r\n"


def bounce(recipients: int) -> bytes:
    """A multipart/report whose delivery-status body holds a line equal to a closed
    multipart's boundary (``--inner``), then many blocks split by blank lines. The
    stdlib parser takes that line as a line of a block (the ``inner`` multipart is
    closed); the scan knows every boundary ever declared and used to leave its
    delivery-status state there, then elide the blank lines that split the blocks."""
    blocks = (NL + NL).join(
        b"Final-Recipient: rfc822; user%d@example.org" % i
        + NL
        + b"Action: failed"
        + NL
        + b"Status: 5.1.1"
        for i in range(recipients)
    )
    return NL.join(
        [
            b"From: mailer-daemon@example.org",
            b"Subject: bounce",
            b"MIME-Version: 1.0",
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=outer",
            b"",
            b"--outer",
            b"Content-Type: multipart/alternative; boundary=inner",
            b"",
            b"--inner",
            b"Content-Type: text/plain",
            b"",
            b"Delivery failed.",
            b"--inner--",
            b"--outer",
            b"Content-Type: message/delivery-status",
            b"",
            b"Reporting-MTA: dns; mx.example.org",
            b"",
            b"--inner",
            b"not a header",
            blocks,
            b"--outer--",
            b"",
        ]
    )


def plain(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[bytes]]:
    with monkeypatch.context() as m:
        m.setattr(parser, "_ELIDE_FROM", len(raw) + 1)
        record, payloads = parse_message(raw)
    return record.model_dump(), payloads


def test_a_stray_boundary_in_a_delivery_status_body_keeps_the_plain_tree(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = bounce(1200)
    assert len(raw) >= parser._ELIDE_FROM  # the skeleton route
    whole = parser._PARSER.parsebytes(raw)
    assert len(whole.get_payload()[1].get_payload()) == 1201  # the parser's blocks
    assert tree(parser._message(raw)) == tree(whole)
    record, payloads = parse_message(raw)
    assert (record.model_dump(), payloads) == plain(raw, monkeypatch)


def test_a_stray_boundary_in_a_delivery_status_body_spooled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same scan serves parse_file (runs of RUN_MIN octets): the same record."""
    raw = bounce(5000)
    record, payloads = parse_file(io.BytesIO(raw))
    want, want_payloads = plain(raw, monkeypatch)
    assert record.model_dump() == want
    assert [bytes(p) for p in payloads] == want_payloads


def _peak(fn: object, raw: bytes) -> int:
    tracemalloc.start()
    try:
        msg = fn(raw)  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        del msg


def test_nothing_elided_means_no_second_copy_of_the_message() -> None:
    """Past _ELIDE_HEADERS octets of headers the scan elides nothing: the skeleton is
    then the message itself, and parsing it instead of ``raw`` held a second copy of
    the message for the whole parse."""
    raw = b"".join(
        b"Received: from host%d.example by mx.example; Fri, 4 Dec 2026" % i + NL
        for i in range(1500)
    )
    raw += b"Content-Type: text/plain" + NL + NL + (b"x" * 75 + NL) * 25_000
    assert not parser.skeleton(
        io.BytesIO(raw), parser._ELIDE_RUN, parser._ELIDE_HEADERS
    ).runs
    plain_peak = _peak(parser._PARSER.parsebytes, raw)
    assert _peak(parser._message, raw) < plain_peak + len(raw) // 4


def test_a_failed_scan_falls_back_to_the_plain_parse_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = bounce(1200)
    want = plain(raw, monkeypatch)

    def broken(*_args: object) -> object:
        raise ValueError("scan bug")

    monkeypatch.setattr(parser, "skeleton", broken)
    with capture_logs() as logs:
        record, payloads = parse_message(raw)
    assert (record.model_dump(), payloads) == want
    assert [e["event"] for e in logs] == ["parse_skeleton_failed"]
    assert "scan bug" in logs[0]["error"]
