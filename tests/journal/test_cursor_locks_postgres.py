"""MP-05 on PostgreSQL: the cursor compare-and-set against a concurrent ``state
forget`` and a concurrent replay (review 2: under READ COMMITTED a forget waiting on
the cursor rows missed the rows the compare-and-set inserted; the replay dropped the
cursors after locking its entry, the reverse of the compare-and-set's order)."""

from __future__ import annotations

import threading
import time

import pytest

from mailpipe.journal.base import Status

pytestmark = [pytest.mark.timeout(60), pytest.mark.services]


def test_forget_waiting_on_set_cursors_leaves_the_new_cursor(pg_schema_url: str) -> None:
    """set_cursors(expect=...) locks the cursor rows FOR UPDATE; a forget arriving
    then waits, but its DELETE FROM mailpipe_cursors (snapshot taken at statement
    start) does not see the rows the CAS inserted: after both commit, the forgotten
    entry is gone and the advanced cursor stands -> never listed again."""
    from mailpipe.journal.postgres import PostgresJournal

    mb, scope = "mb", "INBOX;UIDVALIDITY=1"
    a = PostgresJournal.from_url(pg_schema_url)
    b = PostgresJournal.from_url(pg_schema_url)
    try:
        for uid in ("u5", "u15"):
            a.begin(mb, uid, key="k" + uid, size=1)
            a.finish(mb, uid, status=Status.COMMITTED, disposition="done",
                     sha256=None, delete_due=False)
        a.set_cursors(mb, {scope: 10})
        locked, release = threading.Event(), threading.Event()
        wrote: list[bool] = []

        def poll() -> None:
            with a.batch():  # the CAS's locks held until this commits
                wrote.append(a.set_cursors(mb, {scope: 20}, expect={scope: 10},
                                           passed=["u15"]))
                locked.set()
                release.wait(10)

        t = threading.Thread(target=poll)
        t.start()
        assert locked.wait(10)
        f = threading.Thread(target=lambda: b.forget(mb, ["u5"]))  # `state forget`
        f.start()
        time.sleep(0.5)  # forget now blocks on the cursor row lock
        release.set()
        t.join(10)
        f.join(10)
        assert wrote == [True]
        assert b.get_many(mb, ["u5"]) == {}
        # forget's promise: the forgotten message is listed again (no cursor above it)
        assert b.cursors(mb) == {}, "cursor passes a forgotten entry"
    finally:
        a.close()
        b.close()


def test_replay_done_beside_the_cursor_cas_neither_deadlocks_nor_passes_it(
    pg_schema_url: str,
) -> None:
    """A replay that makes a quarantined message's deletion owed commits while the
    poll's compare-and-set waits on that entry: no deadlock, and the cursor does not
    move over the now owed entry."""
    from mailpipe.chain import ChainResult
    from mailpipe.journal.postgres import PostgresJournal
    from mailpipe.ledger import replay_done
    from mailpipe.message import Message, MessageRef
    from mailpipe.processor import Decision, Disposition

    mb, scope = "mb", "INBOX;UIDVALIDITY=1"
    a = PostgresJournal.from_url(pg_schema_url)
    b = PostgresJournal.from_url(pg_schema_url)
    errors: list[BaseException] = []
    wrote: list[bool] = []
    raw = b"Subject: r\r\n\r\nbody\r\n"
    ref = MessageRef(mailbox=mb, number=1, uid="u15", size=len(raw))
    try:
        a.begin(mb, "u15", key=ref.key, size=1)
        a.finish(mb, "u15", status=Status.QUARANTINED, disposition="quarantine",
                 sha256=None, delete_due=False)
        a.set_cursors(mb, {scope: 10})
        upserted, go = threading.Event(), threading.Event()

        def replay() -> None:  # `quarantine replay`, its transaction held open
            try:
                with b.batch():
                    replay_done(
                        b, None, Message(ref=ref, data=raw),
                        ChainResult(decision=Decision(disposition=Disposition.DONE)),
                        mailbox=mb, uid="u15", delete_policy="after_processing",
                    )
                    upserted.set()
                    go.wait(10)
            except BaseException as exc:
                errors.append(exc)

        def poll() -> None:
            try:
                with a.batch():
                    wrote.append(a.set_cursors(
                        mb, {scope: 20}, expect={scope: 10}, passed=["u15"]
                    ))
            except BaseException as exc:
                errors.append(exc)

        r = threading.Thread(target=replay)
        r.start()
        assert upserted.wait(10)
        p = threading.Thread(target=poll)
        p.start()
        time.sleep(0.5)  # the CAS waits on u15 FOR SHARE
        go.set()
        r.join(20)
        p.join(20)
        assert errors == [], f"one side failed: {errors!r}"
        assert wrote == [False]  # u15 is owed now: the cursor does not pass it
        assert a.cursors(mb) == {scope: 10}
        assert list(a.owed(mb)) == ["u15"]
    finally:
        a.close()
        b.close()
