"""One mailbox poll: list, decide, retrieve, run the chain, journal, DELE, QUIT.

Theory of operation
-------------------
The order of effects is the delivery contract:

1. The journal is consulted first. A message whose chain already finished but whose
   deletion is still owed (``delete_due``) is DELE'd without being processed again.
2. Each new message runs through its pipeline; steps already committed (journal) are
   skipped. Results are grouped: the processors' ``flush()`` (group commit) runs, then
   the journal batch is committed, and only then are DELE commands sent.
3. QUIT is the commit (RFC 1939 §6: the server deletes in the UPDATE state). After
   ``+OK`` the journal marks the deleted messages; a failed QUIT leaves them owed.
4. Any source error aborts the session without QUIT: the server keeps everything, and
   what completed is already journaled, so the next session only DELEs it.

A crash at any instant therefore loses nothing (nothing is DELE'd before it is durable)
and duplicates nothing that the stores key by message key (a message whose journal
batch did not commit is re-run, and stores upsert by key).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from mailpipe import oversize, uidl_reset
from mailpipe.chain import Chain, ChainResult
from mailpipe.config import Config, MailboxSpec
from mailpipe.errors import (
    OversizeError,
    ProcessorError,
    SourceBusyError,
    SourceError,
    SourcePermanentError,
)
from mailpipe.inflight import InflightMarker
from mailpipe.journal.base import Entry, Fence, Journal, Status
from mailpipe.message import Message, MessageRef, message_key
from mailpipe.plugin_manager import Hooks
from mailpipe.processor import Decision, Disposition, ProcessorContext
from mailpipe.quarantine import Quarantine
from mailpipe.source import SourceSession, Unretrievable

log = structlog.get_logger()

GROUP_SIZE = 256  # at most this many messages per group commit (flush + journal batch)
GROUP_BYTES = 16_000_000  # ...and at most about this many octets (per LIST)

ProgressFn = Callable[[str, int, int], None]


@dataclass(slots=True)
class Summary:
    """Counts for one poll of one mailbox (all its commit windows)."""

    mailbox: str
    listed: int = 0
    retrieved: int = 0
    processed: int = 0
    dropped: int = 0
    kept: int = 0
    skipped: int = 0
    failed: int = 0
    quarantined: int = 0
    deleted: int = 0
    bytes: int = 0
    seconds: float = 0.0
    sessions: int = 0
    committed: bool = True
    error: str | None = None
    error_type: str | None = None
    backlog: int | None = None  # messages the latest listing showed (None: none)

    def as_dict(self) -> dict[str, Any]:
        """Return the counts as a plain dict (for logs and hooks)."""
        return {k: getattr(self, k) for k in self.__slots__}

    def not_durable(self, disposition: str, reason: str) -> None:
        """Recount a message whose chain finished but whose group commit failed: it
        stays on the server and runs again, so it failed in this poll."""
        self.processed -= 1
        self.failed += 1
        if disposition == "keep":
            self.kept -= 1
        elif disposition == "quarantine":
            self.quarantined -= 1
        elif reason != "on_complete":
            self.dropped -= 1

    def group_commit_failed(self, count: int, error: str, error_type: str) -> None:
        """Make the poll a failure (status, exit code 1, back-off): ``count`` messages
        were processed but are not durable (nothing is lost; none was DELE'd)."""
        self.error = (
            f"group commit failed for {count} message(s), kept on the server for "
            f"the next poll: {error}"
        )
        self.error_type = error_type


@dataclass(slots=True)
class _Done:
    """A message whose chain finished in this group, awaiting the group commit."""

    ref: MessageRef
    result: ChainResult | None
    status: Status
    disposition: str
    reason: str
    delete_due: bool
    sha256: str | None
    failed: bool = False
    attempts: int = 0
    error: str = ""
    readopt: MessageRef | None = None  # a reused uid that takes this message's size


@dataclass(slots=True)
class _Plan:
    dele: list[MessageRef] = field(default_factory=list)
    process: list[MessageRef] = field(default_factory=list)
    oversize: list[MessageRef] = field(default_factory=list)


def _days(policy: str) -> float | None:
    if policy.startswith("after_days:"):
        return float(policy.split(":", 1)[1])
    return None


def _error_text(exc: BaseException) -> str:
    from mailpipe.secrets import redact

    text = f"{type(exc).__name__}: {exc}"
    return redact(text if len(text) <= 500 else text[:497] + "...")


class _LeaseGuardedSession:
    """A session that calls ``check`` before every action on the mailbox.

    Once the lease is gone another worker may be polling the same mailbox, so reading
    on, DELE or QUIT could act on its messages too. ``check`` raises
    :class:`~mailpipe.leases.LeaseLostError` then; the engine aborts the session (no QUIT, so the server
    deletes nothing this session marked; RFC 1939 §6) and the journal keeps what
    completed, DELE owed.
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

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        self._ack_check()
        await self._inner.mark_deleted(refs)

    async def commit(self) -> None:
        self._ack_check()
        await self._inner.commit()

    async def abort(self) -> None:
        await self._inner.abort()


class MailboxRunner:
    """Polls one mailbox; safe to call :meth:`poll` repeatedly (never concurrently).

    ``lease_check``, when set (by the scheduler, per poll), is called before every
    retrieval, DELE and QUIT and raises :class:`~mailpipe.leases.LeaseLostError` once the mailbox's
    lease is lost.
    """

    def __init__(
        self,
        spec: MailboxSpec,
        *,
        config: Config,
        chain: Chain,
        journal: Journal,
        quarantine: Quarantine,
        hooks: Hooks,
        stop: asyncio.Event | None = None,
        progress: ProgressFn | None = None,
        source: Any = None,
    ) -> None:
        self.spec = spec
        self.cfg = spec.config
        self.name = spec.name
        self.config = config
        self.chain = chain
        self.journal = journal
        self.quarantine = quarantine
        self.hooks = hooks
        self.stop = stop or asyncio.Event()
        self.progress = progress
        self.source = source if source is not None else self._make_source()
        self.spool_dir = config.resolve(config.model.scheduler.spool_dir)
        self.spool_threshold = config.model.scheduler.spool_threshold
        self.log = log.bind(mailbox=self.name)
        self.lease_check: Callable[[], None] | None = None
        # Set with lease_check (mailpipe.leases): the check before DELE/QUIT, and the
        # fence the group commit's journal batch is conditional on (issue 16.2).
        self.ack_check: Callable[[], None] | None = None
        self.fence: Fence | None = None
        # uids run through the chain in this poll: a later commit window never runs
        # them again (a failing message is retried once per poll, after back-off,
        # instead of in every window; "bad input never stops the pipeline").
        self._attempted: set[str] = set()
        self._skipped: set[str] = set()  # oversize skips counted in this poll
        self._reset_checked = False  # C-60: the UIDL reset check runs once per poll
        # Header prefetch is an optimisation: once the server refuses TOP, sends a cut
        # header section, or serves a short RETR after TOP, it is off for good.
        self._prefetch_off = False
        self._login_delay = 0.0  # seconds, from the latest session's CAPA
        self._unkeyed_oversize: set[str] = set()  # no-UIDL messages sent past a limit
        self.inflight = InflightMarker(self.spool_dir, self.name)
        self._summary = Summary(mailbox=self.name)  # the current poll's (see poll)

    def _make_source(self) -> Any:
        ctx = ProcessorContext(
            base_dir=self.config.base_dir, pipeline=self.cfg.pipeline
        )
        cls = self.spec.source_cls
        params = inspect.signature(cls).parameters
        if "mailbox" in params:
            return cls(self.spec.source_options, ctx, mailbox=self.name)
        return cls(self.spec.source_options, ctx)

    # --- the poll ----------------------------------------------------------------

    async def poll(self) -> Summary:
        """Run sessions (commit windows) until no work is left, stop is set, or an
        error occurs. Errors are recorded in the summary, never raised."""
        summary = self._summary = Summary(mailbox=self.name)
        started = time.monotonic()
        self._attempted = set()
        self._skipped = set()
        self._reset_checked = False
        self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # raw mail
        try:
            self._count_crash()
            for _ in range(MAX_SESSIONS_PER_POLL):  # each window makes progress
                try:
                    more = await self._session(summary)
                except OversizeError as exc:
                    # Journaled, so the next session applies on_oversize to it without
                    # downloading it: go on with a new session (the others still flow).
                    if not self._oversize_received(exc, summary):
                        raise
                    more = True
                except SourceBusyError as exc:
                    if summary.sessions == 0 or exc.code not in LATER_LOGIN_CODES:
                        raise
                    # RFC 2449 §6.5: a server enforcing LOGIN-DELAY refuses the next
                    # window's login; what earlier windows committed stands, and the
                    # rest waits for the next poll.
                    self.log.info("login_delay_ends_poll", sessions=summary.sessions)
                    break
                summary.sessions += 1
                if not more or self.stop.is_set():
                    break
                if self._login_delay > MAX_LOGIN_DELAY_WAIT:
                    # A long LOGIN-DELAY is not slept inside a poll: the scheduler
                    # comes back for the rest (it honours LOGIN-DELAY, S-14).
                    self.log.info("login_delay_ends_poll", seconds=self._login_delay)
                    break
                await self._login_delay_pause()
            else:
                self.log.warning("session_limit_reached", sessions=summary.sessions)
        except SourceError as exc:
            summary.committed = False
            summary.error = _error_text(exc)
            summary.error_type = type(exc).__name__
            self.log.warning("session_failed", error=summary.error)
            self._last_exc: BaseException | None = exc
        except Exception as exc:
            summary.committed = False
            summary.error = _error_text(exc)
            summary.error_type = type(exc).__name__
            self.log.error("session_crashed", error=summary.error, exc_info=True)
            self._last_exc = exc
        else:
            # A failed group commit makes the poll a failure without raising: the
            # scheduler backs off for it like for any other failed poll.
            self._last_exc = ProcessorError(summary.error) if summary.error else None
        finally:
            self.inflight.close()
        summary.seconds = round(time.monotonic() - started, 3)
        self.log.info("session_finished", **summary.as_dict())
        self.hooks.session_finished(mailbox=self.name, summary=summary.as_dict())
        return summary

    def _count_crash(self) -> None:
        """Charge an attempt to the message a dead process left in its chain, when it
        was the only chain in flight (see mailpipe.inflight)."""
        try:
            left = self.inflight.take()
        except OSError as exc:  # e.g. a full disk: the poll goes on without it
            self.log.warning("inflight_marker_unavailable", error=_error_text(exc))
            return
        if left is None:
            return
        uid, alone = left
        entry = self.journal.get_many(self.name, [uid]).get(uid)
        if entry is None:  # it died in the header prefetch, before its first begin()
            key = message_key(self.name, uid)
            entry = self.journal.begin(self.name, uid, key=key, size=0)
        if entry.status != Status.PENDING:
            return
        if not alone:
            self.log.warning("message_in_flight_at_death", uid=uid, key=entry.key,
                             charged=False, reason="other chains were in flight")
            return
        attempts = self.journal.fail(self.name, uid, error=CRASH_ERROR, counted=True)
        self.log.error(
            "message_killed_process",
            uid=uid,
            key=entry.key,
            attempts=attempts,
            max_attempts=self.cfg.max_attempts,
        )

    def _mark(self, uid: str | None) -> None:
        """Set (or with None clear) the in-flight marker; a marker that cannot be
        written (a full disk) is skipped with a warning, never a failed message."""
        try:
            if uid is None:
                self.inflight.clear()
            else:
                self.inflight.set(uid)
        except OSError as exc:
            self.log.warning("inflight_marker_unavailable", error=_error_text(exc))

    async def _login_delay_pause(self) -> None:
        """Before the next commit window's login, wait out the LOGIN-DELAY the server
        announced (RFC 2449 §6.5, issue 21 item 4); a stop request ends the wait."""
        delay = self._login_delay
        if delay <= 0:
            return
        self.log.info("login_delay_wait", seconds=delay)
        await wait_or_stop(self.stop, delay)

    @property
    def last_exception(self) -> BaseException | None:
        """The exception of the last poll, if any (for the scheduler's back-off)."""
        return getattr(self, "_last_exc", None)

    async def _session(self, summary: Summary) -> bool:
        """One commit window. Returns True when messages are left for another window."""
        async with self.source.session() as opened:
            self._login_delay = login_delay_seconds(opened)
            session = opened
            if self.lease_check is not None:
                session = _LeaseGuardedSession(
                    opened, self.lease_check, self.ack_check
                )
            refs = await session.list()
            summary.listed = max(summary.listed, len(refs))  # the fullest listing
            summary.backlog = len(refs)  # the latest listing (what is left)
            self.hooks.session_started(
                mailbox=self.name, count=len(refs), octets=sum(r.size for r in refs)
            )
            if not session.supports_uidl and self.cfg.delete != "after_processing":
                raise SourcePermanentError(
                    f"mailbox {self.name!r}: the server offers no UIDL, so "
                    f"delete = {self.cfg.delete!r} cannot tell old mail from new; "
                    "only delete = 'after_processing' is allowed"
                )
            if not session.supports_uidl:
                self.log.warning("server_without_uidl", fallback="content_hash")
            plan = self._plan(refs, session.supports_uidl)
            # Nothing is fetched twice in one poll: a later window skips what an
            # earlier one tried (without UIDL, what it could not retrieve).
            plan.process = [
                r
                for r in plan.process
                if _tried_key(r) not in self._attempted
                and _tried_key(r) not in self._unkeyed_oversize
            ]
            plan.oversize = [
                r for r in plan.oversize if _tried_key(r) not in self._attempted
            ]
            attempted_before = len(self._attempted)
            window, more = self._window(plan.process)

            if plan.dele:
                await session.mark_deleted(plan.dele)
            owed = list(plan.dele)

            if plan.oversize:
                decided = await self._oversize(session, plan.oversize, summary)
                if decided:  # journaled (durable) before DELE
                    await session.mark_deleted(decided)
                owed += decided

            todo = window
            if (
                self.cfg.header_prefetch
                and not self._prefetch_off
                and self.chain.can_prefetch(self.cfg.pipeline)
            ):
                todo, decided = await self._prefetch(session, window, summary)
                if decided:
                    await session.mark_deleted(decided)
                owed += decided

            owed += await self._retrieve(session, todo, summary)
            if self.stop.is_set():
                more = False
            if not session.supports_uidl and len(self._attempted) == attempted_before:
                # Without UIDL a window cannot skip what this poll already tried: a
                # window that ran nothing new ends the poll instead of spinning.
                more = False
            if (
                not more
                and len(self._attempted) > attempted_before
                and not self.stop.is_set()
                and self.cfg.max_messages is None
                and self.cfg.max_bytes is None
                and not self._login_delay
            ):
                # T-44: some servers (Gmail) list only a batch per session and show the
                # next one after QUIT: a session that ran new mail is followed by another,
                # until one finds nothing new (RFC 2449 §6.5 LOGIN-DELAY forbids it).
                more = True
            await self._commit(session, owed, summary)
            self._prune(refs)
            return more

    # --- planning ----------------------------------------------------------------

    def _plan(self, refs: list[MessageRef], uidl: bool) -> _Plan:
        plan = _Plan()
        if not uidl:
            # Without UIDL the uid is known only after RETR (content hash): every
            # message is retrieved and classified then; the size policy still applies
            # from LIST, before any download.
            limit = self.cfg.max_message_size
            for ref in refs:
                big = limit is not None and ref.size > limit
                (plan.oversize if big else plan.process).append(ref)
            return plan
        # C-56: durable state is keyed by uid; message numbers are this session's only.
        entries = self.journal.get_many(self.name, [r.uid for r in refs])
        if not self._reset_checked:  # C-60: before any journal write of this poll
            self._reset_checked = True
            uidl_reset.guard(self.name, self.cfg, refs, entries, self.journal, self.log)
        listed = {r.uid for r in refs}
        gone = [uid for uid in self.journal.owed(self.name) if uid not in listed]
        if gone:
            # A crash between QUIT's +OK and the journal's mark_deleted leaves DELEs
            # owed for mail the server already removed (RFC 1939 §6): settle them.
            self.journal.mark_deleted(self.name, gone)
            self.log.info("owed_deletions_settled", count=len(gone))
        days = _days(self.cfg.delete)
        now = datetime.now(UTC)
        seen_uids: set[str] = set()
        retries: list[MessageRef] = []
        for ref in refs:
            if ref.uid in seen_uids:
                self.log.warning("duplicate_uidl", uid=ref.uid, number=ref.number)
                continue  # RFC 1939 §7: UIDs are unique; never act twice on a clash
            seen_uids.add(ref.uid)
            entry = entries.get(ref.uid)
            if entry is None or entry.status == Status.PENDING:
                if entry is not None and _resting(entry, self.cfg.max_attempts, now):
                    self._skip_unretrievable(ref, entry)
                elif (
                    self.cfg.max_message_size is not None
                    and ref.size > self.cfg.max_message_size
                ) or oversize.marked(entry, self.cfg.max_message_size):
                    plan.oversize.append(ref)
                elif entry is not None and (entry.attempts or entry.last_error):
                    retries.append(ref)
                else:
                    plan.process.append(ref)
                continue
            if entry.delete_due:
                plan.dele.append(ref)
            elif entry.status == Status.DELETED:
                if entry.sha256 and (
                    self.cfg.max_message_size is None
                    or ref.size <= self.cfg.max_message_size
                ):
                    # The UIDL was deleted before: the same message again, or a new
                    # one under a reused or clashing UIDL (RFC 1939 §7 says it must
                    # not be, anchors §3.14 says servers do). The content hash, the
                    # second evidence, decides after RETR (see _retrieved).
                    plan.process.append(ref)
                else:
                    self.log.warning("deleted_message_reappeared", uid=ref.uid)
                    plan.dele.append(ref)
            elif (
                days is not None
                # Only processed mail ages out: KEPT (a keep rule, or adopted by
                # mark-seen without processing) stays on the server.
                and entry.status == Status.COMMITTED
                and entry.first_seen is not None
                and _aware(entry.first_seen) + timedelta(days=days) <= now
            ):
                plan.dele.append(ref)
            elif entry.size and entry.sha256 and ref.size != entry.size:
                # T-23: copies are named by listing order, so when an earlier copy
                # goes, another message can inherit this name; and RFC 1939 §7 lets
                # a server reuse a uid once its message is gone (popa3d's uids hash
                # a few headers). A settled uid listed with another size is fetched
                # again and its content hash decides (see _retrieved); one listed
                # with its old size is the same message and costs no download. An
                # entry without a hash (adopted by mark-seen) has nothing to compare
                # with and is left alone.
                plan.process.append(ref)
        # Messages that failed before go after new ones, so that messages failing
        # again (a 4xx relay, a poison message) can never fill every window and
        # starve new mail under commit_window/max_messages.
        plan.process += retries
        return plan

    def _skip_unretrievable(self, ref: MessageRef, entry: Entry) -> None:
        """A message the server would not deliver whole ``max_attempts`` times stays
        on the server, untouched, and is tried again once a day (issue 20 item 2)."""
        if ref.uid in self._attempted:
            return
        self._attempted.add(ref.uid)
        self.log.warning(
            "message_unretrievable_skipped",
            hint="a server that lists estimated sizes (Exchange) needs "
            "verify_size = 'confirm'" if "incomplete" in entry.last_error else None,
            uid=ref.uid,
            key=ref.key,
            attempts=entry.attempts,
            error=entry.last_error,
            retry_after=str(UNRETRIEVABLE_REST),
        )

    def _window(self, refs: list[MessageRef]) -> tuple[list[MessageRef], bool]:
        limit = len(refs)
        if self.cfg.commit_window:
            limit = min(limit, self.cfg.commit_window)
        if self.cfg.max_messages is not None:
            limit = min(limit, self.cfg.max_messages)
        chosen = refs[:limit]
        if self.cfg.max_bytes is not None:
            total, cut = 0, 0
            for ref in chosen:
                if total + ref.size > self.cfg.max_bytes and cut > 0:
                    break
                total += ref.size
                cut += 1
            chosen = chosen[:cut]
        # Per-session limits (max_messages/max_bytes) end the poll; the commit window
        # only ends the session, and the next window starts at once.
        limited = self.cfg.max_messages is not None or self.cfg.max_bytes is not None
        more = len(chosen) < len(refs) and not limited
        return chosen, more

    # --- oversize and prefetch ---------------------------------------------------

    async def _oversize(
        self, session: SourceSession, refs: list[MessageRef], summary: Summary
    ) -> list[MessageRef]:
        owed: list[MessageRef] = []
        policy = self.cfg.on_oversize
        for ref in refs:
            seen = ref.uid or f"#{ref.number}:{ref.size}"  # once per poll, any window
            if policy == "skip" and seen in self._skipped:
                continue
            self.log.info(
                "message_oversize",
                uid=ref.uid,
                size=ref.size,
                limit=self.cfg.max_message_size,
                action=policy,
            )
            if policy == "skip":
                self._skipped.add(seen)
                summary.skipped += 1
            elif policy == "delete" and not ref.uid:
                # No UIDL: nothing to journal by; decided again from LIST if a crash
                # comes before QUIT, with the same outcome.
                summary.dropped += 1
                owed.append(ref)
            elif policy == "delete":
                self.journal.begin(self.name, ref.uid, key=ref.key, size=ref.size)
                self.journal.finish(
                    self.name,
                    ref.uid,
                    status=Status.COMMITTED,
                    disposition="oversize",
                    sha256=None,
                    reason="oversize: deleted unread",
                    delete_due=True,
                )
                summary.dropped += 1
                owed.append(ref)
        if policy == "quarantine" and refs:
            # Downloaded whole (spooled) to be quarantined: only the source's
            # max_message cap applies (an OversizeError then journals it as kept).
            async for msg in session.retrieve(
                refs, spool_dir=self.spool_dir, spool_threshold=self.spool_threshold
            ):
                if isinstance(msg, Unretrievable):
                    # Never quarantined from a partial copy: an attempt, tried again
                    # in a later poll (and rested like any other, see _plan).
                    _unspool(msg.evidence)
                    self._retrieval_failed(msg, summary)
                    continue
                try:
                    if not msg.ref.uid:  # no UIDL: known by its content hash
                        msg, _entry, settled = self._by_hash(msg, owed)
                        if settled:
                            continue  # quarantined before (kept on the server)
                    reason = f"oversize: {msg.ref.size} > {self.cfg.max_message_size}"
                    delete = self._quarantine(msg, reason=reason, attempts=0, error="")
                    summary.quarantined += 1
                    # Journaled like any quarantined message (durable before its DELE):
                    # otherwise a kept or not-yet-deleted copy is downloaded and
                    # quarantined again on every poll, and replay cannot tell that
                    # the server copy still waits for its DELE.
                    self.journal.begin(
                        self.name, msg.ref.uid, key=msg.ref.key, size=msg.ref.size
                    )
                    self.journal.finish(
                        self.name,
                        msg.ref.uid,
                        status=Status.QUARANTINED,
                        disposition="quarantine",
                        sha256=msg.sha256,
                        reason=reason,
                        delete_due=delete,
                    )
                    if delete:
                        owed.append(msg.ref)
                finally:
                    _unspool(msg)
        return owed

    def _oversize_received(self, exc: OversizeError, summary: Summary) -> bool:
        """Journal a message the server sent past a size limit (see mailpipe.oversize);
        False when it has no uid to journal it by."""
        outcome = oversize.record(
            self.journal,
            self.name,
            exc,
            policy=self.cfg.on_oversize,
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
        if outcome == "kept":
            summary.skipped += 1
        elif outcome == "deleted":
            summary.dropped += 1
        elif ref is not None:
            # No uid to journal it by: this process does not fetch it again (by
            # number and size; a clash only defers a message to a later run).
            self._unkeyed_oversize.add(_tried_key(ref))
            summary.skipped += 1
            return True
        return outcome is not None

    async def _prefetch(
        self, session: SourceSession, refs: list[MessageRef], summary: Summary
    ) -> tuple[list[MessageRef], list[MessageRef]]:
        todo: list[MessageRef] = []
        owed: list[MessageRef] = []
        entries = self.journal.get_many(self.name, [r.uid for r in refs if r.uid])
        for ref in refs:
            if self.stop.is_set():
                break
            spent = entries.get(ref.uid)
            if spent is not None and spent.attempts >= self.cfg.max_attempts:
                todo.append(ref)  # RETR'd to be quarantined (see _run_one)
                continue
            if self._prefetch_off or (
                spent is not None and spent.last_error.startswith(UNRETRIEVABLE)
            ):
                todo.append(ref)  # a retry of a short RETR: no TOP before it
                continue
            headers = await session.headers(ref)
            if headers is None:
                # Refused, or cut short: decide on the whole message instead, and
                # stop asking this server for headers (issue 20 item 3).
                self._disable_prefetch("the server refused TOP or cut its reply")
                todo.append(ref)
                continue
            msg = Message(ref=ref, data=headers, headers_only=True)
            self._mark(ref.uid)  # a header rule that kills the process is charged too
            try:
                decision = await self.chain.prefetch(self.cfg.pipeline, msg)
            finally:
                self._mark(None)
            if decision is None or decision.disposition == Disposition.QUARANTINE:
                todo.append(ref)
                continue
            self.journal.begin(self.name, ref.uid, key=ref.key, size=ref.size)
            self._attempted.add(ref.uid)  # decided in this poll: never run again in it
            delete = self._finish_decision(ref, decision, None, summary)
            self.log.info(
                "message_decided_on_headers",
                uid=ref.uid,
                disposition=str(decision.disposition),
                reason=decision.reason,
            )
            if delete:
                owed.append(ref)
        return todo, owed

    def _disable_prefetch(self, why: str) -> None:
        """Stop asking this server for headers (for the runner's life), once."""
        if not self._prefetch_off:
            self._prefetch_off = True
            self.log.warning("header_prefetch_disabled", reason=why)

    # --- retrieval and the chain ---------------------------------------------------

    async def _retrieve(
        self, session: SourceSession, refs: list[MessageRef], summary: Summary
    ) -> list[MessageRef]:
        """RETR and process ``refs`` in chunks (GROUP_SIZE messages or GROUP_BYTES
        octets, whichever comes first), each a group commit.

        A chunk's retrieval stream is always read to its end before DELE or QUIT is
        sent: with pipelining (RFC 2449 §6.6) RETR replies are still in flight while
        messages are processed, and replies come back in command order, so a DELE sent
        mid-stream would read RETR replies and QUIT would be refused with replies
        outstanding. After a stop request the rest of the chunk is drained unprocessed
        (it stays new in the journal and is processed by the next run).
        """
        owed: list[MessageRef] = []
        if not refs:
            return owed
        entries = self.journal.get_many(self.name, [r.uid for r in refs if r.uid])
        expire_zero = _expire_zero(session)
        total = len(refs)
        for chunk in _chunks(refs, GROUP_SIZE, GROUP_BYTES):
            if self.stop.is_set():
                break
            group: list[_Done] = []
            dele_after: list[
                MessageRef
            ] = []  # known by content hash: DELE after stream
            self._begin_many(chunk, entries)
            try:
                async for msg in oversize.retrieve(
                    session,
                    chunk,
                    spool_dir=self.spool_dir,
                    spool_threshold=self.spool_threshold,
                    max_size=self.cfg.max_message_size,
                ):
                    if isinstance(msg, Unretrievable):
                        confirmed = self._confirmed(msg, entries)
                        if confirmed is not None:
                            msg = confirmed
                    if isinstance(msg, Unretrievable):
                        self._unretrievable(msg, entries, summary, group)
                        if expire_zero and msg.evidence is not None:
                            # C-29, RFC 2449 §6.7: the server may delete at QUIT what
                            # it believes was retrieved; this copy is not whole, so
                            # the session ends without QUIT and the server keeps it.
                            raise SourceError(
                                f"{msg.reason}; on a server with EXPIRE 0 the session "
                                "is aborted without QUIT so that the server keeps it"
                            )
                        continue
                    try:
                        if self.stop.is_set() and not expire_zero:
                            # Drain the stream; processed next time. (With EXPIRE 0
                            # the server may delete what was RETR'd at QUIT, so
                            # the rest of the chunk is processed instead.)
                            continue
                        await self._retrieved(
                            msg, entries, expire_zero, summary, group, dele_after
                        )
                        if self.progress is not None:
                            self.progress(self.name, summary.retrieved, total)
                        if self.stop.is_set():
                            self.log.info("stop_requested", after=summary.retrieved)
                    finally:
                        _unspool(msg)
            except BaseException:
                # Whatever completed is made durable even when the session is failing,
                # so the next session only DELEs it (never re-runs it). No DELE on a
                # broken session: the journal owes them.
                if group:
                    await self._group_commit(session, group, send_dele=False)
                raise
            if dele_after:
                await session.mark_deleted(dele_after)
                owed += dele_after
            if group:
                owed += await self._group_commit(session, group)
        return owed

    def _unretrievable(
        self,
        item: Unretrievable,
        entries: dict[str, Entry],
        summary: Summary,
        group: list[_Done],
    ) -> None:
        """A message the source could not deliver whole (issue 20 items 1-2, issue 21
        item 2): never committed, never acknowledged; an attempt is counted (in the
        group commit) and the server copy waits for a later poll, behind new mail."""
        ref = item.ref
        _unspool(item.evidence)
        if item.after_headers:
            self._disable_prefetch("a RETR after TOP came back short")
        entry = entries.get(ref.uid) if ref.uid else None
        attempts = self._retrieval_failed(item, summary, entry)
        if not ref.uid:
            return  # no UIDL: nothing to journal it by
        error = f"{UNRETRIEVABLE}{item.reason}"
        if item.confirmable and item.evidence is not None:
            error += f" {_copy_tag(item.evidence)}"  # see _confirmed
        group.append(
            _Done(
                ref, None, Status.PENDING, "failed", "", False, None,
                failed=True, attempts=attempts, error=error,
            )
        )

    def _confirmed(
        self, item: Unretrievable, entries: dict[str, Entry]
    ) -> Message | None:
        """The evidence of a confirmable short copy, when an earlier session received
        the very same octets (the listed size is wrong, not the message); else None.

        Only sources asked to (POP3 ``verify_size = "confirm"``) mark copies
        confirmable, and never one served after TOP or followed by stray data.
        """
        evidence = item.evidence
        if not item.confirmable or evidence is None or not item.ref.uid:
            return None
        entry = entries.get(item.ref.uid)
        if entry is None or _copy_tag(evidence) not in entry.last_error:
            return None
        self.log.warning(
            "short_copy_confirmed",
            uid=item.ref.uid,
            listed=item.ref.size,
            received=evidence.size,
            detail="the same octets arrived in two sessions: the listed size is wrong",
        )
        return evidence

    def _retrieval_failed(
        self, item: Unretrievable, summary: Summary, entry: Entry | None = None
    ) -> int:
        """Count, log and announce an attempt that did not deliver a whole message;
        return the attempts so far. Without ``entry`` (the oversize path) the attempt
        is journaled here and now; otherwise the caller's group commit writes it."""
        ref = item.ref
        error = f"{UNRETRIEVABLE}{item.reason}"
        self._attempted.add(_tried_key(ref))  # no later window of this poll asks
        summary.failed += 1
        if not ref.uid:
            self.log.error("message_unretrievable", number=ref.number, error=error)
            return 0
        if entry is None:
            self.journal.begin(self.name, ref.uid, key=ref.key, size=ref.size)
            attempts = self.journal.fail(self.name, ref.uid, error=error, counted=True)
        else:
            attempts = entry.attempts + 1
        self.log.error(
            "message_unretrievable",
            uid=ref.uid,
            key=ref.key,
            error=error,
            attempts=attempts,
            max_attempts=self.cfg.max_attempts,
        )
        self.hooks.message_failed(
            mailbox=self.name,
            uid=ref.uid,
            key=ref.key,
            processor="retrieve",
            error=error,
            attempts=attempts,
        )
        return attempts

    def _begin_many(self, refs: list[MessageRef], entries: dict[str, Entry]) -> None:
        """Begin the journal entries of a chunk's new messages in one transaction.

        One durable commit per chunk instead of one per message: a PENDING entry
        carries no promise of its own (attempts and outcomes are written by the group
        commit), so its durability only needs to precede that commit.
        """
        new = [r for r in refs if r.uid and r.uid not in entries]
        if not new:
            return
        with self.journal.batch():
            for ref in new:
                entries[ref.uid] = self.journal.begin(
                    self.name, ref.uid, key=ref.key, size=ref.size
                )

    async def _retrieved(
        self,
        msg: Message,
        entries: dict[str, Entry],
        expire_zero: bool,
        summary: Summary,
        group: list[_Done],
        dele_after: list[MessageRef],
    ) -> None:
        """Process one retrieved message into ``group`` (or ``dele_after``)."""
        summary.retrieved += 1
        summary.bytes += msg.size
        if msg.size != msg.ref.size:
            self.log.info(
                "octet_count_mismatch",
                uid=msg.ref.uid,
                listed=msg.ref.size,
                received=msg.size,
            )
        known = entries.get(msg.ref.uid) if msg.ref.uid else None
        if msg.ref.uid:
            # Whatever happens to it below, no later window of this poll fetches it.
            self._attempted.add(msg.ref.uid)
        reused: MessageRef | None = None
        if known is not None and known.status not in (Status.PENDING, Status.DELETED):
            # Fetched again because LIST gives a settled uid another size (_plan).
            if known.sha256 == msg.sha256:
                # The same message, counted differently now: remember the new size
                # so that the next poll does not fetch it again.
                self._readopt(msg.ref, known)
                return
            self.log.error("uidl_reused", uid=msg.ref.uid, number=msg.ref.number)
            reused = msg.ref
            msg.ref = replace(msg.ref, uid="")  # a different message: by content hash
        if known is not None and known.status == Status.DELETED:
            if known.sha256 == msg.sha256:
                self.log.warning("deleted_message_reappeared", uid=msg.ref.uid)
                dele_after.append(msg.ref)
                return
            # Another message under a UIDL already used: never DELE it unprocessed;
            # it is known by its content hash instead (as without UIDL).
            self.log.error("uidl_reused", uid=msg.ref.uid, number=msg.ref.number)
            msg.ref = replace(msg.ref, uid="")
        if not msg.ref.uid:
            msg, entry, settled = self._by_hash(msg, dele_after)
            if settled:
                if reused is not None and entry is not None:
                    self._readopt(reused, entry)
                return
            if entry is not None:
                entries[msg.ref.uid] = entry
            if msg.ref.uid in self._attempted and not expire_zero:
                return  # already tried in this poll (no UIDL): next poll retries it
        self._attempted.add(msg.ref.uid)
        done = await self._run_one(msg, entries.get(msg.ref.uid), summary)
        done.readopt = reused
        if done.failed and expire_zero and done.status == Status.PENDING:
            # C-29, RFC 2449 §6.7: EXPIRE 0 lets the server delete what was RETR'd at QUIT;
            # keep the raw bytes before that can happen.
            done = self._quarantine_failed(msg, done, summary)
        group.append(done)

    def _readopt(self, ref: MessageRef, like: Entry | _Done) -> None:
        """Give the uid of ``ref`` the outcome ``like`` records (status, disposition,
        content hash, owed DELE) and ``ref``'s listed size (issue 21 item 3).

        Used when a settled uid came back with another size: either the same message
        counted differently, or another message under a reused uid that was handled
        under its content hash. Either way later polls then list it as settled and do
        not download it again. Durable when it returns (inside a batch: with it).
        """
        with self.journal.batch():
            self.journal.forget(self.name, [ref.uid])
            self.journal.begin(self.name, ref.uid, key=ref.key, size=ref.size)
            self.journal.finish(
                self.name,
                ref.uid,
                status=like.status,
                disposition=like.disposition or "",
                sha256=like.sha256,
                reason=like.reason,
                delete_due=like.delete_due,
            )
        self.log.info("uid_readopted", uid=ref.uid, size=ref.size, status=like.status)

    def _by_hash(
        self, msg: Message, dele: list[MessageRef]
    ) -> tuple[Message, Entry | None, bool]:
        """Key a message without a uid by its content hash; return it, its journal
        entry, and True when that entry is settled (then ``dele`` gets it if its DELE
        is owed)."""
        msg = self._adopt_hash_uid(msg)
        entry = self.journal.get_many(self.name, [msg.ref.uid]).get(msg.ref.uid)
        if entry is None or entry.status == Status.PENDING:
            return msg, entry, False
        if entry.delete_due or entry.status == Status.DELETED:
            dele.append(msg.ref)
        return msg, entry, True

    def _adopt_hash_uid(self, msg: Message) -> Message:
        uid = f"sha256:{msg.sha256}"
        ref = MessageRef(
            mailbox=msg.ref.mailbox or self.name,
            number=msg.ref.number,
            uid=uid,
            size=msg.ref.size,
        )
        msg.ref = ref
        return msg

    async def _run_one(
        self, msg: Message, entry: Entry | None, summary: Summary
    ) -> _Done:
        ref = msg.ref
        if entry is None:
            entry = self.journal.begin(self.name, ref.uid, key=ref.key, size=ref.size)
        if (
            entry.status == Status.PENDING
            and entry.attempts >= self.cfg.max_attempts
            and not entry.last_error.startswith(UNRETRIEVABLE)
        ):
            # Its attempts are spent without a quarantine (the process died in the
            # chain each time, see _count_crash): keep the raw bytes, never run it again.
            done = _Done(ref, None, Status.PENDING, "failed", "", False, msg.sha256,
                         attempts=entry.attempts, error=entry.last_error or CRASH_ERROR)
            done = self._quarantine_failed(msg, done, summary)
            done.failed = False  # the attempts were counted when they happened
            return done
        mlog = self.log.bind(uid=ref.uid, key=ref.key)

        def journal_now(step: str) -> None:
            # A non-idempotent side effect (mail sent, webhook posted) is recorded
            # durably before the next step, so no crash can make it happen twice.
            self.journal.step_committed(self.name, ref.uid, step)

        self._mark(ref.uid)
        try:
            result = await self.chain.run(
                self.cfg.pipeline, msg, done_steps=entry.steps, on_commit=journal_now
            )
        finally:
            self._mark(None)
        if result.ok:
            assert result.decision is not None
            summary.processed += 1
            decision = result.decision
            if decision.disposition == Disposition.QUARANTINE:
                delete = self._quarantine(
                    msg,
                    reason=decision.reason or "quarantined by rule",
                    attempts=0,
                    error="",
                )
                summary.quarantined += 1
                return _Done(
                    ref,
                    result,
                    Status.QUARANTINED,
                    "quarantine",
                    decision.reason,
                    delete,
                    msg.sha256,
                )
            status, delete = self._status_for(decision)
            if decision.disposition == Disposition.KEEP:
                summary.kept += 1
            elif decision.reason != "on_complete":
                summary.dropped += 1
            mlog.debug("message_processed", disposition=str(decision.disposition))
            return _Done(
                ref,
                result,
                status,
                str(decision.disposition),
                decision.reason,
                delete,
                msg.sha256,
            )
        # failure
        assert result.error is not None
        summary.failed += 1
        error = _error_text(result.error)
        attempts = entry.attempts + (0 if result.temporary else 1)
        mlog.warning(
            "message_failed",
            message_id=msg.header("message-id"),
            step=result.failed_step,
            error=error,
            attempts=attempts,
            temporary=result.temporary,
        )
        self.hooks.message_failed(
            mailbox=self.name,
            uid=ref.uid,
            key=ref.key,
            processor=result.failed_step,
            error=error,
            attempts=attempts,
        )
        done = _Done(
            ref,
            result,
            Status.PENDING,
            "failed",
            "",
            False,
            msg.sha256,
            failed=True,
            attempts=attempts,
            error=error,
        )
        if not result.temporary and (result.final or attempts >= self.cfg.max_attempts):
            done = self._quarantine_failed(msg, done, summary)
        return done

    def _quarantine_failed(self, msg: Message, done: _Done, summary: Summary) -> _Done:
        reason = (
            f"failed {done.attempts} time(s) in {done.result.failed_step}"
            if done.result
            else f"the process died {done.attempts} time(s) while running its chain"
        )
        if done.result and done.result.final:  # not retried: say why (the budget)
            reason = f"{reason}: {done.error}"
        delete = self._quarantine(
            msg, reason=reason, attempts=done.attempts, error=done.error
        )
        summary.quarantined += 1
        done.status = Status.QUARANTINED
        done.disposition = "quarantine"
        done.reason = reason
        done.delete_due = delete
        return done

    def _status_for(self, decision: Decision) -> tuple[Status, bool]:
        if decision.disposition == Disposition.KEEP:
            return Status.KEPT, False
        return Status.COMMITTED, self.cfg.delete == "after_processing"

    def _finish_decision(
        self, ref: MessageRef, decision: Decision, sha256: str | None, summary: Summary
    ) -> bool:
        status, delete = self._status_for(decision)
        if decision.disposition == Disposition.KEEP:
            summary.kept += 1
        else:
            summary.dropped += 1
        self.journal.finish(
            self.name,
            ref.uid,
            status=status,
            disposition=str(decision.disposition),
            sha256=sha256,
            reason=decision.reason,
            delete_due=delete,
        )
        self.hooks.message_done(
            mailbox=self.name,
            uid=ref.uid,
            key=ref.key,
            disposition=str(decision.disposition),
        )
        return delete

    def _quarantine(
        self, msg: Message, *, reason: str, attempts: int, error: str
    ) -> bool:
        path = self.quarantine.put(msg, reason=reason, attempts=attempts, error=error)
        self.log.warning(
            "message_quarantined",
            uid=msg.ref.uid,
            key=msg.key,
            reason=reason,
            path=str(path),
        )
        self.hooks.message_quarantined(
            mailbox=self.name,
            uid=msg.ref.uid,
            key=msg.key,
            reason=reason,
            path=str(path),
        )
        return self.cfg.on_quarantine == "delete"

    async def _group_commit(
        self, session: SourceSession, group: list[_Done], *, send_dele: bool = True
    ) -> list[MessageRef]:
        """Flush processors, commit the journal batch, then (and only then) DELE.

        A message whose writes are not durable stays PENDING (run again next poll, no
        attempt counted), gets no ``message_done`` and counts as failed; the poll's
        summary then carries the error (exit 1 with ``run --once``).
        """
        flushed = True
        flush_error, flush_type = "a shared store's flush failed", "FlushError"
        try:
            await self.chain.flush()
        except Exception as exc:
            flushed = False
            flush_error, flush_type = _error_text(exc), type(exc).__name__
            self.log.error("flush_failed", error=flush_error)
        owed: list[MessageRef] = []
        unflushed = 0
        lost: set[str] = set()  # uids whose writes are not durable
        with self.journal.batch(fence=self.fence):
            for d in group:
                steps = list(d.result.committed) if d.result else []
                # A flush failure seen by another mailbox's group commit (shared
                # processors) counts too: see Chain.flushed.
                durable = flushed and (d.result is None or self.chain.flushed(d.result))
                if durable and d.result:
                    steps += d.result.pending
                for step in steps:
                    self.journal.step_committed(self.name, d.ref.uid, step)
                if d.failed and d.status == Status.PENDING:
                    self.journal.fail(
                        self.name,
                        d.ref.uid,
                        error=d.error,
                        counted=not (d.result and d.result.temporary),
                    )
                    continue
                if d.failed:  # quarantined after failures: count the last attempt too
                    self.journal.fail(self.name, d.ref.uid, error=d.error, counted=True)
                if not durable and d.result and d.result.pending:
                    unflushed += 1
                    lost.add(d.ref.uid)
                    if not d.failed:
                        self._summary.not_durable(d.disposition, d.reason)
                    continue  # not durable: stays PENDING, re-run next time
                self.journal.finish(
                    self.name,
                    d.ref.uid,
                    status=d.status,
                    disposition=d.disposition,
                    sha256=d.sha256,
                    reason=d.reason,
                    delete_due=d.delete_due,
                )
                if d.delete_due:
                    owed.append(d.ref)
                if d.readopt is not None:
                    self._readopt(d.readopt, d)
        if unflushed and _expire_zero(session):
            # C-29, C-58: with EXPIRE 0 QUIT may delete every RETR'd message, DELE
            # or not; these are not durable anywhere, so the session must not QUIT.
            raise ProcessorError(
                f"group commit failed for {unflushed} message(s) on a server with "
                "EXPIRE 0; session aborted without QUIT so the server keeps them"
            )
        if unflushed:
            self._summary.group_commit_failed(unflushed, flush_error, flush_type)
        for d in group:
            if d.ref.uid not in lost and (not d.failed or d.status != Status.PENDING):
                self.hooks.message_done(
                    mailbox=self.name,
                    uid=d.ref.uid,
                    key=d.ref.key,
                    disposition=d.disposition,
                )
        if send_dele and owed:
            try:
                await session.mark_deleted(owed)
            except SourceError:
                # Journaled as owed: the next session DELEs them. Re-raise to abort.
                raise
        return owed

    async def _commit(
        self, session: SourceSession, owed: list[MessageRef], summary: Summary
    ) -> None:
        await session.commit()  # RFC 1939 §6: QUIT makes the server delete DELE'd mail
        if owed:
            self.journal.mark_deleted(self.name, [r.uid for r in owed])
        summary.deleted += len(owed)
        self.log.debug("session_committed", deleted=len(owed))

    def _prune(self, refs: list[MessageRef]) -> None:
        try:
            self.journal.prune(self.name, [r.uid for r in refs], 30.0)
        except Exception as exc:  # pruning is housekeeping; never fail a poll for it
            self.log.warning("journal_prune_failed", error=_error_text(exc))


#: Commit windows (sessions) in one poll at most; each makes progress, so a poll that
#: reaches it has more windows than any real mailbox needs: the next poll goes on.
MAX_SESSIONS_PER_POLL = 1000

#: The longest LOGIN-DELAY (seconds) waited between two commit windows of one poll;
#: a longer one ends the poll after the window instead.
MAX_LOGIN_DELAY_WAIT = 60.0

#: Response codes (RFC 2449 §8, RFC 3206) that refuse a later window's login only
#: because an earlier window of the same poll has just logged in.
LATER_LOGIN_CODES = frozenset({"LOGIN-DELAY", "IN-USE"})

#: The prefix of the error journaled for a message the source could not deliver whole.
UNRETRIEVABLE = "unretrievable: "

#: How long a message left unretrievable ``max_attempts`` times rests before the
#: next try (it stays on the server, never acknowledged).
UNRETRIEVABLE_REST = timedelta(days=1)

#: The error recorded for a message whose chain the process did not survive.
CRASH_ERROR = (
    "the mailpipe process died while this message was in the chain "
    "(a crash, the OOM killer or a kill)"
)


def login_delay_seconds(session: SourceSession) -> float:
    """The LOGIN-DELAY (RFC 2449 §6.5) the session's CAPA announced, in seconds; 0
    when none (or unreadable)."""
    caps = getattr(session, "capabilities", None)
    if caps is None:
        return 0.0
    value: Any = caps.get("LOGIN-DELAY") if isinstance(caps, dict) else getattr(
        caps, "login_delay", None
    )
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    try:
        return max(0.0, float(int(str(value).strip().split(" ")[0])))
    except ValueError:
        return 0.0


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _copy_tag(message: Message) -> str:
    """How a short copy's octets are remembered in its journaled error."""
    return f"[copy sha256:{message.sha256}]"


def _tried_key(ref: MessageRef) -> str:
    """What a poll remembers a tried message by: its uid, or without UIDL its number
    and size (good within one poll; a clash only defers a message to the next)."""
    return ref.uid or f"#{ref.number}:{ref.size}"


def _resting(entry: Entry, max_attempts: int, now: datetime) -> bool:
    """True for a message left unretrievable ``max_attempts`` times and tried less
    than :data:`UNRETRIEVABLE_REST` ago."""
    if entry.attempts < max_attempts or not entry.last_error.startswith(UNRETRIEVABLE):
        return False
    return entry.updated is not None and _aware(entry.updated) + UNRETRIEVABLE_REST > now


def _expire_zero(session: SourceSession) -> bool:
    caps = getattr(session, "capabilities", None)
    if caps is None:
        return False
    value: Any = None
    if isinstance(caps, dict):
        value = caps.get("EXPIRE")
    else:
        value = getattr(caps, "expire", None)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return str(value).strip().split(" ")[0] == "0"


def _chunks(refs: list[MessageRef], count: int, octets: int) -> list[list[MessageRef]]:
    """Split ``refs`` into runs of at most ``count`` messages and about ``octets``
    octets (a single larger message forms its own chunk)."""
    out: list[list[MessageRef]] = []
    current: list[MessageRef] = []
    size = 0
    for ref in refs:
        if current and (len(current) >= count or size + ref.size > octets):
            out.append(current)
            current, size = [], 0
        current.append(ref)
        size += ref.size
    if current:
        out.append(current)
    return out


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _unspool(msg: Message | None) -> None:
    if msg is not None and msg.spool_path is not None:
        Path(msg.spool_path).unlink(missing_ok=True)
