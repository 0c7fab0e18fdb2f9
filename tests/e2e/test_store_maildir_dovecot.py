"""A real Dovecot serves the Maildir that store.maildir wrote, byte for byte, over POP3."""

from __future__ import annotations

import os
import poplib
from pathlib import Path

import pytest
from mailpipe.plugins.store.maildir import MaildirOptions, MaildirStore

from mailpipe import Message, ProcessorContext
from mailpipe.testing.dovecot import Dovecot, DovecotUser

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(120)]

CRAFTED = [
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: plain\r\n"
    b"Message-ID: <1@example.com>\r\n\r\nHello Bob.\r\n",
    # RFC 1939 section 3: lines starting with "." are dot-stuffed on the wire.
    b"From: a@example.com\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n"
    b"From me\r\n>From you\r\n\r\nend\r\n",
    "From: a@example.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    "\r\nCafé, naïve, 日本語\r\n".encode(),
    b"From: a@example.com\r\nSubject: long line\r\n\r\n" + b"x" * 5000 + b"\r\n",
]


def corpus_dir() -> Path:
    env = os.environ.get("MAILPIPE_CORPUS")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "corpus"


def as_served(raw: bytes) -> bytes:
    """What a POP3 client reassembles: CRLF line ends, a final CRLF."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def corpus_sample(limit: int = 25) -> list[bytes]:
    folder = corpus_dir()
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.eml")):
        data = path.read_bytes()
        if b"\r" in data.replace(b"\r\n", b""):
            continue  # bare CR: Dovecot's line handling, not ours, would be under test
        out.append(data)
        if len(out) == limit:
            break
    return out


def retrieve_all(d: Dovecot, user: DovecotUser) -> list[bytes]:
    p = poplib.POP3(d.host, d.pop3_port, timeout=10)
    try:
        p.user(user.name)
        p.pass_(user.password)
        count, _ = p.stat()
        return [b"\r\n".join(p.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    finally:
        p.quit()  # no DELE: nothing is removed


def test_dovecot_serves_what_store_maildir_wrote(
    dovecot: Dovecot, dovecot_user: DovecotUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)  # corpus lines beyond 2048 octets
    raws = CRAFTED + corpus_sample()
    messages = [
        Message.from_bytes(raw, mailbox="dovecot-e2e", uid=str(i))
        for i, raw in enumerate(raws)
    ]
    store = MaildirStore(
        MaildirOptions(path=dovecot_user.maildir), ProcessorContext(base_dir=Path("/"))
    )
    store.open()
    for m in messages:
        store.process(m)
    for m in messages:
        store.process(m)  # a re-run writes nothing twice
    store.close()

    got = retrieve_all(dovecot, dovecot_user)
    assert len(got) == len(raws)
    assert got == [as_served(raw) for raw in raws]  # in arrival order
    for raw, served in zip(CRAFTED, got, strict=False):
        assert served == raw  # CRLF input comes back unchanged

    # Dovecot has now seen (and may have moved) the files: a new run still knows them.
    again = MaildirStore(
        MaildirOptions(path=dovecot_user.maildir), ProcessorContext(base_dir=Path("/"))
    )
    for m in messages:
        again.process(m)
    assert dovecot.mailbox_count(dovecot_user) == len(raws)
