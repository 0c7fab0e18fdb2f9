"""Review of issue 18's lease changes in the SQLite journal: a holder's re-take keeps
its epoch, the epoch commit is not fsync'ed.

The interleavings where the old rule (every take raises the epoch) fenced a stale
writer: each must still end with the stale fence refused (issue 16: exactly once
across workers), and the relaxed ``synchronous`` of the epoch commit must never
outlive it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mailpipe.journal import JournalError, Status
from mailpipe.journal.base import Fence
from mailpipe.journal.errors import FencedError
from mailpipe.journal.sqlite import SqliteJournal

pytestmark = pytest.mark.timeout(60)

MB = "box"


def _fenced_write(journal: SqliteJournal, fence: Fence, uid: str) -> None:
    """A poll's group commit: begin and finish ``uid`` under ``fence``."""
    with journal.batch(fence=fence):
        journal.begin(MB, uid, key=f"k-{uid}", size=1)
        journal.finish(
            MB,
            uid,
            status=Status.COMMITTED,
            disposition="done",
            sha256=None,
            delete_due=True,
            fence=fence,
        )


def _refused(journal: SqliteJournal, fence: Fence, uid: str) -> None:
    with pytest.raises(FencedError):
        journal.check_fence(fence)
    with pytest.raises(FencedError):
        _fenced_write(journal, fence, uid)
    assert uid not in journal.get_many(MB, [uid])  # rolled back


def _take(journal: SqliteJournal, owner: str) -> Fence:
    assert journal.lock_mailbox(MB, owner=owner, ttl=60)
    fence = journal.fence(MB, owner=owner)
    assert fence is not None
    return fence


def test_a_restarted_worker_with_the_same_name_fences_the_old_one_both_ways(
    tmp_path: Path,
) -> None:
    """Two journal objects (two processes) with one owner name, e.g. a worker
    restarted with the same worker id while the old one still runs: every change of
    object is a change of holder, whichever way, and the other's fence is refused
    from then on, also after the first re-takes."""
    path = tmp_path / "j.sqlite3"
    old, new = SqliteJournal(path), SqliteJournal(path)
    try:
        f1 = _take(old, "w")
        old.unlock_mailbox(MB, owner="w")
        f2 = _take(new, "w")
        assert f2.epoch > f1.epoch
        _refused(old, f1, "late-1")  # the old process's late group commit
        _fenced_write(new, f2, "a")
        new.unlock_mailbox(MB, owner="w")
        f3 = _take(old, "w")  # the old process polls again
        assert f3.epoch > f2.epoch
        _refused(new, f2, "late-2")
        _refused(old, f1, "late-3")
        old.unlock_mailbox(MB, owner="w")
        f4 = _take(old, "w")  # a re-take with nobody in between: kept
        assert f4 == f3
        _refused(new, f2, "late-4")  # still refused: no ABA through the kept epoch
        _fenced_write(old, f4, "b")
    finally:
        old.close()
        new.close()


def test_a_take_whose_epoch_commit_failed_changes_no_holder(tmp_path: Path) -> None:
    """Another process's take that could not commit its epoch (database busy) gave
    its flock back and took nothing: the previous holder's re-take keeps its epoch
    (no other take), and that process's next successful take fences it."""
    path = tmp_path / "j.sqlite3"
    one, two = SqliteJournal(path), SqliteJournal(path, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        f1 = _take(one, "w1")
        one.unlock_mailbox(MB, owner="w1")
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(JournalError):
            two.lock_mailbox(MB, owner="w2", ttl=60)
        blocker.execute("ROLLBACK")
        assert two.fence(MB, owner="w2") is None
        assert _take(one, "w1") == f1
        _fenced_write(one, f1, "a")
        one.unlock_mailbox(MB, owner="w1")
        f2 = _take(two, "w2")
        assert f2.epoch > f1.epoch
        _refused(one, f1, "late")
        two.unlock_mailbox(MB, owner="w2")
        f3 = _take(one, "w1")
        assert f3.epoch > f2.epoch
        _refused(two, f2, "late-2")
    finally:
        blocker.close()
        one.close()
        two.close()


def test_another_owner_through_the_same_object_is_another_holder(
    tmp_path: Path,
) -> None:
    """One journal object shared by two owner names (two schedulers of one process):
    the row's owner changes, so each take raises the epoch."""
    with SqliteJournal(tmp_path / "j.sqlite3") as journal:
        fa = _take(journal, "a")
        journal.unlock_mailbox(MB, owner="a")
        fb = _take(journal, "b")
        journal.unlock_mailbox(MB, owner="b")
        fa2 = _take(journal, "a")
        assert fa.epoch < fb.epoch < fa2.epoch
        _refused(journal, fb, "late-b")
        _refused(journal, fa, "late-a")


class _FailingRestore:
    """The journal's connection, except that restoring ``synchronous=FULL`` fails
    once armed (the statement fails inside a transaction, for one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.armed = False

    def execute(self, sql: str, *args: Any) -> Any:
        if self.armed and sql == "PRAGMA synchronous=FULL":
            raise sqlite3.OperationalError("injected: cannot restore synchronous")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


def test_a_journal_that_could_not_restore_full_sync_takes_no_lease_again(
    tmp_path: Path,
) -> None:
    """Review of issue 18: when ``synchronous=FULL`` cannot be restored after an epoch
    commit the journal refuses all work ("never write on at NORMAL"). A re-take of a
    mailbox taken before must be refused too, not granted from the kept epoch (its
    poll would run the chain again and again with nothing journaled: a forward or
    webhook sent at every poll); and ``close()`` still gives back the flocks and
    the connection."""
    path = tmp_path / "j.sqlite3"
    journal = SqliteJournal(path)
    other = SqliteJournal(path)
    real = journal._conn
    try:
        _take(journal, "w1")
        journal.unlock_mailbox(MB, owner="w1")
        _take_held = journal.lock_mailbox("held", owner="w1", ttl=60)
        assert _take_held
        proxy = _FailingRestore(real)
        journal._conn = proxy  # type: ignore[assignment]
        proxy.armed = True
        with pytest.raises(JournalError):
            journal.lock_mailbox("third", owner="w1", ttl=60)
        proxy.armed = False
        with pytest.raises(JournalError):
            journal.lock_mailbox(MB, owner="w1", ttl=60)  # the re-take: refused
        assert journal.fence(MB, owner="w1") is None
        assert not other.lock_mailbox("held", owner="w2", ttl=60)  # still ours
        journal.close()
        assert other.lock_mailbox("held", owner="w2", ttl=60)  # given back
        with pytest.raises(sqlite3.ProgrammingError):
            real.execute("SELECT 1")  # closed
    finally:
        journal.close()
        other.close()
        real.close()
