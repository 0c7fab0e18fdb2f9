"""Listing cursors: how far a source may skip in its next listing (MP-05, IC-26).

A source that lists by an ever-growing position (IMAP: the UID within one
UIDVALIDITY) keeps one cursor per scope in the journal: the highest position W such
that every message the listings showed at or below W has a *finished* journal entry.
The next listing then starts after W (``UID FETCH W+1:*``) instead of listing the
whole folder again and filtering by journal.

Pure functions of data only; the ledger reads the entries and writes the result
(:meth:`mailpipe.ledger.Ledger.advance_cursors`).

Finished means nothing about the message can still need it to be listed:

- the status is COMMITTED, KEPT, QUARANTINED or DELETED (an outcome durable in the
  journal), and
- no acknowledgement is owed (``delete_due``): an owed acknowledgement is sent only
  to a message a listing shows, and one not listed would be taken as gone.

So a cursor never passes a message that is PENDING (being processed, failed and
retrying, unretrievable and resting, oversize and skipped) or absent from the journal
(deferred to a later commit window, a LOGIN-DELAY, ``max_messages``): the next
listing shows it again, and everything after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from mailpipe.journal.base import Entry, Status

if TYPE_CHECKING:
    from mailpipe.config import MailboxConfig
    from mailpipe.source import Coverage

#: The statuses of an outcome durable in the journal.
FINISHED = frozenset({Status.COMMITTED, Status.KEPT, Status.QUARANTINED, Status.DELETED})


def finished(entry: Entry | None) -> bool:
    """True when ``entry`` holds a durable outcome and owes no acknowledgement."""
    return entry is not None and entry.status in FINISHED and not entry.delete_due


def usable(cfg: MailboxConfig) -> bool:
    """Whether the mailbox may list from cursors: not with ``delete = "after_days:N"``,
    whose aged mail must be listed to be acknowledged."""
    return not cfg.delete.startswith("after_days:")


def advance(coverage: Mapping[str, Coverage], entries: Mapping[str, Entry]) -> dict[str, int]:
    """The new cursor of every scope in ``coverage``: its start, moved over the
    listed positions in order while their entries (``entries``, by uid) are
    finished; it stops at the first one that is not, and below every ``held``
    position (unfinished, on the server, left out by the criteria). A scope left at 0 (nothing to
    skip) is left out."""
    out: dict[str, int] = {}
    for scope, cover in coverage.items():
        position = cover.start
        cap = min(cover.held) if cover.held else None
        for listed in sorted(p for p in cover.listed if p > cover.start):
            if cap is not None and listed >= cap:
                break  # an unfinished message the listing left out (criteria)
            if not finished(entries.get(cover.listed[listed])):
                break
            position = listed
        if position > 0:
            out[scope] = position
    return out


def passed(coverage: Mapping[str, Coverage], advanced: Mapping[str, int]) -> list[str]:
    """The journal uids the ``advanced`` cursors move over (listed past a scope's
    start, up to its new cursor): the entries a compare-and-set
    (:meth:`mailpipe.journal.base.Journal.set_cursors`) checks are still finished."""
    out: set[str] = set()
    for scope, cover in coverage.items():
        top = advanced.get(scope, 0)
        out.update(uid for p, uid in cover.listed.items() if cover.start < p <= top)
    return sorted(out)
