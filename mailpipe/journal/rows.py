"""How journal rows map to objects, for both backends (SQLite and PostgreSQL).

The column lists each backend selects, and the functions that turn a selected row into
an :class:`~mailpipe.journal.base.Entry` or a :class:`~mailpipe.journal.base.PollRecord`
(and a poll into the parameters of its upsert). Only the SQL dialect (placeholders,
time and JSON types) differs between the backends; the order of the columns and the
meaning of each one live here, once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Final

from mailpipe.journal.base import Entry, PollRecord, Status

#: The columns of an entry, in the order :func:`entry` reads them.
ENTRY_COLUMNS: Final = (
    "mailbox, uid, key, status, attempts, size, sha256, steps, disposition, reason, "
    "last_error, delete_due, first_seen, updated"
)


def entry(row: Sequence[Any], when: Callable[[Any], datetime]) -> Entry:
    """Build an :class:`Entry` from a row of :data:`ENTRY_COLUMNS`; ``when`` turns the
    backend's stored time into an aware UTC datetime. ``steps`` is a JSON array as
    text (SQLite) or already decoded (PostgreSQL's jsonb)."""
    steps = row[7]
    return Entry(
        mailbox=row[0],
        uid=row[1],
        key=row[2],
        status=Status(row[3]),
        attempts=row[4],
        size=row[5],
        sha256=row[6],
        steps=list(json.loads(steps) if isinstance(steps, str | bytes) else steps),
        disposition=row[8],
        reason=row[9],
        last_error=row[10],
        delete_due=bool(row[11]),
        first_seen=when(row[12]),
        updated=when(row[13]),
    )


#: The columns of a poll record, in the order :func:`poll_record` reads them.
POLL_COLUMNS: Final = (
    "mailbox, owner, first_polled, polled_at, last_success, last_error_at, "
    "last_error, last_error_type, backlog, next_poll"
)


def poll_upsert(table: str, mark: str, *, alias: str = "") -> str:
    """The upsert of one poll record into ``table`` (the columns of
    :data:`POLL_COLUMNS`), with ``mark`` as the placeholder (``?`` or ``%s``) and the
    existing row named ``alias`` when the dialect needs one (PostgreSQL: ``p``).
    Parameters: :func:`poll_params`. The rule of :meth:`Journal.record_poll` in SQL."""
    old = f"{alias}." if alias else ""
    marks = ", ".join([mark] * 10)
    return (
        f"INSERT INTO {table}{f' AS {alias}' if alias else ''} ({POLL_COLUMNS}) "
        f"VALUES ({marks}) "
        "ON CONFLICT (mailbox) DO UPDATE SET owner = excluded.owner, "
        "polled_at = excluded.polled_at, "
        f"last_success = coalesce(excluded.last_success, {old}last_success), "
        f"last_error_at = coalesce(excluded.last_error_at, {old}last_error_at), "
        "last_error = CASE WHEN excluded.last_error_at IS NULL "
        f"THEN {old}last_error ELSE excluded.last_error END, "
        "last_error_type = CASE WHEN excluded.last_error_at IS NULL "
        f"THEN {old}last_error_type ELSE excluded.last_error_type END, "
        f"backlog = coalesce(excluded.backlog, {old}backlog), "
        "next_poll = excluded.next_poll"
    )


def poll_params(
    mailbox: str,
    owner: str,
    now: Any,
    *,
    error: str,
    error_type: str,
    backlog: int | None,
    next_poll: Any,
) -> tuple[Any, ...]:
    """The parameters of :func:`poll_upsert`; ``now`` and ``next_poll`` in the
    backend's own time representation (a poll without ``error`` is a success)."""
    ok = not error
    return (
        mailbox, owner, now, now, now if ok else None, None if ok else now,
        error, error_type, backlog, next_poll,
    )


def poll_record(row: Sequence[Any], when: Callable[[Any], datetime]) -> PollRecord:
    """Build a :class:`PollRecord` from a row of :data:`POLL_COLUMNS`; ``when`` turns
    the backend's stored time into an aware UTC datetime."""

    def maybe(value: Any) -> datetime | None:
        return None if value is None else when(value)

    return PollRecord(
        mailbox=row[0],
        owner=row[1],
        first_polled=when(row[2]),
        polled_at=when(row[3]),
        last_success=maybe(row[4]),
        last_error_at=maybe(row[5]),
        last_error=row[6],
        last_error_type=row[7],
        backlog=None if row[8] is None else int(row[8]),
        next_poll=maybe(row[9]),
    )
