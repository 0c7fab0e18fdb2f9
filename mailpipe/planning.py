"""Pure planning: what one session does with what the server lists.

Functions of data only (the listing, the journal entries read for it, the mailbox's
config, the time): no I/O, no logging, no journal writes. The engine reads the
journal, calls :func:`plan`, and hands every write the plan implies to
:mod:`mailpipe.ledger`. ``tests/core/test_planning.py`` is table-driven.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from mailpipe import oversize
from mailpipe.journal.base import Entry, Status

if TYPE_CHECKING:
    from mailpipe.config import MailboxConfig
    from mailpipe.message import MessageRef

#: The prefix of the error journaled for a message the source could not deliver whole.
UNRETRIEVABLE = "unretrievable: "

#: How long a message left unretrievable ``max_attempts`` times rests before the
#: next try (it stays on the server, never acknowledged).
UNRETRIEVABLE_REST = timedelta(days=1)


@dataclass(slots=True)
class Plan:
    """What one session does, in order.

    ``ack``: settled messages whose acknowledgement is owed (durable in the journal).
    ``process``: to retrieve and run (new first, earlier failures last).
    ``oversize``: over ``max_message_size``: ``on_oversize`` decides.
    ``resting``: unretrievable ``max_attempts`` times and resting (left alone).
    ``gone``: uids owed an acknowledgement that the server no longer lists (done).
    ``duplicates``: refs whose uid an earlier ref of the listing already has.
    ``reappeared``: deleted before, listed again with no content hash to compare.
    """

    ack: list[MessageRef] = field(default_factory=list)
    process: list[MessageRef] = field(default_factory=list)
    oversize: list[MessageRef] = field(default_factory=list)
    resting: list[tuple[MessageRef, Entry]] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    duplicates: list[MessageRef] = field(default_factory=list)
    reappeared: list[MessageRef] = field(default_factory=list)


def plan(
    refs: Sequence[MessageRef],
    entries: Mapping[str, Entry],
    owed: Collection[str],
    cfg: MailboxConfig,
    now: datetime,
) -> Plan:
    """Plan a session over ``refs`` keyed by stable uids (C-56: durable state is keyed
    by uid; message numbers are this session's only).

    ``entries`` holds the journal's entries of the listed uids, ``owed`` the uids whose
    acknowledgement the journal owes.
    """
    out = Plan()
    listed = {r.uid for r in refs}
    # A crash between the commit's confirmation and the journal's write leaves
    # acknowledgements owed for mail the server already removed (RFC 1939 §6).
    out.gone = [uid for uid in owed if uid not in listed]
    days = after_days(cfg.delete)
    limit = cfg.max_message_size
    seen: set[str] = set()
    retries: list[MessageRef] = []
    for ref in refs:
        if ref.uid in seen:
            out.duplicates.append(ref)  # RFC 1939 §7: never act twice on a clash
            continue
        seen.add(ref.uid)
        entry = entries.get(ref.uid)
        if entry is None or entry.status == Status.PENDING:
            if entry is not None and resting(entry, cfg.max_attempts, now):
                out.resting.append((ref, entry))
            elif (limit is not None and ref.size > limit) or oversize.marked(entry, limit):
                out.oversize.append(ref)
            elif entry is not None and (entry.attempts or entry.last_error):
                retries.append(ref)
            else:
                out.process.append(ref)
            continue
        if entry.delete_due:
            out.ack.append(ref)
        elif entry.status == Status.DELETED:
            if entry.sha256 and (limit is None or ref.size <= limit):
                # The uid was deleted before: the same message again, or a new one
                # under a reused or clashing uid (RFC 1939 §7 says it must not be,
                # anchors §3.14 says servers do). The content hash decides after
                # retrieval (the engine's identity check).
                out.process.append(ref)
            else:
                out.reappeared.append(ref)
                out.ack.append(ref)
        elif (
            days is not None
            # Only processed mail ages out: KEPT (a keep rule, or adopted by
            # mark-seen without processing) stays on the server.
            and entry.status == Status.COMMITTED
            and entry.first_seen is not None
            and aware(entry.first_seen) + timedelta(days=days) <= now
        ):
            out.ack.append(ref)
        elif entry.size and entry.sha256 and ref.size != entry.size:
            # T-23: a settled uid listed with another size is fetched again and its
            # content hash decides (a reused uid, or a recount); one listed with its
            # old size is the same message and costs no download. An entry without a
            # hash (adopted by mark-seen) has nothing to compare with.
            out.process.append(ref)
    # Messages that failed before go after new ones, so that messages failing again
    # can never fill every window and starve new mail.
    out.process += retries
    return out


def plan_unkeyed(refs: Sequence[MessageRef], limit: int | None) -> Plan:
    """Plan a session without stable ids: every message is retrieved and keyed by
    its content hash then; the size policy still applies from the listing."""
    out = Plan()
    for ref in refs:
        big = limit is not None and ref.size > limit
        (out.oversize if big else out.process).append(ref)
    return out


def window(refs: Sequence[MessageRef], cfg: MailboxConfig) -> tuple[list[MessageRef], bool]:
    """The messages of this commit window, and whether another window follows.

    Per-session limits (``max_messages``/``max_bytes``) end the poll; the commit
    window only ends the session, and the next window starts at once.
    """
    limit = len(refs)
    if cfg.commit_window:
        limit = min(limit, cfg.commit_window)
    if cfg.max_messages is not None:
        limit = min(limit, cfg.max_messages)
    chosen = list(refs[:limit])
    if cfg.max_bytes is not None:
        total, cut = 0, 0
        for ref in chosen:
            if total + ref.size > cfg.max_bytes and cut > 0:
                break
            total += ref.size
            cut += 1
        chosen = chosen[:cut]
    limited = cfg.max_messages is not None or cfg.max_bytes is not None
    return chosen, len(chosen) < len(refs) and not limited


def chunks(refs: Sequence[MessageRef], count: int, octets: int) -> list[list[MessageRef]]:
    """Split ``refs`` into runs of at most ``count`` messages and about ``octets``
    octets (a single larger message forms its own chunk)."""
    out: list[list[MessageRef]] = []
    current: list[MessageRef] = []
    size = 0
    for ref in refs:
        if current and (len(current) >= count or size + ref.size > octets):
            out.append(current)
            current, size = [], 0
        current.append(ref)
        size += ref.size
    if current:
        out.append(current)
    return out


def resting(entry: Entry, max_attempts: int, now: datetime) -> bool:
    """True for a message left unretrievable ``max_attempts`` times and tried less
    than :data:`UNRETRIEVABLE_REST` ago."""
    if entry.attempts < max_attempts or not entry.last_error.startswith(UNRETRIEVABLE):
        return False
    return entry.updated is not None and aware(entry.updated) + UNRETRIEVABLE_REST > now


def tried_key(ref: MessageRef) -> str:
    """What a poll remembers a tried message by: its uid, or without stable ids its
    number and size (good within one poll; a clash only defers it to the next)."""
    return ref.uid or f"#{ref.number}:{ref.size}"


def after_days(policy: str) -> float | None:
    """The days of ``delete = "after_days:N"``, else None."""
    if policy.startswith("after_days:"):
        return float(policy.split(":", 1)[1])
    return None


def aware(dt: datetime) -> datetime:
    """``dt`` with UTC assumed when it carries no zone (SQLite's timestamps)."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
