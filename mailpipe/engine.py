"""One mailbox poll: list, plan, retrieve, run the chain, and let the ledger settle it.

Theory of operation
-------------------
The engine orchestrates; it decides nothing about delivery state on its own:

1. :mod:`mailpipe.planning` turns the listing and the journal's entries into a plan
   (pure): what is owed an acknowledgement, what to retrieve, what is oversize.
2. Each message to retrieve runs through its pipeline (steps already committed are
   skipped). :mod:`mailpipe.ledger` turns each result into an outcome, group-commits
   them (processors' ``flush()``, then the journal batch) and only then owes their
   acknowledgement.
3. :meth:`Ledger.acknowledge` sends what is owed, between retrieval streams or, for a
   session that retrieves across commits (P-14), into the running one; at the
   end of the window :meth:`Ledger.commit` ends the session (POP3 QUIT: the server
   deletes now, RFC 1939 §6) and journals the deletions. A session that can apply
   them and stay open (IMAP, :class:`mailpipe.source.CheckpointSession`) ends each
   window but the last with :meth:`Ledger.checkpoint` instead and lists again for
   the next one: one login per poll, not one per window (MP-06).
4. Any source error aborts the session without a commit: the server keeps
   everything, and what completed is already journaled, so the next session only
   acknowledges it.

A crash at any instant therefore loses nothing (nothing is acknowledged before it is
durable) and duplicates nothing that the stores key by message key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from mailpipe import cursors, identity, oversize, planning, uidl_reset
from mailpipe.chain import Chain
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
from mailpipe.leases import LeaseGuardedSession, LeaseLostError
from mailpipe.ledger import (
    CRASH_ERROR,
    Ledger,
    Outcome,
    Summary,
    copy_tag,
    error_text,
)
from mailpipe.message import Message, MessageRef
from mailpipe.oversize import OversizePolicy
from mailpipe.planning import UNRETRIEVABLE, UNRETRIEVABLE_REST, tried_key
from mailpipe.plugin_manager import Hooks
from mailpipe.prefetch import HeaderPrefetch
from mailpipe.quarantine import Quarantine
from mailpipe.source import (
    CheckpointSession,
    CursorSession,
    EpochSession,
    SessionFacts,
    Source,
    SourceContext,
    SourceSession,
    Unretrievable,
    facts_of,
    retrieves_across_commits,
)

log = structlog.get_logger()

GROUP_SIZE = 256  # at most this many messages per group commit (flush + journal batch)
GROUP_BYTES = 16_000_000  # ...and at most about this many octets (per LIST)

ProgressFn = Callable[[str, int, int], None]

__all__ = [
    "CRASH_ERROR",
    "UNRETRIEVABLE",
    "UNRETRIEVABLE_REST",
    "LeaseLostError",
    "MailboxRunner",
    "ProgressFn",
    "Summary",
    "make_source",
    "wait_or_stop",
]


def make_source(spec: MailboxSpec, config: Config) -> Source:
    """Construct the mailbox's source with its options and a :class:`SourceContext`."""
    context = SourceContext(
        base_dir=config.base_dir,
        mailbox=spec.name,
        spool_dir=config.resolve(config.model.scheduler.spool_dir),
        ack=spec.config.ack,
    )
    return spec.source_cls(spec.source_options, context)  # type: ignore[no-any-return]


class MailboxRunner:
    """Polls one mailbox; safe to call :meth:`poll` repeatedly (never concurrently).

    ``lease_check``, when set (by the scheduler, per poll), is called before every
    retrieval, acknowledgement and commit and raises :class:`LeaseLostError` once the
    mailbox's lease is lost.
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
        self.source = source if source is not None else make_source(spec, config)
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
        self._reset_checked = False  # C-60: the UIDL reset check runs once per poll
        # IC-25: settled entries an epoch change superseded, by content hash (kept
        # across polls: the source reports a change once, its mail may span polls).
        self._superseded: dict[str, Entry] = {}
        self.prefetch = HeaderPrefetch(self.cfg, chain, self.log)
        self.oversize = OversizePolicy(self.cfg, self.log)
        self._login_delay = 0.0  # seconds, from the latest session's facts
        self._next_prune = 0.0  # time.monotonic() of the next journal prune
        self.inflight = InflightMarker(self.spool_dir, self.name)
        self._summary = Summary(mailbox=self.name)  # the current poll's (see poll)
        self._last_exc: BaseException | None = None
        #: The facts of the latest session (None before the first): the scheduler
        #: waits for pushed mail only when they say ``can_push``.
        self.facts: SessionFacts | None = None
        self.ledger = self._new_ledger(self._summary)

    def _new_ledger(self, summary: Summary) -> Ledger:
        return Ledger(
            self.journal, self.name, self.cfg, self.hooks, self.quarantine, summary,
            ack=self.cfg.ack, log=self.log, fence=self.fence,
        )

    # --- the poll ----------------------------------------------------------------

    async def poll(self) -> Summary:
        """Run sessions (commit windows) until no work is left, stop is set, or an
        error occurs. Errors are recorded in the summary, never raised."""
        summary = self._summary = Summary(mailbox=self.name)
        self.ledger = self._new_ledger(summary)
        started = time.monotonic()
        self._attempted = set()
        self.oversize.new_poll()
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
                    if not self.oversize.received(exc, self.ledger):
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
            self._poll_failed(summary, exc)
            self.log.warning("session_failed", error=summary.error)
        except Exception as exc:
            self._poll_failed(summary, exc)
            self.log.error("session_crashed", error=summary.error, exc_info=True)
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

    def _poll_failed(self, summary: Summary, exc: BaseException) -> None:
        summary.committed = False
        summary.error = error_text(exc)
        summary.error_type = type(exc).__name__
        self._last_exc = exc

    def _count_crash(self) -> None:
        """Charge an attempt to the message a dead process left in its chain, when it
        was the only chain in flight (see mailpipe.inflight)."""
        try:
            left = self.inflight.take()
        except OSError as exc:  # e.g. a full disk: the poll goes on without it
            self.log.warning("inflight_marker_unavailable", error=error_text(exc))
            return
        if left is not None:
            uid, alone = left
            self.ledger.charge_crash(uid, alone=alone)

    def _mark(self, uid: str | None) -> None:
        """Set (or with None clear) the in-flight marker; a marker that cannot be
        written (a full disk) is skipped with a warning, never a failed message."""
        try:
            if uid is None:
                self.inflight.clear()
            else:
                self.inflight.set(uid)
        except OSError as exc:
            self.log.warning("inflight_marker_unavailable", error=error_text(exc))

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
        return self._last_exc

    async def _session(self, summary: Summary) -> bool:
        """One session: one commit window, or on a session that can apply its
        acknowledgements and stay open (:class:`CheckpointSession`) every window
        until none is left (MP-06). Returns True when messages are left for another
        session (a window ended by a commit, or T-44's follow-up)."""
        async with self.source.session() as opened:
            self.ledger.abandon()  # an earlier window that failed owes nothing here
            session = opened
            if self.lease_check is not None:
                session = LeaseGuardedSession(
                    opened, self.lease_check, self.ack_check
                )
            keeps_open = isinstance(opened, CheckpointSession)
            while True:
                cursor_session, stored = self._resume(opened)
                refs, more, follow_up = await self._window(session, opened, summary)
                summary.windows += 1
                # Each window makes progress; the bound only guards against a source
                # that lists the same messages again and again.
                next_here = (
                    more and keeps_open and summary.windows < MAX_SESSIONS_PER_POLL
                )
                if next_here:
                    # MP-06: the acknowledgements apply now (IMAP UID EXPUNGE, MOVE,
                    # STORE), and the next window lists again on this session.
                    applied = await self.ledger.checkpoint(session)
                else:
                    applied = await self.ledger.commit(session)
                # What the server still holds of the listing: with no T-44 follow-up
                # session, no later listing shows what this one removed.
                summary.backlog = max(0, len(refs) - applied)
                if cursor_session is not None:
                    self.ledger.advance_cursors(stored, cursor_session.coverage())
                self._prune(refs)
                if not next_here:
                    return more or follow_up

    async def _window(
        self, session: Any, opened: object, summary: Summary
    ) -> tuple[list[MessageRef], bool, bool]:
        """List, plan and run one commit window on an open session, up to (not
        including) its commit. Returns the listing, whether messages are left for
        another window, and whether the server may list more only in a new session
        (T-44)."""
        refs = await session.list()
        facts = facts_of(opened)  # after the listing: it tells whether ids are stable
        self.facts = facts
        self._login_delay = facts.login_delay
        summary.listed = max(summary.listed, len(refs))  # the fullest listing
        summary.backlog = len(refs)  # the latest listing (less what its commit removes)
        self.hooks.session_started(
            mailbox=self.name, count=len(refs), octets=sum(r.size for r in refs)
        )
        if not facts.stable_ids and self.cfg.delete != "after_processing":
            raise SourcePermanentError(
                f"mailbox {self.name!r}: the server offers no UIDL, so "
                f"delete = {self.cfg.delete!r} cannot tell old mail from new; "
                "only delete = 'after_processing' is allowed"
            )
        if not facts.stable_ids:
            self.log.warning("server_without_uidl", fallback="content_hash")
        plan = self._plan(refs, facts, opened)
        # Nothing is fetched twice in one poll: a later window skips what an
        # earlier one tried (without UIDL, what it could not retrieve).
        plan.process = [
            r
            for r in plan.process
            if tried_key(r) not in self._attempted
            and tried_key(r) not in self.oversize.unkeyed
        ]
        plan.oversize = [r for r in plan.oversize if tried_key(r) not in self._attempted]
        attempted_before = len(self._attempted)
        window, more = planning.window(plan.process, self.cfg)

        self.ledger.owe_settled(plan.ack)
        await self.ledger.acknowledge(session)
        if plan.oversize:
            await self.oversize.listed(
                session, plan.oversize, self.ledger, spool_dir=self.spool_dir,
                spool_threshold=self.spool_threshold, identify=self._by_hash,
                attempted=self._attempted,
            )
            await self.ledger.acknowledge(session)
        todo = window
        if self.prefetch.wanted():
            todo = await self.prefetch.decide(
                session, window, journal=self.journal, ledger=self.ledger,
                attempted=self._attempted, stop=self.stop, mark=self._mark,
            )
            await self.ledger.acknowledge(session)
        await self._retrieve(session, todo, summary, facts)
        if self.stop.is_set():
            more = False
        if not facts.stable_ids and len(self._attempted) == attempted_before:
            # Without UIDL a window cannot skip what this poll already tried: a
            # window that ran nothing new ends the poll instead of spinning.
            more = False
        # T-44: some servers (Gmail's POP3, ``pages_listing``) list only a batch
        # per session and show the next one after QUIT: a session that ran new
        # mail is followed by another, until one finds nothing new (RFC 2449 §6.5
        # LOGIN-DELAY forbids it). Any other server listed everything it has.
        follow_up = (
            facts.pages_listing
            and not more
            and len(self._attempted) > attempted_before
            and not self.stop.is_set()
            and self.cfg.max_messages is None
            and self.cfg.max_bytes is None
            and not self._login_delay
        )
        return refs, more, follow_up

    def _resume(self, opened: object) -> tuple[CursorSession | None, dict[str, int]]:
        """MP-05: hand a cursor-capable session the journal's listing cursors (not
        with ``after_days``, see :func:`mailpipe.cursors.usable`), and the uids of
        the unfinished entries, which the session lists whatever its cursors and
        criteria (a failing message is retried, an owed acknowledgement sent, and
        planning's ``gone`` is only what the server no longer has)."""
        if not isinstance(opened, CursorSession) or not cursors.usable(self.cfg):
            return None, {}
        stored = self.journal.cursors(self.name)
        opened.resume(
            stored, self.journal.unfinished(self.name), self.journal.owed(self.name)
        )
        return opened, stored

    # --- planning ----------------------------------------------------------------

    def _plan(
        self, refs: list[MessageRef], facts: SessionFacts, session: object = None
    ) -> planning.Plan:
        """Read what the plan needs, plan (pure), and apply its journal-side effects."""
        if not facts.stable_ids:
            return planning.plan_unkeyed(refs, self.cfg.max_message_size)
        entries = self.journal.get_many(self.name, [r.uid for r in refs])
        if not self._reset_checked:  # C-60: before any journal write of this poll
            self._reset_checked = True
            if not facts.ids_have_epoch:
                uidl_reset.guard(self.name, self.cfg, refs, entries, self.journal, self.log)
        new = any(r.uid not in entries for r in refs)
        if new and facts.ids_have_epoch and isinstance(session, EpochSession):
            # IC-25: entries an epoch change superseded, for adoption by content hash
            # (only when the listing shows ids the journal does not know).
            self._superseded.update(identity.superseded_by_hash(
                self.journal, self.name, {r.uid for r in refs}, session
            ))
        plan = planning.plan(
            refs, entries, self.journal.owed(self.name), self.cfg, datetime.now(UTC)
        )
        self.ledger.settle_gone(plan.gone)
        for ref in plan.duplicates:
            self.log.warning("duplicate_uidl", uid=ref.uid, number=ref.number)
        for ref in plan.reappeared:
            self.log.warning("deleted_message_reappeared", uid=ref.uid)
        for ref, entry in plan.resting:
            self._skip_unretrievable(ref, entry)
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
            retry_after=str(planning.UNRETRIEVABLE_REST),
        )

    # --- retrieval and the chain ---------------------------------------------------

    async def _retrieve(
        self,
        session: SourceSession,
        refs: list[MessageRef],
        summary: Summary,
        facts: SessionFacts,
    ) -> None:
        """Retrieve and process ``refs`` in groups (GROUP_SIZE messages or GROUP_BYTES
        octets, whichever comes first), each a group commit.

        P-14: a session that :func:`~mailpipe.source.retrieves_across_commits` gets
        the whole window as one stream, and each group commits (and acknowledges)
        while the stream goes on: the server sends the next group while this one is
        made durable. Any other session, and any session on a server with EXPIRE 0
        (C-29: its QUIT deletes whatever was RETR'd), gets one stream per group, read
        to its end before the group commits. With pipelining (RFC 2449 §6.6) replies
        come back in command order either way. After a stop request the group in hand
        is committed and the rest is left new in the journal for the next run: read
        and dropped by the session (P-14), or drained here unprocessed.
        """
        if not refs or self.stop.is_set():
            return
        entries = self.journal.get_many(self.name, [r.uid for r in refs if r.uid])
        expire_zero = facts.deletes_on_commit
        groups = planning.chunks(refs, GROUP_SIZE, GROUP_BYTES)
        if retrieves_across_commits(session) and not expire_zero:
            await self._flight(session, groups, entries, summary, facts, len(refs),
                               across=True)
            return
        for group in groups:
            if self.stop.is_set():
                break
            await self._flight(session, [group], entries, summary, facts, len(refs),
                               across=False)

    async def _flight(
        self,
        session: SourceSession,
        groups: list[list[MessageRef]],
        entries: dict[str, Entry],
        summary: Summary,
        facts: SessionFacts,
        total: int,
        *,
        across: bool,
    ) -> None:
        """One retrieval stream over ``groups``, each committed once its messages are
        in (or the stream went past it), and acknowledged only then (MP-04).

        ``across`` (P-14): the session finishes a stream left early, so a stop
        request ends the stream at once. Otherwise ``groups`` is one group, whose
        stream is read to its end (after a stop, drained here) before it commits."""
        expire_zero = facts.deletes_on_commit
        place = {tried_key(r): i for i, g in enumerate(groups) for r in g}
        current, left = 0, len(groups[0])
        begun = False
        group: list[Outcome] = []
        settled: list[MessageRef] = []  # known by content hash: owed after the group

        async def close() -> None:
            # The group's messages are all in (or the stream went past them): make
            # it durable, then owe and acknowledge it (P-14: into the running flight).
            nonlocal current, left, begun, group, settled
            done, owed = group, settled
            group, settled = [], []  # an error from here on must not commit it twice
            # Across commits the first begin covered the rest of the window (P-14).
            current, begun = current + 1, begun and across
            left = len(groups[current]) if current < len(groups) else 0
            self.ledger.owe_settled(owed)
            if done:
                await self.ledger.commit_group(self.chain, done, facts)
            await self.ledger.acknowledge(session)

        stream = oversize.retrieve(
            session,
            [r for g in groups for r in g],
            spool_dir=self.spool_dir,
            spool_threshold=self.spool_threshold,
            max_size=self.cfg.max_message_size,
        )
        try:
            try:
                async for item in stream:
                    # A message of a later group closes the groups before it.
                    while place.get(tried_key(item.ref), current) > current:
                        await close()
                    if not begun:
                        # Once its first message is in, so the journal write overlaps
                        # the transfer; across commits (P-14) the rest of the window
                        # at once: one transaction, not one more fsync per group.
                        self.ledger.begin_many(
                            [r for g in groups[current:] for r in g] if across
                            else groups[current],
                            entries,
                        )
                        begun = True
                    stopped = self.stop.is_set() and not expire_zero
                    if stopped and across:
                        _unspool(item if isinstance(item, Message) else item.evidence)
                        break  # the session drops the rest (P-14)
                    left -= 1
                    await self._item(item, entries, expire_zero, summary, group,
                                     settled, total, drain=stopped)
                    if left <= 0 and across:
                        # (Any other session's stream is read to its end first: the
                        # group commits after the loop, see retrieves_across_commits.)
                        await close()
                        if self.stop.is_set():
                            break
            finally:
                aclose = getattr(stream, "aclose", None)  # a stream left early ends now
                if aclose is not None:
                    await aclose()
        except BaseException:
            # Whatever completed is made durable even when the session is failing,
            # so the next session only acknowledges it (never re-runs it). Nothing
            # is acknowledged on a broken session: the journal owes it.
            if group:
                await self.ledger.commit_group(self.chain, group, facts)
            raise
        while current < len(groups):  # a stream that ended early, or a stop
            await close()

    async def _item(
        self,
        item: Message | Unretrievable,
        entries: dict[str, Entry],
        expire_zero: bool,
        summary: Summary,
        group: list[Outcome],
        settled: list[MessageRef],
        total: int,
        *,
        drain: bool,
    ) -> None:
        """One item of a retrieval stream into ``group`` (``drain``: dropped
        unprocessed, it stays new in the journal and is processed by the next run)."""
        if isinstance(item, Unretrievable):
            item = self._confirmed(item, entries) or item
        if isinstance(item, Unretrievable):
            self._unretrievable(item, entries, group)
            if expire_zero and item.evidence is not None:
                # C-29, RFC 2449 §6.7: the server may delete at QUIT what it believes
                # was retrieved; this copy is not whole, so the session ends without
                # QUIT and the server keeps it.
                raise SourceError(
                    f"{item.reason}; on a server with EXPIRE 0 the session is aborted "
                    "without QUIT so that the server keeps it"
                )
            return
        try:
            if drain:
                # (With EXPIRE 0 the server may delete what was RETR'd at QUIT, so
                # the rest of the group is processed instead: never drained.)
                return
            await self._retrieved(item, entries, expire_zero, summary, group, settled)
            if self.progress is not None:
                self.progress(self.name, summary.retrieved, total)
            if self.stop.is_set():
                self.log.info("stop_requested", after=summary.retrieved)
        finally:
            _unspool(item)

    def _unretrievable(
        self, item: Unretrievable, entries: dict[str, Entry], group: list[Outcome]
    ) -> None:
        """A message the source could not deliver whole (issue 20 items 1-2, issue 21
        item 2): never committed, never acknowledged; an attempt is counted (in the
        group commit) and the server copy waits for a later poll, behind new mail."""
        _unspool(item.evidence)
        if item.after_headers:
            self.prefetch.disable("a RETR after TOP came back short")
        self._attempted.add(tried_key(item.ref))  # no later window of this poll asks
        entry = entries.get(item.ref.uid) if item.ref.uid else None
        if item.ref.uid and entry is None:
            entry = self.ledger.begin(item.ref)
        done = self.ledger.unretrievable(item, entry)
        if done is not None:
            group.append(done)

    def _confirmed(self, item: Unretrievable, entries: dict[str, Entry]) -> Message | None:
        """The evidence of a confirmable short copy, when an earlier session received
        the very same octets (the listed size is wrong, not the message); else None.

        Only sources asked to (POP3 ``verify_size = "confirm"``) mark copies
        confirmable, and never one served after TOP or followed by stray data.
        """
        evidence = item.evidence
        if not item.confirmable or evidence is None or not item.ref.uid:
            return None
        entry = entries.get(item.ref.uid)
        if entry is None or copy_tag(evidence) not in entry.last_error:
            return None
        self.log.warning(
            "short_copy_confirmed",
            uid=item.ref.uid,
            listed=item.ref.size,
            received=evidence.size,
            detail="the same octets arrived in two sessions: the listed size is wrong",
        )
        return evidence

    async def _retrieved(
        self,
        msg: Message,
        entries: dict[str, Entry],
        expire_zero: bool,
        summary: Summary,
        group: list[Outcome],
        settled: list[MessageRef],
    ) -> None:
        """Process one retrieved message into ``group`` (or ``settled``)."""
        summary.retrieved += 1
        summary.bytes += msg.size
        if msg.size != msg.ref.size:
            self.log.info("octet_count_mismatch", uid=msg.ref.uid, listed=msg.ref.size,
                          received=msg.size)
        listed_uid = msg.ref.uid
        had_uid = bool(listed_uid)
        if had_uid:
            # Whatever happens to it below, no later window of this poll fetches it.
            self._attempted.add(msg.ref.uid)
        known = entries.get(msg.ref.uid) if had_uid else None
        res = identity.resolve(
            msg, known, self.journal, self.name, self.log, self._superseded
        )
        msg = res.msg
        if res.adopt is not None:
            # IC-25: processed under an id a new epoch superseded: not run again.
            if self.ledger.adopt(msg.ref, res.adopt):
                settled.append(msg.ref)
            return
        if res.readopt is not None:
            # The same message, counted differently now: remember the new size so
            # that the next poll does not fetch it again.
            self.ledger.readopt(msg.ref, res.readopt)
            return
        if not res.run:
            if res.owe:
                settled.append(msg.ref)
            if res.reused is not None and res.entry is not None:
                self.ledger.readopt(res.reused, res.entry)
            return
        if res.entry is not None:
            entries[msg.ref.uid] = res.entry
        rekeyed = msg.ref.uid != listed_uid  # known by its content hash
        if rekeyed and msg.ref.uid in self._attempted and not expire_zero:
            return  # already tried in this poll (no UIDL): next poll retries it
        self._attempted.add(msg.ref.uid)
        done = await self._run_one(msg, entries.get(msg.ref.uid))
        done.readopt = res.reused
        if done.failed and expire_zero and done.status == Status.PENDING:
            # C-29, RFC 2449 §6.7: EXPIRE 0 lets the server delete what was RETR'd at
            # QUIT; keep the raw bytes before that can happen.
            done = self.ledger.quarantine_failed(msg, done)
        group.append(done)

    def _by_hash(self, msg: Message) -> tuple[Message, Entry | None, bool]:
        return identity.by_hash(self.journal, self.name, msg)

    async def _run_one(self, msg: Message, entry: Entry | None) -> Outcome:
        if entry is None:
            entry = self.ledger.begin(msg.ref)
        if (
            entry.status == Status.PENDING
            and entry.attempts >= self.cfg.max_attempts
            and not entry.last_error.startswith(UNRETRIEVABLE)
        ):
            # Its attempts are spent without a quarantine (the process died in the
            # chain each time, see _count_crash): keep the raw bytes, never run it again.
            return self.ledger.spent(msg, entry)
        uid = msg.ref.uid
        self._mark(uid)
        try:
            result = await self.chain.run(
                self.cfg.pipeline,
                msg,
                done_steps=entry.steps,
                on_commit=lambda step: self.ledger.step_committed(uid, step),
            )
        finally:
            self._mark(None)
        return self.ledger.processed(msg, entry, result)

    def _prune(self, refs: list[MessageRef]) -> None:
        """Drop journal entries deleted over 30 days ago and gone from the server; at
        most once per :data:`PRUNE_INTERVAL` per mailbox (the first poll of a process
        always), not in every poll: a poll with no new mail makes no journal
        transaction for it (issue 18)."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL
        try:
            self.journal.prune(self.name, [r.uid for r in refs], 30.0)
        except Exception as exc:  # pruning is housekeeping; never fail a poll for it
            self.log.warning("journal_prune_failed", error=error_text(exc))


#: Sessions in one poll at most, and commit windows one session runs in a poll
#: (MP-06); each makes progress, so a poll that reaches it has more windows than any
#: real mailbox needs: the next poll goes on.
MAX_SESSIONS_PER_POLL = 1000

#: Seconds between two journal prunes of one mailbox (entries become prunable only 30
#: days after their deletion, so an hour later changes nothing that matters).
PRUNE_INTERVAL = 3600.0

#: The longest LOGIN-DELAY (seconds) waited between two commit windows of one poll;
#: a longer one ends the poll after the window instead.
MAX_LOGIN_DELAY_WAIT = 60.0

#: Response codes (RFC 2449 §8, RFC 3206) that refuse a later window's login only
#: because an earlier window of the same poll has just logged in.
LATER_LOGIN_CODES = frozenset({"LOGIN-DELAY", "IN-USE"})


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less when ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _unspool(msg: Message | None) -> None:
    if msg is not None and msg.spool_path is not None:
        Path(msg.spool_path).unlink(missing_ok=True)
