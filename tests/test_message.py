"""Message and MessageRef: keys, raw bytes in memory or spooled, lenient headers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest

from mailpipe import Message, MessageRef, message_key
from mailpipe.message import distinct_uids

CORPUS = Path(
    os.environ.get("MAILPIPE_CORPUS")
    or Path(__file__).resolve().parents[2] / "shared" / "corpus"
)

RAW = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= report\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Line one\r\n"
    b".leading dot stays unstuffed\r\n"
)


def spooled(tmp_path: Path, data: bytes, *, uid: str = "u1") -> Message:
    path = tmp_path / "spool.eml"
    path.write_bytes(data)
    ref = MessageRef(mailbox="inbox", number=1, uid=uid, size=len(data))
    return Message(ref=ref, spool_path=path)


def test_from_bytes_defaults() -> None:
    msg = Message.from_bytes(RAW)
    digest = hashlib.sha256(RAW).hexdigest()
    assert msg.ref == MessageRef(mailbox="local", number=0, uid=f"sha256:{digest}", size=len(RAW))
    assert msg.raw == RAW
    assert msg.size == len(RAW)
    assert msg.sha256 == digest
    assert msg.tags == set()
    assert msg.meta == {}
    assert msg.record is None
    assert msg.headers_only is False


def test_from_bytes_with_mailbox_and_uid() -> None:
    msg = Message.from_bytes(RAW, mailbox="support", uid="UID-42")
    assert msg.ref.mailbox == "support"
    assert msg.ref.uid == "UID-42"
    assert msg.key == message_key("support", "UID-42")


def test_message_key_is_sha256_of_mailbox_nul_uid() -> None:
    # The key is a stored contract (journal rows, file names, Idempotency-Key headers):
    # changing it would make every message look new after an upgrade.
    expected = hashlib.sha256(b"support\x00UID-42").hexdigest()[:32]
    assert message_key("support", "UID-42") == expected


def test_message_key_shape_and_stability() -> None:
    key = message_key("inbox", "000001a4b2")
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert message_key("inbox", "000001a4b2") == key
    assert message_key("inbox2", "000001a4b2") != key
    assert message_key("inbox", "000001a4b3") != key
    # Splitting differently between mailbox and uid gives a different key.
    assert message_key("ab", "c") != message_key("a", "bc")


def test_key_is_the_same_for_ref_and_message_and_ignores_number_and_size() -> None:
    a = MessageRef(mailbox="inbox", number=1, uid="U1", size=10)
    b = MessageRef(mailbox="inbox", number=7, uid="U1", size=999)
    assert a.key == b.key == message_key("inbox", "U1")
    assert Message(ref=a, data=b"x").key == a.key


def test_same_bytes_give_the_same_default_uid_and_key() -> None:
    assert Message.from_bytes(RAW).key == Message.from_bytes(bytes(RAW)).key
    assert Message.from_bytes(RAW).key != Message.from_bytes(RAW + b"x").key


def _refs(*uids: str) -> list[MessageRef]:
    return [
        MessageRef(mailbox="box", number=n, uid=uid, size=10 * n)
        for n, uid in enumerate(uids, 1)
    ]


def test_distinct_uids_suffixes_each_later_occurrence() -> None:
    refs, renamed = distinct_uids(_refs("abc", "x", "abc", "", "", "abc"))
    assert [r.uid for r in refs] == ["abc", "x", "abc #2", "", "", "abc #3"]
    assert renamed == 2  # empty uids (no UIDL for them) are not duplicates
    assert [(r.number, r.size) for r in refs] == [(n, 10 * n) for n in range(1, 7)]
    assert len({r.key for r in refs if r.uid}) == 4


def test_distinct_uids_never_takes_a_listed_uid() -> None:
    # Only a non-conforming server lists a uid with a space; it still cannot collide.
    refs, renamed = distinct_uids(_refs("abc", "abc #2", "abc"))
    assert [r.uid for r in refs] == ["abc", "abc #2", "abc #2 #2"]
    assert renamed == 1


def test_distinct_uids_leaves_unique_listings_alone() -> None:
    listed = _refs("a", "b", "c")
    assert distinct_uids(listed) == (listed, 0)


def test_message_ref_is_frozen() -> None:
    ref = MessageRef(mailbox="inbox", number=1, uid="U1", size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.uid = "U2"  # type: ignore[misc]


def test_message_needs_data_or_spool_path() -> None:
    ref = MessageRef(mailbox="inbox", number=1, uid="U1", size=1)
    with pytest.raises(ValueError, match="Message needs data or spool_path"):
        Message(ref=ref)


def test_spooled_and_in_memory_agree(tmp_path: Path) -> None:
    big = RAW + b"x" * (3 * 2**20) + b"\r\n"  # > the 1 MiB hashing chunk
    on_disk = spooled(tmp_path, big)
    in_memory = Message(ref=on_disk.ref, data=big)
    assert on_disk.sha256 == in_memory.sha256 == hashlib.sha256(big).hexdigest()
    assert on_disk.raw == in_memory.raw == big
    assert on_disk.size == in_memory.size == len(big)
    with on_disk.open() as f1, in_memory.open() as f2:
        assert f1.read() == f2.read() == big
    assert on_disk.header("Subject") == in_memory.header("Subject") == "café report"
    assert on_disk.key == in_memory.key


def test_sha256_is_cached(tmp_path: Path) -> None:
    msg = spooled(tmp_path, RAW)
    first = msg.sha256
    msg.spool_path.unlink()  # type: ignore[union-attr]
    assert msg.sha256 == first


def test_size_is_octets_received_not_list_size() -> None:
    ref = MessageRef(mailbox="inbox", number=1, uid="U1", size=5000)
    msg = Message(ref=ref, data=RAW)
    assert msg.size == len(RAW)
    assert msg.ref.size == 5000


def test_header_decodes_and_returns_none_when_absent() -> None:
    msg = Message.from_bytes(RAW)
    assert msg.header("subject") == "café report"
    assert msg.header("From") == "Alice <alice@example.org>"
    assert msg.header("X-Missing") is None
    assert msg.email["Message-ID"] == "<1@example.org>"
    assert msg.email is msg.email  # parsed once


def test_header_returns_first_of_repeated_headers() -> None:
    msg = Message.from_bytes(b"Received: first\r\nReceived: second\r\n\r\nbody\r\n")
    assert msg.header("Received") == "first"


@pytest.mark.parametrize(
    "data",
    [
        b"Message-ID: <<>>\r\n\r\n",  # IndexError inside the stdlib's header parser
        b"From: =?utf-8?q?=E2=28=A1?= <a@b>\r\nTo: <<<@@>>>\r\n\r\n",
        b"Subject: =?utf-8?b?////?=\r\n\r\n",
        b"\xff\xfe\x00\x01 not a header at all\r\n\r\n",
        b"",
        b"Subject: caf\xe9 8-bit latin-1\r\n\r\nbody",
        b"Date: 99 Foo 99999 99:99\r\n\r\n",
    ],
    ids=["bad-msgid", "bad-addresses", "bad-b64-word", "binary", "empty", "8bit", "bad-date"],
)
def test_header_never_raises(data: bytes) -> None:
    msg = Message.from_bytes(data)
    for name in ("Message-ID", "From", "To", "Subject", "Date", "X-None"):
        value = msg.header(name)
        assert value is None or isinstance(value, str)


def test_header_returns_none_where_the_stdlib_raises() -> None:
    msg = Message.from_bytes(b"Message-ID: <<>>\r\nSubject: ok\r\n\r\n")
    with pytest.raises(IndexError):
        str(msg.email.get("Message-ID"))  # what header() protects callers from
    assert msg.header("Message-ID") is None
    assert msg.header("Subject") == "ok"


def corpus_files() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(CORPUS.glob("*.eml"))


@pytest.mark.skipif(not corpus_files(), reason=f"corpus not found at {CORPUS}")
def test_header_never_raises_on_the_corpus(tmp_path: Path) -> None:
    checked = 0
    for path in corpus_files():
        data = path.read_bytes()
        msg = Message.from_bytes(data, mailbox="corpus", uid=path.name)
        names = {k for k in msg.email.keys()}  # noqa: SIM118
        for name in names | {"Subject", "From", "Message-ID", "Date"}:
            value = msg.header(name)
            assert value is None or isinstance(value, str), (path.name, name)
        assert msg.sha256 == hashlib.sha256(data).hexdigest()
        checked += 1
    assert checked >= 100


def test_a_header_lookup_reads_only_the_header_section(tmp_path: Path) -> None:
    body = b"x" * 1000 + b"\r\n"
    raw = b"Subject: big\r\nFrom: A <a@example.org>\r\n\r\nSubject: not a header\r\n" + body * 3000
    spool = tmp_path / "m.eml"
    spool.write_bytes(raw)
    ref = MessageRef(mailbox="m", number=1, uid="u", size=len(raw))
    message = Message(ref=ref, spool_path=spool)
    assert message.header("Subject") == "big"
    assert message.header("From") == "A <a@example.org>"
    assert message._email is None  # the body was never parsed
    assert message.head.get_payload() in ("", None)


@pytest.mark.parametrize(
    ("raw", "subject"),
    [(b"Subject: lf\n\nbody\n", "lf"), (b"Subject: no body\r\n", "no body"),
     (b"Subject: folded\r\n over\r\n\r\nb", "folded over")],
    ids=["lf", "no-body", "folded"],
)
def test_the_header_section_is_found_every_way(raw: bytes, subject: str) -> None:
    assert Message.from_bytes(raw).header("Subject") == subject


def test_minimal_record_leaves_the_text_of_a_large_message_to_parse() -> None:
    from mailpipe.document import MINIMAL_TEXT_OCTETS, minimal_record

    small = Message.from_bytes(b"Subject: s\r\n\r\nhello\r\n")
    assert minimal_record(small)["text"] == "hello\n"
    large = Message.from_bytes(
        b"Subject: l\r\n\r\n" + b"y" * (MINIMAL_TEXT_OCTETS + 1)
    )
    record = minimal_record(large)
    assert record["subject"] == "l" and record["text"] is None
    assert large._email is None
