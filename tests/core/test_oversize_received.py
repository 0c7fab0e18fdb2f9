"""Issue 20.6: the size policy holds for the octets received, not for what LIST says.

The fake server lists 100 octets for a multi-megabyte message (``list_size_delta``);
the real pop3 source, the engine, the SQLite journal and store.jsonl must stop the
transfer at the limit, commit nothing for that message, apply ``on_oversize`` and let
the other messages through in the same poll.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner, Summary
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.testing import Faults, Pop3Server
from mailpipe.validation import validate_config

pytestmark = pytest.mark.timeout(120)

BIG = 5_000_000
CHUNK = 256 * 1024  # the pop3 source's default read size


def msg(n: int, body: bytes = b"") -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <size-{n}@example.com>\r\nSubject: m{n}\r\n\r\n"
    ).encode() + (body or f"body {n}\r\n".encode())


def lying_server(big: bytes) -> Pop3Server:
    """Three messages; LIST says the 2nd has 100 octets."""
    return Pop3Server(
        [msg(1), big, msg(3)],
        faults=Faults(list_size_delta={2: 100 - len(big)}),
    )


def big_message() -> bytes:
    return msg(2, (b"C" * 76 + b"\r\n") * (BIG // 78))


async def poll(tmp_path: Path, srv: Pop3Server, **mailbox: Any) -> Summary:
    _, registry = load(entry_points=False)
    data = {
        "mailboxes": [
            {
                "name": "box", "host": srv.host, "port": srv.port,
                "security": "none", "allow_plaintext_password": True,
                "username": "user", "password": "pass", **mailbox,
            }
        ],
        "pipelines": {
            "default": {
                "processors": [{"use": "store.jsonl", "path": str(tmp_path / "out.jsonl")}]
            }
        },
    }
    config = validate_config(data, path=tmp_path / "pipeline.toml", registry=registry)
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    chain = Chain(config.pipelines, base_dir=tmp_path)
    runner = MailboxRunner(
        config.mailboxes[0],
        config=config,
        chain=chain,
        journal=journal,
        quarantine=Quarantine(tmp_path / "quarantine"),
        hooks=Hooks(load(entry_points=False)[0]),
    )
    await chain.open()
    try:
        return await runner.poll()
    finally:
        await chain.close()
        journal.close()


def stored_subjects(tmp_path: Path) -> list[str]:
    out = tmp_path / "out.jsonl"
    if not out.exists():
        return []
    return sorted(json.loads(line)["subject"] for line in out.read_text().splitlines())


def entry(tmp_path: Path, uid: str) -> Any:
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    try:
        return journal.get_many("box", [uid]).get(uid)
    finally:
        journal.close()


def retrs(srv: Pop3Server, session: int) -> list[str]:
    return [
        e.text for e in srv.transcript.entries(session)
        if e.kind == "C" and e.text.upper().startswith("RETR")
    ]


async def test_a_list_that_understates_a_size_is_stopped_at_the_limit(
    tmp_path: Path,
) -> None:
    big = big_message()
    with lying_server(big) as srv, capture_logs() as logs:
        uid = srv.uids[1]
        summary = await poll(tmp_path, srv, max_message_size="1MB")
        sessions = len(srv.sessions)
        again = await poll(tmp_path, srv, max_message_size="1MB")
        left = srv.messages
    assert summary.error is None, summary.error
    assert stored_subjects(tmp_path) == ["m1", "m3"]  # the others still flowed
    assert left == [big]  # skip (the default on_oversize): kept on the server
    stopped = [e for e in logs if e["event"] == "pop3_message_oversize"]
    assert len(stopped) == 1
    # The transfer stopped at the limit: never buffered (or spooled) the rest.
    assert 1_000_000 < stopped[0]["received"] <= 1_000_000 + CHUNK
    e = entry(tmp_path, uid)
    assert e is not None and e.status == Status.PENDING and e.sha256 is None
    assert e.last_error.startswith("oversize:")
    # The next poll skips it without downloading it again.
    assert again.error is None and again.skipped == 1
    assert all(retrs(srv, n) == [] for n in range(sessions + 1, len(srv.sessions) + 1))
    assert not list((tmp_path / "var" / "spool").glob("pop3-*"))


async def test_a_size_liar_is_quarantined_whole_under_on_oversize_quarantine(
    tmp_path: Path,
) -> None:
    big = big_message()
    with lying_server(big) as srv:
        uid = srv.uids[1]
        summary = await poll(
            tmp_path, srv, max_message_size="1MB", on_oversize="quarantine"
        )
        left = srv.messages
    assert summary.error is None, summary.error
    assert (summary.quarantined, left) == (1, [])
    assert stored_subjects(tmp_path) == ["m1", "m3"]
    (eml,) = (tmp_path / "quarantine").rglob("*.eml")
    assert eml.read_bytes() == big  # downloaded whole into the spool, then quarantined
    e = entry(tmp_path, uid)
    assert e is not None and e.status == Status.DELETED


async def test_a_message_over_the_max_message_cap_is_left_on_the_server_for_good(
    tmp_path: Path,
) -> None:
    big = big_message()
    with lying_server(big) as srv:
        uid = srv.uids[1]
        summary = await poll(tmp_path, srv, max_message="2MB")
        sessions = len(srv.sessions)
        again = await poll(tmp_path, srv, max_message="2MB")
        left = srv.messages
    assert summary.error is None and again.error is None
    assert stored_subjects(tmp_path) == ["m1", "m3"]
    assert left == [big]
    e = entry(tmp_path, uid)
    assert e is not None and e.status == Status.KEPT and e.disposition == "oversize"
    assert all(retrs(srv, n) == [] for n in range(sessions + 1, len(srv.sessions) + 1))


async def test_a_raised_limit_lets_a_marked_message_through(tmp_path: Path) -> None:
    """Review: the oversize mark records its limit; a limit raised above it (or
    removed) lets the message be fetched and processed again."""
    big = big_message()
    with lying_server(big) as srv:
        await poll(tmp_path, srv, max_message_size="1MB")
        assert (await poll(tmp_path, srv, max_message_size="1MB")).skipped == 1
        raised = await poll(tmp_path, srv, max_message_size="10MB")
        left = srv.messages
    assert raised.error is None and raised.processed == 1
    assert stored_subjects(tmp_path) == ["m1", "m2", "m3"] and left == []


async def test_without_uidl_a_size_liar_does_not_stop_the_mailbox(
    tmp_path: Path,
) -> None:
    """Review: without UIDL nothing can be journaled; the runner remembers it for its
    life and the other messages flow in the same poll."""
    big = big_message()
    srv = Pop3Server(
        [msg(1), big, msg(3)],
        faults=Faults(list_size_delta={2: 100 - len(big)}, uidl_unsupported=True),
    )
    with srv:
        summary = await poll(tmp_path, srv, max_message_size="1MB")
        left = srv.messages
    assert summary.error is None, summary.error
    assert summary.skipped >= 1 and stored_subjects(tmp_path) == ["m1", "m3"]
    assert left == [big]


async def test_a_top_reply_longer_than_a_header_section_is_not_kept(
    tmp_path: Path,
) -> None:
    """Review: a server answering TOP n 0 with megabytes is not held in memory nor
    judged: the message is retrieved (and size-checked) instead."""
    from mailpipe.plugins.pop3.source import MAX_HEADER_OCTETS, Pop3Options, Pop3Session

    huge_head = b"X-Pad: " + b"p" * (MAX_HEADER_OCTETS + 10) + b"\r\n"
    with Pop3Server([huge_head + msg(1)]) as srv:
        options = Pop3Options(
            host=srv.host, port=srv.port, security="none",
            allow_plaintext_password=True, username="user", password="pass",
        )
        session = Pop3Session(options, "box")
        await session.open()
        try:
            (ref,) = await session.list()
            with capture_logs() as logs:
                assert await session.headers(ref) is None
        finally:
            await session.abort()
    assert [e["event"] for e in logs if e["event"] == "pop3_top_too_long"]
