"""Mailbox leases: one worker per mailbox at a time, renewed apart from message time.

Theory of operation
-------------------
Before each poll the scheduler takes the mailbox's lease in the journal
(:class:`MailboxLease`; an flock with SQLite, an expiring row with PostgreSQL) and
releases it after. While the poll runs, :meth:`MailboxLease.renew_periodically` (a
timer on the event loop, independent of how long any message or step takes; a timer,
not a task, as a cycle over many mailboxes starts one per poll) renews it every
``ttl / 3``; processors run off the event loop, so a slow step (even one longer than
the ttl) does not stop the renewals. The engine calls :meth:`MailboxLease.check` before
every retrieval, DELE and QUIT (renewing on the spot when the background renewal is
late, e.g. after a blocked event loop or a paused process) and
:meth:`MailboxLease.check_fence` before every acknowledgement (DELE, QUIT), which also
asks the journal that the lease's epoch is still current.

Fencing: every change of a lease's holder raises its **epoch** (the SQLite journal
keeps it for a re-take by the same holder with no other take in between, issue 18);
:attr:`MailboxLease.fence` is the token (:class:`~mailpipe.journal.base.Fence`)
that the engine passes to ``journal.batch(fence=...)``. A worker that lost its lease (paused past the ttl,
partitioned, slow) can then neither commit its journal batch nor DELE: the journal
refuses the batch (:class:`~mailpipe.journal.errors.FencedError`, rolled back) once
another worker has taken the mailbox, and the acknowledgement check raises
:class:`LeaseLostError`. A step that outlived the lease is thereby abandoned: the
session is aborted without QUIT, nothing of it is committed or acknowledged (the log
says ``mailbox_lease_lost`` / ``mailbox_lease_fenced``), and the new owner runs the
message again; stores keyed by the message key make the abandoned step's late writes
harmless.

A worker that finds a mailbox leased elsewhere waits :func:`lease_retry_delay` (growing
with consecutive misses, at most ``lease_ttl / 2``), so it neither spins on the journal
nor takes long to take over the mailboxes of a dead worker: about ``1.5 * lease_ttl``
after the worker's last renewal (``lease_ttl`` until its lease expires, ``lease_ttl / 2``
until the next retry).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import structlog

from mailpipe import oversize
from mailpipe.errors import SourceBusyError
from mailpipe.journal.base import Fence, Journal
from mailpipe.journal.errors import FencedError
from mailpipe.message import Message, MessageRef
from mailpipe.source import Ack, Unretrievable, acknowledge

log = structlog.get_logger()

__all__ = [
    "Fence", "LeaseGuardedSession", "LeaseLostError", "MailboxLease", "lease_retry_delay",
]


class LeaseLostError(SourceBusyError):
    """The mailbox lease was lost mid-poll: another worker may own the mailbox now."""


def lease_retry_delay(
    *, interval: float, ttl: float, misses: int, rng: random.Random | None = None
) -> float:
    """Return seconds to wait after ``misses`` consecutive polls found the lease taken.

    Doubles from ``poll_interval`` per miss, capped at ``ttl / 2`` (but never below
    ``poll_interval``), spread by -20 %: the holder is serving the mailbox, so
    retrying sooner only loads the journal, and the cap bounds how long a dead worker's
    mailbox waits after its lease expired.
    """
    r = rng or random
    cap = max(interval, ttl / 2)
    base = min(cap, interval * (2 ** min(max(0, misses - 1), 30)))
    return float(base * r.uniform(0.8, 1.0))


class MailboxLease:
    """The lease on one mailbox for one poll: taken, renewed, checked, released.

    :attr:`expires` is a conservative local deadline (monotonic clock): the instant
    *before* the last successful lock or renew statement was sent plus ``ttl``, never
    later than the expiry the server recorded. Journal errors while renewing leave
    the deadline unchanged, so a lease that cannot be renewed runs out on its own.
    """

    def __init__(
        self,
        journal: Journal,
        mailbox: str,
        *,
        owner: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.mailbox = mailbox
        self.owner = owner
        self.ttl = float(ttl)
        self._clock = clock
        self.expires = 0.0
        self.lost = False
        #: The fencing token of the lease taken (None before, or when the journal
        #: gives none).
        self.fence: Fence | None = None

    def acquire(self) -> bool:
        """Take the lease; False when another worker holds it. A journal error
        propagates; when it comes after the lock was taken (reading the fence) the
        lease is released first."""
        started = self._clock()
        if not self.journal.lock_mailbox(self.mailbox, owner=self.owner, ttl=self.ttl):
            return False
        self.expires, self.lost = started + self.ttl, False
        try:
            self.fence = self.journal.fence(self.mailbox, owner=self.owner)
        except BaseException:
            # Taken, but without its fence no commit could be made under it: given
            # back at once, not left to run out its ttl while every worker, this one
            # included, passes the mailbox over.
            self.release()
            raise
        log.debug("mailbox_lease_taken", mailbox=self.mailbox, owner=self.owner,
                  epoch=None if self.fence is None else self.fence.epoch)
        return True

    def remaining(self) -> float:
        """Seconds the lease is surely still held (negative when past the deadline)."""
        return self.expires - self._clock()

    def renew(self) -> None:
        """Extend the lease by ``ttl``; sets :attr:`lost` when another worker has it."""
        if self.lost:
            return
        started = self._clock()
        try:
            held = self.journal.renew_mailbox(
                self.mailbox, owner=self.owner, ttl=self.ttl
            )
        except Exception as exc:  # journal unreachable: the deadline decides
            log.warning(
                "mailbox_lease_renew_failed",
                mailbox=self.mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        if held:
            self.expires = started + self.ttl
            return
        self.lost = True
        log.error(
            "mailbox_lease_lost",
            mailbox=self.mailbox,
            owner=self.owner,
            epoch=None if self.fence is None else self.fence.epoch,
            action="the step in hand is abandoned: nothing more is committed or "
            "acknowledged by this poll; the new owner runs the message again",
        )

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is held ``ttl / 3`` longer.

        The engine calls this before every retrieval, DELE and QUIT. A renewal that is
        overdue (more than ``ttl / 3`` since the last one) is done here first.
        """
        if not self.lost and self.remaining() < self.ttl * 2 / 3:
            self.renew()
        if not self.lost and self.remaining() < self.ttl / 3:
            self.lost = True
            log.error(
                "mailbox_lease_expired",
                mailbox=self.mailbox,
                remaining=round(self.remaining(), 3),
            )
        if self.lost:
            raise LeaseLostError(
                f"the lease on mailbox {self.mailbox!r} was lost; session aborted",
                code="LEASE",
            )

    def check_fence(self) -> None:
        """:meth:`check`, then ask the journal that :attr:`fence` is still the
        mailbox's lease (one query): raise :class:`LeaseLostError` when another worker
        took the mailbox over. The engine calls this before every acknowledgement
        (DELE, QUIT), which no journal transaction can cover."""
        self.check()
        if self.fence is None:
            return
        try:
            self.journal.check_fence(self.fence)
        except FencedError as exc:
            self.lost = True
            log.error(
                "mailbox_lease_fenced",
                mailbox=self.mailbox,
                owner=self.owner,
                epoch=self.fence.epoch,
                action="acknowledgement refused; session aborted without QUIT",
            )
            raise LeaseLostError(
                f"the lease on mailbox {self.mailbox!r} was taken over; session "
                "aborted before acknowledging",
                code="LEASE",
            ) from exc

    def renew_periodically(self) -> Callable[[], None]:
        """Renew every ``ttl / 3`` on the running event loop until the returned
        function is called (the poll ended) or the lease is lost."""
        loop = asyncio.get_running_loop()
        period = max(0.01, self.ttl / 3)
        handle: asyncio.TimerHandle | None = None

        def tick() -> None:
            nonlocal handle
            self.renew()
            handle = None if self.lost else loop.call_later(period, tick)

        def stop() -> None:
            if handle is not None:
                handle.cancel()

        handle = loop.call_later(period, tick)
        return stop

    def release(self) -> None:
        """Give the lease back (a no-op when another worker holds it now)."""
        try:
            self.journal.unlock_mailbox(self.mailbox, owner=self.owner)
        except Exception as exc:  # it expires on its own
            log.warning(
                "mailbox_unlock_failed",
                mailbox=self.mailbox,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )


class LeaseGuardedSession:
    """A session that calls ``check`` before every action on the mailbox.

    Once the lease is gone another worker may be polling the same mailbox, so reading
    on, acknowledging or committing could act on its messages too. ``check`` raises
    :class:`LeaseLostError` then; the engine aborts the session (no commit, so the
    server applies nothing this session sent; RFC 1939 §6) and the journal keeps what
    completed, the acknowledgement owed.
    """

    def __init__(
        self,
        inner: Any,
        check: Callable[[], None],
        ack_check: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._check = check
        # Before DELE and QUIT: also the fence (the lease epoch is still ours).
        self._ack_check = ack_check or check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def headers(self, ref: MessageRef) -> bytes | None:
        self._check()
        return await self._inner.headers(ref)  # type: ignore[no-any-return]

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message | Unretrievable]:
        self._check()
        stream = oversize.retrieve(
            self._inner, refs, spool_dir=spool_dir, spool_threshold=spool_threshold,
            max_size=max_size,
        )
        async with aclosing(stream):
            async for msg in stream:
                try:
                    self._check()
                except BaseException:
                    _unspool(msg.evidence if isinstance(msg, Unretrievable) else msg)
                    raise
                yield msg

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        self._ack_check()  # the fence too: a fenced-off worker acknowledges nothing
        await acknowledge(self._inner, refs, ack)

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        self._ack_check()
        await self._inner.mark_deleted(refs)

    async def commit(self) -> None:
        self._ack_check()
        await self._inner.commit()

    async def checkpoint(self) -> None:
        """MP-06: like :meth:`commit` (the fence first), for a session that stays open."""
        self._ack_check()
        await self._inner.checkpoint()

    async def abort(self) -> None:
        await self._inner.abort()


def _unspool(msg: Message | None) -> None:
    if msg is not None and msg.spool_path is not None:
        Path(msg.spool_path).unlink(missing_ok=True)
