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
  (``owe`` when its acknowledgement is still owed).

Pure but for one journal read (the content-hash lookup); writes are the ledger's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mailpipe.journal.base import Entry, Status
from mailpipe.message import Message, MessageRef

if TYPE_CHECKING:
    from mailpipe.journal.base import Journal


@dataclass(slots=True)
class Resolution:
    """What :func:`resolve` decided for one retrieved message.

    ``run``: run its chain (with ``entry``, possibly None: new). ``owe``: settled, its
    acknowledgement owed. ``readopt``: the settled entry whose outcome ``msg.ref``
    takes (a recount). ``reused``: the original ref whose id another message reused
    (the ledger re-adopts it once this message is settled).
    """

    msg: Message
    entry: Entry | None = None
    run: bool = False
    owe: bool = False
    readopt: Entry | None = None
    reused: MessageRef | None = None


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
    msg: Message, known: Entry | None, journal: Journal, mailbox: str, log: Any
) -> Resolution:
    """Decide what a retrieved message is (see the module docstring). ``known`` is
    the journal's entry under the message's id (None: new, or no id)."""
    reused: MessageRef | None = None
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
