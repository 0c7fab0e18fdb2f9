"""The size policy on the octets received: a message the server sends past its limit.

LIST sizes are hints (RFC 1939 §5, C-50): a server may list 100 octets and send 100 MB.
The engine therefore hands the mailbox's ``max_message_size`` to the source, which stops
the transfer at that many octets and raises :class:`mailpipe.OversizeError` (the session
is then aborted: nothing is committed or deleted). This module turns that error into a
durable decision, so the next session applies ``on_oversize`` without downloading the
message again:

* over ``max_message_size``: the journal entry stays PENDING with ``last_error``
  starting with :data:`OVERSIZE_MARK`; :func:`marked` makes the plan treat the message
  as oversize from then on (skip, delete unread, or quarantine: downloaded up to the
  ``max_message`` cap into the spool, never into memory);
* over the source's ``max_message`` cap (``hard``), or with no ``max_message_size``: the
  message can never be downloaded whole, so it is journaled KEPT (left on the server,
  never fetched again) or, under ``on_oversize = "delete"``, COMMITTED with its DELE due.

Messages without a uid (no UIDL) cannot be journaled before download; for them the
error ends the poll, as any source error does.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from mailpipe.errors import OversizeError
from mailpipe.journal.base import Entry
from mailpipe.message import Message, MessageRef
from mailpipe.source import Unretrievable

if TYPE_CHECKING:
    from mailpipe.config import MailboxConfig
    from mailpipe.ledger import Ledger

#: Prefix of ``last_error`` for a message that was sent past ``max_message_size``.
OVERSIZE_MARK: Final = "oversize:"

#: The limit recorded in a mark ("... more than N octets ...").
_MARKED_LIMIT: Final = re.compile(r"more than (\d+) octets")


def marked(entry: Entry | None, limit: int | None) -> bool:
    """True when ``entry`` records that its message was sent past a size limit that
    still holds: ``limit`` (the mailbox's ``max_message_size`` now) is set and not
    above the one recorded. A raised or removed limit lets the message be fetched
    again (review of issue 20 item 6)."""
    if entry is None or not entry.last_error.startswith(OVERSIZE_MARK) or limit is None:
        return False
    found = _MARKED_LIMIT.search(entry.last_error)
    return found is None or limit <= int(found.group(1))


def retrieve(
    session: Any,
    refs: Sequence[MessageRef],
    *,
    spool_dir: Path,
    spool_threshold: int,
    max_size: int | None,
) -> AsyncGenerator[Message | Unretrievable, None]:
    """Call ``session.retrieve``, passing ``max_size`` when the source accepts it.

    Whatever the source does with it, every message it yields is checked here too: one
    larger than ``max_size`` is discarded and raises :class:`mailpipe.OversizeError`.
    Sources written before ``max_size`` existed, or that accept it and ignore it,
    cannot stop a transfer early, but never get a message past the limit into a chain.
    """
    kwargs: dict[str, Any] = {"spool_dir": spool_dir, "spool_threshold": spool_threshold}
    if max_size is None:
        stream: AsyncGenerator[Message | Unretrievable, None] = session.retrieve(refs, **kwargs)
        return stream
    if _accepts_max_size(session.retrieve):
        kwargs["max_size"] = max_size
    return _checked(session.retrieve(refs, **kwargs), max_size)


async def _checked(
    stream: AsyncGenerator[Message | Unretrievable, None], max_size: int
) -> AsyncGenerator[Message | Unretrievable, None]:
    async with aclosing(stream):
        async for msg in stream:
            if not isinstance(msg, Unretrievable) and msg.size > max_size:
                if msg.spool_path is not None:
                    Path(msg.spool_path).unlink(missing_ok=True)
                raise OversizeError(
                    f"message {msg.ref.number} has {msg.size} octets, more than "
                    f"{max_size}",
                    number=msg.ref.number, limit=max_size, received=msg.size,
                    ref=msg.ref,
                )
            yield msg


def _accepts_max_size(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "max_size" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )




class OversizePolicy:
    """``on_oversize`` for one mailbox: applied to what the listing shows over
    ``max_message_size`` (:meth:`listed`) and to what a server sent past a limit
    (:meth:`received`). Every journal write goes through the poll's ledger.

    ``skipped`` remembers the messages skipped in this poll (counted once, whatever
    the commit window), ``unkeyed`` the ones without a uid that were sent past a
    limit (not fetched again by this process).
    """

    def __init__(self, cfg: MailboxConfig, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self.skipped: set[str] = set()
        self.unkeyed: set[str] = set()

    def new_poll(self) -> None:
        """Forget the skips counted in the previous poll."""
        self.skipped = set()

    async def listed(
        self,
        session: Any,
        refs: list[MessageRef],
        ledger: Ledger,
        *,
        spool_dir: Path,
        spool_threshold: int,
        identify: Callable[[Message], tuple[Message, Entry | None, bool]],
        attempted: set[str],
    ) -> None:
        """Apply ``on_oversize`` to ``refs`` (listed over ``max_message_size``)."""
        from mailpipe.journal.base import Status
        from mailpipe.planning import tried_key

        policy = self.cfg.on_oversize
        for ref in refs:
            seen = tried_key(ref)  # once per poll, any window
            if policy == "skip" and seen in self.skipped:
                continue
            self.log.info("message_oversize", uid=ref.uid, size=ref.size,
                          limit=self.cfg.max_message_size, action=policy)
            if policy == "skip":
                self.skipped.add(seen)
                ledger.summary.skipped += 1
            elif policy == "delete":
                ledger.oversize_deleted(ref)
        if policy != "quarantine" or not refs:
            return
        # Downloaded whole (spooled) to be quarantined: only the source's max_message
        # cap applies (an OversizeError then journals it as kept).
        async for item in session.retrieve(
            refs, spool_dir=spool_dir, spool_threshold=spool_threshold
        ):
            if isinstance(item, Unretrievable):
                # Never quarantined from a partial copy: an attempt, tried again in a
                # later poll (and rested like any other, see planning.resting).
                _unlink(item.evidence)
                attempted.add(tried_key(item.ref))
                ledger.unretrievable(item, None)
                continue
            msg = item
            try:
                if not msg.ref.uid:  # no UIDL: known by its content hash
                    msg, entry, settled = identify(msg)
                    if settled:  # quarantined before (kept, or its ack owed)
                        if entry is not None and (
                            entry.delete_due or entry.status == Status.DELETED
                        ):
                            ledger.owe_settled([msg.ref])
                        continue
                reason = f"oversize: {msg.ref.size} > {self.cfg.max_message_size}"
                ledger.oversize_quarantined(msg, reason)
            finally:
                _unlink(msg)

    def received(self, exc: OversizeError, ledger: Ledger) -> bool:
        """Journal a message the server sent past a size limit; False when it has no
        uid to journal it by and no ref to remember it by (the poll then fails)."""
        from mailpipe.planning import tried_key

        outcome = ledger.oversize_received(
            exc, policy=self.cfg.on_oversize,
            limited=self.cfg.max_message_size is not None,
        )
        ref = exc.ref
        self.log.warning(
            "message_oversize_received",
            uid=getattr(ref, "uid", None),
            listed=getattr(ref, "size", None),
            limit=exc.limit,
            received_at_least=exc.received,
            hard=exc.hard,
            outcome=outcome,
        )
        if outcome is None and ref is not None:
            # No uid to journal it by: this process does not fetch it again (by
            # number and size; a clash only defers a message to a later run).
            self.unkeyed.add(tried_key(ref))
            ledger.summary.skipped += 1
            return True
        return outcome is not None


def _unlink(msg: Message | None) -> None:
    if msg is not None and msg.spool_path is not None:
        Path(msg.spool_path).unlink(missing_ok=True)


__all__ = ["OVERSIZE_MARK", "OversizePolicy", "marked", "retrieve"]
