"""The `unwrap` processor: opaque-signed S/MIME opened (signature never trusted),
encrypted S/MIME and PGP/MIME marked, TNEF and Outlook .msg, the corpus."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_pem_private_key,
    pkcs7,
)
from mailpipe.plugins.parse import PAYLOADS_KEY, parse_into
from mailpipe.plugins.unwrap import content_type, signed_content
from mailpipe.plugins.unwrap.outlook import OLE_MAGIC

from mailpipe.message import Message
from mailpipe.testing.msgfile import outlook_msg

INNER = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: "
         b"text/plain\r\n\r\nPrinter on floor 3 is broken\r\n--x\r\nContent-Type: "
         b"application/pdf\r\nContent-Disposition: attachment; filename=scan.pdf\r\n"
         b"\r\n%PDF-1.4 scan\r\n--x--\r\n")


@pytest.fixture(scope="module")
def signer() -> tuple[x509.Certificate, Any]:
    # RSA: cryptography's PKCS#7 envelope builder takes RSA recipients only
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("signer@customer.example", common_name="Customer Signer",
                         key_type=trustme.KeyType.RSA)
    return (x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()),
            load_pem_private_key(cert.private_key_pem.bytes(), None))


def _wrap(der: bytes, smime_type: str) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"\r\n")
    return (b"From: c@customer.example\r\nTo: support@desk.example\r\nSubject: "
            b"signed\r\nMIME-Version: 1.0\r\nContent-Type: application/pkcs7-mime; "
            b"smime-type=" + smime_type.encode() + b"; name=smime.p7m\r\n"
            b"Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; "
            b"filename=smime.p7m\r\n\r\n" + body)


def test_opaque_signed_smime_shows_inner_message_unverified(
    signer: tuple[x509.Certificate, Any], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    cert, key = signer
    der = (pkcs7.PKCS7SignatureBuilder().set_data(INNER)
           .add_signer(cert, key, hashes.SHA256()).sign(Encoding.DER, []))
    assert signed_content(der) == INNER
    message = make_message(_wrap(der, "signed-data"))
    before = parse_into(message)
    assert not (before.text or "").strip()  # the empty ticket of issue 17
    assert processor("unwrap").process(message) is None
    record = parse_into(message)
    assert record.text is not None and "Printer on floor 3" in record.text
    (env,) = record.envelopes
    assert (env.kind, env.unwrapped, env.signature) == (
        "smime-opaque-signed", True, "unverified")
    assert any("CN=Customer Signer" in s for s in env.signers)
    pdf = [a for a in record.attachments if a.filename == "scan.pdf"]
    assert len(pdf) == 1 and pdf[0].source == "smime"
    payloads = message.meta[PAYLOADS_KEY]
    assert len(payloads) == len(record.attachments)
    assert payloads[pdf[0].index] == b"%PDF-1.4 scan"
    assert message.raw.startswith(b"From: c@customer.example")  # raw untouched


def test_encrypted_smime_is_marked_and_left_sealed(
    signer: tuple[x509.Certificate, Any], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    cert, _ = signer
    der = (pkcs7.PKCS7EnvelopeBuilder().set_data(INNER).add_recipient(cert)
           .encrypt(Encoding.DER, []))
    assert content_type(der) == "1.2.840.113549.1.7.3"
    assert signed_content(der) is None
    message = make_message(_wrap(der, "enveloped-data"))
    processor("unwrap").process(message)
    (env,) = parse_into(message).envelopes
    assert (env.kind, env.unwrapped, env.signature) == ("smime-encrypted", False, "none")


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x30", b"\x30\x80", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x06\x01\x2a",
     b"\x30\x80" * 100, bytes(range(256))],
    ids=["empty", "tag-only", "indefinite-open", "huge-length", "oid-only",
         "deep-nesting", "noise"],
)
def test_malformed_cms_never_raises(blob: bytes) -> None:
    assert signed_content(blob) is None
    content_type(blob)


def test_pgp_mime_and_inline_pgp_are_marked(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    encrypted = (b"From: a@x.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/"
                 b"encrypted; protocol=\"application/pgp-encrypted\"; boundary=b\r\n\r\n"
                 b"--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
                 b"--b\r\nContent-Type: application/octet-stream\r\n\r\n-----BEGIN PGP "
                 b"MESSAGE-----\r\nhQEMA\r\n-----END PGP MESSAGE-----\r\n--b--\r\n")
    inline = (b"From: a@x.example\r\n\r\n-----BEGIN PGP SIGNED MESSAGE-----\r\nHash: "
              b"SHA256\r\n\r\nhello\r\n-----BEGIN PGP SIGNATURE-----\r\nx\r\n"
              b"-----END PGP SIGNATURE-----\r\n")
    for raw, kind in ((encrypted, "pgp-encrypted"), (inline, "pgp-signed")):
        message = make_message(raw)
        processor("unwrap").process(message)
        assert [e.kind for e in parse_into(message).envelopes] == [kind]


def _msg_attachment(data: bytes) -> bytes:
    return (b"From: a@x.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
            b" boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached"
            b"\r\n--b\r\nContent-Type: application/vnd.ms-outlook\r\nContent-Disposition:"
            b" attachment; filename=fwd.msg\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(data) + b"--b--\r\n")


def test_broken_outlook_msg_is_a_defect_note(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    message = make_message(_msg_attachment(OLE_MAGIC + b"\0" * 600))
    assert processor("unwrap").process(message) is None
    record = parse_into(message)
    (env,) = record.envelopes
    assert (env.kind, env.unwrapped) == ("outlook-msg", False)
    assert [d.kind for d in record.defects] == ["UnwrapFailed"]


def test_outlook_msg_items_become_attachments_and_text(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
) -> None:
    """A real .msg (written by mailpipe.testing.msgfile) read by extract-msg."""
    pytest.importorskip("extract_msg")
    xlsx = b"PK\x03\x04 sheet" * 400  # over 4096 octets: regular sectors, not mini
    item = outlook_msg("Invoice 42", "Please pay invoice 42.",
                       [("invoice.xlsx", "application/vnd.ms-excel", xlsx),
                        ("note.txt", "text/plain", b"small")])
    message = make_message(_msg_attachment(item))
    processor("unwrap").process(message)
    record = parse_into(message)
    msg_att = next(a for a in record.attachments if a.filename == "fwd.msg")
    assert msg_att.text == "Invoice 42\n\nPlease pay invoice 42."
    found = {a.filename: a for a in record.attachments if a.source == "msg"}
    assert set(found) == {"invoice.xlsx", "note.txt"}
    assert found["invoice.xlsx"].part == f"{msg_att.part}/msg.1"
    payloads = message.meta[PAYLOADS_KEY]
    assert payloads[found["invoice.xlsx"].index] == xlsx
    assert payloads[found["note.txt"].index] == b"small"
    assert len(payloads) == len(record.attachments)
    assert [(e.kind, e.unwrapped) for e in record.envelopes] == [("outlook-msg", True)]


def test_outlook_msg_body_becomes_the_body_of_an_empty_message(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
) -> None:
    pytest.importorskip("extract_msg")
    item = outlook_msg("Fwd", "The customer wrote this.")
    raw = (b"From: a@x.example\r\nMIME-Version: 1.0\r\nContent-Type: "
           b"application/vnd.ms-outlook; name=mail.msg\r\nContent-Transfer-Encoding: "
           b"base64\r\n\r\n" + base64.encodebytes(item))
    message = make_message(raw)
    processor("unwrap").process(message)
    assert parse_into(message).text == "The customer wrote this."


EXPECTED = {
    "smime-pgp__james__mail_with_signature_and_content_type_xpkcs7mime.eml":
        ("smime-opaque-signed", True),
    "smime-pgp__james__crypted_with_attachment.eml": ("smime-encrypted", False),
    "smime-pgp__cpython__msg_45.eml": ("pgp-signed", False),
    "smime-pgp__mimekit__thunderbird-signed.eml": ("smime-signed", False),
    "tnef__mimekit__ukr.eml": ("ms-tnef", True),
}


@pytest.mark.timeout(300)
def test_unwrap_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    step = processor("unwrap")
    seen = {}
    for path in corpus_files:
        message = make_message(path.read_bytes())
        assert step.process(message) is None, path.name
        record = parse_into(message)
        assert len(message.meta[PAYLOADS_KEY]) == len(record.attachments), path.name
        assert all(e.signature != "valid" for e in record.envelopes), path.name
        seen[path.name] = record.envelopes
    for name, (kind, unwrapped) in EXPECTED.items():
        assert [(e.kind, e.unwrapped) for e in seen[name]][:1] == [(kind, unwrapped)]
    opaque = seen["smime-pgp__james__mail_with_signature_and_content_type_xpkcs7mime.eml"]
    assert any("user@james.org" in s for s in opaque[0].signers)


#: An OID arc of 3001 continuation octets, lengths consistent: decoded whole it was
#: one int of ~6300 digits (quadratic shifts, then str() raised ValueError past
#: Python's 4300-digit limit). The review's literal is one octet short of its
#: declared length, so it was (rightly) rejected before the OID was read.
LONG_OID = b"\x30\x82\x0b\xbf\x06\x82\x0b\xbb\x2a" + b"\xff" * 3001 + b"\x01"
REVIEW_BLOB = b"\x30\x82\x0b\xbf\x06\x82\x0b\xbb\x2a" + b"\xff" * 3000 + b"\x01"


@pytest.mark.parametrize("blob", [LONG_OID, REVIEW_BLOB, b"\x30\x45\x06\x43\x2a"
                                  + b"\x81" * 65 + b"\x01", b"\x30\x0d\x06\x0b\x2a"
                                  + b"\x81" * 9 + b"\x01"],
                         ids=["long-arc", "review-literal", "65-octets", "9-octet-arc"])
def test_overlong_oid_is_not_a_content_type(blob: bytes) -> None:
    assert content_type(blob) is None
    assert signed_content(blob) is None


def test_oid_at_the_limits_is_read() -> None:
    arc = b"\xff" * 7 + b"\x7f"  # 8 octets: the longest arc accepted
    oid = b"\x2a" + arc * 7 + b"\x86\x48"  # 59 octets
    blob = bytes([0x30, len(oid) + 2, 0x06, len(oid)]) + oid
    assert content_type(blob) == "1.2." + ".".join([str(2**56 - 1)] * 7) + ".840"


def test_overlong_oid_in_p7m_never_raises(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    message = make_message(_wrap(LONG_OID, "signed-data"))
    assert processor("unwrap").process(message) is None
    assert parse_into(message).envelopes == []  # not CMS: nothing claimed


class _CountingPayload:
    """A payload that counts how often its bytes are read."""

    def __init__(self, data: bytes) -> None:
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __bytes__(self) -> bytes:
        self.reads += 1
        return self.data


def test_only_attachments_named_or_typed_msg_are_read(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    raw = (b"From: a@x.example\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;"
           b" boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
           b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
           b"filename=scan.pdf\r\n\r\n%PDF-1.4 scan\r\n"
           b"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
           b"attachment; filename=fwd.msg\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(OLE_MAGIC + b"\0" * 600) + b"--b--\r\n")
    message = make_message(raw)
    record = parse_into(message)
    spies = [_CountingPayload(bytes(p)) for p in message.meta[PAYLOADS_KEY]]
    message.meta[PAYLOADS_KEY] = spies
    assert [a.filename for a in record.attachments] == ["scan.pdf", "fwd.msg"]
    processor("unwrap").process(message)
    assert [s.reads for s in spies] == [0, 1]  # the PDF is never read
    assert [e.kind for e in record.envelopes] == ["outlook-msg"]
