"""The ``pop3`` session's retrieval: RETR flights, and only whole messages yielded.

The RETRs go out as a :class:`.flight.Flight` drains (P-14); each body is kept in
memory up to the spool threshold, else written to a spool file as it arrives
(:class:`_Sink`), so memory is bounded by the chunk size. A body is yielded only once
the next reply's status line parsed, and only when it is not shorter than its LIST
size allows (:mod:`.completeness`, MP-01); otherwise it is an
:class:`~mailpipe.source.Unretrievable`.

Contract: :class:`Pop3Retrieval` is the retrieval half of
:class:`~mailpipe.plugins.pop3.source.Pop3Session` (a mixin, never used alone): it
yields the messages of the refs asked in order, a refused or incomplete one as an
:class:`~mailpipe.source.Unretrievable`; the DELEs the session queued lead its flight
and those acknowledged while it runs join it (the session's ``_deleted`` notes their
replies); a stream its consumer left early is handed to the session (``_unread``) to
be read to its end before the next command; and it leaves no spool file behind for a
message it did not yield.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mailpipe.errors import OversizeError, SourceError
from mailpipe.message import Message, MessageRef
from mailpipe.source import Unretrievable

from .client import Pop3Client
from .completeness import END_SLACK, shortfall
from .events import BodyChunk, BodyEnd, BodyStart, Dele, Err, Event, Retr
from .flight import Flight
from .options import Pop3Options
from .protocol import RemoteProtocolError


class Pop3Retrieval:
    """The retrieval of :class:`~mailpipe.plugins.pop3.source.Pop3Session`."""

    # The session's (see Pop3Session.__init__ and the acknowledgement half).
    options: Pop3Options
    client: Pop3Client
    _queued: list[Dele]
    _flight: Flight | None
    _unread: AsyncIterator[Event] | None
    _topped: set[int]
    _log: Any
    _read_unread: Callable[[], Coroutine[Any, Any, None]]
    _deleted: Callable[[Event], None]

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        """RETR each ref (pipelined window) and yield complete messages in order.

        Bodies over ``spool_threshold`` go to a file in ``spool_dir`` as they arrive, so
        memory is bounded by the chunk size. A ``-ERR`` (T-25), or a body received
        shorter than its LIST size allows (MP-01, see :mod:`.completeness`), is yielded
        as an :class:`~mailpipe.source.Unretrievable`, never as a message. A body
        passing ``max_size`` (or the ``max_message`` cap) raises
        :class:`mailpipe.OversizeError` naming its ref, with the connection closed.

        P-14: the RETRs go out as the window drains (:class:`.flight.Flight`), so
        ``refs`` may be a whole commit window: replies wait in the transport (TCP flow
        control) while the consumer is busy, never in memory. DELEs acknowledged while
        the stream runs join it. A consumer that stops early ends the RETRs not yet
        sent; what is in flight is read (and dropped) before the next command.
        """
        # A stream left early is read first; the queued DELEs are not sent on their
        # own here: they lead this flight (P-13).
        await self._read_unread()
        by_number = {ref.number: ref for ref in refs}
        sink: _Sink | None = None
        # MP-01: a body is yielded only once the next reply's status line has parsed
        # (the next RETR's, a DELE's, or the closing NOOP's): a server that failed to
        # dot-stuff a lone "." line ends the body early and sends the rest as stray
        # data, which then fails to parse as a reply, so the cut body is never
        # delivered.
        held: Message | Unretrievable | None = None
        limits = None if max_size is None else dict.fromkeys(by_number, max_size)
        # P-13: the DELEs queued since the last flight lead this one.
        queued, self._queued = self._queued, []
        flight = Flight(queued, refs)
        stream = self.client.stream(
            flight,
            sizes={ref.number: ref.size for ref in refs},  # T-45 deadlines
            limits=limits,
        )
        self._flight = flight
        ended = False
        try:
            async for event in stream:
                if isinstance(event, BodyChunk):
                    assert sink is not None
                    sink.write(event.data)
                    continue
                if held is not None:  # a reply's status line parsed: its end is sound
                    out, held = held, None
                    yield out
                if isinstance(getattr(event, "command", None), Dele):
                    self._deleted(event)
                elif isinstance(event, BodyStart):
                    ref = by_number[event.command.number]  # type: ignore[attr-defined]
                    sink = _Sink(ref, spool_dir, spool_threshold)
                elif isinstance(event, BodyEnd):
                    assert sink is not None
                    done, sink = sink, None
                    flight.answered(done.ref)
                    held = await self._finished(done)
                elif isinstance(event, Err) and isinstance(event.command, Retr):
                    number = event.command.number
                    text = event.text[:200]
                    self._log.warning("pop3_retr_refused", number=number, text=text)
                    if number in by_number:
                        flight.answered(by_number[number])
                        yield Unretrievable(
                            by_number[number], f"RETR {number} refused: {text}"
                        )
            ended = True
        except RemoteProtocolError as exc:
            if held is not None:
                out, held = held, None
                yield self._unsound(out, exc) if isinstance(out, Message) else out
            raise
        except OversizeError as exc:
            exc.ref = by_number.get(exc.number)
            raise
        except SourceError:
            # A dropped connection or a timeout after a body's terminator: that body
            # ended with its ".", so it is delivered before the error goes on.
            if held is not None:
                out, held = held, None
                yield out
            raise
        finally:
            self._flight = None
            if not ended:
                # P-14: left early (a stop request, or an error before an abort): no
                # further RETR; the DELEs the flight holds still go, and what is in
                # flight is read to its end before the next command (see _settle).
                flight.stop()
                self._unread = stream
            if sink is not None:
                sink.discard()
            if held is not None:  # never delivered (the consumer stopped early)
                _discard(held)

    def _unsound(self, message: Message, exc: RemoteProtocolError) -> Unretrievable:
        """The message whose body was followed by data that is no reply (MP-01)."""
        ref = message.ref
        self._log.error(
            "pop3_message_unsound", uid=ref.uid, number=ref.number, error=str(exc)[:200]
        )
        return Unretrievable(
            ref,
            f"RETR {ref.number} was followed by data that is not a reply, so where "
            f"the message ends cannot be trusted (a server that does not dot-stuff?): "
            f"{str(exc)[:160]}",
            evidence=message,
            after_headers=False,
        )

    async def _finished(self, sink: _Sink) -> Message | Unretrievable:
        """The message a finished body makes, or an Unretrievable when it is short.

        A spooled body that may be short is read back on a worker thread (MP-01):
        the event loop is not held for the whole file at once."""
        message = sink.finish()
        ref, octets = message.ref, sink.octets
        if octets != ref.size:
            # C-50 / T-21: LIST sizes are hints, never framing.
            self._log.info(
                "pop3_size_mismatch", uid=ref.uid, listed=ref.size, received=octets
            )
        if self.options.verify_size == "off":
            return message
        try:
            if message.spool_path is None or octets + END_SLACK >= ref.size:
                missing = shortfall(octets, ref.size, message.open)
            else:
                missing = await asyncio.to_thread(
                    shortfall, octets, ref.size, message.open
                )
        except BaseException:
            # Read back from its spool file, a body may meet an error (EMFILE, EIO)
            # or a cancellation: it goes on, and the spool file with the raw mail in
            # it goes (MP-01).
            _discard(message)
            raise
        if not missing:
            return message
        # MP-01: a copy shorter than any way of counting its LIST size is cut short
        # (a missing dot-stuffing, a header-only RETR after TOP): never committed.
        after_top = ref.number in self._topped
        reason = (
            f"RETR {ref.number} incomplete: received {octets} octets, LIST "
            f"said {ref.size} ({missing} missing beyond line-end slack)"
            + (" after TOP in the same session" if after_top else "")
        )
        self._log.error(
            "pop3_message_incomplete",
            uid=ref.uid,
            listed=ref.size,
            received=octets,
            after_top=after_top,
        )
        return Unretrievable(
            ref,
            reason,
            evidence=message,
            after_headers=after_top,
            confirmable=self.options.verify_size == "confirm" and not after_top,
        )


def _discard(item: Message | Unretrievable) -> None:
    """Remove the spool file of a message (or of an Unretrievable's evidence)."""
    message = item.evidence if isinstance(item, Unretrievable) else item
    if message is not None and message.spool_path is not None:
        with contextlib.suppress(OSError):
            Path(message.spool_path).unlink()


class _Sink:
    """Collects one body in memory, spilling to a spool file past the threshold."""

    def __init__(self, ref: MessageRef, spool_dir: Path, threshold: int) -> None:
        self.ref = ref
        self.spool_dir = spool_dir
        self.threshold = threshold
        self.parts: list[bytes] = []
        self.octets = 0  # lines are counted only if the size cannot tell (MP-01)
        self.path: Path | None = None
        self.file: Any = None
        if ref.size > threshold:
            self._spill()

    def _spill(self) -> None:
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # raw mail
        fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="pop3-", suffix=".eml")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        for part in self.parts:
            self.file.write(part)
        self.parts = []

    def write(self, data: bytes) -> None:
        self.octets += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.parts.append(data)
        if self.octets > self.threshold:
            self._spill()

    def finish(self) -> Message:
        meta = {"octets_listed": self.ref.size, "octets_received": self.octets}
        if self.file is not None:
            self.file.close()
            self.file = None
            return Message(ref=self.ref, spool_path=self.path, meta=meta)
        return Message(ref=self.ref, data=b"".join(self.parts), meta=meta)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

