"""The delivery ledger: the one writer of delivery state, and the acknowledgement gate.

Every change to what mailpipe knows about a message — begun, a step committed, an
attempt failed, an outcome (done, kept, dropped, quarantined), a deletion owed, a
deletion done — is made here, together with the outcome counts of the poll and the
``mailpipe_message_*`` hooks. The engine, ``quarantine replay`` and ``state
mark-seen`` all go through it.

**Where is a message acknowledged?** Only in :meth:`Ledger.acknowledge`, and only for
refs the ledger itself put on its *owed* list, which it does after — never before —
the write that makes the outcome durable (MP-01, RFC 1939 §6):

- a group commit (:meth:`Ledger.commit_group`): the processors' ``flush()`` ran, the
  journal batch with the outcome committed, and the outcome says the message is due;
- an outcome already durable in the journal when the session listed it
  (:meth:`Ledger.owe_settled`: a deletion owed by an earlier session, an aged
  ``after_days`` message, a deleted message that reappeared);
- a decision journaled on its own (:meth:`Ledger.decided` on prefetched headers,
  the oversize policy), each committed before it returns.

:meth:`Ledger.commit` then ends the session (POP3 QUIT) and only after the server
confirmed marks the acknowledged messages deleted; a failed commit leaves them owed.
:meth:`Ledger.checkpoint` does the same for a session that applies them and stays
open for the next commit window (IMAP, MP-06).
``tests/core/test_ledger.py`` proves the gate, and ``tests/core/test_ledger_only.py``
that no other module acknowledges, commits a source session, or writes the journal's
delivery state.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from mailpipe import cursors
from mailpipe import source as contract
from mailpipe.errors import ProcessorError
from mailpipe.journal.base import Entry, Fence, Finish, Journal, Status
from mailpipe.message import Message, MessageRef, message_key
from mailpipe.planning import UNRETRIEVABLE
from mailpipe.processor import Decision, Disposition
from mailpipe.source import Ack, SessionFacts, Unretrievable
from mailpipe.storable import storable

if TYPE_CHECKING:
    from mailpipe.chain import Chain, ChainResult
    from mailpipe.config import MailboxConfig
    from mailpipe.errors import OversizeError
    from mailpipe.plugin_manager import Hooks
    from mailpipe.quarantine import Quarantine

log = structlog.get_logger()


#: The error recorded for a message whose chain the process did not survive.
CRASH_ERROR = (
    "the mailpipe process died while this message was in the chain "
    "(a crash, the OOM killer or a kill)"
)


class AcknowledgeBeforeDurable(AssertionError):
    """A programming error: something asked to acknowledge a message whose outcome is
    not durable in the journal. Raised before anything reaches the server."""


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
    sessions: int = 0  # logins (connections)
    windows: int = 0  # commit windows (several per session when it checkpoints, MP-06)
    committed: bool = True
    error: str | None = None
    error_type: str | None = None
    backlog: int | None = None  # the latest listing less what its commit removed (None: none)
    reconciled: int = 0  # adopted by content hash after an epoch change (IC-25)

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
        were processed but are not durable (nothing is lost; none was acknowledged)."""
        self.error = (
            f"group commit failed for {count} message(s), kept on the server for "
            f"the next poll: {error}"
        )
        self.error_type = error_type


@dataclass(slots=True)
class Outcome:
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
class Ledger:
    """The delivery state of one mailbox, written one way (see the module docstring).

    One ledger serves one poll (its :class:`Summary`); :meth:`acknowledge` and
    :meth:`commit` act on the session the engine passes, the owed list belongs to it.
    """

    journal: Journal
    mailbox: str
    cfg: MailboxConfig
    hooks: Hooks
    quarantine: Quarantine
    summary: Summary
    ack: Ack = contract.DELETE
    log: Any = field(default=None)
    #: The lease's fencing token (mailpipe.leases): the group commit's journal batch
    #: commits only while it is current (issue 16.2); None without a lease.
    fence: Fence | None = None
    _owed: list[tuple[MessageRef, Ack]] = field(default_factory=list)  # due, durable, unsent
    _sent: list[MessageRef] = field(default_factory=list)  # acknowledged this session

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = log.bind(mailbox=self.mailbox)

    # --- beginning and steps ---------------------------------------------------------

    def begin(self, ref: MessageRef) -> Entry:
        """Start (or look up) the entry of ``ref``; PENDING until an outcome."""
        return self.journal.begin(self.mailbox, ref.uid, key=ref.key, size=ref.size)

    def begin_many(self, refs: Iterable[MessageRef], entries: dict[str, Entry]) -> None:
        """Begin the entries of a chunk's new messages in one transaction.

        A PENDING entry carries no promise of its own (attempts and outcomes are
        written by the group commit), so one commit per chunk suffices, and it need
        not wait for the disk (MP-08): lost with the OS, an entry is begun again when
        its message is listed again, and the group commit's sync makes it durable.
        """
        new = [(r.uid, r.key, r.size) for r in refs if r.uid and r.uid not in entries]
        if not new:
            return
        with self._batch(synced=False):
            entries.update(begin_many(self.journal, self.mailbox, new))

    def step_committed(self, uid: str, step: str) -> None:
        """Record at once that ``step`` committed (a non-idempotent side effect: mail
        sent, webhook posted), so no crash can make it happen twice."""
        self.journal.step_committed(self.mailbox, uid, step)

    def charge_crash(self, uid: str, *, alone: bool) -> None:
        """Charge an attempt to the message a dead process left in its chain (see
        :mod:`mailpipe.inflight`), when it was the only chain in flight."""
        entry = self.journal.get_many(self.mailbox, [uid]).get(uid)
        if entry is None:  # it died in the header prefetch, before its first begin()
            key = message_key(self.mailbox, uid)
            entry = self.journal.begin(self.mailbox, uid, key=key, size=0)
        if entry.status != Status.PENDING:
            return
        if not alone:
            self.log.warning("message_in_flight_at_death", uid=uid, key=entry.key,
                             charged=False, reason="other chains were in flight")
            return
        with self._batch():
            attempts = self.journal.fail(self.mailbox, uid, error=CRASH_ERROR, counted=True)
        self.log.error(
            "message_killed_process",
            uid=uid,
            key=entry.key,
            attempts=attempts,
            max_attempts=self.cfg.max_attempts,
        )
        self.hooks.message_failed(mailbox=self.mailbox, uid=uid, key=entry.key,
                                  processor="(process died)", error=CRASH_ERROR,
                                  attempts=attempts)

    # --- outcomes --------------------------------------------------------------------

    def processed(self, msg: Message, entry: Entry, result: ChainResult) -> Outcome:
        """Turn a chain's result into the outcome the group commit will write: counts,
        the failure hook, and a quarantine once the attempts are spent."""
        ref = msg.ref
        if result.ok:
            assert result.decision is not None
            self.summary.processed += 1
            decision = result.decision
            reason = storable(decision.reason)  # a processor's text, maybe a header's
            if decision.disposition == Disposition.QUARANTINE:
                delete = self.quarantined(
                    msg, reason=reason or "quarantined by rule",
                    attempts=0, error="",
                )
                return Outcome(ref, result, Status.QUARANTINED, "quarantine",
                               reason, delete, msg.sha256)
            status, delete = self._status_for(decision)
            self._count(decision)
            self.log.debug("message_processed", uid=ref.uid,
                           disposition=str(decision.disposition))
            return Outcome(ref, result, status, str(decision.disposition),
                           reason, delete, msg.sha256)
        assert result.error is not None
        self.summary.failed += 1
        error = error_text(result.error)
        attempts = entry.attempts + (0 if result.temporary else 1)
        self.log.warning(
            "message_failed",
            uid=ref.uid,
            key=ref.key,
            message_id=msg.header("message-id"),
            step=result.failed_step,
            error=error,
            attempts=attempts,
            temporary=result.temporary,
        )
        self._failed_hook(ref, result.failed_step or "", error, attempts)
        done = Outcome(ref, result, Status.PENDING, "failed", "", False, msg.sha256,
                       failed=True, attempts=attempts, error=error)
        if not result.temporary and (result.final or attempts >= self.cfg.max_attempts):
            done = self.quarantine_failed(msg, done)
        return done

    def spent(self, msg: Message, entry: Entry) -> Outcome:
        """A message whose attempts were all spent by process deaths: quarantined
        without running its chain again (the attempts were counted when they
        happened)."""
        done = Outcome(msg.ref, None, Status.PENDING, "failed", "", False, msg.sha256,
                       attempts=entry.attempts, error=entry.last_error or CRASH_ERROR)
        done = self.quarantine_failed(msg, done)
        done.failed = False
        return done

    def quarantine_failed(self, msg: Message, done: Outcome) -> Outcome:
        """Quarantine a message that failed ``done.attempts`` times (raw bytes kept)."""
        reason = (
            # storable: a route to no pipeline names the failed step by the route's
            # text, a processor's (maybe a header's): the journal and the sidecar
            # must store it (review of h-lows: a lone surrogate failed every poll).
            f"failed {done.attempts} time(s) in {storable(done.result.failed_step)}"
            if done.result
            else f"the process died {done.attempts} time(s) while running its chain"
        )
        if done.result and done.result.final:  # not retried: say why (the budget)
            reason = f"{reason}: {done.error}"
        done.delete_due = self.quarantined(
            msg, reason=reason, attempts=done.attempts, error=done.error
        )
        done.status = Status.QUARANTINED
        done.disposition = "quarantine"
        done.reason = reason
        return done

    def quarantined(self, msg: Message, *, reason: str, attempts: int, error: str) -> bool:
        """Put the raw message in the quarantine; return True when the mailbox's
        policy (``on_quarantine = "delete"``) makes the server copy due."""
        path = self.quarantine.put(msg, reason=reason, attempts=attempts, error=error)
        self.summary.quarantined += 1
        self.log.warning("message_quarantined", uid=msg.ref.uid, key=msg.key,
                         reason=reason, path=str(path))
        self.hooks.message_quarantined(mailbox=self.mailbox, uid=msg.ref.uid,
                                       key=msg.key, reason=reason, path=str(path))
        return self.cfg.quarantine_ack is not None

    def decided(self, ref: MessageRef, decision: Decision, sha256: str | None) -> None:
        """Journal (durably, now) a decision made without the chain's writes — on
        prefetched headers — and owe the acknowledgement when it is due."""
        status, delete = self._status_for(decision)
        self._count(decision, prefetch=True)
        with self._batch():
            self.begin(ref)
            self.journal.finish(self.mailbox, ref.uid, status=status,
                                disposition=str(decision.disposition), sha256=sha256,
                                reason=storable(decision.reason), delete_due=delete)
        self.hooks.message_done(mailbox=self.mailbox, uid=ref.uid, key=ref.key,
                                disposition=str(decision.disposition))
        if delete:
            self._owed.append((ref, self.ack))

    def unretrievable(self, item: Unretrievable, entry: Entry | None) -> Outcome | None:
        """Count, log and announce an attempt that did not deliver a whole message
        (MP-01). With ``entry`` the attempt is written by the group commit (the
        returned outcome); without it, it is journaled now. Nothing is owed."""
        ref = item.ref
        error = storable(f"{UNRETRIEVABLE}{item.reason}")  # the server's words
        if item.confirmable and item.evidence is not None:
            error += f" {copy_tag(item.evidence)}"  # see Engine._confirmed
        self.summary.failed += 1
        if not ref.uid:
            self.log.error("message_unretrievable", number=ref.number, error=error)
            return None
        if entry is None:
            with self._batch():
                self.begin(ref)
                attempts = self.journal.fail(self.mailbox, ref.uid, error=error,
                                             counted=True)
        else:
            attempts = entry.attempts + 1
        self.log.error("message_unretrievable", uid=ref.uid, key=ref.key, error=error,
                       attempts=attempts, max_attempts=self.cfg.max_attempts)
        self._failed_hook(ref, "retrieve", error, attempts)
        if entry is None:
            return None
        return Outcome(ref, None, Status.PENDING, "failed", "", False, None,
                       failed=True, attempts=attempts, error=error)

    def oversize_deleted(self, ref: MessageRef) -> None:
        """``on_oversize = "delete"``: journal it deleted unread, and owe its
        acknowledgement (a message without a uid is decided again from LIST)."""
        self.summary.dropped += 1
        if ref.uid:
            with self._batch():
                self.begin(ref)
                self.journal.finish(self.mailbox, ref.uid, status=Status.COMMITTED,
                                    disposition="oversize", sha256=None,
                                    reason="oversize: deleted unread", delete_due=True)
        self._owed.append((ref, contract.DELETE))  # "delete" means delete, unread

    def oversize_quarantined(self, msg: Message, reason: str) -> None:
        """``on_oversize = "quarantine"``: the whole message is kept in the quarantine
        and journaled like any quarantined message, durable before its ack."""
        delete = self.quarantined(msg, reason=reason, attempts=0, error="")
        with self._batch():
            self.begin(msg.ref)
            self.journal.finish(self.mailbox, msg.ref.uid, status=Status.QUARANTINED,
                                disposition="quarantine", sha256=msg.sha256,
                                reason=reason, delete_due=delete)
        if delete:
            self._owed.append((msg.ref, self._quarantine_ack()))

    def oversize_received(self, exc: OversizeError, *, policy: str, limited: bool) -> str | None:
        """Journal the decision for a message the server sent past a size limit (see
        :mod:`mailpipe.oversize`); return its outcome, None without a uid."""
        ref = exc.ref
        if ref is None or not ref.uid:
            return None
        listed = f"LIST said {ref.size}"
        if limited and not exc.hard:
            with self._batch():
                self.begin(ref)
                self._mark_oversize(ref, exc, listed, policy)
            return "marked"
        delete = policy == "delete"
        with self._batch():
            self.begin(ref)
            self.journal.finish(
                self.mailbox, ref.uid,
                status=Status.COMMITTED if delete else Status.KEPT,
                disposition="oversize", sha256=None,
                reason=f"oversize: the server sent more than the {exc.limit}-octet cap "
                f"({listed}); " + ("deleted unread" if delete else "left on the server"),
                delete_due=delete,
            )
        if delete:
            self.summary.dropped += 1
        else:
            self.summary.skipped += 1
        return "deleted" if delete else "kept"

    def readopt(self, ref: MessageRef, like: Entry | Outcome) -> None:
        """Give the uid of ``ref`` the outcome ``like`` records and ``ref``'s listed
        size (issue 21 item 3), so later polls list it as settled. Durable when it
        returns (inside a batch: with it)."""
        self._take_outcome(ref, like, status=like.status, delete_due=like.delete_due)
        self.log.info("uid_readopted", uid=ref.uid, size=ref.size, status=like.status)

    def _take_outcome(
        self, ref: MessageRef, like: Entry | Outcome, *, status: Status, delete_due: bool
    ) -> None:
        """Write ``like``'s outcome under ``ref``'s uid and size, in one batch."""
        with self._batch():
            # MP-05: the entry only; the mailbox's cursors stay.
            self.journal.forget(self.mailbox, [ref.uid], cursors=False)
            self.begin(ref)
            self.journal.finish(self.mailbox, ref.uid, status=status,
                                disposition=like.disposition or "", sha256=like.sha256,
                                reason=like.reason, delete_due=delete_due)

    def adopt(self, ref: MessageRef, earlier: Entry) -> bool:
        """IC-25: ``ref`` (a new id of a new epoch) holds the message ``earlier`` (a
        superseded id) settled: ``ref`` takes that outcome, durable when this returns,
        and the message is not run again. Returns True when its acknowledgement is
        owed (the outcome was due for it, or done: the new copy gets it again by the
        mailbox's policy); the caller then owes it with :meth:`owe_settled`."""
        due = earlier.delete_due or earlier.status == Status.DELETED
        status = earlier.status
        if status == Status.DELETED:  # done for the old copy, owed for this one
            quarantined = earlier.disposition == "quarantine"
            status = Status.QUARANTINED if quarantined else Status.COMMITTED
        self._take_outcome(ref, earlier, status=status, delete_due=due)
        self.summary.reconciled += 1
        self.log.warning("epoch_reconciled", uid=ref.uid, earlier=earlier.uid,
                         status=status, owed=due)
        return due

    def advance_cursors(
        self, stored: Mapping[str, int], coverage: Mapping[str, contract.Coverage]
    ) -> None:
        """Store the listing cursors the session's ``coverage`` earns (MP-05), after
        :meth:`commit`: every outcome they pass over is durable in the journal
        already (see :mod:`mailpipe.cursors`). ``stored`` is what the session was
        resumed from; nothing is written when nothing moved.

        Compare-and-set: written only if the cursors are still ``stored`` and every
        entry passed over is still finished, in one transaction, so a ``state
        forget`` or a replay that ran during the poll (and dropped the cursors) wins;
        the next poll then lists whole."""
        uids = {uid for cover in coverage.values() for uid in cover.listed.values()}
        entries = self.journal.get_many(self.mailbox, sorted(uids)) if uids else {}
        advanced = cursors.advance(coverage, entries)
        if advanced == dict(stored):
            return
        written = self.journal.set_cursors(
            self.mailbox, advanced, expect=stored,
            passed=cursors.passed(coverage, advanced), **self._fenced(),
        )
        if written:
            self.log.debug("cursors_advanced", cursors=advanced)
        else:
            self.log.info("cursors_not_advanced", reason="changed during the poll")

    def settle_gone(self, uids: Sequence[str]) -> None:
        """Deletions owed for mail the server no longer lists are done (a crash came
        between the commit's confirmation and :meth:`commit`'s journal write)."""
        if uids:
            self.journal.mark_deleted(self.mailbox, uids, **self._fenced())
            self.log.info("owed_deletions_settled", count=len(uids))

    # --- the group commit and the gate -----------------------------------------------

    def owe_settled(self, refs: Iterable[MessageRef]) -> None:
        """Owe the acknowledgement of messages whose outcome the journal already holds
        durably (the plan read it: a deletion owed, aged out, or a settled message
        listed again). Checked against the journal: a ref whose entry is missing or
        still PENDING raises :class:`AcknowledgeBeforeDurable`."""
        refs = list(refs)
        if not refs:  # the common case, once per chunk: no journal round trip
            return
        entries = self.journal.get_many(self.mailbox, [r.uid for r in refs if r.uid])
        for ref in refs:
            entry = entries.get(ref.uid)
            if entry is None or entry.status == Status.PENDING:
                raise AcknowledgeBeforeDurable(
                    f"mailbox {self.mailbox!r}: uid {ref.uid!r} has no durable outcome"
                )
            self._owed.append((ref, self._ack_for(entry.disposition or "")))

    async def commit_group(
        self, chain: Chain, group: list[Outcome], facts: SessionFacts
    ) -> None:
        """Flush the processors, commit the journal batch, then owe what is due.

        A message whose writes are not durable stays PENDING (run again next poll, no
        attempt counted), gets no ``message_done`` and counts as failed; the poll's
        summary then carries the error. With ``deletes_on_commit`` (EXPIRE 0, C-29,
        C-58) such a message must not reach a commit, so this raises instead.
        """
        flushed = True
        flush_error, flush_type = "a shared store's flush failed", "FlushError"
        try:
            await chain.flush()
        except Exception as exc:
            flushed = False
            flush_error, flush_type = error_text(exc), type(exc).__name__
            self.log.error("flush_failed", error=flush_error)
        due: list[tuple[MessageRef, Ack]] = []
        lost: set[str] = set()  # uids whose writes are not durable
        # The steps and outcomes go to the journal a run at a time (one statement
        # each, issue 18), in the order of the writes they stand for: a run is
        # written out before any other write of the group (a failure, a readopt).
        steps: list[tuple[str, str]] = []
        finished: list[Finish] = []

        def write_out() -> None:
            if steps:
                steps_committed(self.journal, self.mailbox, steps)
                steps.clear()
            if finished:
                finish_many(self.journal, self.mailbox, finished)
                finished.clear()

        with self._batch():
            for d in group:
                uid = d.ref.uid
                # A flush failure seen by another mailbox's group commit (shared
                # processors) counts too: see Chain.flushed.
                durable = flushed and (d.result is None or chain.flushed(d.result))
                if d.result:
                    steps.extend((uid, step) for step in d.result.committed)
                    if durable:
                        steps.extend((uid, step) for step in d.result.pending)
                if d.failed:
                    write_out()
                if d.failed and d.status == Status.PENDING:
                    self.journal.fail(self.mailbox, uid, error=d.error,
                                      counted=not (d.result and d.result.temporary))
                    continue
                if d.failed:  # quarantined after failures: count the last attempt too
                    self.journal.fail(self.mailbox, uid, error=d.error, counted=True)
                if not durable and d.result and d.result.pending:
                    lost.add(uid)
                    if not d.failed:
                        self.summary.not_durable(d.disposition, d.reason)
                    continue  # not durable: stays PENDING, re-run next time
                finished.append(Finish(uid, d.status, d.disposition, d.sha256,
                                       d.reason, d.delete_due))
                if d.delete_due:
                    due.append((d.ref, self._ack_for(d.disposition)))
                if d.readopt is not None:
                    write_out()
                    self.readopt(d.readopt, d)
            write_out()
        # The batch is durable here: only now is anything of this group owed (MP-01).
        if lost and facts.deletes_on_commit:
            raise ProcessorError(
                f"group commit failed for {len(lost)} message(s) on a server with "
                "EXPIRE 0; session aborted without QUIT so the server keeps them"
            )
        if lost:
            self.summary.group_commit_failed(len(lost), flush_error, flush_type)
        for d in group:
            if d.ref.uid not in lost and (not d.failed or d.status != Status.PENDING):
                self.hooks.message_done(mailbox=self.mailbox, uid=d.ref.uid,
                                        key=d.ref.key, disposition=d.disposition)
        self._owed.extend(due)

    async def acknowledge(self, session: Any) -> None:
        """Send the acknowledgement of every message owed so far (MP-01).

        The only call of a source's ``acknowledge`` in mailpipe. Nothing takes effect
        on the server before :meth:`commit`.
        """
        owed, self._owed = self._owed, []
        by_ack: dict[Ack, list[MessageRef]] = {}
        for ref, ack in owed:
            by_ack.setdefault(ack, []).append(ref)
        for ack, refs in by_ack.items():
            await contract.acknowledge(session, refs, ack)
            self._sent.extend(refs)

    async def commit(self, session: Any) -> int:
        """End the session so the server applies the acknowledgements (POP3 QUIT),
        then journal them done. Returns how many. A refused commit raises (the
        journal still owes them, so the next session acknowledges them again)."""
        sent = self._take_sent()
        await session.commit()  # RFC 1939 §6: QUIT makes the server delete DELE'd mail
        return self._applied(sent)

    async def checkpoint(self, session: Any) -> int:
        """Like :meth:`commit`, but the session applies the acknowledgements and
        stays open for the next commit window (MP-06): journaled done only after the
        server confirmed; a refused checkpoint raises and leaves them owed."""
        sent = self._take_sent()
        await session.checkpoint()
        return self._applied(sent)

    def _take_sent(self) -> list[MessageRef]:
        if self._owed:
            raise AcknowledgeBeforeDurable(
                f"{len(self._owed)} owed acknowledgement(s) not sent before the commit"
            )
        sent, self._sent = self._sent, []
        return sent

    def _applied(self, sent: list[MessageRef]) -> int:
        """The server confirmed the acknowledgements ``sent``: journal them done.

        Not waiting for the disk (MP-08): lost with the OS, they are still owed, the
        state a crash between the server's confirmation and this write leaves, which
        the next poll settles (gone from the server: :meth:`settle_gone`; listed
        again: acknowledged again)."""
        uids = [r.uid for r in sent if r.uid]
        if uids:
            with self._batch(synced=False):
                self.journal.mark_deleted(self.mailbox, uids)
        self.summary.deleted += len(sent)
        self.log.debug("session_committed", deleted=len(sent))
        return len(sent)

    def abandon(self) -> None:
        """Forget what this session owed or sent (it ends without a commit): the
        journal still owes each of them, so the next session acknowledges them."""
        self._owed.clear()
        self._sent.clear()

    def pending(self) -> list[MessageRef]:
        """What is owed but not yet sent (for tests)."""
        return [ref for ref, _ in self._owed]

    # --- helpers ---------------------------------------------------------------------

    def _mark_oversize(self, ref: MessageRef, exc: OversizeError, listed: str,
                       policy: str) -> None:
        from mailpipe.oversize import OVERSIZE_MARK

        self.journal.fail(
            self.mailbox, ref.uid,
            error=f"{OVERSIZE_MARK} the server sent more than {exc.limit} octets "
            f"({listed}); handled by on_oversize = {policy!r}",
            counted=False,
        )

    def _ack_for(self, disposition: str) -> Ack:
        """The acknowledgement an outcome gets (MP-04): ``acknowledge`` for processed
        mail, ``on_quarantine`` for quarantined mail, a plain delete for
        ``on_oversize = "delete"`` (deleted unread)."""
        if disposition == "quarantine":
            return self._quarantine_ack()
        if disposition == "oversize":
            return contract.DELETE
        return self.ack

    def _quarantine_ack(self) -> Ack:
        return self.cfg.quarantine_ack or contract.DELETE

    def _batch(self, *, synced: bool = True) -> AbstractContextManager[None]:
        """A journal batch, conditional on the lease's epoch when the ledger holds a
        fence (issue 16.2: a worker that lost its lease can commit nothing);
        ``synced=False`` only for writes MP-08 allows to wait for a later sync."""
        options: dict[str, Any] = self._fenced()
        if not synced and _takes_synced(self.journal):
            options["synced"] = False
        return self.journal.batch(**options)

    def _fenced(self) -> dict[str, Any]:
        """The ``fence=`` argument of a journal write outside a batch, when fenced."""
        return {} if self.fence is None else {"fence": self.fence}

    def _status_for(self, decision: Decision) -> tuple[Status, bool]:
        if decision.disposition == Disposition.KEEP:
            return Status.KEPT, False
        return Status.COMMITTED, self.cfg.delete == "after_processing"

    def _count(self, decision: Decision, *, prefetch: bool = False) -> None:
        if decision.disposition == Disposition.KEEP:
            self.summary.kept += 1
        elif prefetch or decision.reason != "on_complete":
            self.summary.dropped += 1

    def _failed_hook(self, ref: MessageRef, step: str, error: str, attempts: int) -> None:
        self.hooks.message_failed(mailbox=self.mailbox, uid=ref.uid, key=ref.key,
                                  processor=step, error=error, attempts=attempts)


def error_text(exc: BaseException) -> str:
    """One line for the journal and the logs: the exception's type and text, cut at
    500 characters, secrets redacted, made :func:`~mailpipe.storable.storable` (an
    exception's text may quote a malformed header's NUL)."""
    from mailpipe.secrets import redact

    text = f"{type(exc).__name__}: {exc}"
    return storable(redact(text if len(text) <= 500 else text[:497] + "..."))


def copy_tag(message: Message) -> str:
    """How a short copy's octets are remembered in its journaled error."""
    return f"[copy sha256:{message.sha256}]"


# --- a journal's batch writes, or its single-row ones ------------------------------
# begin_many, steps_committed and finish_many came with issue 18: a journal written
# before them (a third-party one given to the engine) has only the single-row methods,
# which write the same rows one statement each, inside the same batch.


def _takes_synced(journal: Journal) -> bool:
    """Whether ``journal.batch`` takes ``synced`` (MP-08). A journal written before
    it (a third-party one) has every batch synced, which is always safe."""
    kind = type(journal)
    if kind not in _TAKES_SYNCED:
        try:
            params = list(inspect.signature(journal.batch).parameters.values())
        except (TypeError, ValueError):
            params = []
        _TAKES_SYNCED[kind] = any(
            p.name == "synced" or p.kind is p.VAR_KEYWORD for p in params
        )
    return _TAKES_SYNCED[kind]


_TAKES_SYNCED: dict[type, bool] = {}


def _own(journal: Journal, name: str) -> Any:
    """``journal``'s method ``name``, or None where it has none or only inherits the
    :class:`Journal` protocol's empty one (a class that subclasses the protocol)."""
    method = getattr(journal, name, None)
    if method is None or getattr(method, "__func__", None) is getattr(Journal, name):
        return None
    return method


def begin_many(
    journal: Journal, mailbox: str, items: Sequence[tuple[str, str, int]]
) -> dict[str, Entry]:
    """:meth:`Journal.begin_many`, or :meth:`Journal.begin` for each item."""
    many = _own(journal, "begin_many")
    if many is not None:
        return many(mailbox, items)  # type: ignore[no-any-return]
    return {uid: journal.begin(mailbox, uid, key=key, size=size)
            for uid, key, size in items}


def steps_committed(journal: Journal, mailbox: str, items: Sequence[tuple[str, str]]) -> None:
    """:meth:`Journal.steps_committed`, or :meth:`Journal.step_committed` for each."""
    many = _own(journal, "steps_committed")
    if many is not None:
        many(mailbox, items)
        return
    for uid, step in items:
        journal.step_committed(mailbox, uid, step)


def finish_many(journal: Journal, mailbox: str, items: Sequence[Finish]) -> None:
    """:meth:`Journal.finish_many`, or :meth:`Journal.finish` for each."""
    many = _own(journal, "finish_many")
    if many is not None:
        many(mailbox, items)
        return
    for f in items:
        journal.finish(mailbox, f.uid, status=f.status, disposition=f.disposition,
                       sha256=f.sha256, reason=f.reason, delete_due=f.delete_due)


# --- outside a poll: replay and mark-seen ------------------------------------------


def replay_failed(
    journal: Journal, hooks: Hooks | None, mailbox: str, uid: str, key: str,
    result: ChainResult,
) -> str:
    """A quarantined message failed again when replayed: record the steps that
    committed (never repeated) and the error (no attempt counted: it stays in the
    quarantine), and announce the failure. Returns the error line."""
    error = error_text(result.error) if result.error else "failed"
    with journal.batch():
        for step in result.committed:
            journal.step_committed(mailbox, uid, step)
        if journal.get_many(mailbox, [uid]).get(uid) is not None:
            journal.fail(mailbox, uid, error=f"replay: {error}", counted=False)
    if hooks is not None:
        hooks.message_failed(mailbox=mailbox, uid=uid, key=key,
                             processor=result.failed_step or "", error=error, attempts=0)
    return error


def replay_done(
    journal: Journal, hooks: Hooks | None, message: Message, result: ChainResult,
    *, mailbox: str, uid: str, delete_policy: str,
) -> None:
    """A quarantined message's replay finished (its processors already flushed):
    record its steps and outcome. A server copy that was kept (QUARANTINED, nothing
    owed) becomes COMMITTED with its acknowledgement owed per ``delete_policy``, so
    the next poll acknowledges it; a KEEP decision leaves it on the server."""
    decided = result.decision.disposition if result.decision else None
    keep = decided == Disposition.KEEP
    with journal.batch():
        entry = journal.get_many(mailbox, [uid]).get(uid)
        if entry is None:
            entry = journal.begin(mailbox, uid, key=message.key, size=message.size)
        for step in [*result.committed, *result.pending]:
            journal.step_committed(mailbox, uid, step)
        if entry.status != Status.DELETED:
            # Owed now, maybe below a listing cursor: a CursorSession lists every owed
            # uid whatever its cursor (MP-05), so the cursors stay (dropping them here
            # took the cursor rows after the entry, the reverse of the compare-and-set's
            # lock order: a deadlock on PostgreSQL).
            journal.finish(
                mailbox, uid,
                status=Status.KEPT if keep else Status.COMMITTED,
                disposition="keep" if keep else "done",
                sha256=message.sha256,
                reason="replayed",
                delete_due=entry.delete_due or (
                    not keep
                    and entry.status == Status.QUARANTINED
                    and delete_policy == "after_processing"
                ),
            )
    if hooks is not None:
        hooks.message_done(mailbox=mailbox, uid=uid, key=message.key,
                           disposition="keep" if keep else "done")


async def adopt_seen(
    journal: Journal, mailbox: str, session: Any, refs: Sequence[MessageRef]
) -> int:
    """``state mark-seen``: remember ``refs`` as KEPT without processing them, then end
    the session cleanly (nothing was acknowledged, so the server deletes nothing).
    Returns how many were new to the journal."""
    count = journal.mark_seen(mailbox, [(r.uid, r.key, r.size) for r in refs])
    await session.commit()
    return count


def record_step(journal: Journal, mailbox: str, uid: str, step: str) -> None:
    """Record at once that ``step`` committed for ``uid`` (outside a poll: replay)."""
    journal.step_committed(mailbox, uid, step)


def forget(journal: Journal, mailbox: str, uids: Sequence[str] | None) -> int:
    """``state forget``: drop entries (all of ``mailbox`` without ``uids``), so their
    messages are processed again when listed. Returns how many."""
    return journal.forget(mailbox, list(uids) if uids is not None else None)
