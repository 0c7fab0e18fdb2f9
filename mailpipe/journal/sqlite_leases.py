"""SqliteLeases: the mailbox locks of the SQLite journal (flocks and lease epochs).

Mailbox locks: ``fcntl.flock`` on ``<db>.locks/<sha256(mailbox)>.lock``, non-blocking.
The OS drops the lock when the process dies, so ``ttl`` is not needed and ignored. A
take raises the mailbox's epoch in the ``leases`` table (a small commit, not fsync'ed:
see :meth:`~mailpipe.journal.sqlite_transactions.SqliteTransactions._unsynced`), so
fenced writes (:meth:`~mailpipe.journal.sqlite.SqliteJournal.batch` with a fence) mean
the same here as in the PostgreSQL journal; but a holder that takes a mailbox again with
nobody's take in between (the ``leases`` row still names its owner and the epoch it took
last through this object, read under the flock) keeps that epoch and writes nothing: a
cycle over many mailboxes makes no journal commit per mailbox for its leases (issue 18).
The epoch still moves on at every change of holder, which is what a fence is for.
:meth:`SqliteLeases.leases` tells whether a lock is held without touching it: on Linux
it looks the lock file up in ``/proc/locks``; elsewhere it tries a shared lock and
drops it at once (a poll starting in that instant finds the mailbox busy and comes back
later, as for any lock held elsewhere).

Contract: :class:`SqliteLeases` is the lock layer of
:class:`~mailpipe.journal.sqlite.SqliteJournal` (never used alone), on its
transactions; the journal's ``__init__`` sets the state declared on the class, and its
``close`` closes the descriptors still held. Every method here takes the journal's
connection lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from mailpipe.journal.base import Fence, Lease
from mailpipe.journal.errors import JournalError
from mailpipe.journal.sqlite_transactions import SqliteTransactions

_PROC_LOCKS: Final = Path("/proc/locks")


def _flock_holder(path: Path) -> str | None:
    """Return the owner written in the flock file ``path`` while it is locked, else
    None (no file, or nobody holds it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError:
        return "unknown"  # cannot look (permissions): never report it free
    try:
        # "12: FLOCK  ADVISORY  WRITE 31018 fe:00:2146519 0 EOF" (dev in hex, inode).
        # Locks of processes in other PID namespaces are not listed there.
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        locked = any(
            "FLOCK" in line and ident in line.split()
            for line in _PROC_LOCKS.read_text().splitlines()
        )
    except OSError:  # not Linux, or /proc not mounted: ask the lock itself
        try:
            locked = _try_shared(path)
        except OSError:
            return "unknown"
    if not locked:
        return None
    try:
        owner = path.read_text().split("\n", 1)[0].strip()
    except OSError:
        owner = ""
    return owner or "unknown"


def _try_shared(path: Path) -> bool:
    """True when an exclusive flock on ``path`` is held (a shared one is refused)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock when it was taken
    return False


def lock_path(db_path: Path, mailbox: str) -> Path:
    """Return the flock file of ``mailbox`` for the journal at ``db_path``."""
    digest = hashlib.sha256(mailbox.encode()).hexdigest()
    return Path(f"{db_path}.locks") / f"{digest}.lock"


class SqliteLeases(SqliteTransactions):
    """The mailbox locks of :class:`~mailpipe.journal.sqlite.SqliteJournal`."""

    # Set by SqliteJournal.__init__.
    _memory: bool
    _locks: dict[str, tuple[str, int | None]]  # mailbox -> (owner, flock fd)
    _epochs: dict[str, int]  # the lease epoch of each lock held here
    # (owner, epoch) of the last take of each mailbox through this object, held or
    # released: a take that finds them still in the leases row writes nothing.
    _taken: dict[str, tuple[str, int]]
    _lock_paths: dict[str, Path]

    def leases(self, mailboxes: Iterable[str]) -> dict[str, Lease]:
        """Return the mailboxes whose flock is held now (by any process) and by whom.

        The owner is what the holder wrote into the lock file. Never takes a lock on
        Linux (``/proc/locks``); see the module docstring for other systems.
        """
        held: dict[str, Lease] = {}
        with self._lock:
            for mailbox in mailboxes:
                mine = self._locks.get(mailbox)
                if mine is not None:
                    held[mailbox] = Lease(mailbox=mailbox, owner=mine[0])
                    continue
                if self._memory:
                    continue
                owner = _flock_holder(lock_path(self.path, mailbox))
                if owner is not None:
                    held[mailbox] = Lease(mailbox=mailbox, owner=owner)
        return held

    def lock_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Take the exclusive flock of ``mailbox``; False if another holder has it.

        Taking a lock this object already holds for the same ``owner`` returns True.
        """
        del ttl  # the OS releases a flock when its process dies
        with self._lock:
            held = self._locks.get(mailbox)
            if held is not None:
                return held[0] == owner
            if self._memory:
                self._locks[mailbox] = (owner, None)
                self._take_epoch(mailbox, owner)
                return True
            fd = self._open_lock_file(mailbox)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # Who holds it, for humans; the flock itself is the lock (never unlinked).
            # Rewritten only when another holder's name is in it, in place: cut to
            # zero first, the file's block is freed and allocated again, a journaled
            # change of the file system on the event loop in every poll of every
            # mailbox (`run --once` names a new holder each time: ~0.1-0.5 ms each on
            # ext4, bench/RESULTS.md §45, issue 18). Cut only when the old name was
            # longer; a crash between the two leaves a name that the next take
            # rewrites (the pread below never matches it).
            text = f"{owner}\n{mailbox}\n".encode()
            old = os.pread(fd, len(text) + 1, 0)
            if old != text:
                os.pwrite(fd, text, 0)
                if len(old) > len(text):
                    os.ftruncate(fd, len(text))
            self._locks[mailbox] = (owner, fd)
            self._take_epoch(mailbox, owner)
        return True

    def _open_lock_file(self, mailbox: str) -> int:
        """Open (create) the flock file of ``mailbox``; its folder is made when
        missing (first use, or removed meanwhile)."""
        path = self._lock_paths.get(mailbox)
        if path is None:
            path = self._lock_paths[mailbox] = lock_path(self.path, mailbox)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def _take_epoch(self, mailbox: str, owner: str) -> None:
        """Raise the mailbox's lease epoch for ``owner`` (the lock is held), unless
        the ``leases`` row is still this object's last take of the mailbox for
        ``owner``: that epoch is kept (a read, no write). On a journal error the lock
        is given back and the error raised."""
        last = self._taken.get(mailbox)
        try:
            if last is not None and last[0] == owner:
                with self._guard():
                    if self._closed:  # e.g. full sync not restored: no lease either
                        raise JournalError(f"journal {self.path} is closed")
                    row = self._conn.execute(
                        "SELECT owner, epoch FROM leases WHERE mailbox = ?", (mailbox,)
                    ).fetchone()
                if row is not None and (row[0], int(row[1])) == last:
                    self._epochs[mailbox] = last[1]
                    return
            with self._unsynced(), self._tx() as conn:
                (epoch,) = conn.execute(
                    "INSERT INTO leases (mailbox, owner, epoch) VALUES (?, ?, 1) "
                    "ON CONFLICT (mailbox) DO UPDATE "
                    "SET owner = excluded.owner, epoch = leases.epoch + 1 "
                    "RETURNING epoch",
                    (mailbox, owner),
                ).fetchone()
        except BaseException:
            _owner, fd = self._locks.pop(mailbox)
            if fd is not None:
                os.close(fd)
            raise
        self._epochs[mailbox] = int(epoch)
        self._taken[mailbox] = (owner, int(epoch))

    def fence(self, mailbox: str, *, owner: str) -> Fence | None:
        """The fence of the lock ``owner`` holds on ``mailbox`` here (no I/O)."""
        with self._lock:
            held = self._locks.get(mailbox)
            if held is None or held[0] != owner or mailbox not in self._epochs:
                return None
            return Fence(mailbox=mailbox, owner=owner, epoch=self._epochs[mailbox])

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Return True while ``owner`` holds the lock (a flock cannot expire)."""
        with self._lock:
            held = self._locks.get(mailbox)
            return held is not None and held[0] == owner

    def unlock_mailbox(self, mailbox: str, *, owner: str) -> None:
        """Release the lock if ``owner`` holds it."""
        with self._lock:
            held = self._locks.get(mailbox)
            if held is None or held[0] != owner:
                return
            del self._locks[mailbox]
            self._epochs.pop(mailbox, None)
            if held[1] is not None:
                os.close(held[1])  # closing the descriptor drops the flock
