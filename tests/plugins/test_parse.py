"""The parse processor on small hand-written fixtures (tests/data/parse)."""

from __future__ import annotations

import base64
import hashlib
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.parse import (
    PAYLOADS_KEY,
    MessageRecord,
    ParseProcessor,
    parse_into,
    parse_message,
)
from mailpipe.plugins.parse.charsets import decode_text
from mailpipe.plugins.parse.headers import decode_header
from mailpipe.plugins.parse.html_text import html_to_text

from mailpipe.message import Message, MessageRef
from mailpipe.processor import ProcessorContext

DATA = Path(__file__).resolve().parents[1] / "data" / "parse"


def load(name: str) -> tuple[MessageRecord, list[bytes]]:
    return parse_message((DATA / name).read_bytes(), key="k", mailbox="mb", uid="u1")


def test_japanese_iso2022jp_subject_split_mid_character_and_idn() -> None:
    record, payloads = load("japanese_iso2022jp.eml")
    assert record.subject == "日本語の件名テスト"
    assert record.from_addresses[0].name == "山田太郎"
    assert record.from_addresses[0].address == "taro@日本語.jp"
    assert record.text == "こんにちは、世界。\n了解です。\n"
    assert record.date == datetime(2024, 4, 2, 0, 30, tzinfo=UTC)
    assert record.date_raw == "Tue, 02 Apr 2024 09:30:00 +0900"
    assert record.message_id == "jp-1@example.jp"
    assert record.defects == []
    assert payloads == []


def test_shift_jis_body_uses_cp932_superset_and_euc_jp_subject() -> None:
    record, _ = load("shift_jis_cp932.eml")
    assert record.subject == "見積のご依頼"
    assert record.text == "①株式会社㈱の見積書です。\n"
    assert not any(d.kind == "CharsetDefect" for d in record.defects)


def test_rfc2231_and_rfc2047_file_names_and_inline_image() -> None:
    record, payloads = load("rfc2231_filenames.eml")
    assert record.subject == "Rechnung für März"
    assert [(a.name, a.address) for a in record.from_addresses] == [
        ("Doe, Jane", "jane@example.org")
    ]
    assert [(a.name, a.address) for a in record.to] == [
        ("Jörg Müller", "joerg@example.de")
    ]
    names = [a.filename for a in record.attachments]
    assert names == [None, "Rechnung für März 2024.pdf", "Übersicht.txt"]
    image, pdf, _txt = record.attachments
    assert (image.content_id, image.inline, image.part) == ("logo@x", True, "1.2")
    assert (pdf.content_type, pdf.disposition, pdf.inline) == (
        "application/pdf",
        "attachment",
        False,
    )
    assert payloads[1].startswith(b"%PDF-1.4")
    assert pdf.size == len(payloads[1])
    assert pdf.sha256 == hashlib.sha256(payloads[1]).hexdigest()
    assert payloads[2] == b"Zeile 1"
    assert [a.index for a in record.attachments] == [0, 1, 2]
    # HTML-only body (multipart/related) rendered as text
    assert record.text_from_html is True
    assert record.text == "Siehe Anhang"


def test_broken_mime_becomes_defects_not_exceptions() -> None:
    record, payloads = load("broken_mime.eml")
    kinds = {d.kind for d in record.defects}
    assert {"DateDefect", "CloseBoundaryNotFoundDefect", "CharsetDefect"} <= kinds
    assert {"Base64Defect", "AddressDefect"} <= kinds
    assert record.date is None
    assert record.date_raw == "yesterday at noon"
    assert record.text == "Grüße aus Köln"  # unknown charset: UTF-8 bytes recognised
    assert payloads == [b"Hello World!"]  # 4n+1 base64: last lone character dropped


def test_bounce_is_auto_reply_with_delivery_status_and_original() -> None:
    record, payloads = load("bounce_dsn.eml")
    assert record.auto_reply is True
    assert record.auto_reply_reason == "auto-submitted: auto-replied"
    assert record.text == "Your message could not be delivered to nobody@example.net."
    status, original = record.attachments
    assert status.content_type == "message/delivery-status"
    assert b"Status: 5.1.1" in payloads[0]
    assert (original.source, original.filename) == ("rfc822", "Hello there.eml")
    inner, _ = parse_message(payloads[1])
    assert inner.message_id == "orig-1@example.com"
    assert inner.text == "Original body"  # RFC 2046: the CRLF belongs to the boundary


def test_html_only_list_mail_threading() -> None:
    record, _ = load("html_only.eml")
    assert record.html is not None and "<h1>" in record.html
    assert record.text == "Café news\n\nFirst item\nsecond line\n\n- one\n- two"
    assert record.text_from_html is True
    assert record.list_id == "news.lists.example.org"
    assert record.auto_reply_reason == "precedence: bulk"
    assert record.in_reply_to == ["n-41@lists.example.org"]
    assert record.references == ["n-1@lists.example.org", "n-41@lists.example.org"]
    root, _ = parse_message(b"Message-ID: <n-1@lists.example.org>\r\n\r\nroot\r\n")
    assert record.thread_key == root.thread_key  # same conversation as the root
    assert len(record.thread_key) == 32


def test_forward_with_uuencoded_block_and_nested_message() -> None:
    record, payloads = load("forward_uuencode.eml")
    uu, fwd = record.attachments
    assert (uu.filename, uu.source) == ("notes.bin", "uuencode")
    assert payloads[0] == b"uuencoded payload bytes\x00\x01\x02"
    assert "begin 644" not in (record.text or "")
    assert record.text is not None and record.text.endswith("Bye")
    assert (fwd.source, fwd.content_type, fwd.filename) == (
        "rfc822",
        "message/rfc822",
        "report.eml",
    )
    inner, inner_payloads = parse_message(payloads[1])
    assert inner.subject == "report"
    assert inner.text == "inner text"
    assert [a.filename for a in inner.attachments] == ["r.csv"]
    assert inner_payloads == [b"a,b\n1,2"]


def _tnef_object(level: int, name: int, kind: int, data: bytes) -> bytes:
    # MS-OXTNEF §2.1.3.1: level, attribute id (name, type), length, data, checksum
    checksum = sum(data) & 0xFFFF
    return (
        struct.pack("<BHHI", level, name, kind, len(data))
        + data
        + struct.pack("<H", checksum)
    )


def _tnef(filename: str, content: bytes) -> bytes:
    return (
        struct.pack("<IH", 0x223E9F78, 0x0001)
        + _tnef_object(1, 0x9006, 0x0008, struct.pack("<I", 0x00010000))
        + _tnef_object(2, 0x9002, 0x0006, b"\x01\x00" + b"\x00" * 12)
        + _tnef_object(2, 0x8010, 0x0001, filename.encode() + b"\0")
        + _tnef_object(2, 0x800F, 0x0006, content)
    )


def test_tnef_winmail_dat_is_expanded() -> None:
    tnef = _tnef("budget.xlsx", b"spreadsheet bytes")
    raw = (
        b"From: boss@example.com\r\nSubject: budget\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="t"\r\n\r\n'
        b"--t\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b'--t\r\nContent-Type: application/ms-tnef; name="winmail.dat"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(tnef)
        + b"--t--\r\n"
    )
    record, payloads = parse_message(raw)
    winmail, inner = record.attachments
    assert (winmail.filename, winmail.source) == ("winmail.dat", "mime")
    assert payloads[0] == tnef
    assert (inner.filename, inner.source, inner.part) == ("budget.xlsx", "tnef", "2")
    assert payloads[1] == b"spreadsheet bytes"
    assert record.text == "see attached"


def test_headers_only_message_for_prefetch() -> None:
    full = (DATA / "bounce_dsn.eml").read_bytes()
    head = full[: full.index(b"\n\n") + 2]
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=len(full))
    message = Message(ref=ref, data=head, headers_only=True)
    proc = ParseProcessor(ParseProcessor.Options(), ProcessorContext())
    assert proc.prefetch(message) is None
    record = message.record
    assert isinstance(record, MessageRecord)
    assert record.subject == "Undelivered Mail Returned to Sender"
    assert record.auto_reply is True
    assert record.size == len(full)  # LIST size, not the header block
    assert record.attachments == []


def test_processor_sets_record_payloads_and_tag_snapshot() -> None:
    message = Message.from_bytes(
        (DATA / "rfc2231_filenames.eml").read_bytes(), mailbox="mb"
    )
    message.tags.add("early")
    proc = ParseProcessor(ParseProcessor.Options(), ProcessorContext())
    assert proc.process(message) is None
    record = message.record
    assert isinstance(record, MessageRecord)
    assert record.key == message.key and record.uid == message.ref.uid
    assert record.sha256 == message.sha256 and record.size == message.size
    assert record.tags == ["early"]
    payloads = message.meta[PAYLOADS_KEY]
    assert len(payloads) == len(record.attachments) == 3
    assert MessageRecord.model_validate_json(record.model_dump_json()) == record


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # RFC 2047 §6.2: space between dropped
        ("=?utf-8?q?a?= b", "a b"),
        ("=?UTF-8?B?w6k=?=", "é"),
        ("=?utf-8?B?44GC?==?utf-8?B?44GE?=", "あい"),  # adjacent, no space
        ("=?iso-8859-1?q?caf=E9?=\r\n =?koi8-r?b?8NLJ18XU?=", "caféПривет"),  # noqa: RUF001
        ("=?bogus-charset?q?abc?=", "abc"),
        ("=?utf-8*en?q?x?=", "x"),  # RFC 2231 §5 language suffix
        ("a\r\n\tb", "a b"),  # folding white space shows as one space
        ("=?utf-8?Q?M=C3=BCller,_Hans?=", "Müller, Hans"),
    ],
)
def test_decode_header_cases(raw: str, expected: str) -> None:
    assert decode_header(raw)[0] == expected


def test_decode_header_exact_values() -> None:
    assert decode_header("=?utf-8?q?a?= =?utf-8?q?b?=")[0] == "ab"
    assert decode_header("=?utf-8?B?44GC?==?utf-8?B?44GE?=")[0] == "あい"
    text, problems = decode_header("=?bogus-charset?q?abc?=")
    assert text == "abc" and problems
    raw_latin = "Caf\udce9 cr\udce8me"  # 8-bit Latin-1 octets as surrogate escapes
    assert decode_header(raw_latin)[0] == "Café crème"


@pytest.mark.parametrize(
    ("data", "label", "expected"),
    [
        ("Grüße".encode(), "us-ascii", "Grüße"),  # lying label
        ("Grüße".encode("latin-1"), "iso-8859-1", "Grüße"),
        ("€".encode("cp1252"), "iso-8859-1", "€"),  # WHATWG: latin-1 means cp1252
        ("한국어".encode("cp949"), "ks_c_5601-1987", "한국어"),
        ("简体中文".encode("gb18030"), "gb2312", "简体中文"),
        ("テスト".encode("iso2022_jp"), None, "テスト"),  # undeclared ISO-2022-JP
        ("テスト".encode("euc_jp"), "EUC-JP", "テスト"),
        (b"plain", "charset=us-ascii", "plain"),
    ],
)
def test_decode_text_fallbacks(data: bytes, label: str | None, expected: str) -> None:
    assert decode_text(data, label)[0] == expected


def test_decode_text_never_loses_undecodable_bytes_silently() -> None:
    text, problem = decode_text(b"\xff\xfe\xfa\x80 abc", "utf-8")
    assert "abc" in text and problem is not None


def test_html_to_text_is_linear_on_hostile_markup() -> None:
    hostile = "<script" * 20000 + "<!--" * 20000 + "<a" * 20000
    assert isinstance(html_to_text(hostile), str)
    assert html_to_text("<p>a</p><script>x</script><style>y</style>b") == "a\n\nb"


def test_address_edge_cases() -> None:
    raw = (
        b"From: purchasing@acme.example <noreply@acme.example>\r\n"
        b'To: "Doe, J." <j@x.example>, x@y.example (Comment, with comma),'
        b" Team: a@t.example, b@t.example;, undisclosed-recipients:;\r\n"
        b"Cc: <@route.example:u@h.example>, bare@xn--mnchen-3ya.example\r\n\r\n"
    )
    record, _ = parse_message(raw)
    assert [(a.name, a.address) for a in record.from_addresses] == [
        ("purchasing@acme.example", "noreply@acme.example")
    ]
    assert [(a.name, a.address) for a in record.to] == [
        ("Doe, J.", "j@x.example"),
        ("Comment, with comma", "x@y.example"),
        ("", "a@t.example"),
        ("", "b@t.example"),
    ]
    assert [a.address for a in record.cc] == ["u@h.example", "bare@münchen.example"]


def test_empty_and_garbage_inputs() -> None:
    for raw in (b"", b"\r\n", b"\x00\xff" * 100, b"Subject", b"--\r\n--\r\n"):
        record, payloads = parse_message(raw)
        assert record.size == len(raw)
        assert record.sha256 == hashlib.sha256(raw).hexdigest()
        assert isinstance(payloads, list)


def test_unknown_charset_with_isolated_high_octets_decodes_as_latin() -> None:
    """A careful reader sees 'Café', not a detector's guess from two bytes."""
    raw = (
        b"Subject: =?x-unknown-charset?Q?Caf=E9_order?=\r\n"
        b"Content-Type: text/plain; charset=no-such-charset\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Caf=E9 order\r\n"
    )
    record, _ = parse_message(raw)
    assert record.subject == "Café order"
    assert record.text is not None and record.text.startswith("Café order")
    assert any(d.kind == "CharsetDefect" for d in record.defects)


def _uuencoded(blocks: int) -> bytes:
    one = b"begin 644 f.txt\r\n!80``\r\n`\r\nend\r\n"
    return b"From: a@example.com\r\nSubject: uu\r\n\r\n" + one * blocks


def test_uuencoded_blocks_count_towards_the_part_cap() -> None:
    """One cap for every kind of part: 20,000 uuencoded blocks in a 0.64 MB message
    gave 20,000 attachments past the 5,000-part cap."""
    from mailpipe.plugins.parse import MAX_PARTS

    record, payloads = parse_message(_uuencoded(MAX_PARTS + 50))
    assert len(record.attachments) == len(payloads) < MAX_PARTS
    assert all(a.source == "uuencode" for a in record.attachments)
    assert payloads[0] == b"a"
    assert [d.kind for d in record.defects].count("TooManyParts") == 1
    assert "begin 644 f.txt" in (record.text or "")  # the rest stays in the text


def test_mime_parts_and_uuencoded_blocks_share_one_cap() -> None:
    from mailpipe.plugins.parse import MAX_PARTS

    uu = _uuencoded(MAX_PARTS // 2).split(b"\r\n\r\n", 1)[1]
    part = (
        b"--B\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=p.bin\r\n\r\nx\r\n"
    )
    raw = (
        b"From: a@example.com\r\nSubject: mix\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain\r\n\r\n" + uu + part * (MAX_PARTS // 2 + 10)
        + b"--B--\r\n"
    )
    record, payloads = parse_message(raw)
    assert len(record.attachments) == len(payloads) < MAX_PARTS
    assert {a.source for a in record.attachments} == {"uuencode", "mime"}
    assert [d.kind for d in record.defects].count("TooManyParts") == 1


def test_a_record_is_copied_only_when_a_lone_surrogate_must_be_replaced() -> None:
    """Issue 18: one search over every string of the record; a clean record is kept
    as it is (no copy of each container), a lone surrogate anywhere (a header tuple,
    an address model, the body) is still replaced."""
    from mailpipe.plugins.parse.parser import _clean_record
    from mailpipe.plugins.parse.record import Address

    clean = {"headers": [("Subject", "Café")], "to": [Address(name="Zoë", address="z@x")],
             "text": "ok", "size": 3, "date": None}
    assert _clean_record(clean) is clean
    for where in ("headers", "to", "text"):
        dirty = dict(clean)
        if where == "headers":
            dirty[where] = [("Subject", "Caf\udce9")]
        elif where == "to":
            dirty[where] = [Address(name="Zo\ud800", address="z@x")]
        else:
            dirty[where] = "lone \udfff"
        cleaned = _clean_record(dirty)
        assert cleaned is not dirty
        assert "\ufffd" in repr(cleaned[where])
        assert cleaned["size"] == 3 and cleaned["headers"][0][0] == "Subject"


@pytest.mark.parametrize(
    ("header", "name", "where"),
    [
        ('text/plain; charset="ISO-8859-1"', "charset", "content-type"),
        ("text/plain; CHARSET=utf-8; format=flowed", "charset", "content-type"),
        ("text/plain; format=flowed", "charset", "content-type"),
        ("multipart/mixed; boundary=xyz", "charset", "content-type"),
        ("attachment; filename*0*=utf-8''r%C3%A9; filename*1=sum.pdf", "filename",
         "content-disposition"),
        ("attachment; FileName=report.pdf", "filename", "content-disposition"),
        ("inline", "filename", "content-disposition"),
        ('application/pdf; name="a;b.pdf"', "name", "content-type"),
        ("application/pdf", "name", "content-type"),
    ],
)
def test_param_answers_as_get_param(header: str, name: str, where: str) -> None:
    from email.message import Message as EmailMessage

    from mailpipe.plugins.parse.headers import param

    part = EmailMessage()
    part[where] = header
    assert param(part, name, where) == part.get_param(name, None, where)
    assert param(EmailMessage(), name, where) is None  # no such header


def test_param_parses_no_header_that_cannot_hold_the_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18: a part without a file name costs no parameter parse."""
    from email.message import Message as EmailMessage

    from mailpipe.plugins.parse.headers import param

    part = EmailMessage()
    # Two parameters: not the one-parameter shape that param() reads itself.
    part["Content-Type"] = "application/pdf; x-mac-type=PDF; x-mac-creator=CARO"

    def parse(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(part, "get_param", parse)
    assert param(part, "name") is None
    assert param(part, "filename", "content-disposition") is None
    with pytest.raises(AssertionError):
        param(part, "x-mac-type")


def test_a_single_part_message_parses_its_content_type_parameters_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18: the body's charset is the header hint's: looked up once, not twice;
    the file name lookup parses nothing when the header cannot hold one."""
    from email.message import Message as EmailMessage

    calls: list[str] = []
    original = EmailMessage.get_param

    def counting(self: Any, param: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(param)
        return original(self, param, *args, **kwargs)

    monkeypatch.setattr(EmailMessage, "get_param", counting)
    # Two parameters: a shape param() leaves to get_param().
    raw = (b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n"
           b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n\r\n"
           b"Gr\xc3\xbc\xc3\x9fe\r\n")
    message = Message.from_bytes(raw, mailbox="m", uid="1")
    parse_into(message)
    assert message.record is not None
    assert message.record.subject == "café"
    assert message.record.text is not None and message.record.text.startswith("Grüße")
    assert calls == ["charset"]


def _unfold_by_patterns(value: str) -> str:
    """unfold()'s definition: the two substitutions it is equal to."""
    from mailpipe.plugins.parse.headers import _EOL, _FOLD

    return _EOL.sub(" ", _FOLD.sub(" ", value))


def test_unfold_equals_its_two_substitutions_on_every_short_value() -> None:
    """Issue 18: unfold() works line by line; every value of up to 7 characters
    over a text character, SP, HTAB, CR and LF gives what the patterns give."""
    import itertools

    from mailpipe.plugins.parse.headers import unfold

    for length in range(8):
        for chars in itertools.product("a \t\r\n", repeat=length):
            value = "".join(chars)
            assert unfold(value) == _unfold_by_patterns(value), repr(value)


@pytest.mark.parametrize(
    "value",
    [
        "v=1; a=rsa-sha256;\r\n\th=from:to;\r\n\tb=yJGG\r\n\t+MFa=",
        "from out.example.net\r\n\tby mx.example (Postfix)\r\n\tfor <a@b>; Tue",
        "a \r\n \r\n \t b",  # one run of folds: one space
        "a\r\n  \r\nb",  # white space then CR LF without a fold after it
        "=?utf-8?q?a?=\r\n =?utf-8?q?b?=",
        "trailing\r\n",
        "\r\n\tleading",
        "bare\rcr\n\n lf",
        "no line breaks at all",
    ],
)
def test_unfold_real_values(value: str) -> None:
    from mailpipe.plugins.parse.headers import unfold

    assert unfold(value) == _unfold_by_patterns(value)


def test_unfold_scans_no_value_with_the_fold_pattern(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18: the fold pattern, tried at every position, cost about 10 us per
    folded field (a tenth of a small message's parse); unfold() no longer runs it."""
    from mailpipe.plugins.parse import headers

    class Refuse:
        def sub(self, *_args: object) -> str:
            raise AssertionError("the fold pattern ran")

    monkeypatch.setattr(headers, "_FOLD", Refuse())
    assert headers.unfold("v=1;\r\n\th=from:to;\r\n\tb=yJGG") == "v=1; h=from:to; b=yJGG"
    raw = (b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\th=from:to\r\n"
           b"Subject: folded\r\n subject\r\n\r\nbody\r\n")
    record = parse_message(raw)[0]
    assert record.subject == "folded subject"


def _content_types() -> list[str]:
    """Content-Type values around the one-parameter shape param() answers itself."""
    import itertools

    types = ["text/plain", "TEXT/Plain", "text", "multipart/mixed", "text/plain;",
             'text/"plain"', "text/plain; format=flowed"]
    spaces = ["", " ", "\r\n\t", "  \t"]
    names = ["charset", "CharSet", "charset*", "charset*0", "name", "char\u017fet", "char set"]
    values = ["us-ascii", '"UTF-8"', '"a b"', '"a\\"b"', "<x>", '"<x>"', "", '""', "a=b",
              "'x'", "a;b", '"a;b"', "utf-8 ", '"utf-8', "utf-8\u00e9", "\udce9"]
    out = []
    for t, s1, n, s2, v, tail in itertools.product(
        types, spaces, names, spaces[:2], values, ["", ";", " ", "; x=y"]
    ):
        out.append(f"{t}{s1};{s2}{n}{s2}={s2}{v}{tail}")
    return out


def test_param_answers_as_get_param_for_every_content_type_shape() -> None:
    """Issue 18: param() answers the one-parameter shape without get_param(); for
    every nearby value it answers as get_param() does."""
    from email.message import Message as EmailMessage

    from mailpipe.plugins.parse.headers import param

    for value in _content_types():
        part = EmailMessage()
        part["Content-Type"] = value
        for name in ("charset", "CHARSET", "name"):
            try:
                expected: object = part.get_param(name, None)
            except Exception as exc:  # param() raises as get_param() does
                expected = type(exc)
            try:
                got: object = param(part, name)
            except Exception as exc:
                got = type(exc)
            assert got == expected, (value, name)


def test_param_parses_no_one_parameter_content_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18: ``text/plain; charset=us-ascii``, the header of most parts, costs no
    parameter parse (about 10 us of a small message's parse)."""
    from email.message import Message as EmailMessage

    from mailpipe.plugins.parse.headers import param

    def parse(*_args: object, **_kwargs: object) -> object:
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(EmailMessage, "get_param", parse)
    for value, expected in [
        ("text/plain; charset=us-ascii", "us-ascii"),
        ('text/plain;\r\n\tCHARSET="UTF-8"', "UTF-8"),
        ("application/pdf; name=report.pdf", None),
    ]:
        part = EmailMessage()
        part["Content-Type"] = value
        assert param(part, "charset") == expected
    raw = b"From: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi\r\n"
    assert parse_message(raw)[0].text == "hi\n"


@pytest.mark.parametrize(
    "text",
    [
        '"Bob Jones" <bob@example.net>',
        "bob@example.net",
        "  (comment) <a@b> ",
        '"a, b" <a@b>',
        "a@b, c@d",
        "undisclosed-recipients:;",
        "group: a@b, c@d;",
        '"quoted \\" (paren" <a@b>',
        "<a@b> (Name, Jr)",
        "",
        "   ",
    ],
)
def test_split_list_entries(text: str) -> None:
    """Issue 18: a list without ",", ";" or ":" is one entry without a character
    loop; the others go through it."""
    from mailpipe.plugins.parse.addresses import split_list

    expected = {
        '"Bob Jones" <bob@example.net>': ['"Bob Jones" <bob@example.net>'],
        "bob@example.net": ["bob@example.net"],
        "  (comment) <a@b> ": ["(comment) <a@b>"],
        '"a, b" <a@b>': ['"a, b" <a@b>'],
        "a@b, c@d": ["a@b", "c@d"],
        "undisclosed-recipients:;": [],
        "group: a@b, c@d;": ["a@b", "c@d"],
        '"quoted \\" (paren" <a@b>': ['"quoted \\" (paren" <a@b>'],
        "<a@b> (Name, Jr)": ["<a@b> (Name, Jr)"],
        "": [],
        "   ": [],
    }
    assert split_list(text) == expected[text]


@pytest.fixture
def parser_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of what the parser module hashes with sha256 from now on."""
    from mailpipe.plugins.parse import parser

    hashed: list[int] = []

    class Counting:
        @staticmethod
        def sha256(data: bytes = b"") -> Any:
            hashed.append(len(data))
            return hashlib.sha256(data)

    monkeypatch.setattr(parser, "hashlib", Counting)
    return hashed


def test_parse_into_takes_the_messages_sha256_instead_of_hashing_again(
    parser_hashes: list[int],
) -> None:
    """Issue 18: the raw bytes of a message in memory are hashed once (the ledger
    and the stores read message.sha256 too); the record carries that digest."""
    raw = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    message = Message.from_bytes(raw, mailbox="m", uid="1")  # hashes raw once
    hashed = parser_hashes
    record = parse_into(message)
    assert record.sha256 == hashlib.sha256(raw).hexdigest() == message.sha256
    assert len(raw) not in hashed  # the thread key's seed is hashed, not the message
    assert parse_message(raw)[0].sha256 == record.sha256
    assert len(raw) in hashed


def _tree(msg: Any) -> dict[str, Any]:
    """Everything an email.message.Message holds (defects by kind and text)."""
    state = dict(vars(msg))
    state["defects"] = [(type(d).__name__, str(d)) for d in msg.defects]
    state["policy"] = repr(state["policy"])
    return state


def _simple_inputs() -> list[bytes]:
    """The messages of tests/data/parse and variants around the one-part shape:
    bare CR or LF, form feed, "From " lines, continuation first, an empty field name,
    8-bit octets, multipart and message/* types, no body, LF line ends."""
    import random

    head = (b"Received: from a\r\n\tby b; Tue\r\nFrom: \"A\" <a@b>\r\nTo: c@d\r\n"
            b"Subject: s\r\nContent-Type: text/plain; charset=us-ascii\r\n")
    seeds = [head + b"\r\nbody\r\n.line\r\n", head + b"\r\n", head + b"\r\nno end",
             head.replace(b"\r\n", b"\n") + b"\nlf body\n"]
    seeds += [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
    pieces = [b"\r", b"\n", b"\x0c", b"From ", b" ", b"\t", b":", b"\xe9", b"\r\n",
              b"\r\n\r\n", b"\r\n ", b"Content-Type: multipart/mixed; boundary=x\r\n",
              b"Content-Type: message/rfc822\r\n", b"Content-Type: text/html\r\n"]
    rng = random.Random(18)
    out = list(seeds)
    for _ in range(3000):
        raw = bytearray(rng.choice(seeds)[:2000])
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, min(len(raw), 300))
            raw[at:at] = rng.choice(pieces)
        out.append(bytes(raw))
    return out


def test_a_one_part_message_is_read_as_the_feedparser_reads_it() -> None:
    """Issue 18: _simple() builds the stdlib parser's tree of a one-part message
    without its line-by-line walk of the body; on every input it accepts, the tree
    is the parser's (headers, payload, defects, everything)."""
    from mailpipe.plugins.parse import parser

    taken = 0
    for raw in _simple_inputs():
        simple = parser._simple(raw)
        if simple is None:
            continue
        taken += 1
        assert _tree(simple) == _tree(parser._PARSER.parsebytes(raw)), raw[:120]
    assert taken > 200  # the shape is common among the variants, not a corner


def test_a_one_part_message_is_parsed_without_the_feedparser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 18: the feedparser walked a small message's body line by line (about a
    third of its parse); a one-part message no longer reaches it."""
    from mailpipe.plugins.parse import parser

    class Refuse:
        def parsebytes(self, *_args: object, **_kwargs: object) -> Any:
            raise AssertionError("the feedparser ran")

    monkeypatch.setattr(parser, "_PARSER", Refuse())
    raw = (b"From: \"A B\" <a@example.org>\r\nSubject: one\r\n part\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n")
    record = parse_message(raw)[0]
    assert not record.defects
    assert (record.subject, record.text) == ("one part", "Grüße\n")
    assert [a.address for a in record.from_addresses] == ["a@example.org"]


def _spooled_cases() -> list[bytes]:
    attachment = base64.encodebytes(bytes(range(256)) * 400)
    multipart = (
        b"Subject: spooled\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + attachment.replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    return [multipart, b"Subject: plain\r\n\r\n" + b"line\r\n" * 5000, b"", b"no header"]


@pytest.mark.parametrize("raw", _spooled_cases())
def test_parse_of_a_spooled_message_gives_it_the_sha256_it_read(
    raw: bytes, tmp_path: Path
) -> None:
    # Issue 18: parse reads every octet of a spooled message and hashes them; the
    # stores and the ledger take that sha256 instead of reading the file once more.
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=len(raw))
    message = Message(ref=ref, spool_path=path)
    parse_into(message)
    path.write_bytes(b"changed after parse")  # not read again
    assert message.sha256 == hashlib.sha256(raw).hexdigest() == message.record.sha256


def test_a_known_sha256_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: s\r\n\r\nbody\r\n")
    ref = MessageRef(mailbox="mb", number=1, uid="u1", size=20)
    message = Message(ref=ref, spool_path=path)
    known = message.sha256
    message.hashed("0" * 64)
    assert message.sha256 == known


def test_a_spooled_message_without_long_runs_is_hashed_once(
    tmp_path: Path, parser_hashes: list[int]
) -> None:
    # Issue 18: parse_file hashes every octet while it builds the skeleton; a message
    # with no run long enough to elide (many parts, each under spool.RUN_MIN) is then
    # parsed from memory, which must take that sha256, not hash the octets again.

    part = base64.encodebytes(bytes(range(256)) * 400).replace(b"\n", b"\r\n")
    raw = (
        b'Subject: many parts\r\nMIME-Version: 1.0\r\n'
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        + b"".join(
            b"--b\r\nContent-Type: image/png\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + part
            for _ in range(12)
        )
        + b"--b--\r\n"
    )
    hashed = parser_hashes
    path = tmp_path / "m.eml"
    path.write_bytes(raw)
    message = Message(ref=MessageRef(mailbox="mb", number=1, uid="u", size=len(raw)),
                      spool_path=path)
    record = parse_into(message)
    assert record.sha256 == message.sha256 == hashlib.sha256(raw).hexdigest()
    assert len(raw) not in hashed


def _bound_method_calls(module: Any) -> list[str]:
    """The ``name.method(...)`` calls in ``module``'s functions that load ``method`` as
    a plain attribute (a bound method object built on each call) where the object's
    type defines it as a method: CPython 3.11 compiles a call on a name an import
    statement bound that way, instead of LOAD_METHOD."""
    import dis
    import itertools
    import types

    def codes(code: types.CodeType) -> Any:
        yield code
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from codes(const)

    functions = [
        f for v in vars(module).values() if getattr(v, "__module__", None) == module.__name__
        for f in ([v] if isinstance(v, types.FunctionType) else
                  [m for m in vars(v).values() if isinstance(m, types.FunctionType)]
                  if isinstance(v, type) else [])
    ]
    found = []
    for function in functions:
        for code in codes(function.__code__):
            ops = list(dis.get_instructions(code))
            for load, attr in itertools.pairwise(ops):
                if load.opname != "LOAD_GLOBAL" or attr.opname != "LOAD_ATTR":
                    continue
                if attr.argrepr.startswith("NULL|self"):  # 3.12+: a method load
                    continue
                value = module.__dict__.get(load.argval)
                if isinstance(value, types.ModuleType | type):
                    continue  # a module's function, a class's (class)method: no gain
                if callable(getattr(type(value), attr.argval, None)):
                    found.append(f"{code.co_name}: {load.argval}.{attr.argval}")
    return found


def test_the_parsers_method_calls_on_module_objects_build_no_bound_method() -> None:
    """Issue 18 (parse is on the hot path): splitting parser.py into walk.py and
    cleaning.py kept every function's bytecode. A pattern imported by name from a
    sibling (``from .walk import _ANGLE_ID``) made ``_ANGLE_ID.search(...)`` in
    ``_record``, ``_first_id`` and ``_ids`` a LOAD_ATTR (a bound method each call,
    ~45 ns) where the single module had LOAD_METHOD."""
    from mailpipe.plugins.parse import cleaning, parser, walk

    for module in (parser, walk, cleaning):
        assert _bound_method_calls(module) == [], module.__name__
