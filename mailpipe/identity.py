"""Message identity: which journal entry a retrieved message belongs to.

A source's id (POP3 UIDL) is the first evidence, the content hash the second
(anchors §3.14: servers reuse ids, or have none). :func:`resolve` compares what was
retrieved with what the journal holds under its id and says what happens to it:

- the same message, listed with another size (a recount): its entry takes the new
  size (``readopt``), nothing runs;
- a message deleted before and listed again, same content: its acknowledgement is
  owed again (``owe``), nothing runs;
- another message under an id the journal already used: it is keyed by its content
  hash instead (``sha256:<hex>``, as without stable ids), and the id is re-adopted
  for it (``reused``) once it is settled;
- a message without an id whose content hash the journal knows settled: nothing runs
  (``owe`` when its acknowledgement is still owed);
- a message under a new id of a new epoch (IC-25: an IMAP folder recreated with a new
  UIDVALIDITY) whose content hash a settled entry of a superseded id holds: that
  outcome is adopted under the new id (``adopt``), nothing runs.

Pure but for journal reads (the content-hash lookup, the superseded entries); writes
are the ledger's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from mailpipe.journal.base import Entry, Status
from mailpipe.message import Message, MessageRef

if TYPE_CHECKING:
    from mailpipe.journal.base import Journal
    from mailpipe.source import EpochSession

#: The most journal entries of one mailbox read when an epoch may have changed.
EPOCH_SCAN_LIMIT: Final = 1_000_000


@dataclass(slots=True)
class Resolution:
    """What :func:`resolve` decided for one retrieved message.

    ``run``: run its chain (with ``entry``, possibly None: new). ``owe``: settled, its
    acknowledgement owed. ``readopt``: the settled entry whose outcome ``msg.ref``
    takes (a recount). ``reused``: the original ref whose id another message reused
    (the ledger re-adopts it once this message is settled). ``adopt``: the settled
    entry of a superseded epoch whose outcome the message takes (IC-25).
    """

    msg: Message
    entry: Entry | None = None
    run: bool = False
    owe: bool = False
    readopt: Entry | None = None
    reused: MessageRef | None = None
    adopt: Entry | None = None


def superseded_by_hash(
    journal: Journal, mailbox: str, listed: Collection[str], session: EpochSession
) -> dict[str, Entry]:
    """The settled entries whose ids an epoch change superseded, by content hash.

    Reads the mailbox's entries the listing did not show and keeps those the session
    says another epoch replaced (IC-25). Empty when the session saw no possible change.
    """
    if not session.epoch_changed:
        return {}
    unlisted = {
        e.uid: e
        for e in journal.list(mailbox, limit=EPOCH_SCAN_LIMIT)
        if e.uid not in listed and e.status != Status.PENDING and e.sha256
    }
    if not unlisted:
        return {}
    found: dict[str, Entry] = {}
    for uid in session.superseded(sorted(unlisted)):
        entry = unlisted.get(uid)
        if entry is not None and entry.sha256:
            found[entry.sha256] = entry
    return found


def by_hash(journal: Journal, mailbox: str, msg: Message) -> tuple[Message, Entry | None, bool]:
    """Key ``msg`` by its content hash (``sha256:<hex>``); return it, its journal
    entry, and True when that entry is settled."""
    msg.ref = MessageRef(
        mailbox=msg.ref.mailbox or mailbox,
        number=msg.ref.number,
        uid=f"sha256:{msg.sha256}",
        size=msg.ref.size,
    )
    entry = journal.get_many(mailbox, [msg.ref.uid]).get(msg.ref.uid)
    return msg, entry, entry is not None and entry.status != Status.PENDING


def resolve(
    msg: Message, known: Entry | None, journal: Journal, mailbox: str, log: Any,
    superseded: Mapping[str, Entry] | None = None,
) -> Resolution:
    """Decide what a retrieved message is (see the module docstring). ``known`` is
    the journal's entry under the message's id (None: new, or no id); ``superseded``
    is :func:`superseded_by_hash`'s answer for this poll."""
    reused: MessageRef | None = None
    pending = known is None or known.status == Status.PENDING
    if pending and msg.ref.uid and superseded:
        earlier = superseded.get(msg.sha256)
        if earlier is not None:
            return Resolution(msg, earlier, adopt=earlier)
    if known is not None and known.status not in (Status.PENDING, Status.DELETED):
        # Fetched again because the listing gives a settled id another size.
        if known.sha256 == msg.sha256:
            return Resolution(msg, known, readopt=known)
        log.error("uidl_reused", uid=msg.ref.uid, number=msg.ref.number)
        reused = msg.ref
        msg.ref = replace(msg.ref, uid="")  # a different message: by content hash
    if known is not None and known.status == Status.DELETED:
        if known.sha256 == msg.sha256:
            log.warning("deleted_message_reappeared", uid=msg.ref.uid)
            return Resolution(msg, known, owe=True)
        # Another message under an id already used: never acknowledge it unprocessed.
        log.error("uidl_reused", uid=msg.ref.uid, number=msg.ref.number)
        msg.ref = replace(msg.ref, uid="")
    if msg.ref.uid:
        return Resolution(msg, known, run=True)
    msg, entry, settled = by_hash(journal, mailbox, msg)
    if settled:
        assert entry is not None
        due = entry.delete_due or entry.status == Status.DELETED
        return Resolution(msg, entry, owe=due, readopt=None, reused=reused)
    return Resolution(msg, entry, run=True, reused=reused)
