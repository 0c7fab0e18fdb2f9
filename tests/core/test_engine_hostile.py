"""Hostile and quirky servers through the whole delivery path (issue 20 items 1-3, issue
21 items 1-4): only a complete message is ever committed, a refused or short RETR is an
attempt like a processor failure, a refused TOP falls back to RETR, UTF8 is sent,
reused uids are caught in keep mode, LOGIN-DELAY is honoured between windows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from mailpipe.engine import UNRETRIEVABLE
from mailpipe.journal.base import Status
from mailpipe.testing import Faults, Pop3Server
from mailpipe.testing.server import wire_form

pytestmark = pytest.mark.timeout(120)

Factory = Callable[..., Pop3Server]

DOTS = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: dots\r\n"
    b"Message-ID: <dots@example.com>\r\n\r\nline one\r\n.\r\nIMPORTANT TAIL\r\n"
)


def msg(n: int, subject: str | None = None, body: str = "") -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <hostile-{n}@example.com>\r\nSubject: {subject or f'm{n}'}\r\n"
        f"\r\nbody {n}\r\n{body}"
    ).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(r: Any) -> list[str]:
    """The sha256 of each message a rig's store.jsonl holds, in order (byte-exact)."""
    return [rec["sha256"] for rec in r.stored()]


def retrs(srv: Pop3Server) -> int:
    """RETR commands the server received, refused ones included."""
    return srv.transcript.keywords().count("RETR")


# --- issue 20 item 1: a server that does not dot-stuff ------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_unstuffed_dot_line_is_never_committed(
    pop3_server_factory: Factory, rig: Any, pipelining: bool
) -> None:
    """MP-01: the body ends at the lone "." and the rest arrives as stray data. The
    23-octet copy must not be committed (its original would be DELE'd next session)."""
    srv = pop3_server_factory(
        messages=[DOTS, msg(2)],
        pipelining=pipelining,
        faults=[Faults(no_dot_stuffing=True)],  # the first session only
    )
    r = rig(srv)
    first = await r.poll()
    # Before: the 23-octet copy was journaled done and the original DELE'd next time.
    assert first.failed == 1
    assert [rec["size"] for rec in r.stored()] in ([], [len(msg(2))])
    assert DOTS in srv.messages  # the server copy is kept
    entry = r.journal.get_many("box", [srv.uids[0]])[srv.uids[0]]
    assert entry.status == Status.PENDING and entry.attempts == 1
    assert entry.last_error.startswith(UNRETRIEVABLE) and "LIST said" in entry.last_error
    # The server behaves again: the whole message is committed, once, then deleted.
    await r.poll()
    assert sorted(stored(r)) == sorted([sha(DOTS), sha(msg(2))])
    assert srv.messages == []


async def test_size_check_can_be_turned_off(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """verify_size = "off" commits what arrives (for servers that list wrong sizes)."""
    srv = pop3_server_factory(messages=[msg(1)], faults=Faults(list_size_delta=500))
    r = rig(srv, verify_size="off")
    summary = await r.poll()
    assert (summary.processed, summary.failed) == (1, 0)


async def test_strict_never_commits_a_short_copy_however_often_it_comes(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory(messages=[msg(1)], faults=Faults(list_size_delta=500))
    r = rig(srv, max_attempts=3)
    for _ in range(4):
        await r.poll()
    assert r.stored() == [] and len(srv.messages) == 1
    assert srv.transcript.keywords().count("RETR") == 3  # then it rests


async def test_confirm_commits_a_short_copy_seen_twice_in_two_sessions(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """Exchange lists estimated sizes: the same octets twice are the message."""
    srv = pop3_server_factory(
        messages=[msg(1), msg(2)], faults=Faults(list_size_delta={1: 500})
    )
    r = rig(srv, verify_size="confirm")
    first = await r.poll()
    assert (first.processed, first.failed) == (1, 1)
    with structlog.testing.capture_logs() as logs:
        second = await r.poll()
    assert (second.processed, second.failed) == (1, 0)
    assert [e["event"] for e in logs if e["event"] == "short_copy_confirmed"] == [
        "short_copy_confirmed"
    ]
    assert sorted(stored(r)) == sorted([sha(msg(1)), sha(msg(2))])
    assert srv.messages == []


async def test_confirm_never_accepts_a_copy_served_after_top(
    pop3_server_factory: Factory, rig: Any
) -> None:
    mails = [msg(n, body="line\r\n" * 40) for n in range(1, 3)]
    srv = pop3_server_factory(messages=mails, faults=Faults(short_retr_after_top=True))
    r = rig(srv, before=[PARSE, HEADER_RULE], verify_size="confirm")
    await r.poll()
    await r.poll()
    assert sorted(stored(r)) == sorted(sha(m) for m in mails)  # whole, never the head


async def test_larger_than_listed_and_line_end_slack_are_accepted(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """LIST sizes are hints (C-50): bare-LF sessions, sizes counted with LF, and a
    size below what arrived never count as incomplete."""
    body = "x\r\n" * 50
    srv = pop3_server_factory(
        messages=[msg(1, body=body), msg(2, body=body), msg(3)],
        faults=[Faults(bare_lf=True, list_size_delta={1: 0, 2: -52, 3: -40})],
    )
    r = rig(srv)
    summary = await r.poll()
    assert (summary.processed, summary.failed, summary.error) == (3, 0, None)


# --- issue 20 item 2: RETR refused at the head of the mailbox ------------------------


def refusing_head(factory: Factory, count: int) -> Pop3Server:
    """A server with ``count`` messages whose first five RETRs are refused."""
    refused = {f"RETR {n}": "[SYS/PERM] cannot read" for n in range(1, 6)}
    return factory(
        messages=[msg(n) for n in range(1, count + 1)], faults=Faults(err_on=refused)
    )


async def test_refused_retr_at_the_head_does_not_spin_or_starve(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = refusing_head(pop3_server_factory, 30)
    r = rig(srv, commit_window=5)
    summary = await r.poll()
    # Before: 16,300 sessions and 81,495 RETRs in 60 s, none of the 25 stored.
    assert summary.processed == 25 and summary.failed == 5
    assert summary.sessions <= 6  # 30 / 5 windows (no T-44 follow-up: not Gmail)
    assert retrs(srv) == 30
    assert len(srv.messages) == 5  # the refused five stay on the server
    entries = r.journal.get_many("box", srv.uids)
    assert {e.attempts for e in entries.values()} == {1}
    assert all(e.last_error.startswith(UNRETRIEVABLE) for e in entries.values())


async def test_refused_retr_with_max_messages_reaches_the_rest(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = refusing_head(pop3_server_factory, 15)
    r = rig(srv, max_messages=5, max_attempts=2)
    processed = 0
    for _ in range(6):
        processed += (await r.poll()).processed
    assert processed == 10 and len(srv.messages) == 5
    # After max_attempts the five rest (skipped, never deleted, never RETR'd again
    # before a day has passed).
    before = retrs(srv)
    with structlog.testing.capture_logs() as logs:
        quiet = await r.poll()
    assert retrs(srv) == before and quiet.failed == 0
    assert len([e for e in logs if e["event"] == "message_unretrievable_skipped"]) == 5
    assert len(srv.messages) == 5


# --- issue 20 item 3: TOP refused ----------------------------------------------------

PARSE = {"use": "parse"}  # filter needs it before it (its `requires`)
HEADER_RULE = {
    "use": "filter",
    "rules": [{"name": "noreply", "when": {"from_domain": ["noreply.example"]},
               "then": "drop"}],
}


async def test_refused_top_falls_back_to_retr_and_is_remembered(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory(
        messages=[msg(n) for n in range(1, 11)],
        faults=Faults(err_on={"TOP": "not today"}),
    )
    r = rig(srv, before=[PARSE, HEADER_RULE], commit_window=4)
    summary = await r.poll()
    # Before: every poll failed and 0 of 10 were processed.
    assert (summary.error, summary.processed) == (None, 10)
    assert srv.messages == []
    tops = [k for n in range(1, len(srv.sessions) + 1)
            for k in srv.transcript.keywords(n) if k == "TOP"]
    assert len(tops) == 1  # refused once, then never asked again


# --- issue 21 item 2: GNU pop3d's short RETR after TOP --------------------------------


async def test_short_retr_after_top_is_refetched_whole(
    pop3_server_factory: Factory, rig: Any
) -> None:
    mails = [msg(n, body="line\r\n" * 40) for n in range(1, 6)]
    srv = pop3_server_factory(
        messages=mails, faults=Faults(short_retr_after_top=True)
    )
    r = rig(srv, before=[PARSE, HEADER_RULE])
    first = await r.poll()
    # Before: header-only copies stored and the originals DELE'd.
    # All five were TOP'd first; each RETR came back short: none committed, and
    # header prefetch is off for this server from now on.
    assert (first.processed, first.failed) == (0, 5) and len(srv.messages) == 5
    assert set(stored(r)) <= {sha(m) for m in mails}
    second = await r.poll()
    assert second.error is None
    assert sorted(stored(r)) == sorted(sha(m) for m in mails)  # byte-exact, once each
    assert "TOP" not in srv.transcript.keywords(len(srv.sessions))
    assert srv.messages == []


# --- issue 21 item 1: RFC 6856 UTF8 ---------------------------------------------------

UTF8_MAIL = (
    "From: Jörg <j@example.com>\r\nTo: b@example.com\r\nSubject: Grüße\r\n"
    "Message-ID: <utf8@example.com>\r\n\r\nHallo\r\n"
).encode()


async def test_utf8_is_sent_so_courier_serves_the_original(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory(
        messages=[UTF8_MAIL, msg(2)], utf8=True, faults=Faults(utf8_notice=True)
    )
    r = rig(srv)
    summary = await r.poll()
    assert (summary.error, summary.processed) == (None, 2)
    assert sha(UTF8_MAIL) in stored(r)
    keywords = srv.transcript.keywords(1)
    assert keywords.index("UTF8") < keywords.index("AUTH")  # AUTHORIZATION state


async def test_without_utf8_a_shorter_notice_is_never_committed(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """With utf8 = false the size check is the second line of defence: a notice
    shorter than the listed original is not committed."""
    big = UTF8_MAIL + b"Hallo\r\n" * 100
    srv = pop3_server_factory(messages=[big], utf8=True, faults=Faults(utf8_notice=True))
    r = rig(srv, utf8=False)
    summary = await r.poll()
    assert (summary.processed, summary.failed) == (0, 1)
    assert r.stored() == [] and srv.messages == [big]


# --- issue 21 item 3: keep mode and reused uids ---------------------------------------


async def test_keep_mode_sees_a_reused_uid_and_downloads_it_once(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    srv.add_message(msg(1), uid="hash-of-headers")
    r = rig(srv, delete="never")
    assert (await r.poll()).processed == 1
    srv._mailbox.remove([srv._mailbox.items[0]])  # another client deletes it
    srv.add_message(msg(2, body="a longer, different body\r\n"), uid="hash-of-headers")
    second = await r.poll()
    assert second.processed == 1  # before: skipped forever
    third = await r.poll()
    assert (third.retrieved, third.processed) == (0, 0)
    assert len(r.stored()) == 2


# --- issue 21 item 4: LOGIN-DELAY between commit windows -------------------------------


async def test_login_delay_is_waited_between_windows(
    pop3_server_factory: Factory, rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine waits LOGIN-DELAY (interruptibly, on its stop event) after the first
    window's QUIT and before the second login; proven by what it waits on and when,
    not by the clock."""
    import mailpipe.engine

    srv = pop3_server_factory(messages=[msg(n) for n in range(1, 5)], login_delay=60)
    waited: list[tuple[float, int]] = []

    async def wait_or_stop(stop: Any, seconds: float) -> None:
        waited.append((seconds, len(srv.sessions)))  # sessions opened so far

    monkeypatch.setattr(mailpipe.engine, "wait_or_stop", wait_or_stop)
    r = rig(srv, commit_window=2)
    summary = await r.poll()
    assert (summary.error, summary.processed, summary.sessions) == (None, 4, 2)
    assert waited == [(60.0, 1)]  # once, after session 1 and before session 2


async def test_enforced_login_delay_ends_the_poll_cleanly(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """Cyrus with popminpoll: the second window's login is refused [LOGIN-DELAY]. What
    the first window committed stands and the poll is not a failure."""
    busy = Faults(err_on={"AUTH": "[LOGIN-DELAY] wait", "PASS": "[LOGIN-DELAY] wait"})
    srv = pop3_server_factory(
        messages=[msg(n) for n in range(1, 5)], faults=[Faults(), busy]
    )
    r = rig(srv, commit_window=2)
    summary = await r.poll()
    # Before: SourceBusyError, exit 1, committed false, although 2 were deleted.
    assert (summary.error, summary.committed) == (None, True)
    assert (summary.processed, summary.deleted) == (2, 2)
    assert len(srv.messages) == 2
    assert (await r.poll()).processed == 2


def test_wire_form_is_the_list_size() -> None:
    assert len(wire_form(msg(1))) == len(msg(1))


# --- review findings: every path that could still commit a cut copy, loop or starve ---


async def test_unstuffed_dot_line_within_the_slack_is_caught_by_the_next_reply(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """A server that lists LF-counted sizes leaves the size check blind to a short cut;
    the stray data after the cut fails to parse as the closing reply (the NOOP after
    the last RETR, or the next RETR's status), so the copy is never delivered."""
    lines = 60
    body = "".join(f"line {i}\r\n" for i in range(lines)) + ".\r\nTAIL\r\n"
    mail = msg(1, "dots at the end", body)
    lf_size = len(mail) - mail.count(b"\r\n")
    srv = pop3_server_factory(
        messages=[mail],
        faults=[Faults(no_dot_stuffing=True, list_size_delta=lf_size - len(mail))],
    )
    r = rig(srv)
    first = await r.poll()
    # Before: the 631-of-640-octet copy was journaled COMMITTED and the original DELE'd.
    assert r.stored() == [] and srv.messages == [mail]
    assert first.failed == 1 and first.error is not None
    entry = r.journal.get_many("box", srv.uids)[srv.uids[0]]
    assert entry.status == Status.PENDING and "not a reply" in entry.last_error
    await r.poll()  # the server behaves: the whole message, once
    assert stored(r) == [sha(mail)] and srv.messages == []


async def test_expire_zero_short_copy_aborts_without_quit(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """RFC 2449 §6.7: an EXPIRE 0 server may delete at QUIT what was RETR'd; a short
    copy must not be followed by QUIT."""
    mails = [msg(1), msg(2, body="line\r\n" * 30)]
    srv = pop3_server_factory(
        messages=mails, expire=0, faults=[Faults(list_size_delta={2: 500})]
    )
    r = rig(srv)
    first = await r.poll()
    assert first.error is not None and "EXPIRE 0" in first.error
    assert "QUIT" not in srv.transcript.keywords(1)
    assert srv.messages == mails  # nothing deleted; message 1 is journaled, DELE owed
    second = await r.poll()
    assert second.error is None
    assert sorted(stored(r)) == sorted(sha(m) for m in mails) and srv.messages == []


async def test_no_uidl_refused_head_does_not_starve(
    pop3_server_factory: Factory, rig: Any
) -> None:
    refused = {f"RETR {n}": "[SYS/PERM] cannot read" for n in range(1, 6)}
    srv = pop3_server_factory(
        messages=[msg(n) for n in range(1, 31)],
        faults=Faults(uidl_unsupported=True, err_on=refused),
    )
    r = rig(srv, commit_window=5)
    summary = await r.poll()
    assert (summary.processed, summary.failed) == (25, 5)
    assert len(srv.messages) == 5


async def test_keep_mode_size_shift_of_the_same_mail_costs_one_download(
    pop3_server_factory: Factory, rig: Any
) -> None:
    """A server that starts counting sizes differently: each settled message is fetched
    once, recognised by its hash, and its new size remembered; new mail still flows."""
    srv = pop3_server_factory(messages=[msg(n) for n in range(1, 4)])
    r = rig(srv, delete="never", commit_window=2)
    assert (await r.poll()).processed == 3
    srv.faults = Faults(list_size_delta=-7)
    srv.add_message(msg(4))
    shifted = await r.poll()
    assert (shifted.processed, shifted.error) == (1, None)
    assert shifted.retrieved == 4 and shifted.sessions <= 4
    quiet = await r.poll()
    assert (quiet.retrieved, quiet.processed) == (0, 0)
    assert len(r.stored()) == 4


async def test_mark_seen_entries_are_not_processed_when_sizes_shift(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory(messages=[msg(n) for n in range(1, 4)])
    r = rig(srv, delete="never")
    r.journal.mark_seen(
        "box",
        [(u, f"k{u}", len(wire_form(m))) for u, m in zip(srv.uids, srv.messages, strict=True)],
    )
    srv.faults = Faults(list_size_delta=-7)
    summary = await r.poll()
    assert (summary.retrieved, summary.processed) == (0, 0) and r.stored() == []


async def test_a_rested_message_that_arrives_whole_is_processed_not_quarantined(
    pop3_server_factory: Factory, rig: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datetime

    import mailpipe.engine

    srv = pop3_server_factory(  # RETR refused in the sessions of the first two polls
        messages=[msg(1)], faults=[Faults(err_on={"RETR 1": "[IN-USE] busy"})] * 2
    )
    r = rig(srv, max_attempts=2)
    for _ in range(2):
        assert (await r.poll()).failed == 1
    assert (await r.poll()).retrieved == 0  # resting
    monkeypatch.setattr(mailpipe.planning, "UNRETRIEVABLE_REST", datetime.timedelta(0))
    summary = await r.poll()
    assert (summary.processed, summary.quarantined) == (1, 0)
    assert stored(r) == [sha(msg(1))] and srv.messages == []


async def test_oversize_quarantine_refused_is_an_attempt_once_per_poll(
    pop3_server_factory: Factory, rig: Any
) -> None:
    big = msg(99, body="x" * 5000 + "\r\n")
    srv = pop3_server_factory(
        messages=[*(msg(n) for n in range(1, 11)), big],
        faults=Faults(err_on={"RETR 11": "cannot read"}),
    )
    r = rig(srv, commit_window=2, max_message_size="2KB", on_oversize="quarantine")
    summary = await r.poll()
    assert (summary.processed, summary.failed) == (10, 1)
    assert srv.transcript.keywords().count("RETR") == 11  # the big one asked once
    uid = srv.uids[-1]
    assert r.journal.get_many("box", [uid])[uid].attempts == 1


async def test_after_days_a_reused_uid_ages_out_like_any_processed_mail(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv = pop3_server_factory()
    srv.add_message(msg(1), uid="h")
    r = rig(srv, delete="after_days:30")
    assert (await r.poll()).processed == 1
    srv._mailbox.remove([srv._mailbox.items[0]])
    srv.add_message(msg(2, body="another body\r\n"), uid="h")
    assert (await r.poll()).processed == 1
    entry = r.journal.get_many("box", ["h"])["h"]
    assert entry.status == Status.COMMITTED and entry.sha256 == sha(srv.messages[0])


async def test_top_of_a_headers_only_message_keeps_prefetch_on(
    pop3_server_factory: Factory, rig: Any
) -> None:
    headers_only = b"From: a@example.com\r\nSubject: no body\r\n"
    srv = pop3_server_factory(messages=[headers_only, msg(2), msg(3)])
    r = rig(srv, before=[PARSE, HEADER_RULE])
    with structlog.testing.capture_logs() as logs:
        summary = await r.poll()
    assert (summary.processed, summary.error) == (3, None)
    assert not [e for e in logs if e["event"] == "header_prefetch_disabled"]
    assert srv.transcript.keywords(1).count("TOP") == 3


async def test_wait_or_stop_ends_when_stop_is_set() -> None:
    import asyncio

    from mailpipe.engine import wait_or_stop

    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(wait_or_stop(stop, 3600), 60)  # returns at once, not in 1 h
