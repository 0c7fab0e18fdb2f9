"""The ``pop3`` session's acknowledgement: DELE, then QUIT as the commit (MP-04).

``delete`` is a DELE, ``keep`` is nothing. While a retrieval runs, the DELEs join its
flight (P-14); otherwise, with pipelining, they are queued and go out with the
session's next commands (P-13), and without it they are sent at once. Nothing is
removed before QUIT (RFC 1939 §6), which :meth:`Pop3Acknowledgement.commit` sends only
once every reply arrived (P-09). ``abort`` closes the connection without QUIT: the
queued DELEs are dropped unsent and the server keeps everything.

Contract: :class:`Pop3Acknowledgement` is the acknowledgement half of
:class:`~mailpipe.plugins.pop3.source.Pop3Session` (a mixin, never used alone): a
message number is sent one DELE per session unless it was refused (C-54); before a
command of the session's own (a listing, TOP, DELEs sent now, QUIT) ``_settle`` reads
a stream left early to its end and sends the queued DELEs;
:meth:`Pop3Acknowledgement.commit` raises :class:`mailpipe.CommitError` when QUIT is
not confirmed (C-57); :meth:`Pop3Acknowledgement.abort` never raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from mailpipe.message import MessageRef
from mailpipe.source import Ack, AckKind

from .client import Pop3Client
from .events import Dele, Err, Event
from .flight import Flight


class Pop3Acknowledgement:
    """The acknowledgement of :class:`~mailpipe.plugins.pop3.source.Pop3Session`."""

    # The session's (see Pop3Session.__init__).
    client: Pop3Client
    _committed: bool
    _marked: set[int]
    _asked: set[int]
    _queued: list[Dele]
    _flight: Flight | None
    _unread: AsyncIterator[Event] | None
    _log: Any

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        """``delete``: DELE; ``keep``: nothing (MP-04).

        While a :meth:`~mailpipe.plugins.pop3.source.Pop3Session.retrieve` stream
        runs, the DELEs join its flight (P-14). Else, with pipelining, they are queued
        and go out with the session's next commands (P-13): the next flight of RETRs,
        the next listing or TOP, or just before QUIT;
        an abort drops them unsent (nothing deleted, the journal still owes them).
        Without pipelining they are sent now (:meth:`mark_deleted`).
        """
        if ack.kind is AckKind.DELETE:
            todo = self._unasked(refs)
            if self._flight is not None:
                self._flight.add(todo)
            elif self.client.pipelining_active:
                self._queued.extend(todo)
            else:
                await self._settle()
                await self._send(todo)
        elif ack.kind is not AckKind.KEEP:
            raise ValueError(f"POP3 cannot acknowledge with {ack}")

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        """DELE each ref now (pipelined); nothing is removed before QUIT (RFC 1939 §6)."""
        await self._settle()
        await self._send(self._unasked(refs))

    def _unasked(self, refs: Sequence[MessageRef]) -> Sequence[Dele]:
        """The DELEs of ``refs`` neither marked nor queued nor awaiting a reply (C-54:
        never DELE a marked number again, so a refusal is never "already deleted")."""
        todo: list[Dele] = []
        for ref in refs:
            if ref.number not in self._asked:
                self._asked.add(ref.number)
                todo.append(Dele(number=ref.number))
        return todo

    async def _send(self, deles: Sequence[Dele]) -> None:
        if deles:
            async for event in self.client.stream(deles):
                self._deleted(event)

    async def _settle(self) -> None:
        """Before a command of its own: read a stream left early to its end (P-14: the
        DELEs of its flight included; the rest is dropped, nothing is delivered), then
        send the queued DELEs (P-13)."""
        await self._read_unread()
        queued, self._queued = self._queued, []
        await self._send(queued)

    async def _read_unread(self) -> None:
        """Read a stream left early to its end (P-14): the DELEs of its flight are
        noted, the rest is dropped, nothing is delivered."""
        unread, self._unread = self._unread, None
        if unread is not None:
            async for event in unread:
                if isinstance(getattr(event, "command", None), Dele):
                    self._deleted(event)

    def _deleted(self, event: Event) -> None:
        """Note a DELE reply: marked, or refused (T-25)."""
        number = getattr(getattr(event, "command", None), "number", None)
        if isinstance(event, Err):
            # T-25: the message vanished; the journal retries the DELE next time.
            self._log.warning("pop3_dele_refused", number=number, text=event.text[:200])
            self._asked.discard(number)  # may be asked again
        elif isinstance(number, int):
            self._marked.add(number)

    async def commit(self) -> None:
        """QUIT once every reply arrived (P-09, P-14); raises
        :class:`mailpipe.CommitError` when not confirmed (C-57)."""
        await self._settle()
        self._committed = True
        await self.client.quit()
        self._log.info("pop3_committed", deleted=len(self._marked))

    async def abort(self) -> None:
        """Close without QUIT; never raises."""
        try:
            await self.client.abort()
        except Exception as exc:  # the contract: never raises
            self._log.debug("pop3_abort_failed", error=type(exc).__name__)
