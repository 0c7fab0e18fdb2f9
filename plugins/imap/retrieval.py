"""The ``imap`` session's retrieval: headers and bodies, read without a change (IC-30).

Bodies come by pipelined ``UID FETCH uid (UID BODY.PEEK[])``; each body is kept in
memory up to the spool threshold, else written straight to a spool file
(:class:`_Sink`), so memory is bounded by the chunk size.

Contract: :class:`ImapRetrieval` is the retrieval half of
:class:`~mailpipe.plugins.imap.source.ImapSession` (a mixin, never used alone): it
retrieves messages the session's
:meth:`~mailpipe.plugins.imap.source.ImapSession.list` numbered (``_where``), yields
them in the order asked, a gone UID as :class:`~mailpipe.source.Unretrievable`, and leaves no
spool file behind for a message it did not yield.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailpipe.errors import OversizeError
from mailpipe.message import Message, MessageRef
from mailpipe.source import Unretrievable

from . import events as cmd
from .client import ImapClient
from .events import (
    Data,
    Done,
    Event,
    LiteralChunk,
    LiteralStart,
    fetch_items,
    parse_number,
)
from .folder import _Folder, _Where

#: The longest header section kept for header rules; longer ones are dropped and
#: the message is retrieved instead.
MAX_HEADER_OCTETS = 1 << 20


@dataclass(slots=True)
class _Sink:
    """One FETCH body: in memory up to the threshold, else straight to a spool file."""

    ref: MessageRef | None
    size: int
    spool_dir: Path
    threshold: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0
    path: Path | None = None
    file: Any = None

    def __post_init__(self) -> None:
        if self.size > self.threshold:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.spool_dir, prefix="imap-", suffix=".eml")
            self.path, self.file = Path(name), os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.file is not None:
            self.file.write(data)
        else:
            self.parts.append(data)

    def finish(self, ref: MessageRef) -> Message:
        meta = {"octets_listed": ref.size, "octets_received": self.received}
        if self.file is not None:
            self.file.close()
            self.file = None
            return Message(ref=ref, spool_path=self.path, meta=meta)
        return Message(ref=ref, data=b"".join(self.parts), meta=meta)

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()


class ImapRetrieval:
    """The retrieval of :class:`~mailpipe.plugins.imap.source.ImapSession`."""

    # The session's (see ImapSession.__init__).
    client: ImapClient
    _where: dict[int, _Where]
    _log: Any
    _select: Callable[[bytes], Awaitable[_Folder]]

    async def headers(self, ref: MessageRef) -> bytes | None:
        """``UID FETCH uid (BODY.PEEK[HEADER])``; None when refused or too long."""
        where = self._where[ref.number]
        await self._select(where.folder)
        parts: list[bytes] = []
        size = 0
        async for event in self.client.stream(
            [cmd.uid_fetch(str(where.uid), "UID BODY.PEEK[HEADER]")]
        ):
            if isinstance(event, LiteralChunk):
                size += len(event.data)
                if size <= MAX_HEADER_OCTETS:
                    parts.append(event.data)
            elif isinstance(event, Done) and not event.ok:
                return None
        if size > MAX_HEADER_OCTETS or not parts:
            return None
        return b"".join(parts)

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        """Pipelined ``UID FETCH uid (UID BODY.PEEK[])`` per ref, in order (IC-30).

        Bodies over ``spool_threshold`` go straight to a file; memory is bounded by
        the chunk size. A UID that is gone (expunged by another client, IT-16) is
        yielded as :class:`Unretrievable`. A literal larger than ``max_size`` raises
        :class:`mailpipe.OversizeError` before any of it is read.
        """
        index = 0
        while index < len(refs):
            folder = self._where[refs[index].number].folder
            batch = []
            while index < len(refs) and self._where[refs[index].number].folder == folder:
                batch.append(refs[index])
                index += 1
            await self._select(folder)
            async for item in self._fetch_batch(batch, spool_dir, spool_threshold, max_size):
                yield item

    async def _fetch_batch(
        self,
        refs: Sequence[MessageRef],
        spool_dir: Path,
        threshold: int,
        max_size: int | None,
    ) -> AsyncIterator[Message | Unretrievable]:
        by_uid = {self._where[r.number].uid: r for r in refs}
        commands = [cmd.uid_fetch(str(uid), "UID BODY.PEEK[]") for uid in by_uid]
        uid_of = {id(c): uid for c, uid in zip(commands, by_uid, strict=True)}
        sink: _Sink | None = None
        ready: dict[int, Message] = {}
        # Completions come in command order, so the oldest unanswered UID is the one
        # whose body is arriving (servers send no unsolicited BODY[]).
        waiting = list(by_uid)
        try:
            async for event in self.client.stream(commands):
                if isinstance(event, LiteralStart):
                    if event.section != "BODY[]":
                        sink = _Sink(None, 0, spool_dir, threshold)  # not ours: dropped
                        continue
                    if max_size is not None and event.size > max_size:
                        raise OversizeError(
                            f"{self.client.where}: message of {event.size} octets "
                            f"exceeds {max_size}",
                            number=event.number, limit=max_size, received=0,
                            ref=by_uid[waiting[0]] if waiting else None,
                        )
                    sink = _Sink(None, event.size, spool_dir, threshold)
                elif isinstance(event, LiteralChunk):
                    assert sink is not None
                    sink.write(event.data)
                elif isinstance(event, Data) and event.name == "FETCH" and sink is not None:
                    done_sink, sink = sink, None
                    fetched = _uid_of(event)
                    ref = by_uid.get(fetched) if fetched is not None else None
                    if fetched is None or ref is None or fetched in ready:
                        done_sink.discard()  # unsolicited or repeated (IT-05)
                        continue
                    ready[fetched] = done_sink.finish(ref)
                elif isinstance(event, Done):
                    uid = uid_of.get(id(event.command))
                    if uid is None:
                        continue
                    if uid in waiting:
                        waiting.remove(uid)
                    message = ready.pop(uid, None)
                    if message is not None:
                        yield message
                    else:
                        # IT-16: expunged by another client, or refused.
                        text = event.text[:200]
                        self._log.warning("imap_fetch_missing", uid=uid, text=text)
                        yield Unretrievable(
                            by_uid[uid], f"UID FETCH {uid} returned no body: {text}"
                        )
        finally:
            if sink is not None:
                sink.discard()
            for left in ready.values():
                if left.spool_path is not None:
                    with contextlib.suppress(OSError):
                        Path(left.spool_path).unlink()


def _uid_of(event: Event) -> int | None:
    if not isinstance(event, Data):
        return None
    try:
        value = fetch_items(event.values).get("UID")
        return parse_number(value) if value is not None else None
    except ValueError:
        return None
