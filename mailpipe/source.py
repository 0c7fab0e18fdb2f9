"""The source contract: how the engine talks to a mailbox, whatever the protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from mailpipe.message import Message, MessageRef


@dataclass(slots=True)
class Unretrievable:
    """A message the source could not deliver whole in this session.

    Yielded by :meth:`SourceSession.retrieve` in place of a message that the server
    refused (``-ERR`` to RETR) or that arrived incomplete (fewer octets than the
    listing promised, beyond line-end slack; a body cut short by a missing
    dot-stuffing). The engine never commits it and never acknowledges it: it counts
    an attempt, leaves the server copy alone and tries again in a later poll.

    ``evidence`` is what arrived (``None`` when nothing did); ``reason`` says what was
    wrong in one line, with the figures (listed and received octets, the server's
    text); ``after_headers`` is True when the same session had asked for this
    message's headers first (some servers then serve a short copy). ``confirmable``
    says the evidence may be the server's whole message under a wrong listed size:
    the engine commits it once the same octets arrived in an earlier session too.
    """

    ref: MessageRef
    reason: str
    evidence: Message | None = None
    after_headers: bool = False
    confirmable: bool = False


@runtime_checkable
class SourceSession(Protocol):
    """One session with a mailbox; deletions take effect only at :meth:`commit`.

    Contract (RFC 1939 §6 for POP3): ``mark_deleted`` only marks; ``commit`` makes the
    server delete what was marked (QUIT); ``abort`` closes without committing, so the
    server keeps everything. Any :class:`mailpipe.SourceError` leaves the session unusable;
    the engine then calls ``abort``.
    """

    #: False when the server offers no stable ids (no UIDL); uids are then content hashes.
    supports_uidl: bool

    async def list(self) -> list[MessageRef]:
        """Return every message in the mailbox with its uid and size (UIDL + LIST)."""
        ...

    async def headers(self, ref: MessageRef) -> bytes | None:
        """Return the header section of ``ref`` (POP3 ``TOP n 0``), or ``None`` when
        the server refused it or sent an incomplete header section: the engine then
        retrieves the whole message instead and decides on that."""
        ...

    def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        """Yield each message of ``refs`` in order, pipelined where the server allows.

        Bodies larger than ``spool_threshold`` octets go to a file under ``spool_dir``
        (memory bounded by the chunk size); smaller ones are held in memory. A message
        that cannot be delivered whole (refused, or received incomplete) is yielded
        as an :class:`Unretrievable` in its place, never as a ``Message``. A message
        that arrives larger than ``max_size`` octets (whatever its listed size) stops
        the transfer there and raises :class:`mailpipe.OversizeError` with its ref;
        the session is unusable afterwards. (Optional: the engine calls sources whose
        ``retrieve`` lacks ``max_size`` without it, see :mod:`mailpipe.oversize`.)
        """
        ...

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """Mark ``refs`` for deletion (POP3 DELE, pipelined); nothing is gone before commit."""
        ...

    async def commit(self) -> None:
        """End the session and let the server delete what was marked (POP3 QUIT).

        Raises :class:`mailpipe.CommitError` when the server does not confirm.
        """
        ...

    async def abort(self) -> None:
        """Close without committing: nothing marked is deleted. Never raises."""
        ...


@runtime_checkable
class Source(Protocol):
    """A kind of mailbox (``source = "pop3"``): a name, an ``Options`` model, sessions.

    Constructed as ``SourceClass(options, context)``; ``session()`` returns an async
    context manager that connects and authenticates on enter and aborts (never commits)
    on exit, so an exception can never delete anything.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def session(self) -> AbstractAsyncContextManager[SourceSession]:
        """Open one session with the mailbox."""
        ...
