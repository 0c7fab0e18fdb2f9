"""Issue 21.1: a POP3 server's notice that carries the original (RFC 6856 §3).

The two ``courier_notice_*.eml`` fixtures were captured from Courier 1.0.16 in the
interop lab (``mailpipe.testing.servers``): ORIGINAL and ORIGINAL_PART below were
loaded into its Maildir and read back with the reference client, which does not send
``UTF8``. :func:`notice` rebuilds that shape byte for byte (checked below), for the
variations.
"""

from __future__ import annotations

import base64
import io
import random
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.filter import FilterOptions, FilterProcessor
from mailpipe.plugins.parse import (
    PAYLOADS_KEY,
    MessageRecord,
    ParseProcessor,
    SpooledPayload,
    parse_file,
    parse_message,
)

from mailpipe.message import Message, MessageRef
from mailpipe.processor import Decision, Disposition, ProcessorContext

DATA = Path(__file__).resolve().parents[1] / "data" / "parse"

NEWS = "Grüße aus München \u2013 Newsletter"  # an en dash, as sent
ORIGINAL = (
    "From: Jürgen Müller <juergen@example.de>\r\n"
    "To: Zoë <zoe@example.org>\r\n"
    f"Subject: {NEWS}\r\n"
    "Date: Tue, 04 Jun 2024 10:00:00 +0200\r\n"
    "Message-ID: <news-42@example.de>\r\n"
    "List-Id: Weekly news <weekly.example.de>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "\r\n"
    "Hallo Zoë, schöne Grüße.\r\n"
).encode()
#: 8-bit octets only in a MIME part's header (a file name): Courier wraps it too.
ORIGINAL_PART = (
    "From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nTo: b@example.com\r\n"
    "Subject: mixed with attachment\r\nDate: Tue, 04 Jun 2024 10:00:00 +0000\r\n"
    "Message-ID: <mp@example.de>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: multipart/mixed; boundary=XYZ\r\n\r\n"
    "--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee attachment\r\n"
    '--XYZ\r\nContent-Type: application/pdf; name="Bericht für Zoë.pdf"\r\n'
    'Content-Disposition: attachment; filename="Bericht für Zoë.pdf"\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XYZ--\r\n"
).encode()

NOTICE_TEXT = (
    b"This E-mail message was determined to be Unicode-formatted\r\n"
    b"but your E-mail reader does not support Unicode E-mail.\r\n\r\n"
    b"Please use an E-mail reader that supports POP3 with UTF-8\r\n"
    b"(see https://tools.ietf.org/html/rfc6856.html).\r\n\r\n"
    b"This can also happen when the sender's E-mail program does not\r\n"
    b"correctly format the sent message.\r\n\r\n"
    b"The original message is included as a separate attachment\r\n"
    b"so that it can be downloaded manually.\r\n"
)


def notice(
    original: bytes,
    *,
    subject: bytes = b"Cannot display Unicode content",
    extra: bytes = b"",
    carrier: bytes = b"Content-Type: message/global\r\n",
    parts: bytes = b"",
) -> bytes:
    """Courier 1.0.16's notice around ``original``; ``extra`` header lines are put
    first, ``parts`` are added after the carrier (the variations are not Courier's)."""
    b = b"=_36-1796395334"
    return (
        extra + b"From: Mail Delivery Subsystem <postmaster>\r\n"
        b"Subject: " + subject + b"\r\nMime-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + b + b'"\r\n\r\n\r\n\r\n'
        b"--" + b + b"\r\nContent-Type: text/plain\r\n\r\n" + NOTICE_TEXT + b"\r\n"
        b"--" + b + b"\r\n" + carrier + b"\r\n" + original + b"\r\n"
        + parts + b"--" + b + b"--\r\n"
    )


def _without(record: MessageRecord, *names: str) -> dict[str, Any]:
    data: dict[str, Any] = record.model_dump()
    for name in names:
        data.pop(name)
    for a in data["attachments"]:
        a.pop("part")
    return data


def test_the_hand_built_notice_is_the_captured_one() -> None:
    assert notice(ORIGINAL) == (DATA / "courier_notice_8bit_headers.eml").read_bytes()
    assert notice(ORIGINAL_PART) == (
        DATA / "courier_notice_8bit_part_header.eml"
    ).read_bytes()


@pytest.mark.parametrize(
    ("fixture", "original"),
    [
        ("courier_notice_8bit_headers.eml", ORIGINAL),
        ("courier_notice_8bit_part_header.eml", ORIGINAL_PART),
    ],
)
def test_courier_notice_is_described_by_the_original(
    fixture: str, original: bytes
) -> None:
    raw = (DATA / fixture).read_bytes()
    record, payloads = parse_message(raw, key="k", mailbox="mb", uid="u1")
    want, want_payloads = parse_message(original, key="k", mailbox="mb", uid="u1")
    assert record.server_wrapped is True
    assert (record.sha256, record.size) == (parse_message(raw)[0].sha256, len(raw))
    wrapped, *rest = record.defects
    assert (wrapped.kind, wrapped.part) == ("ServerWrapped", "2")
    assert "courier" in wrapped.detail and "message/global" in wrapped.detail
    assert rest == want.defects
    assert _without(record, "sha256", "size", "defects") == _without(
        want, "sha256", "size", "defects"
    )
    assert payloads == want_payloads
    # part paths point into the raw bytes as received: under the carrier part 2
    assert [a.part for a in record.attachments] == [
        "2." + a.part for a in want.attachments
    ]


def test_wrapped_newsletter_fields() -> None:
    record, _ = parse_message((DATA / "courier_notice_8bit_headers.eml").read_bytes())
    assert record.subject == NEWS
    assert [a.address for a in record.from_addresses] == ["juergen@example.de"]
    assert record.message_id == "news-42@example.de"
    assert record.list_id == "weekly.example.de"
    assert record.text == "Hallo Zoë, schöne Grüße.\n"
    assert ("Subject", "Cannot display Unicode content") not in record.headers
    # the JSON shape is unchanged: server_wrapped is a property, not a field
    assert "server_wrapped" not in record.model_dump()
    part_record, payloads = parse_message(
        (DATA / "courier_notice_8bit_part_header.eml").read_bytes()
    )
    [pdf] = part_record.attachments
    assert (pdf.filename, pdf.part, pdf.source) == ("Bericht für Zoë.pdf", "2.2", "mime")
    assert payloads == [b"%PDF-1.4\n"]
    assert part_record.text == "see attachment"


def test_wrapped_message_through_the_file_parser_spools_its_attachment() -> None:
    rng = random.Random(21)
    big = base64.encodebytes(rng.randbytes(600_000)).replace(b"\n", b"\r\n")
    original = (
        "From: Zoë <zoe@example.org>\r\nSubject: Größe\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=yy\r\n\r\n--yy\r\n"
        "Content-Type: text/plain\r\n\r\nsee the file\r\n--yy\r\n"
        "Content-Type: application/pdf; name=a.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + big + b"--yy--\r\n"
    raw = notice(original)
    want, want_payloads = parse_message(raw)
    got, got_payloads = parse_file(io.BytesIO(raw))
    assert want.server_wrapped and want.subject == "Größe"
    assert got.model_dump() == want.model_dump()
    assert [bytes(p) for p in got_payloads] == [bytes(p) for p in want_payloads]
    assert [type(p) for p in got_payloads] == [SpooledPayload]
    assert got.attachments[0].part == "2.2"


def test_message_rfc822_carrier_with_8bit_headers_is_unwrapped() -> None:
    raw = notice(ORIGINAL, carrier=b"Content-Type: message/rfc822\r\n")
    record, _ = parse_message(raw)
    assert record.server_wrapped
    assert record.subject == NEWS
    assert "message/rfc822" in record.defects[0].detail


FORWARDED = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.com\r\n"
    b"Subject: Fwd: Gr\xc3\xbc\xc3\x9fe\r\nDate: Wed, 05 Jun 2024 09:00:00 +0000\r\n"
    b"Message-ID: <fwd-1@example.com>\r\nMIME-Version: 1.0\r\n"
    b"User-Agent: Thunderbird\r\n"
    b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n'
    b"--f\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee below.\r\n"
    b"--f\r\nContent-Type: message/global\r\nContent-Disposition: attachment\r\n\r\n"
    + ORIGINAL + b"\r\n--f--\r\n"
)

NOT_A_NOTICE = {
    # a person forwarding a message with 8-bit headers as an attachment
    "forwarded message/global": FORWARDED,
    "forwarded message/rfc822": FORWARDED.replace(b"message/global", b"message/rfc822"),
    # a look-alike that came through an MTA: its trace fields are not Courier's
    "notice with a Received field": notice(
        ORIGINAL, extra=b"Received: from evil.example by mx.example.org\r\n"
    ),
    "notice with a Message-ID": notice(ORIGINAL, extra=b"Message-ID: <x@evil>\r\n"),
    "another subject": notice(ORIGINAL, subject=b"Your mail"),
    # what a server wraps has 8-bit headers; this one has none
    "ASCII-only original": notice(
        b"From: x@example.com\r\nSubject: ascii only\r\n\r\n\xc3\xa4 body\r\n"
    ),
    "a third part": notice(
        ORIGINAL, parts=b"--=_36-1796395334\r\nContent-Type: text/plain\r\n\r\nps\r\n"
    ),
    "carrier transfer-encoded": notice(
        base64.encodebytes(ORIGINAL).replace(b"\n", b"\r\n"),
        carrier=b"Content-Type: message/global\r\nContent-Transfer-Encoding: base64\r\n",
    ),
    "carrier is not a message": notice(
        ORIGINAL, carrier=b"Content-Type: application/octet-stream\r\n"
    ),
}


@pytest.mark.parametrize("name", list(NOT_A_NOTICE))
def test_not_a_server_notice_is_not_unwrapped(name: str) -> None:
    raw = NOT_A_NOTICE[name]
    record, _ = parse_message(raw)
    assert [d for d in record.defects if d.kind == "ServerWrapped"] == []
    assert record.subject != NEWS
    assert record.list_id is None
    if b"message/" in raw.split(b"\r\n\r\n", 1)[1][:2000]:  # kept as an attachment
        assert record.attachments[-1].content_type.startswith("message/")
    assert record.size == len(raw)


def test_forwarded_message_stays_a_forward() -> None:
    record, payloads = parse_message(FORWARDED)
    assert record.subject == "Fwd: Grüße"
    assert record.message_id == "fwd-1@example.com"
    assert record.text == "See below."
    [attached] = record.attachments
    assert (attached.content_type, attached.source, attached.part) == (
        "message/global",
        "rfc822",
        "2",
    )
    assert parse_message(payloads[0])[0].subject == NEWS


def _processors(rules: list[dict[str, Any]]) -> tuple[ParseProcessor, FilterProcessor]:
    options = FilterOptions.model_validate({"rules": rules})
    context = ProcessorContext()
    return ParseProcessor(ParseProcessor.Options(), context), FilterProcessor(
        options, context
    )


RULES: list[dict[str, Any]] = [
    {"name": "lists", "when": {"mailing_list": True}, "then": "keep"},
    {
        "name": "by-header",
        "when": {"header": {"name": "Message-ID", "contains": "news-42"}},
        "then": "keep",
    },
    {"name": "rest", "when": {"size": {"ge": 0}}, "then": "drop"},
]


def test_filter_judges_the_original_and_raw_stays_as_received() -> None:
    raw = (DATA / "courier_notice_8bit_headers.eml").read_bytes()
    parse, rules = _processors(RULES)
    message = Message.from_bytes(raw, mailbox="mb")
    assert parse.process(message) is None
    assert rules.process(message) == Decision(
        disposition=Disposition.KEEP, reason="lists"
    )
    assert message.raw == raw  # stores get the bytes as received, the notice
    assert message.meta[PAYLOADS_KEY] == []
    _, only_header = _processors(RULES[1:])
    assert only_header.process(message) == Decision(
        disposition=Disposition.KEEP, reason="by-header"
    )


def test_filter_prefetch_waits_for_the_whole_notice() -> None:
    raw = (DATA / "courier_notice_8bit_headers.eml").read_bytes()
    head = raw[: raw.index(b"\r\n\r\n") + 4]
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw))
    top = Message(ref=ref, data=head, headers_only=True)
    parse, rules = _processors(RULES)
    assert rules.header_only is True
    assert parse.prefetch(top) is None
    record = top.record
    assert isinstance(record, MessageRecord)
    assert record.subject == "Cannot display Unicode content"  # the notice's header
    assert record.server_wrapped and record.defects[0].part == ""
    assert rules.prefetch(top) is None  # not "rest: drop" on the notice's header
    # any other header block is still decided on headers alone
    other = Message(
        ref=ref, data=b"From: a@example.com\r\nSubject: x\r\n\r\n", headers_only=True
    )
    assert rules.prefetch(other) == Decision(
        disposition=Disposition.DONE, reason="rest"
    )
