"""``mailpipe status``: how each mailbox is doing, read from the journal and quarantine.

Everything shown is durable state another process can read while ``mailpipe run``
works: the journal's poll records (:class:`~mailpipe.journal.base.PollRecord`, written
at the end of every poll), its oldest PENDING entries, its locks (PostgreSQL leases with
their expiry; SQLite's flock, a "local lock" held until its process exits) and the
quarantine directory. Health is judged by the rule of ``/healthz``
(:func:`mailpipe.metrics.is_stale`): a mailbox is unhealthy when it has not succeeded
for ``[metrics] unhealthy_after``, counted from its first recorded poll when it never
succeeded; a mailbox with no recorded poll at all is unhealthy ("never polled").
Disabled mailboxes are listed and never judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mailpipe.config import Config
from mailpipe.journal.base import Journal, Lease, PollRecord
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.metrics import is_stale
from mailpipe.quarantine import Quarantine
from mailpipe.secrets import redact


@dataclass(slots=True, kw_only=True)
class MailboxStatus:
    """The status of one configured mailbox at :attr:`checked_at`.

    ``healthy`` is None for a disabled mailbox. ``lock_kind`` is ``"lease"``
    (PostgreSQL, with ``lock_expires``) or ``"local lock"`` (SQLite flock), and
    ``lock_owner`` is None when nobody holds the mailbox now.
    """

    mailbox: str
    enabled: bool
    healthy: bool | None
    problem: str
    checked_at: datetime
    last_poll: datetime | None = None
    polled_by: str | None = None
    last_success: datetime | None = None
    last_error_at: datetime | None = None
    last_error: str = ""
    last_error_type: str = ""
    backlog: int | None = None
    oldest_pending: datetime | None = None
    quarantined: int = 0
    lock_kind: str = "lease"
    lock_owner: str | None = None
    lock_expires: datetime | None = None
    next_poll: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict: times as ISO 8601 UTC, plus ages in seconds."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if name == "checked_at":
                continue
            out[name] = value.isoformat() if isinstance(value, datetime) else value
        out["oldest_pending_age_seconds"] = _age(self.oldest_pending, self.checked_at)
        out["last_success_age_seconds"] = _age(self.last_success, self.checked_at)
        return out


def _age(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else round((now - then).total_seconds(), 3)


def collect(
    config: Config,
    journal: Journal | None,
    quarantine: Quarantine,
    *,
    now: datetime | None = None,
) -> list[MailboxStatus]:
    """Return the status of every configured mailbox, in config order.

    Reads only: the journal's poll records, oldest pending entries and locks (never
    taking one), and the quarantine's sidecars. ``journal`` None means there is no
    journal yet: nothing was ever polled.

    :raises JournalError: the journal cannot be read.
    """
    now = now or datetime.now(UTC)
    unhealthy_after = float(config.model.metrics.unhealthy_after)
    names = [m.name for m in config.mailboxes]
    polls: dict[str, PollRecord] = {}
    pending: dict[str, datetime] = {}
    leases: dict[str, Lease] = {}
    if journal is not None:
        polls = journal.polls()
        pending = journal.oldest_pending()
        leases = journal.leases(names)
    local = isinstance(journal, SqliteJournal)  # flock: no expiry, "local lock"
    out = []
    for spec in config.mailboxes:
        name = spec.name
        record = polls.get(name)
        enabled = spec.config.enabled
        healthy: bool | None = None
        problem = "disabled"
        if enabled:
            healthy, problem = _judge(record, now=now, unhealthy_after=unhealthy_after)
        lease = leases.get(name)
        status = MailboxStatus(
            mailbox=name,
            enabled=enabled,
            healthy=healthy,
            problem=problem,
            checked_at=now,
            oldest_pending=pending.get(name),
            quarantined=len(quarantine.list(name)),
            lock_kind="local lock" if local else "lease",
            lock_owner=lease.owner if lease else None,
            lock_expires=lease.expires if lease else None,
        )
        if record is not None:
            status.last_poll = record.polled_at
            status.polled_by = record.owner
            status.last_success = record.last_success
            status.last_error_at = record.last_error_at
            status.last_error = redact(record.last_error)
            status.last_error_type = record.last_error_type
            status.backlog = record.backlog
            status.next_poll = record.next_poll
        out.append(status)
    return out


def _judge(
    record: PollRecord | None, *, now: datetime, unhealthy_after: float
) -> tuple[bool, str]:
    """Apply the /healthz rule to one enabled mailbox's poll record."""
    if record is None:
        return False, "never polled"
    success = record.last_success.timestamp() if record.last_success else None
    if is_stale(
        success,
        since=record.first_polled.timestamp(),
        now=now.timestamp(),
        unhealthy_after=unhealthy_after,
    ):
        if record.last_success is None:
            return False, "never succeeded"
        quiet = _span((now - record.last_success).total_seconds())
        return False, f"no success for {quiet}"
    return True, "ok"


def healthy(statuses: list[MailboxStatus]) -> bool:
    """True when no enabled mailbox is unhealthy (the exit code of ``status``)."""
    return all(s.healthy is not False for s in statuses)


def as_document(statuses: list[MailboxStatus]) -> dict[str, Any]:
    """Return the ``status --json`` document: overall health, time, mailboxes."""
    checked = statuses[0].checked_at if statuses else datetime.now(UTC)
    return {
        "healthy": healthy(statuses),
        "checked_at": checked.isoformat(),
        "mailboxes": [s.as_json() for s in statuses],
    }


def _span(seconds: float) -> str:
    """Render a duration compactly: 45s, 12m, 3h05m, 2d04h."""
    s = int(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _ago(then: datetime | None, now: datetime) -> str:
    return "-" if then is None else f"{_span((now - then).total_seconds())} ago"


def _next(status: MailboxStatus) -> str:
    if not status.enabled:
        return "-"
    if status.next_poll is None:
        return "-" if status.last_poll is None else "not scheduled"
    ahead = (status.next_poll - status.checked_at).total_seconds()
    return f"in {_span(ahead)}" if ahead >= 0 else f"overdue {_span(ahead)}"


def _lock(status: MailboxStatus) -> str:
    if status.lock_owner is None:
        return "free"
    if status.lock_expires is None:
        return f"{status.lock_owner} ({status.lock_kind})"
    left = (status.lock_expires - status.checked_at).total_seconds()
    return f"{status.lock_owner} (lease, {_span(left)} left)"


def rows(statuses: list[MailboxStatus]) -> list[list[str]]:
    """Return the table rows of the human output (header first)."""
    table = [
        [
            "mailbox",
            "health",
            "last success",
            "last error",
            "backlog",
            "oldest pending",
            "quarantine",
            "lock",
            "next poll",
        ]
    ]
    for s in statuses:
        health = "disabled" if s.healthy is None else "ok"
        if s.healthy is False:
            health = f"UNHEALTHY: {s.problem}"
        error = "-"
        if s.last_error_at is not None:
            when = _ago(s.last_error_at, s.checked_at)
            error = f"{s.last_error_type or 'error'} {when}"
        table.append(
            [
                s.mailbox,
                health,
                _ago(s.last_success, s.checked_at),
                error,
                "-" if s.backlog is None else str(s.backlog),
                _ago(s.oldest_pending, s.checked_at),
                str(s.quarantined),
                _lock(s),
                _next(s),
            ]
        )
    return table


def error_lines(statuses: list[MailboxStatus]) -> list[str]:
    """Return ``mailbox: ErrorType: text`` for each mailbox's last error (redacted)."""
    return [
        f"{s.mailbox}: last error {s.last_error_at.isoformat(timespec='seconds')} "
        f"{s.last_error_type}: {s.last_error}"
        for s in statuses
        if s.last_error_at is not None
    ]
