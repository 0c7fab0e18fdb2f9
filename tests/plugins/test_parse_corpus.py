"""The parse processor on the shared real-world corpus (skipped when it is absent)."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest
from mailpipe.plugins.parse import MessageRecord, parse_into, parse_message, spool

from mailpipe.message import Message, MessageRef


def _corpus() -> Path:
    env = os.environ.get("MAILPIPE_CORPUS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "corpus"


CORPUS = _corpus()


@pytest.fixture(autouse=True)
def _corpus_present() -> None:
    """Skip in a user's clone without the corpus; in CI (env CI set) it must be there."""
    if not (CORPUS / "MANIFEST.tsv").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"corpus not found at {CORPUS}; CI provides ../shared/corpus")
        pytest.skip(f"corpus not found at {CORPUS} (set MAILPIPE_CORPUS)")


def _files() -> list[str]:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        return []
    with (CORPUS / "MANIFEST.tsv").open(encoding="utf-8", newline="") as f:
        return [row["file"] for row in csv.DictReader(f, delimiter="\t")]


def parse(name: str) -> tuple[MessageRecord, list[bytes]]:
    return parse_message((CORPUS / name).read_bytes(), key=name)


@pytest.mark.timeout(300)  # bounded: the whole corpus, on a shared 2-core machine
def test_every_corpus_file_parses_and_keeps_its_bytes() -> None:
    files = _files()
    assert len(files) >= 300
    for name in files:
        raw = (CORPUS / name).read_bytes()
        record, payloads = parse_message(raw, key=name)
        assert record.sha256 == hashlib.sha256(raw).hexdigest(), name
        assert record.size == len(raw), name
        assert not any(d.kind == "ParseFailed" for d in record.defects), name
        assert len(payloads) == len(record.attachments), name
        for att, data in zip(record.attachments, payloads, strict=True):
            assert att.size == len(data), name
            assert att.sha256 == hashlib.sha256(data).hexdigest(), name
        # the record round-trips through JSON as stores and forwarders use it
        assert MessageRecord.model_validate_json(record.model_dump_json()) == record


JAPANESE = [
    ("japanese__mikel__japanese.eml", "まみむめも", "かきくえこ"),
    ("japanese__mikel__japanese_iso_2022.eml", "まみむめも", "すみません。"),
    ("japanese__mikel__japanese_shift_jis.eml", "test", "あいうえお"),
    (
        "japanese__mimekit__japanese.eml",
        "日本語メールテスト (testing Japanese emails)",
        None,
    ),
    ("japanese__mikel__example14.eml", "Re: TEST テストテスト", "Hello"),
    (
        "japanese__sisimai__lhost-mfilter-01.eml",
        "failure notice",
        "このメールは「m-FILTER」",
    ),
]


@pytest.mark.parametrize(("name", "subject", "text_start"), JAPANESE)
def test_japanese(name: str, subject: str, text_start: str | None) -> None:
    record, _ = parse(name)
    assert record.subject == subject
    if text_start is not None:
        assert (record.text or "").startswith(text_start)
    assert not any(d.kind == "CharsetDefect" for d in record.defects)


def test_japanese_names_and_file_names() -> None:
    record, _ = parse("japanese__mikel__japanese.eml")
    assert [(a.name, a.address) for a in record.to] == [
        ("みける", "raasdnil@gmail.com")
    ]
    record, _ = parse("japanese__mikel__japanese_attachment.eml")
    assert [a.filename for a in record.attachments] == ["てすと.txt"]
    record, _ = parse("japanese__mikel__japanese_attachment_long_name.eml")
    assert record.subject == "まみむめも" * 10
    assert [a.filename for a in record.attachments] == ["かきくけこ" * 5 + ".txt"]
    record, payloads = parse("japanese__sisimai__lhost-sendmail-51.eml")
    nested = [i for i, a in enumerate(record.attachments) if a.source == "rfc822"]
    inner, _ = parse_message(payloads[nested[0]])
    assert inner.subject == "にゃーん"


@pytest.mark.parametrize(
    ("name", "field", "expected"),
    [
        (
            "encoded-headers__enmime__qp-utf8-header-no-break.eml",
            "subject",
            "MIME UTF8 Test ¢ More Text",
        ),
        (
            "encoded-headers__mikel__raw_email_with_partially_quoted_subject.eml",
            "subject",
            'Re: Test: "漢字" mid "漢字" tail',
        ),
        (
            "encoded-headers__flanker__bilingual-simple.eml",
            "subject",
            "Simple text. How are you? Как ты поживаешь?",
        ),
        (
            "encoded-headers__mikel__raw_email_encoded_stack_level_too_deep.eml",
            "subject",
            "Nicolas Fouché has accepted your invitation to Gmail",
        ),
        ("charset__mikel__raw_email.eml", "subject", "NOTE: 한국말로 하는 것"),
        ("8bit-headers__mikel__utf8_headers.eml", "subject", "Säying Hello"),
        (
            "8bit-headers__mikel__invalid_subject_characters.eml",
            "subject",
            "Formação FrenetikPolis: Mega Campanha Final Verão | Cursos de Setembro",
        ),
        (
            "8bit-headers__flanker__broken-headers.eml",
            "subject",
            "Forget Asking For A Link Exchange…",
        ),
    ],
)
def test_encoded_headers(name: str, field: str, expected: str) -> None:
    record, _ = parse(name)
    assert getattr(record, field) == expected


def test_encoded_display_names() -> None:
    record, _ = parse("encoded-headers__spamscope__mail_test_18.eml")
    assert [(a.name, a.address) for a in record.from_addresses] == [
        ("LastßlName, FirstName", "comma.name@example.com")
    ]
    record, _ = parse("encoded-headers__mimetools__german-qp.eml")
    assert record.from_addresses[0].name == "Jörn Reder"
    record, _ = parse("encoded-headers__enmime__qp-utf8-header-no-break.eml")
    assert [a.name for a in record.from_addresses] == ["James Hillyerd", "André Pirard"]
    assert record.to[0].name == "Mirosław Marczak"
    record, _ = parse("8bit-headers__flanker__from-encoding.eml")
    assert record.from_addresses[0].name == "Ingo Lütkebohle"


@pytest.mark.parametrize(
    ("name", "filename"),
    [
        ("encoded-headers__mime4j__russian-headers.eml", "Список.doc"),
        (
            "attachment__mimetools__attachment-filename-encoding-Latin1.eml",
            "attachment.äöü",
        ),
        (
            "attachment__mimetools__attachment-filename-encoding-UTF8.eml",
            "attachment.äöü",
        ),
        (
            "attachment__mikel__attachment_with_quoted_filename.eml",
            "Eelanalüüsi päring.jpg",
        ),
        ("attachment__enmime__mime-bad-8bit-filename.eml", "管理.doc"),
        ("attachment__rspamd__fname.eml", "[삼성생명]2020.08.14 데일리 경제뉴스.pdf"),
        ("attachment__spamscope__mail_test_1.eml", "ФНС_РФ558.zip"),  # noqa: RUF001
        ("attachment__mikel__attachment_nonascii_filename.eml", "ciële.txt"),
        (
            "attachment__mikel__attachment_with_base64_encoded_name.eml",
            "This is a test.pdf",
        ),
    ],
)
def test_rfc2231_and_encoded_file_names(name: str, filename: str) -> None:
    record, _ = parse(name)
    assert record.attachments[0].filename == filename


def test_broken_mime() -> None:
    record, _ = parse("broken-mime__enmime__extra-base64-character.eml")
    assert record.text == "Hello World!"
    assert any(d.kind == "Base64Defect" for d in record.defects)
    record, _ = parse("charset__mikel__raw_email10.eml")  # charset=x-unknown
    assert (record.text or "").startswith("Test test. Hi. Waving.")
    assert "Envoyé" in (record.text or "")
    record, _ = parse("charset__enmime__html-mime-bad-charset-inline.eml")
    assert record.text == "Test of text section"
    record, _ = parse("broken-mime__mikel__raw_email_with_illegal_boundary.eml")
    assert (record.text or "").startswith("Hello\nThis is an outlook test")
    # big5 text labelled us-ascii
    record, _ = parse("charset__enmime__chardet-success-big-5.eml")
    assert (record.text or "").startswith("顏是家訓")
    record, _ = parse("encoded-headers__enmime__qp-utf8-header-recursed.eml")
    assert record.from_addresses[1].address == "PIRARD@vm1.ulg.ac.be"


@pytest.mark.parametrize(
    "name",
    [
        "bounce__mikel__multi_address_bounce1.eml",
        "bounce__flanker__office365.eml",
        "bounce__nodemailer__delivery-status.eml",
        "bounce__flanker__gmail-invalid-address.eml",
        "japanese__sisimai__lhost-postfix-53.eml",
    ],
)
def test_bounces_are_auto_replies(name: str) -> None:
    record, _ = parse(name)
    assert record.auto_reply is True
    assert record.auto_reply_reason


def test_bounce_parts() -> None:
    record, payloads = parse("bounce__mikel__multi_address_bounce1.eml")
    types = [a.content_type for a in record.attachments]
    assert types == ["message/delivery-status", "message/rfc822"]
    assert b"Final-Recipient" in payloads[0]
    inner, _ = parse_message(payloads[1])
    assert inner.subject == "Test of bounce email"


def test_tnef() -> None:
    record, payloads = parse("tnef__mimekit__rich-text.eml")
    tnef = {
        a.filename: i for i, a in enumerate(record.attachments) if a.source == "tnef"
    }
    assert "kitten-playing-with-a-christmas-tree.jpg" in tnef
    assert payloads[tnef["kitten-playing-with-a-christmas-tree.jpg"]][:2] == b"\xff\xd8"
    record, _ = parse("tnef__mimekit__ukr.eml")
    assert (record.text or "").startswith("шостий")
    assert record.attachments[0].filename == "winmail.dat"


def test_uuencode() -> None:
    record, payloads = parse("uuencode__mimetools__uu-zeegee.eml")
    assert [a.filename for a in record.attachments] == ["up.gif", "zeegee.gif"]
    assert all(p.startswith(b"GIF8") for p in payloads)
    assert all(a.source == "uuencode" for a in record.attachments)
    assert "begin 644" not in (record.text or "")
    record, payloads = parse("uuencode__spamscope__mail_test_15.eml")
    assert record.attachments[0].filename == "REQUEST FOR QUOTE.zip"
    assert payloads[0][:2] == b"PK"
    assert [(a.name, a.address) for a in record.from_addresses] == [
        ("purchasing@aquillaindustries.com", "do-not-reply@ncs.gov.ng")
    ]
    record, _ = parse("uuencode__mimetools__sig-uu.eml")
    assert record.attachments[0].filename == ".signature"


@pytest.mark.timeout(300)  # bounded: the whole corpus, on a shared 2-core machine
def test_every_corpus_file_parsed_from_a_spool_file_has_its_own_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 18: a spooled message takes the sha256 parse_file computed as its own
    # (the evidence beside the UIDL), so that must be the file's, whatever it holds.
    monkeypatch.setattr(spool, "RUN_MIN", 64)  # every file takes the skeleton path
    for name in _files():
        raw = (CORPUS / name).read_bytes()
        path = tmp_path / "spooled.eml"
        path.write_bytes(raw)
        ref = MessageRef(mailbox="corpus", number=1, uid=name, size=len(raw))
        message = Message(ref=ref, spool_path=path)
        parse_into(message)
        assert message.sha256 == hashlib.sha256(raw).hexdigest(), name
