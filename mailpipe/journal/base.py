"""The journal contract: durable per-message delivery state keyed by (mailbox, uid).

Theory of operation
-------------------
The journal is what makes re-fetching harmless. For each (mailbox, uid) it records the
status, the attempts, the content hash, the chain steps that have durably committed,
when the message was first seen and the last error. Status moves:

    (absent) --begin--> pending --finish--> committed | kept | quarantined
    pending  --fail---> pending (attempts+1)
    committed/quarantined --mark_deleted (after QUIT +OK)--> deleted

A message ``committed`` (or ``quarantined`` with delete policy) but still on the server
(crash, dropped connection, failed QUIT) is DELE'd in the next session without being
processed again. Steps listed in ``steps`` are skipped when a message is re-run.

Every write is durable when the method returns, except inside ``batch()``, where all
writes become durable together when the block exits (group commit). The engine issues
DELE only after the batch covering those messages has exited.

Beside the entries, the journal keeps one *poll record* per mailbox
(:class:`PollRecord`, written by the scheduler at the end of each poll with
:meth:`Journal.record_poll`) so that ``mailpipe status`` can tell, from another
process, when a mailbox last succeeded, how its last failure looked, how many messages
the server listed and when the next poll is due. It costs one upsert per poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, runtime_checkable

import structlog

log = structlog.get_logger()


class Status(StrEnum):
    """Where a message stands in its delivery."""

    PENDING = "pending"  # seen; chain not finished (or failed; see attempts)
    COMMITTED = "committed"  # chain finished with DONE; DELE per policy still due
    KEPT = "kept"  # chain said KEEP, or keep-mode done: leave on server, never re-run
    QUARANTINED = "quarantined"  # raw bytes in quarantine; DELE per policy
    DELETED = "deleted"  # QUIT confirmed the deletion


@dataclass(slots=True, kw_only=True)
class Entry:
    """One journal row."""

    mailbox: str
    uid: str
    key: str
    status: Status
    attempts: int = 0
    size: int = 0
    sha256: str | None = None
    steps: list[str] = field(default_factory=list)
    disposition: str | None = None
    reason: str = ""
    last_error: str = ""
    delete_due: bool = False  # DELE this message at the next session
    first_seen: datetime | None = None
    updated: datetime | None = None


class Finish(NamedTuple):
    """One outcome for :meth:`Journal.finish_many`: the arguments of
    :meth:`Journal.finish` for ``uid`` (``sha256=None`` keeps a known hash)."""

    uid: str
    status: Status
    disposition: str
    sha256: str | None
    reason: str
    delete_due: bool


@dataclass(slots=True, kw_only=True)
class PollRecord:
    """What the polls of one mailbox left behind (one row per mailbox).

    ``first_polled`` is when the first poll was recorded (what "since when" means for
    a mailbox that never succeeded). ``last_success`` and the ``last_error*`` fields
    are each kept until the next poll of their kind, so both are known after a
    failure that followed a success. ``backlog`` is the message count of the latest
    listing (None until a poll got as far as listing). ``next_poll`` is when the
    worker that polled plans the next poll (None after ``run --once``).
    """

    mailbox: str
    owner: str
    first_polled: datetime
    polled_at: datetime
    last_success: datetime | None = None
    last_error_at: datetime | None = None
    last_error: str = ""
    last_error_type: str = ""
    backlog: int | None = None
    next_poll: datetime | None = None


@dataclass(slots=True, kw_only=True)
class Lease:
    """Who holds a mailbox's lock now: ``owner`` (``host:pid``) and until when.

    ``expires`` is None for a lock that does not expire (SQLite's flock, released
    when the holding process exits).
    """

    mailbox: str
    owner: str
    expires: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fence:
    """A fencing token: the lease ``epoch`` that ``owner`` took on ``mailbox``.

    Every take of a mailbox's lease by another holder than the last raises its epoch
    (never reused, a release included), so a write made conditional on a fence is
    refused (:class:`~mailpipe.journal.errors.FencedError`) once another worker has
    taken the mailbox, however long this one was paused. A holder that takes the
    mailbox again with no other take in between may get the same epoch back (the
    SQLite journal does: no write per poll), as no other worker can have written.
    """

    mailbox: str
    owner: str
    epoch: int


def verify_fence(fence: Fence, row: tuple[Any, ...] | None) -> None:
    """Raise FencedError unless ``row`` (the lease row's owner and epoch, or None when
    there is none) is ``fence``; a refused batch is logged as abandoned work."""
    from mailpipe.journal.errors import FencedError

    if row is not None and (row[0], int(row[1])) == (fence.owner, fence.epoch):
        return
    held = "no lease" if row is None else f"epoch {row[1]} of {row[0]}"
    raise FencedError(
        f"the lease on mailbox {fence.mailbox!r} moved on (held: epoch "
        f"{fence.epoch} of {fence.owner}; journal: {held}); write refused"
    )


@contextmanager
def fenced_commit(fence: Fence) -> Iterator[None]:
    """Around a batch's last fence check: log a refusal as the poll's abandoned work."""
    from mailpipe.journal.errors import FencedError

    try:
        yield
    except FencedError as exc:
        log.error(
            "journal_batch_fenced",
            mailbox=fence.mailbox,
            owner=fence.owner,
            epoch=fence.epoch,
            error=str(exc),
            action="batch rolled back; the work of this poll is abandoned to the "
            "mailbox's new owner",
        )
        raise


@runtime_checkable
class Journal(Protocol):
    """Durable delivery state. Implementations: SQLite (default), PostgreSQL."""

    def get_many(self, mailbox: str, uids: Iterable[str]) -> dict[str, Entry]:
        """Return the entries of ``uids`` that exist, by uid."""
        ...

    def owed(self, mailbox: str) -> list[str]:
        """Return the uids whose DELE is still owed (``delete_due``)."""
        ...

    def retained(self, mailbox: str) -> dict[str, int]:
        """Return uid → size of every entry not DELETED (mail believed on the server)."""
        ...

    def unfinished(self, mailbox: str) -> list[str]:
        """Return the uids whose message still needs a listing (MP-05): PENDING
        (being processed, failing and retried, resting) or owing an acknowledgement
        (``delete_due``)."""
        ...

    def begin(self, mailbox: str, uid: str, *, key: str, size: int) -> Entry:
        """Insert a PENDING entry if absent (first_seen now); return the current entry."""
        ...

    def begin_many(
        self, mailbox: str, items: Sequence[tuple[str, str, int]]
    ) -> dict[str, Entry]:
        """:meth:`begin` for each ``(uid, key, size)``, in one transaction (inside a
        batch: part of it); return the current entry of each uid, by uid.

        Optional, like :meth:`steps_committed` and :meth:`finish_many` (issue 18): the
        ledger calls the single-row method for each item of a journal without it."""
        ...

    def step_committed(self, mailbox: str, uid: str, step: str) -> None:
        """Record that chain step ``step`` durably committed for this message."""
        ...

    def steps_committed(self, mailbox: str, items: Iterable[tuple[str, str]]) -> None:
        """:meth:`step_committed` for each ``(uid, step)`` in order, in one
        transaction (inside a batch: part of it)."""
        ...

    def finish(
        self,
        mailbox: str,
        uid: str,
        *,
        status: Status,
        disposition: str,
        sha256: str | None,
        reason: str = "",
        delete_due: bool,
        fence: Fence | None = None,
    ) -> None:
        """Set the final status of a chain run; ``delete_due`` says whether DELE is owed.

        With ``fence``, as :meth:`batch` with that fence."""
        ...

    def finish_many(self, mailbox: str, items: Iterable[Finish]) -> None:
        """:meth:`finish` for each item in order, in one transaction (inside a batch:
        part of it)."""
        ...

    def fail(self, mailbox: str, uid: str, *, error: str, counted: bool) -> int:
        """Record a failed attempt (``counted`` adds one); return the attempts so far."""
        ...

    def mark_deleted(
        self, mailbox: str, uids: Iterable[str], *, fence: Fence | None = None
    ) -> None:
        """After QUIT +OK: the server deleted ``uids``; status DELETED, delete_due False.

        With ``fence``, as :meth:`batch` with that fence."""
        ...

    def list(
        self,
        mailbox: str | None = None,
        status: Status | None = None,
        limit: int = 1000,
    ) -> list[Entry]:
        """Return entries, newest first, optionally filtered."""
        ...

    def forget(
        self, mailbox: str, uids: Iterable[str] | None = None, *, cursors: bool = True
    ) -> int:
        """Delete entries (all of the mailbox when ``uids`` is None); return how many.

        Also drops every cursor of the mailbox (:meth:`cursors`), in the same
        transaction, so that a forgotten message is listed, and processed, again;
        ``cursors=False`` deletes the entries only (an entry rewritten at once, MP-05)."""
        ...

    def cursors(self, mailbox: str) -> dict[str, int]:
        """Return the mailbox's listing cursors: scope → position (MP-05).

        A cursor is a watermark a source lists from (IMAP: ``UID FETCH W+1:*`` per
        folder and UIDVALIDITY): every position up to it that a listing showed has a
        finished entry (see :mod:`mailpipe.cursors`). Only the ledger writes them."""
        ...

    def set_cursors(
        self,
        mailbox: str,
        cursors: Mapping[str, int],
        *,
        expect: Mapping[str, int] | None = None,
        passed: Iterable[str] = (),
        fence: Fence | None = None,
    ) -> bool:
        """Replace every cursor of ``mailbox`` with ``cursors`` (an empty mapping
        drops them all). Durable when it returns (inside a batch: with it); with
        ``fence``, as :meth:`batch` with that fence.

        Compare-and-set (MP-05): with ``expect``, the write happens only when, in the
        same transaction, the mailbox's cursors still equal ``expect`` (what the
        poll read before listing) and every uid of ``passed`` (the entries the new
        cursors move over) still has a finished entry (COMMITTED, KEPT, QUARANTINED
        or DELETED, no ``delete_due``): a ``forget`` or replay that ran meanwhile
        wins. PostgreSQL locks the cursor rows (``FOR UPDATE``) and the passed
        entries (``FOR SHARE``), so the case of no cursor rows is covered by the
        entries. Returns whether it wrote."""
        ...

    def mark_seen(self, mailbox: str, items: Iterable[tuple[str, str, int]]) -> int:
        """Adopt (uid, key, size) items as KEPT without processing; return how many new."""
        ...

    def prune(
        self, mailbox: str, present: Iterable[str], older_than_days: float
    ) -> int:
        """Drop DELETED entries not on the server any more and older than the limit."""
        ...

    def batch(
        self, *, fence: Fence | None = None, synced: bool = True
    ) -> AbstractContextManager[None]:
        """Group commit: writes inside become durable together at exit (re-entrant).

        With ``fence``, the batch commits only while ``fence`` is the mailbox's current
        lease (checked in the same transaction, just before it commits, with the lease
        row locked against a take-over until then); otherwise it rolls back and raises
        :class:`~mailpipe.journal.errors.FencedError`.

        ``synced=False`` (MP-08): a batch opened while no other is open in the journal
        commits atomically and visibly but without waiting for the disk: a process
        crash loses nothing, an OS crash or power loss (SQLite) or a database server
        crash (PostgreSQL) may lose the batch whole, never keep a later synced commit
        without it. For writes whose loss leaves a state that recovery already
        handles. No other thread's write joins it (it holds the journal's connection
        while open); a synced batch inside it raises
        :class:`~mailpipe.journal.errors.JournalError`. Inside an open batch it is part
        of that batch. A journal whose ``batch`` lacks the parameter is given none
        (every batch synced).
        """
        ...

    def check_fence(self, fence: Fence) -> None:
        """Raise :class:`~mailpipe.journal.errors.FencedError` unless ``fence`` is the
        mailbox's current lease (asked of the journal now; for a check before an
        acknowledgement, which no journal transaction can cover)."""
        ...

    def record_poll(
        self,
        mailbox: str,
        *,
        owner: str,
        error: str = "",
        error_type: str = "",
        backlog: int | None = None,
        next_poll: datetime | None = None,
    ) -> None:
        """Record the end of a poll of ``mailbox`` (a success when ``error`` is empty).

        Upserts the mailbox's :class:`PollRecord`: ``polled_at`` (and on success
        ``last_success``, on failure ``last_error_at``/``last_error``/
        ``last_error_type``) become now; ``backlog`` None keeps the known count;
        ``next_poll`` is stored as given. Durable when it returns (outside a batch).
        """
        ...

    def polls(self) -> dict[str, PollRecord]:
        """Return the poll record of every mailbox that has one, by mailbox."""
        ...

    def oldest_pending(self) -> dict[str, datetime]:
        """Return, per mailbox, the ``first_seen`` of its oldest PENDING entry."""
        ...

    def leases(self, mailboxes: Iterable[str]) -> dict[str, Lease]:
        """Return who holds the lock of each of ``mailboxes`` now (held ones only).

        Read-only: asking never takes or disturbs a lock. An expired PostgreSQL lease
        is not held.
        """
        ...

    def lock_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Take the exclusive lease on ``mailbox`` across processes; False if held.

        A take raises the mailbox's lease epoch, except that one by the holder of the
        last take, through the same journal object, may keep it (see :class:`Fence`
        and :meth:`fence`)."""
        ...

    def fence(self, mailbox: str, *, owner: str) -> Fence | None:
        """The fence of the lease ``owner`` took on ``mailbox`` through this journal
        (its epoch, as of the take), or None when it holds none here. No I/O."""
        ...

    def renew_mailbox(self, mailbox: str, *, owner: str, ttl: float) -> bool:
        """Extend a held lease; False when it was lost (the session must abort)."""
        ...

    def unlock_mailbox(self, mailbox: str, *, owner: str) -> None:
        """Release the lease if ``owner`` holds it."""
        ...

    def close(self) -> None:
        """Release connections and locks."""
        ...


def iter_chunks(items: Iterable[str], size: int = 500) -> Iterator[list[str]]:
    """Yield lists of at most ``size`` items (for SQL IN clauses)."""
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


#: The OAuth token cache (:mod:`mailpipe.oauth.cache`): one row per account (the key
#: shared by every mailbox of one account). ``sealed`` holds the access and refresh
#: tokens encrypted with the ``cache_key``; the other columns are what ``mailpipe auth
#: status`` shows. ``lease_owner``/``lease_until`` make one worker at a time refresh.
#: Times are Unix seconds. Format with ``table`` and ``real`` (the float type).
OAUTH_TOKENS_TABLE = """
        CREATE TABLE {table} (
            account        text    PRIMARY KEY,
            description    text    NOT NULL DEFAULT '{{}}',
            sealed         text    NOT NULL DEFAULT '',
            expires_at     {real},
            refresh_at     {real},
            rt_issued_at   {real},
            last_refresh   {real},
            refreshes      integer NOT NULL DEFAULT 0,
            last_error     text    NOT NULL DEFAULT '',
            last_error_code text   NOT NULL DEFAULT '',
            last_error_at  {real},
            lease_owner    text,
            lease_until    {real}
        )
        """


def apply_migrations(
    execute: Callable[..., Any],
    *,
    table: str,
    param: str,
    migrations: Sequence[Sequence[str]],
    where: str,
) -> int:
    """Bring a journal schema to ``len(migrations)`` inside the caller's transaction.

    ``execute(sql, params=())`` is the DB-API connection's ``execute``; ``param`` its
    placeholder (``?`` or ``%s``); ``table`` holds the single version row. Returns the
    version found before migrating. A newer stored version raises SchemaVersionError
    naming ``where`` (this code must not write a schema it does not know).
    """
    from mailpipe.journal.errors import SchemaVersionError

    latest = len(migrations)
    execute(f"CREATE TABLE IF NOT EXISTS {table} (version integer NOT NULL)")
    row = execute(f"SELECT version FROM {table}").fetchone()
    current = int(row[0]) if row else 0
    if current > latest:
        raise SchemaVersionError(
            f"{where} has schema version {current}; this mailpipe knows up to {latest}"
        )
    for statements in migrations[current:]:
        for statement in statements:
            execute(statement)
    if row is None:
        execute(f"INSERT INTO {table} (version) VALUES ({param})", (latest,))
    elif current != latest:
        execute(f"UPDATE {table} SET version = {param}", (latest,))
    return current


def check_schema(version: int | None, *, latest: int, where: str) -> None:
    """For a read-only open: accept only the schema this code reads (``latest``).

    ``version`` is the stored version, None when the version table is missing.

    :raises JournalMissingError: no version table (an empty database).
    :raises SchemaOutdatedError: older; reading must not migrate it.
    :raises SchemaVersionError: newer than this mailpipe knows.
    """
    from mailpipe.journal.errors import (
        JournalMissingError,
        SchemaOutdatedError,
        SchemaVersionError,
    )

    if version is None:
        raise JournalMissingError(f"{where} has no mailpipe tables yet")
    if version > latest:
        raise SchemaVersionError(
            f"{where} has schema version {version}; this mailpipe knows up to {latest}"
        )
    if version < latest:
        raise SchemaOutdatedError(
            f"{where} has schema version {version} (this mailpipe reads {latest}); "
            "the next `mailpipe run` migrates it"
        )
