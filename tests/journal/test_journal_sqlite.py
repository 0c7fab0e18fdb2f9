"""SqliteJournal specifics: pragmas, lock files, busy errors, in-memory use."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailpipe import message_key
from mailpipe.journal import JournalError, Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.journal.sqlite_leases import lock_path

pytestmark = pytest.mark.timeout(60)


def test_database_uses_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "j.sqlite3"
    with SqliteJournal(path) as journal:
        assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        # Issue 18: statement journals of a batch stay in memory (no temporary files;
        # crash recovery is the WAL's, unchanged).
        assert journal._conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(5,)]


def test_lock_file_sits_next_to_the_database_and_names_the_owner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.sqlite3"
    with SqliteJournal(path) as journal:
        assert journal.lock_mailbox("support", owner="host-1:42", ttl=60)
        lock = lock_path(path, "support")
        digest = hashlib.sha256(b"support").hexdigest()
        assert lock == tmp_path / "j.sqlite3.locks" / f"{digest}.lock"
        assert lock.read_text() == "host-1:42\nsupport\n"
        journal.unlock_mailbox("support", owner="host-1:42")
    assert lock.exists()  # never unlinked: unlinking a flock file races


def test_a_holders_retake_keeps_its_epoch_and_commits_nothing(tmp_path: Path) -> None:
    """Issue 18: a worker polling its mailboxes again takes each lease again; with no
    other take in between it keeps its epoch and the journal sees no commit (no
    fsync per mailbox and poll). Any other holder's take still moves the epoch on, and
    the previous holder's fence is refused from then on."""
    from mailpipe.journal.errors import FencedError

    path = tmp_path / "j.sqlite3"
    one, two = SqliteJournal(path), SqliteJournal(path)
    watch = sqlite3.connect(path)  # PRAGMA data_version moves on others' commits
    try:
        assert one.lock_mailbox("box", owner="w1", ttl=60)
        first = one.fence("box", owner="w1")
        one.unlock_mailbox("box", owner="w1")
        version = watch.execute("PRAGMA data_version").fetchone()[0]
        for _ in range(3):
            assert one.lock_mailbox("box", owner="w1", ttl=60)
            assert one.fence("box", owner="w1") == first
            one.unlock_mailbox("box", owner="w1")
        assert watch.execute("PRAGMA data_version").fetchone()[0] == version
        # The same owner name through another journal object is another holder.
        assert two.lock_mailbox("box", owner="w1", ttl=60)
        second = two.fence("box", owner="w1")
        two.unlock_mailbox("box", owner="w1")
        assert first is not None and second is not None
        assert second.epoch > first.epoch
        with pytest.raises(FencedError):
            one.check_fence(first)
        assert one.lock_mailbox("box", owner="w1", ttl=60)  # after another's take
        third = one.fence("box", owner="w1")
        assert third is not None and third.epoch > second.epoch
        one.check_fence(third)
        one.unlock_mailbox("box", owner="w1")
        assert one.lock_mailbox("box", owner="w2", ttl=60)  # another owner
        fourth = one.fence("box", owner="w2")
        assert fourth is not None and fourth.epoch > third.epoch
    finally:
        watch.close()
        one.close()
        two.close()


def test_the_epoch_commit_is_not_fsynced_and_full_sync_comes_back(
    tmp_path: Path,
) -> None:
    """Issue 18: the lease epoch's commit runs at ``synchronous=NORMAL`` (no fsync; see
    ``SqliteJournal._unsynced`` for why that is safe) and the connection is back at FULL
    right after; inside an open batch the batch's commit decides, nothing switches."""
    with SqliteJournal(tmp_path / "j.sqlite3") as journal:
        statements: list[str] = []
        journal._conn.set_trace_callback(statements.append)
        assert journal.lock_mailbox("box", owner="w1", ttl=60)
        upsert = next(i for i, s in enumerate(statements) if "INTO leases" in s)
        assert "PRAGMA synchronous=NORMAL" in statements[:upsert]
        assert statements[-1] == "PRAGMA synchronous=FULL"
        assert journal._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        statements.clear()
        with journal.batch():
            assert journal.lock_mailbox("other", owner="w1", ttl=60)
        assert any("INTO leases" in s for s in statements)
        assert not any("synchronous" in s for s in statements)
        journal._conn.set_trace_callback(None)


def test_the_lock_folder_is_made_again_when_removed(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with SqliteJournal(path) as journal:
        assert journal.lock_mailbox("box", owner="w1", ttl=60)
        journal.unlock_mailbox("box", owner="w1")
        lock = lock_path(path, "box")
        lock.unlink()
        lock.parent.rmdir()
        assert journal.lock_mailbox("box", owner="w1", ttl=60)
        assert lock.read_text() == "w1\nbox\n"


def test_the_lock_file_names_each_new_holder(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with SqliteJournal(path) as journal:
        assert journal.lock_mailbox("box", owner="a-much-longer-owner:1", ttl=60)
        journal.unlock_mailbox("box", owner="a-much-longer-owner:1")
        assert journal.lock_mailbox("box", owner="w2", ttl=60)
        assert lock_path(path, "box").read_text() == "w2\nbox\n"


def test_a_new_holder_s_name_is_written_over_the_old_one_not_after_a_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: the lock file is cut only when the old holder's name was longer
    (cut to zero first, ext4 frees the file's block and allocates it again, a
    journaled change in every poll of every mailbox: ``run --once`` names a new holder
    each time), and not written at all when it already names the holder. The file
    still names exactly the holder, whatever the lengths."""
    import os

    from mailpipe.journal import sqlite_leases

    calls: list[tuple[str, int]] = []
    real_cut, real_write = os.ftruncate, os.pwrite

    def ftruncate(fd: int, length: int) -> None:
        calls.append(("cut", length))
        real_cut(fd, length)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        calls.append(("write", len(data)))
        return real_write(fd, data, offset)

    monkeypatch.setattr(sqlite_leases.os, "ftruncate", ftruncate)
    monkeypatch.setattr(sqlite_leases.os, "pwrite", pwrite)
    path = tmp_path / "j.sqlite3"
    with SqliteJournal(path) as journal:
        for owner, expected in (
            ("host:1001", ["write"]),  # a new, empty file
            ("host:1002", ["write"]),  # the same length: written over in place
            ("host:1002", []),  # the same holder again: left as it is
            ("host:99", ["write", "cut"]),  # shorter: the old name's tail is cut
            ("host:123456", ["write"]),  # longer: nothing of the old name is left
        ):
            calls.clear()
            assert journal.lock_mailbox("box", owner=owner, ttl=60)
            text = f"{owner}\nbox\n"
            assert lock_path(path, "box").read_text() == text
            assert [kind for kind, _ in calls] == expected, owner
            assert all(n == len(text) for _, n in calls), calls
            journal.unlock_mailbox("box", owner=owner)
        # A crash between the write and the cut left the old name's tail after the
        # same holder's name: its next take finds it (pread reads one byte more).
        lock_path(path, "box").write_text("host:99\nbox\n23456\n")
        calls.clear()
        assert journal.lock_mailbox("box", owner="host:99", ttl=60)
        assert lock_path(path, "box").read_text() == "host:99\nbox\n"
        assert [kind for kind, _ in calls] == ["write", "cut"]


def test_a_busy_database_raises_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = SqliteJournal(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with pytest.raises(JournalError, match="locked"):
            journal.begin("support", "u1", key=message_key("support", "u1"), size=1)
        with pytest.raises(JournalError, match="locked"), journal.batch():
            pass
    finally:
        other.execute("ROLLBACK")
        other.close()
    journal.begin("support", "u1", key=message_key("support", "u1"), size=1)
    assert set(journal.get_many("support", ["u1"])) == {"u1"}
    journal.close()


def test_closed_journal_refuses_work(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    journal.close()
    with pytest.raises(JournalError, match="closed"):
        journal.fail("support", "u1", error="x", counted=True)
    with pytest.raises(JournalError, match="closed"), journal.batch():
        pass


def test_in_memory_journal_works_with_local_locks() -> None:
    with SqliteJournal(":memory:") as journal:
        journal.mark_seen("support", [("u1", "k1", 1)])
        assert journal.list()[0].status is Status.KEPT
        assert journal.lock_mailbox("support", owner="a", ttl=1)
        assert not journal.lock_mailbox("support", owner="b", ttl=1)


# --- issue 20 item 7: a full disk is reported as such, never as a raw sqlite3 error --


class _Full:
    """Fault injection: SQLite answers ``database or disk is full`` (SQLITE_FULL) to
    statements containing ``armed``, after rolling the transaction back as SQLite does
    for SQLITE_FULL."""

    armed: str | None = None


class _FullConnection(sqlite3.Connection):
    def _fail(self, sql: str) -> None:
        if _Full.armed is not None and _Full.armed in sql:
            if self.in_transaction:
                super().execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        self._fail(sql)
        return super().execute(sql, *args)  # type: ignore[arg-type]

    def executemany(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        self._fail(sql)
        return super().executemany(sql, *args)  # type: ignore[arg-type]


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> type[_Full]:
    connect = sqlite3.connect

    def with_faults(*args: object, **kwargs: object) -> sqlite3.Connection:
        return connect(*args, factory=_FullConnection, **kwargs)  # type: ignore[arg-type, misc]

    monkeypatch.setattr(sqlite3, "connect", with_faults)
    _Full.armed = None
    return _Full


def test_open_on_a_full_disk_is_a_journal_error(
    tmp_path: Path, full_disk: type[_Full]
) -> None:
    full_disk.armed = "journal_mode"
    with pytest.raises(JournalError, match="database or disk is full"):
        SqliteJournal(tmp_path / "j.sqlite3")


def test_a_full_disk_in_a_batch_is_not_hidden_by_the_rollback(
    tmp_path: Path, full_disk: type[_Full]
) -> None:
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    journal.begin("box", "u1", key="k1", size=1)
    full_disk.armed = "UPDATE"
    with pytest.raises(JournalError) as info, journal.batch():
        journal.finish(
            "box", "u1", status=Status.COMMITTED, disposition="done", sha256=None,
            delete_due=True,
        )
    assert "database or disk is full" in str(info.value)
    assert "cannot rollback" not in str(info.value)
    full_disk.armed = None
    assert journal.get_many("box", ["u1"])["u1"].status == Status.PENDING
    with journal.batch():  # the journal is usable again
        journal.fail("box", "u1", error="x", counted=True)
    journal.close()


def test_lock_holder_without_proc_locks_asks_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of issue 19: an unreadable /proc/locks (not Linux, /proc not mounted, a
    sandbox) falls back to a shared-lock probe instead of a traceback."""
    import mailpipe.journal.sqlite_leases as backend

    journal = SqliteJournal(tmp_path / "j.sqlite3")
    try:
        assert journal.lock_mailbox("box", owner="w1", ttl=60)
        monkeypatch.setattr(backend, "_PROC_LOCKS", tmp_path)  # exists, unreadable as text
        path = backend.lock_path(tmp_path / "j.sqlite3", "box")
        assert backend._flock_holder(path) == "w1"
        journal.unlock_mailbox("box", owner="w1")
        assert backend._flock_holder(path) is None
    finally:
        journal.close()


def _deleted_long_ago(path: Path, uids: list[str]) -> tuple[SqliteJournal, list[datetime]]:
    """A journal whose ``support`` entries ``uids`` were deleted 40 days before its
    clock's now (the clock: a one-item list to move)."""
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    journal = SqliteJournal(path, busy_timeout=0.05, clock=lambda: now[0])
    for uid in uids:
        journal.begin("support", uid, key=message_key("support", uid), size=1)
    journal.mark_deleted("support", uids)
    now[0] += timedelta(days=40)
    return journal, now


def test_a_prune_with_nothing_to_drop_takes_no_write_lock(tmp_path: Path) -> None:
    """Issue 18: every `run --once` prunes each mailbox once; with nothing to drop
    (nearly always) it only reads, so another writer holding the lock does not make
    it wait (it raised "database is locked" when it began a write transaction)."""
    path = tmp_path / "j.sqlite3"
    journal, _now = _deleted_long_ago(path, ["on-server"])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        assert journal.prune("support", ["on-server"], 30.0) == 0
        assert journal.prune("nobody", [], 30.0) == 0
        with pytest.raises(JournalError, match="locked"):  # a drop still writes
            journal.prune("support", [], 30.0)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert journal.prune("support", [], 30.0) == 1
    assert journal.list("support") == []
    journal.close()


@pytest.mark.parametrize(
    ("change", "kept_as"),
    [
        # pending again, as a re-delivered uid would be: the status check keeps it
        ("status", Status.PENDING),
        # still DELETED but marked again (``updated`` now), as another worker's
        # ``mark_deleted`` of a re-delivered uid does: the age check on its own keeps it
        ("updated", Status.DELETED),
    ],
)
def test_an_entry_changed_between_the_prune_s_read_and_its_delete_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, kept_as: Status
) -> None:
    """The prune reads outside the write lock; its DELETE checks status and age
    again, each on its own, so an entry another writer changed in between is not
    dropped with the rest."""
    path = tmp_path / "j.sqlite3"
    journal, now = _deleted_long_ago(path, ["changed", "dropped"])
    value = Status.PENDING.value if change == "status" else now[0].timestamp()
    real_tx = journal._tx

    def tx_after_a_change() -> Any:
        with sqlite3.connect(path, isolation_level=None) as other:
            other.execute(
                f"UPDATE entries SET {change} = ? "
                "WHERE mailbox = 'support' AND uid = 'changed'",
                (value,),
            )
        return real_tx()

    monkeypatch.setattr(journal, "_tx", tx_after_a_change)
    assert journal.prune("support", [], 30.0) == 1
    assert [(e.uid, e.status) for e in journal.list("support")] == [
        ("changed", kept_as)
    ]
    journal.close()


def test_a_closed_or_refusing_journal_refuses_a_prune(tmp_path: Path) -> None:
    """A prune is a write: refused, as before its read came first, by a journal that
    is closed or refuses work (``_closed``: full sync not restored, "never write on
    at NORMAL"), even with nothing to drop; not a silent 0 from the read alone."""
    path = tmp_path / "j.sqlite3"
    journal, _now = _deleted_long_ago(path, ["on-server"])
    journal._closed = True  # what _unsynced sets when FULL cannot be restored
    with pytest.raises(JournalError, match="is closed"):
        journal.prune("support", ["on-server"], 30.0)
    journal.close()
    with pytest.raises(JournalError, match="is closed"):
        journal.prune("support", ["on-server"], 30.0)


class _FailingConnection:
    """The journal's connection, with the statements in ``fail`` raising once each.

    Not :class:`_FullConnection`: SQLITE_FULL rolls the transaction back itself,
    while a failed COMMIT (or ROLLBACK) here leaves it open, the case the unsynced
    batch must clean up after."""

    def __init__(self, conn: sqlite3.Connection, fail: set[str]) -> None:
        self._conn = conn
        self.fail = fail

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.strip() in self.fail:
            self.fail.discard(sql.strip())
            raise sqlite3.OperationalError(f"injected failure of {sql.strip()}")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize(
    "fail",
    [
        "BEGIN IMMEDIATE",
        "COMMIT",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA synchronous=FULL",
        "body",
        "COMMIT+ROLLBACK",
        "body+ROLLBACK",
    ],
)
def test_mp08_an_unsynced_batch_that_fails_anywhere_leaves_no_state_behind(
    tmp_path: Path, fail: str
) -> None:
    """Whatever fails in an unsynced batch, the caller sees that failure (the body's
    own exception when the body raised; a failed rollback of it, as for any batch,
    with the body's exception as its context), and afterwards the journal is either usable
    at ``synchronous=FULL`` with no transaction open, or refuses work with its
    connection closed; either way the lock is free and no other process is kept
    from writing."""
    path = tmp_path / "journal.sqlite3"
    journal = SqliteJournal(path)
    real = journal._conn
    journal._conn = _FailingConnection(real, {s for s in fail.split("+") if s != "body"})  # type: ignore[assignment]
    expected = RuntimeError if fail == "body" else JournalError
    with pytest.raises(expected) as raised, journal.batch(synced=False):
        journal.begin("mb", "u", key=message_key("mb", "u"), size=1)
        if fail.startswith("body"):
            raise RuntimeError("the block's own error")
    if fail == "body+ROLLBACK":
        assert "injected failure of ROLLBACK" in str(raised.value)
        chain, exc = [], raised.value.__context__
        while exc is not None:
            chain.append(exc)
            exc = exc.__context__
        assert any(isinstance(e, RuntimeError) for e in chain)
    assert (journal._depth, journal._relaxed) == (0, False)
    assert journal._lock.acquire(blocking=False)
    journal._lock.release()
    if journal._closed:
        with pytest.raises(JournalError, match="closed"):
            journal.begin("mb", "v", key=message_key("mb", "v"), size=1)
    else:
        assert not real.in_transaction
        assert real.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        journal.begin("mb", "v", key=message_key("mb", "v"), size=1)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free
        other.execute("ROLLBACK")
    finally:
        other.close()
    journal.close()
