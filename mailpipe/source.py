"""The source contract: how the engine talks to a mailbox, whatever the protocol.

A *source* is a kind of mailbox (``source = "pop3"``, ``"imap"``, a third party's).
The engine knows sources only through this module:

- :class:`Source` is constructed as ``SourceClass(options, context)`` with a
  :class:`SourceContext` and opens :class:`SourceSession` objects.
- A session states what it is with typed :class:`SessionFacts` (``session.facts``),
  never through protocol details the engine would have to guess at.
- A session acknowledges a message with one of the :class:`AckKind` actions the
  source declares in ``Source.acknowledgements``; the mailbox's ``acknowledge`` key
  is validated against that set when the config loads (MP-04).
- Acknowledgements take effect only at :meth:`SourceSession.commit`; the engine calls
  :meth:`SourceSession.acknowledge` only through :mod:`mailpipe.ledger`'s gate, after
  every committing step and the journal batch are durable (MP-01).
- A session whose acknowledgements can take effect without ending it (IMAP: UID
  EXPUNGE, MOVE and STORE apply at once) offers :class:`CheckpointSession`: the engine
  then runs each commit window on the same session, ending all but the last with
  :meth:`CheckpointSession.checkpoint` instead of a new login (MP-06). POP3 cannot
  (RFC 1939 §6: only QUIT applies DELE), so each of its windows is a session.
- A session that can list only what is new offers :class:`CursorSession`: before
  ``list()`` the engine hands it the cursors the journal holds, after the commit it
  reads what the listing covered, and the ledger stores the advanced cursors (MP-05).
- A push-capable source offers :meth:`PushSource.wait_for_mail`, which the scheduler
  awaits instead of its poll timer while the latest session's facts say ``can_push``
  (IMAP: IDLE, or STATUS polling without it). A source that holds connections between
  waits also offers :meth:`ClosableSource.close`, which the scheduler awaits when it
  stops.

:mod:`mailpipe.testing.contract` holds the test suite any source proves itself with.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from mailpipe.message import Message, MessageRef


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source learns about where it runs.

    ``base_dir``: the config file's folder (relative paths in options resolve against
    it); ``mailbox``: the mailbox's name in the config (for logs and keys);
    ``spool_dir``: a private directory for large message bodies; ``ack``: the
    mailbox's ``acknowledge`` (a ``flag`` source leaves mail carrying it out of its
    listings, also in a new process).
    """

    base_dir: Path = field(default_factory=Path.cwd)
    mailbox: str = ""
    spool_dir: Path | None = None
    ack: Ack | None = None

    def resolve(self, path: Path | str) -> Path:
        """Resolve ``path`` against ``base_dir`` unless it is absolute (``~`` expanded)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What one open session tells the engine about the mailbox behind it.

    ``stable_ids``: message ids survive sessions (POP3 UIDL, IMAP UID); when False the
    engine keys messages by content hash and allows only ``delete = "after_processing"``.
    ``ids_have_epoch``: ids are only valid under an epoch the source folds into them
    (IMAP UIDVALIDITY), and the session is an :class:`EpochSession` that says which
    journal ids a new epoch superseded; the engine reconciles their messages by
    content hash (IC-25), so the POP3 id-reset guard (C-60) does not apply.
    ``login_delay``: seconds the server wants between two logins (RFC 2449 §6.5).
    ``deletes_on_commit``: the server may delete at commit what was retrieved even
    without an acknowledgement (POP3 ``EXPIRE 0``, RFC 2449 §6.7; C-29).
    ``can_push``: the source can wait for new mail (IMAP: IDLE, or STATUS polling).
    ``pages_listing``: the server may list only a page of its mailbox per session and
    show the rest after the session ends (Gmail's POP3, T-44): a poll whose session
    ran new mail then opens a follow-up session. The default (True) keeps that
    follow-up for a source that does not say, as before this field existed; the
    built-in sources set it: POP3 for Gmail only, IMAP never. A source that lists
    everything loses nothing by setting False: the next poll lists what is left.
    """

    stable_ids: bool = True
    ids_have_epoch: bool = False
    login_delay: float = 0.0
    deletes_on_commit: bool = False
    can_push: bool = False
    pages_listing: bool = True


class AckKind(enum.StrEnum):
    """How a source can acknowledge a processed message (MP-04).

    ``delete``: remove it (POP3 DELE; IMAP ``\\Deleted`` + expunge). ``move``: move it
    to a named folder. ``flag``: set a flag or keyword and leave it (the source's
    listing must then leave flagged mail out). ``keep``: leave it untouched (the
    journal remembers it by id).
    """

    DELETE = "delete"
    MOVE = "move"
    FLAG = "flag"
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class Ack:
    """One acknowledgement: a kind, and the folder (``move``) or flag (``flag``)."""

    kind: AckKind = AckKind.DELETE
    target: str | None = None

    def __str__(self) -> str:
        return self.kind.value if self.target is None else f"{self.kind}:{self.target}"


#: The acknowledgement a source gets when the mailbox config names none.
DELETE = Ack(AckKind.DELETE)


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

    #: What the session knows about the mailbox (valid once the session is open).
    facts: SessionFacts

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

    async def acknowledge(self, refs: Sequence[MessageRef], ack: Ack) -> None:
        """Acknowledge ``refs`` with ``ack`` (one of the source's ``acknowledgements``).

        Nothing takes effect before :meth:`commit` (POP3: DELE marks, QUIT deletes),
        or before :meth:`CheckpointSession.checkpoint` on a session that has it.
        A message the server no longer has is skipped with a warning, never an error:
        the journal owes its acknowledgement until a listing shows it gone.
        """
        ...

    async def commit(self) -> None:
        """End the session and let the server apply the acknowledgements (POP3 QUIT).

        Raises :class:`mailpipe.CommitError` when the server does not confirm.
        """
        ...

    async def abort(self) -> None:
        """Close without committing: nothing marked is deleted. Never raises."""
        ...


@runtime_checkable
class CheckpointSession(Protocol):
    """A session that can apply its acknowledgements and stay open (MP-06).

    The engine ends a commit window with :meth:`checkpoint` instead of
    :meth:`SourceSession.commit` when another window follows, and runs that window on
    the same session: :mod:`mailpipe.cursors` are handed over again
    (:meth:`CursorSession.resume`) and the mailbox is listed again. Only
    :mod:`mailpipe.ledger` calls it, after the acknowledgements it sent, exactly
    like ``commit`` (MP-01).
    """

    async def checkpoint(self) -> None:
        """Apply every acknowledgement sent since the session opened or since the
        last checkpoint, and keep the session open: the next :meth:`list
        <SourceSession.list>` shows the mailbox as it is now, without them.

        Raises :class:`mailpipe.CommitError` when the server does not confirm (the
        session is unusable afterwards, as after a failed ``commit``).
        """
        ...


@runtime_checkable
class Source(Protocol):
    """A kind of mailbox (``source = "pop3"``): a name, an ``Options`` model, sessions.

    Constructed as ``SourceClass(options, context)`` with a :class:`SourceContext`;
    ``session()`` returns an async context manager that connects and authenticates on
    enter and aborts (never commits) on exit, so an exception can never delete anything.
    A class attribute ``acknowledgements`` (a frozenset of :class:`AckKind`) lists what
    its sessions implement; a source without it (written against the first contract)
    is taken to support ``delete`` and ``keep`` (see :func:`acknowledgements_of`).
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def session(self) -> AbstractAsyncContextManager[SourceSession]:
        """Open one session with the mailbox."""
        ...


@runtime_checkable
class PushSource(Protocol):
    """A source that can wait for new mail instead of being polled (``can_push``)."""

    async def wait_for_mail(self, timeout: float) -> bool:
        """Return True as soon as new mail may be there, False after ``timeout``
        seconds without any. Never raises for a lost connection: it returns True, so
        that the next poll (which reconnects) reports the error."""
        ...


@runtime_checkable
class ClosableSource(Protocol):
    """A source that keeps resources between sessions (IMAP's push connections)."""

    async def close(self) -> None:
        """Release them (LOGOUT); called once when the scheduler stops. Never raises."""
        ...


@runtime_checkable
class EpochSession(Protocol):
    """A session whose ids carry an epoch (``ids_have_epoch``, IMAP UIDVALIDITY).

    When an epoch changes (a folder deleted and recreated, a server migration) every
    message of that scope is listed under a new id. The engine then reads the journal
    ids this listing did not show, asks :meth:`superseded` which of them an epoch
    change replaced, and adopts each retrieved message whose content hash one of those
    entries holds (IC-25): processed once, never skipped unprocessed.
    """

    @property
    def epoch_changed(self) -> bool:
        """True when an epoch may have changed since the source's previous listing
        (always True for the first listing of a process: it cannot know)."""
        ...

    def superseded(self, uids: Sequence[str]) -> list[str]:
        """Of ``uids`` (journal ids of this mailbox not in the listing), those of a
        scope this listing showed under another epoch."""
        ...


@dataclass(slots=True)
class Coverage:
    """What one listing showed of one cursor scope (MP-05).

    ``start``: the cursor the listing began after (0 when the journal held none);
    ``listed``: position → journal uid of every message the listing showed past
    ``start`` (IMAP: UID → id). Positions are integers that only grow for new mail.
    """

    start: int = 0
    listed: dict[int, str] = field(default_factory=dict)
    #: Positions of unfinished journal entries still on the server that the listing
    #: left out (the search criteria no longer match): the cursor stays below them.
    held: set[int] = field(default_factory=set)


@runtime_checkable
class CursorSession(Protocol):
    """A session that lists only what lies past a stored cursor per *scope* (MP-05).

    A scope is a string the source chooses (IMAP: ``"<folder>;UIDVALIDITY=<v>"``, so
    a new epoch is a new scope and starts from nothing). The contract:

    - :meth:`resume` is called before :meth:`SourceSession.list` with the cursors the
      journal holds and the uids of the mailbox's unfinished entries (PENDING, or an
      acknowledgement owed); ``list()`` then leaves out every message at or below its
      scope's cursor (and still everything the source leaves out anyway, e.g. by
      search criteria), but lists each unfinished one the criteria still select
      whatever the cursor (a failing message is retried), and each owed one whatever
      the cursor and criteria (so one not listed is truly gone: planning's
      ``gone``); an unfinished one left out but still on the server is reported in
      :attr:`Coverage.held`, and no cursor passes it.
    - A scope names the cursor and the selection it was earned under (IMAP: the
      folder, its UIDVALIDITY and the search criteria), so a configuration that
      selects differently starts from no cursor.
    - :meth:`coverage` is read after the session committed: per scope listed, the
      cursor it started from and what the listing showed past it. The ledger advances
      a scope's cursor over the longest run of listed positions whose journal
      entries are finished (:mod:`mailpipe.cursors`) and replaces the mailbox's
      cursors with the result: a scope not in the coverage is dropped. A session
      that did not list from cursors (IMAP without UIDPLUS) returns no coverage.
    """

    def resume(
        self,
        cursors: Mapping[str, int],
        unfinished: Collection[str] = (),
        owed: Collection[str] = (),
    ) -> None:
        """Use ``cursors`` (scope → position) for the next :meth:`list`; never let a
        cursor pass one of ``unfinished`` (journal uids) still on the server, and list
        each of ``owed`` (acknowledgement due) on the server whatever the criteria."""
        ...

    def coverage(self) -> Mapping[str, Coverage]:
        """Per scope, what the last :meth:`list` started from and showed."""
        ...


def facts_of(session: Any) -> SessionFacts:
    """The session's :class:`SessionFacts`.

    Sessions written against the first contract (before ``facts``) are read the old
    way: ``supports_uidl`` and a POP3-style ``capabilities`` mapping (``LOGIN-DELAY``,
    ``EXPIRE``); new sources set ``facts``.
    """
    facts = getattr(session, "facts", None)
    if isinstance(facts, SessionFacts):
        return facts
    caps = getattr(session, "capabilities", None)
    return SessionFacts(
        stable_ids=bool(getattr(session, "supports_uidl", True)),
        login_delay=_first_number(_cap(caps, "LOGIN-DELAY", "login_delay")) or 0.0,
        deletes_on_commit=_first_number(_cap(caps, "EXPIRE", "expire")) == 0.0,
    )


def retrieves_across_commits(session: Any) -> bool:
    """True when the session sets ``retrieves_across_commits = True`` (P-14): one
    :meth:`SourceSession.retrieve` may then be handed a whole commit window, and the
    engine group-commits, and acknowledges, while that stream is suspended between
    two messages. Such a session promises that its memory stays bounded whatever
    the number of refs (replies wait in the transport), that an acknowledgement made
    while the stream runs is sent no earlier than it was made, and that a stream its
    consumer closes early is finished (read, nothing delivered) before its next
    command and before :meth:`SourceSession.commit`. Any other session gets one
    ``retrieve`` per group, read to its end before the group commits."""
    return getattr(session, "retrieves_across_commits", False) is True


def acknowledgements_of(source_cls: Any) -> frozenset[AckKind]:
    """The acknowledgements a source class declares (``delete`` and ``keep`` for one
    written against the first contract)."""
    declared = getattr(source_cls, "acknowledgements", None)
    if declared is None:
        return frozenset({AckKind.DELETE, AckKind.KEEP})
    return frozenset(AckKind(a) for a in declared)


async def acknowledge(session: Any, refs: Sequence[MessageRef], ack: Ack) -> None:
    """Call the session's ``acknowledge``; a first-contract session (``mark_deleted``
    only) supports ``delete``. Only :mod:`mailpipe.ledger` calls this (MP-01)."""
    if not refs:
        return
    method = getattr(session, "acknowledge", None)
    if method is not None:
        await method(refs, ack)
        return
    if ack.kind is not AckKind.DELETE:
        raise TypeError(f"{type(session).__name__} cannot acknowledge with {ack}")
    await session.mark_deleted(refs)


def _cap(caps: Any, key: str, attr: str) -> Any:
    if caps is None:
        return None
    value = caps.get(key) if isinstance(caps, dict) else getattr(caps, attr, None)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return value


def _first_number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(int(str(value).strip().split(" ")[0])))
    except ValueError:
        return None
