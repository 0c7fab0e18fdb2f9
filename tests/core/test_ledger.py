"""The acknowledgement gate (MP-01): a message is acknowledged only after every
committing step and the journal batch holding its outcome are durable.

Each test drives :class:`mailpipe.ledger.Ledger` directly, with a real SQLite journal
that records when its batches commit, a chain whose ``flush()`` can fail, and a session
that records what reaches "the server".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mailpipe.chain import ChainResult
from mailpipe.config import MailboxConfig
from mailpipe.errors import CommitError, ProcessorError
from mailpipe.journal.base import Entry, Fence, Journal, Status
from mailpipe.journal.errors import FencedError
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.ledger import AcknowledgeBeforeDurable, Ledger, Outcome, Summary
from mailpipe.message import MessageRef
from mailpipe.plugin_manager import Hooks, load
from mailpipe.processor import Decision, Disposition
from mailpipe.quarantine import Quarantine
from mailpipe.source import Ack, AckKind, SessionFacts

EVENTS: list[str] = []


class RecordingJournal(SqliteJournal):
    """A real journal that notes each outermost batch commit (and can fail one):
    ``journal-commit`` when SQLite syncs it (``synchronous=FULL`` inside),
    ``journal-commit-unsynced`` when it does not (NORMAL, MP-08)."""

    fail_next_batch = False

    @contextmanager
    def batch(  # type: ignore[override]
        self, *, fence: Fence | None = None, synced: bool = True
    ) -> Iterator[None]:
        outer = self._depth == 0
        with super().batch(fence=fence, synced=synced):
            level = self._conn.execute("PRAGMA synchronous").fetchone()[0]
            yield
            if outer and self.fail_next_batch:
                self.fail_next_batch = False
                raise OSError("disk full (injected)")
        if outer:
            EVENTS.append("journal-commit" if level == 2 else "journal-commit-unsynced")


class Chain:
    """The two things the ledger asks of a chain: flush, and whether a result's
    pending writes survived it."""

    def __init__(self, *, flush_fails: bool = False) -> None:
        self.flush_fails = flush_fails

    async def flush(self) -> None:
        EVENTS.append("flush")
        if self.flush_fails:
            raise OSError("flush failed (injected)")

    def flushed(self, result: ChainResult) -> bool:
        return not self.flush_fails


class Session:
    def __init__(self, *, commit_fails: bool = False) -> None:
        self.acked: list[tuple[list[str], Ack]] = []
        self.committed = False
        self.commit_fails = commit_fails

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        EVENTS.append("ack")
        self.acked.append(([r.uid for r in refs], ack))

    async def commit(self) -> None:
        EVENTS.append("commit")
        if self.commit_fails:
            raise CommitError("-ERR some deleted messages not removed")
        self.committed = True


def ref(n: int) -> MessageRef:
    return MessageRef(mailbox="box", number=n, uid=f"u{n}", size=10)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[RecordingJournal]:
    EVENTS.clear()
    j = RecordingJournal(tmp_path / "j.sqlite3")
    yield j
    j.close()


def make(journal: RecordingJournal, tmp_path: Path, **cfg: Any) -> Ledger:
    config = MailboxConfig.model_validate({"name": "box", **cfg})
    return Ledger(journal, "box", config, Hooks(load(entry_points=False)[0]),
                  Quarantine(tmp_path / "q"), Summary(mailbox="box"), ack=config.ack)


def done(n: int, *, pending: bool = True) -> Outcome:
    result = ChainResult(decision=Decision(disposition=Disposition.DONE, reason="on_complete"),
                         committed=[], pending=["store"] if pending else [])
    return Outcome(ref(n), result, Status.COMMITTED, "done", "on_complete", True, "ab" * 32)


async def test_group_commit_owes_only_after_flush_and_journal_commit(journal, tmp_path):
    ledger = make(journal, tmp_path)
    for n in (1, 2):
        ledger.begin(ref(n))
    EVENTS.clear()
    await ledger.commit_group(Chain(), [done(1), done(2)], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert EVENTS == ["flush", "journal-commit", "ack"]
    assert session.acked == [(["u1", "u2"], Ack(AckKind.DELETE))]
    assert await ledger.commit(session) == 2
    entries = journal.get_many("box", ["u1", "u2"])
    assert {e.status for e in entries.values()} == {Status.DELETED}
    # MP-08: the deletions the server confirmed are journaled without a sync
    assert EVENTS == ["flush", "journal-commit", "ack", "commit", "journal-commit-unsynced"]
    assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again


async def test_mp08_only_the_group_commit_waits_for_the_disk(journal, tmp_path):
    """A chunk's PENDING entries and the confirmed deletions commit unsynced (each a
    state recovery handles if the OS loses it); the group commit that gates the
    acknowledgement is synced, fenced or not."""
    for fenced in (False, True):
        ledger = make(journal, tmp_path)
        if fenced:
            journal.lock_mailbox("box", owner="w1", ttl=60)
            ledger.fence = journal.fence("box", owner="w1")
            assert ledger.fence is not None
        base = 10 if fenced else 0
        entries: dict[str, Entry] = {}
        EVENTS.clear()
        ledger.begin_many([ref(base + 1), ref(base + 2)], entries)
        assert EVENTS == ["journal-commit-unsynced"]
        assert set(entries) == {f"u{base + 1}", f"u{base + 2}"}
        await ledger.commit_group(Chain(), [done(base + 1), done(base + 2)], SessionFacts())
        session = Session()
        await ledger.acknowledge(session)
        await ledger.commit(session)
        assert EVENTS == ["journal-commit-unsynced", "flush", "journal-commit", "ack",
                          "commit", "journal-commit-unsynced"]
        got = journal.get_many("box", [f"u{base + 1}", f"u{base + 2}"])
        assert {e.status for e in got.values()} == {Status.DELETED}


async def test_mp08_a_stale_fence_refuses_the_unsynced_deletion_write(journal, tmp_path):
    """The confirmed deletions are still fenced: a worker whose lease was taken over
    writes nothing (they stay owed, acknowledged again by the holder)."""
    ledger = make(journal, tmp_path)
    journal.lock_mailbox("box", owner="w1", ttl=60)
    ledger.fence = journal.fence("box", owner="w1")
    ledger.begin_many([ref(1)], {})
    await ledger.commit_group(Chain(), [done(1)], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    with journal._tx() as conn:  # another holder took the mailbox over
        conn.execute("UPDATE leases SET owner = 'w2', epoch = epoch + 1 WHERE mailbox = 'box'")
    with pytest.raises(FencedError):
        await ledger.commit(session)
    assert journal.get_many("box", ["u1"])["u1"].status == Status.COMMITTED
    assert journal.get_many("box", ["u1"])["u1"].delete_due


async def test_a_failed_flush_owes_nothing_and_leaves_the_messages_pending(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    await ledger.commit_group(Chain(flush_fails=True), [done(1)], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == []
    assert journal.get_many("box", ["u1"])["u1"].status == Status.PENDING
    assert ledger.summary.error and "group commit failed for 1" in ledger.summary.error


async def test_a_failed_journal_commit_owes_nothing(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    journal.fail_next_batch = True
    with pytest.raises(OSError, match="disk full"):
        await ledger.commit_group(Chain(), [done(1)], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == [] and ledger.pending() == []
    assert journal.get_many("box", ["u1"])["u1"].status == Status.PENDING


async def test_not_durable_on_a_deletes_on_commit_server_aborts(journal, tmp_path):
    # C-29: with EXPIRE 0 the commit may delete what was retrieved: never reach it.
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    with pytest.raises(ProcessorError, match="EXPIRE 0"):
        await ledger.commit_group(Chain(flush_fails=True), [done(1)],
                                  SessionFacts(deletes_on_commit=True))
    assert ledger.pending() == []


async def test_settled_acknowledgements_need_a_durable_outcome(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))  # PENDING: nothing durable says it is done
    with pytest.raises(AcknowledgeBeforeDurable, match="u1"):
        ledger.owe_settled([ref(1)])
    with pytest.raises(AcknowledgeBeforeDurable, match="u9"):
        ledger.owe_settled([ref(9)])  # unknown to the journal
    journal.finish("box", "u1", status=Status.COMMITTED, disposition="done",
                   sha256=None, reason="", delete_due=True)
    ledger.owe_settled([ref(1)])
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == [(["u1"], Ack(AckKind.DELETE))]


async def test_commit_refuses_owed_acknowledgements_not_sent(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    await ledger.commit_group(Chain(), [done(1)], SessionFacts())
    with pytest.raises(AcknowledgeBeforeDurable, match="not sent"):
        await ledger.commit(Session())


async def test_a_refused_commit_leaves_the_acknowledgement_owed(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    await ledger.commit_group(Chain(), [done(1)], SessionFacts())
    session = Session(commit_fails=True)
    await ledger.acknowledge(session)
    with pytest.raises(CommitError):
        await ledger.commit(session)
    entry = journal.get_many("box", ["u1"])["u1"]
    assert (entry.status, entry.delete_due) == (Status.COMMITTED, True)
    assert journal.owed("box") == ["u1"]


async def test_keep_decisions_and_keep_policy_owe_nothing(journal, tmp_path):
    ledger = make(journal, tmp_path, delete="never")
    ledger.begin(ref(1))
    ledger.begin(ref(2))
    kept = Outcome(ref(2), None, Status.KEPT, "keep", "rule", False, None)
    outcome = done(1)
    outcome.delete_due = False
    await ledger.commit_group(Chain(), [outcome, kept], SessionFacts())
    ledger.decided(ref(3), Decision(disposition=Disposition.DONE, reason="header rule"), None)
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == []


async def test_the_configured_acknowledgement_is_the_one_sent(journal, tmp_path):
    ledger = make(journal, tmp_path, acknowledge={"move": "Processed"})
    ledger.decided(ref(1), Decision(disposition=Disposition.DONE, reason="header rule"), None)
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == [(["u1"], Ack(AckKind.MOVE, "Processed"))]


async def test_failed_attempts_are_counted_in_the_group_and_owe_nothing(journal, tmp_path):
    ledger = make(journal, tmp_path)
    ledger.begin(ref(1))
    failed = Outcome(ref(1), ChainResult(error=ValueError("bad"), failed_step="parse"),
                     Status.PENDING, "failed", "", False, None, failed=True, attempts=1,
                     error="ValueError: bad")
    await ledger.commit_group(Chain(), [failed], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert session.acked == []
    entry = journal.get_many("box", ["u1"])["u1"]
    assert (entry.status, entry.attempts, entry.last_error) == (
        Status.PENDING, 1, "ValueError: bad")


def test_a_message_that_killed_the_process_is_charged_and_announced(journal, tmp_path):
    from mailpipe import hookimpl
    from mailpipe.ledger import CRASH_ERROR

    heard: list[dict[str, Any]] = []

    class Recorder:
        @hookimpl
        def mailpipe_message_failed(
            self, uid: str, processor: str, error: str, attempts: int
        ) -> None:
            heard.append({"uid": uid, "processor": processor, "error": error,
                          "attempts": attempts})

    pm = load(entry_points=False)[0]
    pm.register(Recorder())
    config = MailboxConfig.model_validate({"name": "box"})
    ledger = Ledger(journal, "box", config, Hooks(pm), Quarantine(tmp_path / "q"),
                    Summary(mailbox="box"))
    ledger.begin(ref(1))
    ledger.charge_crash("u1", alone=True)
    ledger.charge_crash("u1", alone=False)  # not alone: not charged, not announced
    assert journal.get_many("box", ["u1"])["u1"].attempts == 1
    assert [(h["uid"], h["processor"], h["error"], h["attempts"]) for h in heard] == [
        ("u1", "(process died)", CRASH_ERROR, 1)]


async def test_each_outcome_gets_its_own_acknowledgement(journal, tmp_path):
    # MP-04: `acknowledge` is for processed mail; a quarantined message follows
    # `on_quarantine`, and an oversize "delete" deletes (unread), whatever the rest.
    from mailpipe.message import Message

    ledger = make(journal, tmp_path, acknowledge={"move": "Processed"},
                  on_quarantine={"move": "Errors"})
    for n in (1, 2):
        ledger.begin(ref(n))
    ledger.oversize_deleted(ref(3))
    bad = Message(ref=ref(2), data=b"Subject: x\r\n\r\nbody\r\n")
    quarantined = Outcome(ref(2), None, Status.QUARANTINED, "quarantine", "rule",
                          ledger.quarantined(bad, reason="rule", attempts=0, error=""),
                          bad.sha256)
    await ledger.commit_group(Chain(), [done(1), quarantined], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert sorted(session.acked, key=lambda a: a[0]) == [
        (["u1"], Ack(AckKind.MOVE, "Processed")),
        (["u2"], Ack(AckKind.MOVE, "Errors")),
        (["u3"], Ack(AckKind.DELETE)),
    ]
    await ledger.commit(session)
    # Owed again from the journal (a crash before the commit's journal write): the
    # same acknowledgement per outcome.
    journal.finish("box", "u1", status=Status.COMMITTED, disposition="done",
                   sha256=None, reason="", delete_due=True)
    journal.finish("box", "u2", status=Status.QUARANTINED, disposition="quarantine",
                   sha256=None, reason="", delete_due=True)
    ledger.owe_settled([ref(1), ref(2)])
    again = Session()
    await ledger.acknowledge(again)
    assert sorted(again.acked, key=lambda a: a[0]) == [
        (["u1"], Ack(AckKind.MOVE, "Processed")), (["u2"], Ack(AckKind.MOVE, "Errors"))]


async def test_a_fenced_off_ledger_writes_nothing_anywhere(tmp_path):
    # Issue 16.2: once another worker took the mailbox over, every delivery-state
    # write of the old owner's ledger is refused (not only its group commit).
    from mailpipe.journal import FencedError
    from mailpipe.leases import MailboxLease

    one = SqliteJournal(tmp_path / "f.sqlite3")
    two = SqliteJournal(tmp_path / "f.sqlite3")
    try:
        lease = MailboxLease(one, "box", owner="w1", ttl=30)
        assert lease.acquire()
        config = MailboxConfig.model_validate({"name": "box"})
        ledger = Ledger(one, "box", config, Hooks(load(entry_points=False)[0]),
                        Quarantine(tmp_path / "q"), Summary(mailbox="box"),
                        fence=lease.fence)
        ledger.begin(ref(1))
        one.unlock_mailbox("box", owner="w1")  # taken over behind its back
        assert two.lock_mailbox("box", owner="w2", ttl=30)
        writes = [
            lambda: ledger.decided(ref(2), Decision(disposition=Disposition.DONE,
                                                    reason="rule"), None),
            lambda: ledger.oversize_deleted(ref(3)),
            lambda: ledger.settle_gone(["u1"]),
            lambda: ledger.charge_crash("u1", alone=True),
            lambda: ledger.begin_many([ref(4)], {}),
        ]
        for write in writes:
            with pytest.raises(FencedError):
                write()
        with pytest.raises(FencedError):
            await ledger.commit_group(Chain(), [done(1)], SessionFacts())
        entries = one.get_many("box", ["u1", "u2", "u3", "u4"])
        assert set(entries) == {"u1"}
        assert (entries["u1"].status, entries["u1"].attempts) == (Status.PENDING, 0)
        assert ledger.pending() == []
    finally:
        two.close()
        one.close()


class SingleRowJournal:
    """A journal written before issue 18 (a third-party one): the single-row methods
    only, no ``begin_many``, ``steps_committed`` nor ``finish_many``."""

    def __init__(self, inner: RecordingJournal) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("begin_many", "steps_committed", "finish_many"):
            raise AttributeError(name)
        return getattr(self._inner, name)


class ProtocolSubclassJournal(Journal):
    """The same, subclassing the Journal protocol: it inherits the protocol's empty
    ``begin_many`` and co. (returning None), which must not be taken for its own."""

    def __init__(self, inner: RecordingJournal) -> None:
        self._inner = inner


def _delegate(name: str) -> Any:
    def method(self: ProtocolSubclassJournal, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._inner, name)(*args, **kwargs)

    return method


for _name in dir(Journal):
    if not _name.startswith("_") and _name not in (
        "begin_many", "steps_committed", "finish_many"
    ):
        setattr(ProtocolSubclassJournal, _name, _delegate(_name))


class FenceOnlyBatchJournal(SingleRowJournal):
    """A journal written before MP-08: its ``batch`` takes a fence only."""

    def batch(self, *, fence: Fence | None = None) -> Any:
        return self._inner.batch(fence=fence)


async def test_mp08_a_journal_whose_batch_takes_no_synced_has_every_batch_synced(
    journal, tmp_path
):
    config = MailboxConfig.model_validate({"name": "box"})
    ledger = Ledger(FenceOnlyBatchJournal(journal), "box", config,  # type: ignore[arg-type]
                    Hooks(load(entry_points=False)[0]), Quarantine(tmp_path / "q"),
                    Summary(mailbox="box"), ack=config.ack)
    EVENTS.clear()
    ledger.begin_many([ref(1), ref(2)], {})
    await ledger.commit_group(Chain(), [done(1), done(2)], SessionFacts())
    session = Session()
    await ledger.acknowledge(session)
    assert await ledger.commit(session) == 2
    assert EVENTS == ["journal-commit", "flush", "journal-commit", "ack", "commit",
                      "journal-commit"]
    got = journal.get_many("box", ["u1", "u2"])
    assert {e.status for e in got.values()} == {Status.DELETED}


@pytest.mark.parametrize("wrapper", [SingleRowJournal, ProtocolSubclassJournal])
async def test_a_journal_without_the_batch_writes_still_commits_groups(
    journal, tmp_path, wrapper
):
    """The batch writes are optional: the ledger falls back to begin, step_committed
    and finish for a journal that lacks them, with the same rows."""
    config = MailboxConfig.model_validate({"name": "box"})
    ledger = Ledger(wrapper(journal), "box", config,  # type: ignore[arg-type]
                    Hooks(load(entry_points=False)[0]), Quarantine(tmp_path / "q"),
                    Summary(mailbox="box"), ack=config.ack)
    entries: dict[str, Any] = {}
    ledger.begin_many([ref(1), ref(2)], entries)
    assert sorted(entries) == ["u1", "u2"] and entries["u1"].status == Status.PENDING
    EVENTS.clear()
    await ledger.commit_group(Chain(), [done(1), done(2)], SessionFacts())
    assert EVENTS == ["flush", "journal-commit"]
    got = journal.get_many("box", ["u1", "u2"])
    assert {(e.status, e.delete_due, tuple(e.steps)) for e in got.values()} == {
        (Status.COMMITTED, True, ("store",))
    }
