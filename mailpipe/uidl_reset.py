"""Suspect a UIDL reset before mass ingestion in keep modes (conformance C-60).

A server that renames every uid (Dovecot ``pop3_uidl_format`` or UIDVALIDITY change, a
migration) makes kept mail look new: with ``delete = "never"`` or ``"after_days:N"``
all of it would be processed again. The evidence, checked once per poll before any
journal write:

- the maildrop is non-trivial (at least :data:`MIN_MESSAGES` listed) and more than
  half of its uids are unknown to the journal, and
- of the messages the journal believes still on the server (any status but DELETED),
  more than half, and at least :data:`MIN_MESSAGES`, are no longer listed, and
- more than half of the vanished messages reappear, by LIST size, among the unknown
  ones (renamed mail keeps its sizes). Without this, another client emptying a kept
  mailbox before new mail arrives would look the same, and adopting that new mail
  unprocessed (the advice for a reset) would lose it.

Delete mode (``after_processing``) is never checked: there listed mail is normally new.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from mailpipe.config import MailboxConfig
from mailpipe.errors import UidlResetSuspected
from mailpipe.message import MessageRef

MIN_MESSAGES = 10


class RetainedQuery(Protocol):
    """The one journal query the check needs (:meth:`Journal.retained`)."""

    def retained(self, mailbox: str) -> dict[str, int]:
        """Return uid → size of every entry not DELETED."""
        ...


@dataclass(frozen=True, slots=True)
class ResetEvidence:
    """Counts behind a suspected reset (no uids, no content)."""

    listed: int  # messages listed with a uid
    unseen: int  # ...of which the journal knows nothing
    retained: int  # journal entries believed on the server
    vanished: int  # ...of which are not listed any more
    same_size: int  # unseen messages whose LIST size matches a vanished entry's

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for the log event)."""
        return asdict(self)


def assess(
    refs: Sequence[MessageRef],
    known: Container[str],
    journal: RetainedQuery,
    mailbox: str,
) -> ResetEvidence | None:
    """Return the evidence when a reset is suspected, else None.

    ``known`` holds the listed uids the journal has an entry for (any status). The
    journal is queried only when the listing alone already looks suspicious.
    """
    listed = [ref for ref in refs if ref.uid]
    unseen = [ref for ref in listed if ref.uid not in known]
    if len(listed) < MIN_MESSAGES or 2 * len(unseen) <= len(listed):
        return None
    retained = journal.retained(mailbox)
    on_server = {ref.uid for ref in listed}
    vanished = [size for uid, size in retained.items() if uid not in on_server]
    if len(vanished) < MIN_MESSAGES or 2 * len(vanished) <= len(retained):
        return None
    # Renamed mail keeps its sizes; new mail after the kept mail was deleted elsewhere
    # almost never matches them.
    same = Counter(ref.size for ref in unseen) & Counter(vanished)
    if 2 * sum(same.values()) <= len(vanished):
        return None
    return ResetEvidence(
        listed=len(listed),
        unseen=len(unseen),
        retained=len(retained),
        vanished=len(vanished),
        same_size=sum(same.values()),
    )


def guard(
    mailbox: str,
    cfg: MailboxConfig,
    refs: Sequence[MessageRef],
    known: Container[str],
    journal: RetainedQuery,
    log: Any,
) -> None:
    """Apply ``cfg.on_uidl_reset`` in keep modes: raise or warn on a suspected reset.

    :raises UidlResetSuspected: with ``on_uidl_reset = "stop"`` (the default).
    """
    if cfg.delete == "after_processing":
        return
    evidence = assess(refs, known, journal, mailbox)
    if evidence is None:
        return
    if cfg.on_uidl_reset == "ingest":
        log.warning("uidl_reset_suspected", action="ingest", **evidence.as_dict())
        return
    log.error("uidl_reset_suspected", action="stop", **evidence.as_dict())
    e = evidence
    raise UidlResetSuspected(
        f"mailbox {mailbox!r}: UIDL reset suspected (C-60): {e.unseen} of {e.listed} "
        f"listed messages are new to the journal and {e.vanished} of the {e.retained} "
        f"it keeps are no longer listed ({e.same_size} of the new ones have the size "
        "of a vanished one); nothing was processed. If the server renamed its uids "
        "(uid format or UIDVALIDITY change, migration), run `mailpipe state mark-seen "
        f"CONFIG {mailbox}` to adopt the current mail without processing it; if the "
        f'mail is really new, set on_uidl_reset = "ingest" for this mailbox.'
    )
