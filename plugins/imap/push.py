"""Push for the ``imap`` source: a pool of connections watching every folder.

Issue 14 point 8; IDLE as IC-43, polling without it as IC-44.

:meth:`PushPool.wait` returns True as soon as any configured folder has mail the last
listing did not see, False after ``timeout``. Contract (:class:`mailpipe.source.PushSource`):

- The first ``idle_connections`` folders each have a connection of their own that
  ``EXAMINE``\\ s the folder (read-only: watching never changes it) and IDLEs (IC-43);
  IDLE is ended with ``DONE`` and issued again every ``idle_renew`` seconds (RFC 2177
  §3: before the server's 29-minute inactivity timer, IC-43).
- The other folders, and every folder when the server does not list IDLE, are polled on
  one shared connection with ``STATUS folder (UIDNEXT)`` every ``status_interval``
  seconds (IC-44; it never selects, so STATUS is never sent for a selected mailbox).
- New mail means ``UIDNEXT`` beyond what the last listing saw (``listed_uidnext``) or an
  ``EXISTS``/``RECENT`` during IDLE: mail that arrived between the listing and the wait
  wakes it at once, and a reconnect never loses a wake-up (the comparison is absolute).
- When the wait ends (one folder woke it, the deadline came, or the wait itself was
  cancelled) the other watchers are asked to stop: each ends IDLE cleanly (``DONE``,
  tagged OK) and its connection stays open for the next wait (no new login). Only a
  watcher still busy after :data:`STOP_GRACE` seconds is cancelled and its connection
  aborted, so a cancelled wait may take up to :data:`STOP_GRACE` seconds to return.
  :meth:`PushPool.close` ends any running wait the same way and sends LOGOUT on every
  connection (each bounded at 10 s, all at once); the scheduler closes all sources at
  once within a bound (:func:`mailpipe.scheduler.close_sources`).
- A folder whose STATUS the server refuses (NO: deleted, not readable) gives no
  information this round; the other folders are still checked, the refusal is logged
  once (IC-44).
- Connection budget: one mailbox holds up to ``idle_connections`` IDLE connections
  (at most :data:`MAX_IDLE_CONNECTIONS`), one shared STATUS connection when some
  folders are polled, and its poll's own session. The budget is per mailbox only:
  two mailboxes on the same account (or workers on the same address) add up and may
  exceed the server's per-user limit (Dovecot: ``mail_max_userip_connections``,
  10 by default), which then refuses a LOGIN; lower ``idle_connections`` for them.
  The scheduler closes the pool when the mailbox's lease is held by, or lost to,
  another worker (noticed by a poll attempt). Limit: a lease covers a poll, not the
  wait between polls (it is released after each poll), so workers that take turns
  polling one mailbox may each keep a pool open for it.
- A connection lost while watching makes the wait return True (the next poll reports
  the error). A connection that cannot be (re)opened waits an exponential back-off
  (:data:`RECONNECT_INITIAL` doubling to :data:`RECONNECT_MAX`), never a tight loop; a
  pooled connection found dead at the start of a wait (the server timed it out between
  waits) is reopened once at once, without waking anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

import structlog

from mailpipe.errors import SourceError

from . import events as cmd
from .client import CommandFailed
from .events import Data, Status, status_items

if TYPE_CHECKING:
    from .source import ImapSession

log = structlog.get_logger()

#: IC-44: most IDLE connections per mailbox. With the poll's own session and the shared
#: STATUS connection one mailbox stays within Dovecot's default of 10 connections per
#: user and address (mail_max_userip_connections). The budget is per mailbox: two
#: mailboxes on one account add up (see the module docstring; lower idle_connections).
MAX_IDLE_CONNECTIONS: Final = 8
#: IC-43: the default IDLE renewal, well before RFC 2177's 29 minutes.
IDLE_RENEW: Final = 25 * 60.0
#: IC-44: the default interval of STATUS polling (folders without an IDLE connection).
STATUS_INTERVAL: Final = 60.0
#: Back-off before reopening a connection that failed: doubled per failure, capped.
RECONNECT_INITIAL: Final = 1.0
RECONNECT_MAX: Final = 300.0
#: Seconds the other watchers get to end IDLE cleanly once one has woken the wait;
#: those still busy after it are cancelled (their connections aborted).
STOP_GRACE: Final = 10.0


class _Dropped(Exception):
    """A pooled connection failed while watching (the wait then returns True)."""


class _Link:
    """One pooled connection: opened on demand, reopened after a back-off."""

    def __init__(self, opener: Callable[[], ImapSession], name: str) -> None:
        self._opener = opener
        self.name = name
        self.session: ImapSession | None = None
        self.failures = 0
        self.retry_at = 0.0
        #: True once the session served a wait (by the next one it may have gone stale).
        self.reused = False

    async def get(self, deadline: float, stop: asyncio.Event) -> ImapSession | None:
        """The open session, (re)opening it after any back-off; None when the deadline
        came or ``stop`` was set first."""
        loop = asyncio.get_running_loop()
        for _ in range(64):  # bounded: each failed open doubles the back-off
            if self.session is not None:
                return self.session
            await _sleep(stop, min(self.retry_at, deadline) - loop.time())
            if stop.is_set() or loop.time() >= deadline:
                return None
            session = self._opener()
            try:
                await session.open()
            except (SourceError, OSError) as exc:
                await session.abort()
                self.session = None
                await self.failed(exc)
                continue
            except BaseException:  # cancelled while opening: no socket left behind
                await session.abort()
                raise
            self.session, self.reused = session, False
        return None

    async def failed(self, exc: BaseException, *, stale: bool = False) -> None:
        """Close and forget the session; back off unless it went ``stale`` between
        waits (then it is reopened at once, once)."""
        await self.drop()
        if stale:
            self.retry_at = 0.0
            log.info("imap_push_reconnect", link=self.name, error=str(exc)[:200])
            return
        self.failures += 1
        delay = min(RECONNECT_MAX, RECONNECT_INITIAL * 2 ** (self.failures - 1))
        self.retry_at = asyncio.get_running_loop().time() + delay
        log.warning(
            "imap_push_connection_failed", link=self.name, error=str(exc)[:200],
            failures=self.failures, retry_in=delay,
        )

    async def drop(self) -> None:
        """Abort the session (its state is unknown) without LOGOUT; never raises."""
        session, self.session = self.session, None
        if session is not None:
            await session.abort()

    def healthy(self) -> None:
        """The connection did its work: the next failure starts the back-off anew."""
        self.failures = 0

    async def close(self) -> None:
        """LOGOUT (bounded) and close; never raises."""
        session, self.session = self.session, None
        if session is not None:
            try:
                await session.client.logout()
            except Exception as exc:  # close must never raise
                log.debug("imap_push_logout_failed", error=type(exc).__name__)
            await session.abort()


class PushPool:
    """The connections of one mailbox's push (see the module docstring)."""

    def __init__(
        self,
        opener: Callable[[], ImapSession],
        folders: Sequence[bytes],
        listed_uidnext: dict[bytes, int],
        *,
        idle_connections: int,
        idle_renew: float = IDLE_RENEW,
        status_interval: float = STATUS_INTERVAL,
        mailbox: str = "",
    ) -> None:
        self.folders = list(folders)
        self.listed_uidnext = listed_uidnext
        self.idle_connections = min(idle_connections, len(self.folders))
        self.idle_renew = idle_renew
        self.status_interval = status_interval
        self._log = log.bind(mailbox=mailbox)
        self._idle_links = [
            _Link(opener, f"idle:{_show(w)}") for w in self.folders[:self.idle_connections]
        ]
        self._status_link = _Link(opener, "status")
        #: None until a connection told whether the server has IDLE.
        self.server_idle: bool | None = None
        #: UIDNEXT first seen for a folder no listing has covered yet (the baseline).
        self._first_seen: dict[bytes, int] = {}
        self._running: set[asyncio.Task[bool]] = set()
        self._stops: set[asyncio.Event] = set()
        #: Folders whose STATUS the server refused (NO): logged once until it answers.
        self._status_refused: set[bytes] = set()

    # --- the wait -------------------------------------------------------------------

    async def wait(self, timeout: float) -> bool:
        """True as soon as any folder has new mail, False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stop = asyncio.Event()
        self._stops.add(stop)
        try:
            return await self._wait(deadline, stop)
        finally:
            self._stops.discard(stop)

    async def _wait(self, deadline: float, stop: asyncio.Event) -> bool:
        if self.server_idle is None and not await self._probe(deadline, stop):
            return False
        watched = self._idle_links if self.server_idle else []
        polled = self.folders[len(watched):]
        tasks = [
            asyncio.ensure_future(self._watch(link, wire, deadline, stop))
            for link, wire in zip(watched, self.folders, strict=False)
        ]
        if polled:
            tasks.append(asyncio.ensure_future(self._poll(polled, deadline, stop)))
        self._running.update(tasks)
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED
                )
                if any(not t.cancelled() and t.exception() is None and t.result()
                       for t in done):
                    return True
            return False
        finally:
            stop.set()
            await self._settle(tasks)

    async def _settle(self, tasks: list[asyncio.Task[bool]]) -> None:
        """Let the watchers end cleanly (DONE) for :data:`STOP_GRACE` seconds, then
        cancel the rest; every task is awaited (none outlives the wait)."""
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_GRACE)
        finally:
            for task in tasks:
                task.cancel()  # no-op for the finished ones
            await asyncio.gather(*tasks, return_exceptions=True)
            self._running.difference_update(tasks)
        for task in tasks:
            exc = None if task.cancelled() else task.exception()
            if exc is not None:  # a bug: the watchers catch every connection error
                self._log.warning(
                    "imap_push_watch_failed", error=f"{type(exc).__name__}: {exc}"[:200]
                )

    async def _probe(self, deadline: float, stop: asyncio.Event) -> bool:
        """Open the first connection to learn whether the server lists IDLE; without
        it that connection becomes the shared STATUS one. False when it cannot open."""
        link = self._idle_links[0] if self._idle_links else self._status_link
        session = await link.get(deadline, stop)
        if session is None:
            return False
        self.server_idle = "IDLE" in session.client.capabilities
        if not self.server_idle and link is not self._status_link:
            # IC-44: no IDLE: every folder is polled with STATUS on this connection.
            self._status_link.session, link.session = link.session, None
            self._log.info("imap_push_without_idle", folders=len(self.folders))
        return True

    # --- one IDLE connection ------------------------------------------------------------

    async def _watch(
        self, link: _Link, wire: bytes, deadline: float, stop: asyncio.Event
    ) -> bool:
        """IDLE on ``wire`` until new mail (True), the deadline or ``stop`` (False); a
        connection lost while watching is True (IC-43, IC-44)."""
        loop = asyncio.get_running_loop()
        for _ in range(1000):  # bounded: each round opens, renews or backs off
            session = await link.get(deadline, stop)
            if session is None:
                return False
            client, stale = session.client, link.reused
            try:
                try:
                    uidnext = await self._examine(session, wire)
                except CommandFailed:
                    raise
                except (SourceError, OSError) as exc:
                    if stale:
                        await link.failed(exc, stale=True)
                        continue
                    raise _Dropped(str(exc)) from exc
                link.reused = True
                if self._is_new(wire, uidnext):
                    return True
                while not stop.is_set():
                    left = deadline - loop.time()
                    if left <= 0:
                        return False
                    ask = min(left, self.idle_renew)
                    started = loop.time()
                    if await client.idle(ask, stop):
                        link.healthy()
                        return True
                    link.healthy()
                    if not stop.is_set() and loop.time() - started < ask * 0.9:
                        # The server ended (or refused) IDLE before its time: look
                        # again after status_interval, never IDLE in a tight loop.
                        await _sleep(stop, min(self.status_interval, deadline - loop.time()))
                        break
                else:
                    return False
            except CommandFailed as exc:  # EXAMINE refused: the folder is gone?
                await link.failed(exc)
            except (_Dropped, SourceError, OSError) as exc:
                await link.failed(exc)
                return True  # the next poll reconnects and reports the error
            except asyncio.CancelledError:
                await link.drop()  # cancelled mid-command: the state is unknown
                raise
        return False

    async def _examine(self, session: ImapSession, wire: bytes) -> int | None:
        """EXAMINE ``wire`` (read-only: watching never changes the folder); its UIDNEXT."""
        events, _ = await session.client.command(cmd.select(wire, readonly=True))
        for event in events:
            if (
                isinstance(event, Status) and event.code is not None
                and event.code.name == "UIDNEXT"
            ):
                return event.code.number()
        return None

    # --- the shared STATUS connection ---------------------------------------------------

    async def _poll(
        self, folders: list[bytes], deadline: float, stop: asyncio.Event
    ) -> bool:
        """``STATUS (UIDNEXT)`` of ``folders`` every ``status_interval`` seconds until
        new mail (True), the deadline or ``stop`` (False) (IC-44)."""
        link = self._status_link
        loop = asyncio.get_running_loop()
        for _ in range(1 << 20):  # bounded: one round per status_interval or back-off
            session = await link.get(deadline, stop)
            if session is None:
                return False
            stale = link.reused
            try:
                found = await self._status(session, folders)
            except CommandFailed as exc:
                await link.failed(exc)
                continue
            except (SourceError, OSError) as exc:
                await link.failed(exc, stale=stale)
                if stale:
                    continue
                return True
            except asyncio.CancelledError:
                await link.drop()  # cancelled mid-command: the state is unknown
                raise
            link.reused = True
            link.healthy()
            if any(self._is_new(wire, uidnext) for wire, uidnext in found.items()):
                return True
            left = deadline - loop.time()
            if left <= 0 or stop.is_set():
                return False
            await _sleep(stop, min(self.status_interval, left))
            if stop.is_set() or loop.time() >= deadline:
                return False
        return False

    async def _status(
        self, session: ImapSession, folders: list[bytes]
    ) -> dict[bytes, int | None]:
        """UIDNEXT per folder, one pipelined STATUS each (IP-01). A NO for one folder
        (deleted, no longer readable) is no information for that folder: the others
        are still checked and the refusal is logged once, not on every round (IC-44).
        A BAD raises :class:`CommandFailed` (the connection is reopened)."""
        out: dict[bytes, int | None] = dict.fromkeys(folders)
        commands = [cmd.status(wire) for wire in folders]
        of = {id(command): wire for command, wire in zip(commands, folders, strict=True)}
        async for event in session.client.stream(commands):
            if isinstance(event, Data) and event.name == "STATUS":
                try:
                    name, items = status_items(event.values)
                except ValueError:
                    continue
                if name in out and "UIDNEXT" in items:
                    out[name] = items["UIDNEXT"]
            elif isinstance(event, cmd.Done):
                wire = of.get(id(event.command))
                if event.ok and wire is not None:
                    self._status_refused.discard(wire)
                elif event.status == "NO" and wire is not None:
                    out[wire] = None
                    if wire not in self._status_refused:
                        self._status_refused.add(wire)
                        self._log.warning(
                            "imap_push_status_refused", folder=_show(wire),
                            error=event.text[:200],
                        )
                elif not event.ok:
                    raise CommandFailed(
                        f"{session.client.where}: STATUS failed: {event.text[:200]}", event
                    )
        return out

    # --- common -----------------------------------------------------------------------

    def _is_new(self, wire: bytes, uidnext: int | None) -> bool:
        """UIDNEXT beyond what the last listing saw (or, before any listing, beyond
        the first value seen)."""
        if uidnext is None:
            return False
        seen = self.listed_uidnext.get(wire)
        if seen is None:
            seen = self._first_seen.setdefault(wire, uidnext)
        return uidnext > seen

    async def close(self) -> None:
        """End every wait still running (it returns False) and LOGOUT every
        connection; never raises."""
        for stop in self._stops:
            stop.set()
        await self._settle(list(self._running))
        await asyncio.gather(
            *(link.close() for link in [*self._idle_links, self._status_link]),
            return_exceptions=True,
        )


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop`` is set."""
    if seconds > 0 and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


def _show(wire: bytes) -> str:
    return wire.decode("ascii", "replace")


__all__ = ["MAX_IDLE_CONNECTIONS", "PushPool"]
