"""parse_file (issue 20.6): the same record and bytes as parse_message, with long runs
of leaf-body lines decoded from the file into SpooledPayloads instead of memory."""

from __future__ import annotations

import base64
import binascii
import io
import quopri
import random

import pytest
from mailpipe.plugins.parse import SpooledPayload, parse_file, parse_message
from mailpipe.plugins.parse.body import cut_body
from mailpipe.plugins.parse.transfer import QpDecoder

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
    assert_same(*CASES[name])


def assert_same(raw: bytes, spooled: int) -> None:
    """parse_file gives parse_message's record and bytes, ``spooled`` of them spooled."""
    want, want_payloads = parse_message(raw)
    got, got_payloads = parse_file(io.BytesIO(raw))
    assert got.model_dump() == want.model_dump()
    assert [bytes(p) for p in got_payloads] == [bytes(p) for p in want_payloads]
    assert sum(isinstance(p, SpooledPayload) for p in got_payloads) == spooled


def qp(n: int, nl: bytes = b"\r\n") -> bytes:
    return quopri.encodestring(_RNG.randbytes(n)).replace(b"\n", nl)


def part(headers: bytes, body: bytes) -> bytes:
    return b"--zz\r\n" + headers + b"\r\n" + body


OCTETS = b"".join(bytes([_RNG.randrange(256)]) * 60 + b"\r\n" for _ in range(12_000))
TEXT = ("h\u00e9llo w\u00f6rld, " * 20 + "\r\n").encode() * 2_000  # ~0.7 MB of UTF-8
# Issue 20.6: every kind of large leaf body, not only base64 lines
KINDS = {
    "quoted-printable attachment": (
        H + part(b"Content-Type: application/octet-stream; name=a.bin\r\n"
                 b"Content-Transfer-Encoding: quoted-printable\r\n", qp(400_000))
        + b"--zz--\r\n", 1,
    ),
    "quoted-printable, bare LF, soft break before the boundary": (
        H + part(b"Content-Type: application/pdf\r\n"
                 b"Content-Transfer-Encoding: Quoted-Printable\r\n",
                 qp(400_000, b"\n") + b"tail=\n") + b"--zz--\r\n", 1,
    ),
    "quoted-printable, one long line with =CR": (
        H + part(b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: "
                 b"quoted-printable\r\n", b"ab=3D=\r" + b"x" * 2_500_000 + b"\r\n")
        + b"--zz--\r\n", 1,
    ),
    "8bit attachment": (
        H + part(b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: 8bit\r\n",
                 OCTETS) + b"--zz--\r\n", 1,
    ),
    "binary attachment, lone CRs, no line end at the boundary": (
        H + part(b"Content-Type: image/png\r\nContent-Transfer-Encoding: binary\r\n",
                 OCTETS.replace(b"\r\n", b"\r")[:-1]) + b"\r\n--zz--\r\n", 1,
    ),
    "unknown encoding, lines like boundaries and headers": (
        H + part(b"Content-Type: application/x-y\r\nContent-Transfer-Encoding: x-what\r\n",
                 (b"--z\r\nX-Not: a header\r\n--zzz\r\n\r\n" + OCTETS[:400]) * 1_000)
        + b"--zz--\r\n", 1,
    ),
    "large text body (8bit, UTF-8)": (
        H + part(b"Content-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: 8bit\r\n", TEXT * 2) + b"--zz--\r\n", 0,
    ),
    "large quoted-printable html body": (
        H + part(b"Content-Type: text/html\r\nContent-Transfer-Encoding: quoted-printable"
                 b"\r\n", quopri.encodestring(TEXT * 3)) + b"--zz--\r\n", 0,
    ),
    "large base64 text body": (
        H + part(b"Content-Type: text/plain; charset=utf-8\r\n"
                 b"Content-Transfer-Encoding: base64\r\n",
                 base64.encodebytes(TEXT * 2).replace(b"\n", b"\r\n")) + b"--zz--\r\n", 0,
    ),
    "digest part without Content-Type": (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/digest; boundary=zz\r\n\r\n"
        + part(b"", b"From: c@d.example\r\nContent-Type: application/pdf\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + OCTETS) + b"--zz--\r\n", 0,
    ),
    "delivery status": (
        H + part(b"Content-Type: message/delivery-status\r\n",
                 b"Reporting-MTA: dns; x\r\n\r\n"
                 + b"".join(b"Final-Recipient: rfc822; u%d@x\r\nAction: failed\r\n\r\n"
                            % i for i in range(20_000))) + b"--zz--\r\n", 0,
    ),
    "single part, 8bit, no line end at the end": (
        b"From: a@b.example\r\nContent-Type: application/pdf\r\n\r\n" + OCTETS[:-2], 1,
    ),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_parse_file_matches_parse_message_for_every_body_kind(name: str) -> None:
    assert_same(*KINDS[name])


def test_body_text_is_capped_with_a_defect_and_cut_at_a_line_end() -> None:
    raw = KINDS["large base64 text body"][0]
    record, _ = parse_message(raw, max_body=100_000)
    assert record.text is not None and 0.5e5 < len(record.text.encode()) <= 100_000
    assert record.text.endswith("\n") and "\ufffd" not in record.text
    (defect,) = [d for d in record.defects if d.kind == "BodyTruncated"]
    assert defect.part == "1" and f"{len(TEXT) * 2} octets" in defect.detail
    got, _ = parse_file(io.BytesIO(raw), max_body=100_000)
    assert got.model_dump() == record.model_dump()
    whole, _ = parse_message(raw, max_body=10 * len(raw))
    assert whole.text == (TEXT * 2).decode().replace("\r\n", "\n")
    assert not [d for d in whole.defects if d.kind == "BodyTruncated"]


def test_cut_body_never_splits_a_utf8_character() -> None:
    text = "\u20ac" * 100  # 3 octets each, no line ends
    for size in range(1, 30):
        assert cut_body(text.encode()[:size]).decode() == "\u20ac" * (size // 3)


def test_qp_decoder_matches_a2b_qp_for_any_pieces() -> None:
    data = b"a=3D=\r\nb==\n=\rjunk\nc=4\n=\n" + qp(5_000) + b"=0" + b"y=" * 3_000 + b"="
    want = binascii.a2b_qp(data)
    for size in (1, 2, 3, 7, 100, 4096):
        decoder = QpDecoder(None)
        decoder.LONG = 50  # type: ignore[misc]  # cut long lines often
        for i in range(0, len(data), size):
            decoder.feed(data[i : i + size])
        payload, problem = decoder.finish()
        assert bytes(payload) == want and problem is None, size


def test_an_empty_boundary_splits_parts_in_both_paths() -> None:
    """Review of issue 20.6: boundary="" is a boundary to the stdlib ("--" lines
    split the parts); the spooled path hid every attachment behind one elided run."""
    import base64
    import io

    from mailpipe.plugins.parse import parse_file, parse_message

    pad = (b"x" * 70 + b"\r\n") * 4000  # long enough to be elided at the default
    raw = (
        b"From: a@b\r\nSubject: invoice\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary=""\r\n\r\n'
        b"--\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" + pad
        + b"--\r\nContent-Type: application/x-msdownload\r\n"
        b'Content-Disposition: attachment; filename="invoice.exe"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"MZ" + bytes(3000)).replace(b"\n", b"\r\n")
        + b"----\r\n"
    )
    memory, _ = parse_message(raw)
    spooled, _ = parse_file(io.BytesIO(raw))
    assert [a.filename for a in memory.attachments] == ["invoice.exe"]
    assert spooled.model_dump() == memory.model_dump()


def test_a_uuencoded_block_past_the_body_cap_is_reported_in_both_paths() -> None:
    """Review of issue 20.6: cutting the text at max_body_size dropped a uuencoded
    attachment after the cut without a word; now a defect says so (raw keeps it)."""
    import io

    from mailpipe.plugins.parse import parse_file, parse_message

    text = b"line of text\r\n" * 90_000  # ~1.2 MB, past the 1 MiB default cap
    raw = (
        b"From: a@b\r\nSubject: uu\r\n\r\n" + text
        + b"begin 644 evil.exe\r\n#0V%T\r\n`\r\nend\r\n"
    )
    for record, _ in (parse_message(raw), parse_file(io.BytesIO(raw))):
        kinds = [d.kind for d in record.defects]
        assert "BodyTruncated" in kinds and "UuencodeBeyondCap" in kinds
