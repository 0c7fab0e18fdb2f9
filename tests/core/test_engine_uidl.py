"""UIDL edge cases through the whole delivery path: the real pop3 source against the fake
POP3 server, the engine, the SQLite journal and a store (conformance T-23, C-60)."""

from __future__ import annotations

import poplib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import structlog

from mailpipe.errors import SourcePermanentError, UidlResetSuspected
from mailpipe.journal.base import Status
from mailpipe.message import message_key
from mailpipe.testing import Pop3Server
from mailpipe.testing.server import wire_form

pytestmark = pytest.mark.timeout(120)

Factory = Callable[..., Pop3Server]


def msg(n: int, subject: str | None = None) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <uidl-{n}@example.com>\r\nSubject: {subject or f'm{n}'}\r\n"
        f"\r\nbody {n}\r\n"
    ).encode()


async def test_t23_duplicate_uids_are_all_delivered_and_deleted(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    copy = msg(1, "identical copy")
    srv.add_message(copy, uid="abc")
    srv.add_message(copy, uid="abc")  # RFC 1939 §7: same uid for an identical copy
    srv.add_message(msg(2), uid="other")
    r = rig(srv)
    summary = await r.poll()
    assert summary.error is None, summary.error
    assert (summary.listed, summary.processed, summary.deleted) == (3, 3, 3)
    stored = r.stored()
    assert sorted(d["uid"] for d in stored) == ["abc", "abc #2", "other"]
    assert len({d["key"] for d in stored}) == 3  # each copy stored under its own key
    assert srv.messages == []  # both copies deleted, after they were stored
    assert srv.sessions[-1].outcome == "committed"
    entries = r.journal.get_many("box", ["abc", "abc #2", "other"])
    assert {e.status for e in entries.values()} == {Status.DELETED}
    assert len(entries) == 3


async def test_t23_duplicate_uids_in_keep_mode_are_processed_once(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    for _ in range(2):
        srv.add_message(msg(1, "identical copy"), uid="abc")
    r = rig(srv, delete="never")
    first = await r.poll()
    second = await r.poll()  # the occurrence uids are stable: nothing new
    assert (first.processed, second.processed) == (2, 0)
    # Issue 21 item 3: listed with their journaled sizes, the copies are not
    # downloaded again on every poll (before: each poll re-fetched every copy).
    assert second.retrieved == 0
    assert sorted(d["uid"] for d in r.stored()) == ["abc", "abc #2"]
    assert len(srv.messages) == 2


# --- C-60: UIDL reset suspected -------------------------------------------------------


def fill(srv: Pop3Server, start: int, count: int) -> None:
    for n in range(start, start + count):
        srv.add_message(msg(n))


def reset_events(logs: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == "uidl_reset_suspected"]


@pytest.mark.parametrize("delete", ["never", "after_days:30"])
async def test_c60_keep_mode_stops_when_every_uid_changed(
    pop3_server_factory: Factory, rig: Any, delete: str
) -> None:
    srv = pop3_server_factory()
    fill(srv, 1, 12)
    r = rig(srv, delete=delete)
    first = await r.poll()
    assert (first.error, first.processed) == (None, 12)
    before = r.journal.list("box")
    srv.rename_uids(lambda uid: "v2-" + uid)  # e.g. a Dovecot UIDVALIDITY change
    with structlog.testing.capture_logs() as logs:
        second = await r.poll()
    assert second.error_type == "UidlResetSuspected"
    assert second.retrieved == second.processed == 0 and not second.committed
    assert len(r.stored()) == 12  # nothing ingested again
    assert r.journal.list("box") == before  # and nothing journaled
    assert len(srv.messages) == 12 and srv.sessions[-1].outcome != "committed"
    assert "RETR" not in srv.transcript.keywords(len(srv.sessions))
    assert isinstance(r.runner.last_exception, UidlResetSuspected)
    assert isinstance(r.runner.last_exception, SourcePermanentError)  # long back-off
    text = second.error or ""
    assert "mailpipe state mark-seen CONFIG box" in text
    assert 'on_uidl_reset = "ingest"' in text
    (event,) = reset_events(logs)
    assert event["log_level"] == "error" and event["action"] == "stop"
    assert {k: event[k] for k in ("listed", "unseen", "retained", "vanished")} == {
        "listed": 12,
        "unseen": 12,
        "retained": 12,
        "vanished": 12,
    }
    assert event["same_size"] == 12  # renamed mail keeps its sizes
    assert not any(str(v).startswith("v2-") for v in event.values())  # counts only

    # The operator adopts the renamed mail (what `mailpipe state mark-seen` records).
    third = await r.poll()
    assert third.error_type == "UidlResetSuspected"  # still stopped until then
    sizes = [len(wire_form(m)) for m in srv.messages]  # LIST sizes, as mark-seen records
    r.journal.mark_seen(
        "box", [(u, message_key("box", u), n) for u, n in zip(srv.uids, sizes, strict=True)]
    )
    fill(srv, 13, 1)
    fourth = await r.poll()
    assert (fourth.error, fourth.processed) == (None, 1)
    assert len(r.stored()) == 13


async def test_c60_ingest_warns_and_processes_the_renamed_mail(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    fill(srv, 1, 12)
    r = rig(srv, delete="never", on_uidl_reset="ingest", commit_window=5)
    await r.poll()
    srv.rename_uids(lambda uid: "v2-" + uid)
    with structlog.testing.capture_logs() as logs:
        second = await r.poll()
    # 3 commit windows, a session each (POP3 applies DELE only at QUIT), and no
    # follow-up session: the fake server is no Gmail, it lists everything (T-44)
    assert (second.error, second.processed, second.sessions) == (None, 12, 3)
    assert len(r.stored()) == 24  # new uids are new keys: processed again
    (event,) = reset_events(logs)  # once per poll, not once per commit window
    assert event["log_level"] == "warning" and event["action"] == "ingest"
    assert (event["unseen"], event["vanished"]) == (12, 12)


async def test_c60_keep_mode_with_new_mail_and_some_deletions_never_triggers(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    r = rig(srv, delete="never")
    with structlog.testing.capture_logs() as logs:
        fill(srv, 1, 12)
        assert (await r.poll()).processed == 12  # first poll: all new, journal empty
        fill(srv, 13, 30)  # 30 of 42 listed are new: more than half unseen
        assert (await r.poll()).processed == 30
        drop_on_server(srv, [1, 2, 3, 4, 5])  # another client deletes some kept mail
        fill(srv, 43, 40)  # 40 of 77 new; 5 of the 42 kept vanished
        third = await r.poll()
    assert (third.error, third.processed) == (None, 40)
    assert reset_events(logs) == []
    assert len(r.stored()) == 82


async def test_c60_delete_mode_never_triggers(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    fill(srv, 1, 12)
    # Kept by the pipeline, so the journal holds 12 kept entries on the server.
    r = rig(srv, on_complete="keep")
    await r.poll()
    assert len(srv.messages) == len(r.journal.retained("box")) == 12
    srv.rename_uids(lambda uid: "v2-" + uid)
    with structlog.testing.capture_logs() as logs:
        second = await r.poll()
    assert (second.error, second.processed) == (None, 12)
    assert reset_events(logs) == []


def drop_on_server(srv: Pop3Server, numbers: list[int]) -> None:
    """Delete messages as another POP3 client would (DELE, QUIT)."""
    client = poplib.POP3(srv.host, srv.port, timeout=10)
    try:
        client.user("user")
        client.pass_("pass")
        for n in numbers:
            client.dele(n)
    finally:
        client.quit()


async def test_keep_mode_a_new_message_inheriting_a_copy_name_is_processed(
    pop3_server_factory: Any, rig: Any
) -> None:
    """Copies are named by listing order: when another client deletes the first copy,
    a different message arriving under the same uid takes the name "abc #2", which the
    journal knows. Its content hash tells it apart (found in review)."""
    srv = pop3_server_factory()
    srv.add_message(msg(1, "copy"), uid="abc")
    srv.add_message(msg(1, "copy"), uid="abc")
    r = rig(srv, delete="never")
    assert (await r.poll()).processed == 2
    srv._mailbox.remove([srv._mailbox.items[0]])  # the user's phone deletes copy 1
    srv.add_message(msg(99, "brand new mail"), uid="abc")
    third = await r.poll()
    assert third.processed == 1
    fourth = await r.poll()  # processed once: known by its content hash now
    assert fourth.processed == 0
