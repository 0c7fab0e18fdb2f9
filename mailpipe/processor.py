"""The processor contract: what a step of a chain is and what it may answer."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    from mailpipe.message import Message


class Disposition(StrEnum):
    """What happens to a message when the chain stops.

    ``DONE``: processed; deleted from the server per the mailbox's ``delete`` policy.
    ``KEEP``: left on the server and not processed; remembered as seen.
    ``QUARANTINE``: the raw message goes to quarantine with the reason, then per policy.
    """

    DONE = "done"
    KEEP = "keep"
    QUARANTINE = "quarantine"


@dataclass(frozen=True, slots=True)
class Decision:
    """A processor's answer that stops (or reroutes) the chain.

    Exactly one of ``disposition`` or ``route`` is set. ``reason`` says why (a rule name,
    for example) and ends up in logs, the journal and quarantine sidecars.
    """

    disposition: Disposition | None = None
    route: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if (self.disposition is None) == (self.route is None):
            raise ValueError("Decision needs exactly one of disposition or route")


Result = Decision | Disposition | None


class _Later:
    """The type of :data:`LATER` (one instance)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LATER"


#: What ``process_nowait`` returns when it cannot handle the message without waiting:
#: the chain then calls ``process`` on the step's thread (see :class:`Processor`).
LATER = _Later()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorContext:
    """What a processor learns about where it runs.

    ``base_dir``: the config file's folder; relative paths in options resolve against it.
    ``dry_run``: when true, processors with side effects must write nothing.
    """

    base_dir: Path = field(default_factory=Path.cwd)
    pipeline: str = ""
    dry_run: bool = False
    secrets: tuple[str, ...] = ()

    def resolve(self, path: Path | str) -> Path:
        """Resolve ``path`` against ``base_dir`` unless it is absolute (``~`` expanded)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@runtime_checkable
class Processor(Protocol):
    """One step of a chain.

    Class attributes: ``name`` (what ``use =`` names), ``Options`` (a pydantic model with
    ``extra="forbid"`` validating the rest of the TOML table) and ``commits`` (True for
    steps with durable side effects: the journal records them, and a re-run of the same
    message skips a step that already committed).

    ``process(message)`` may be sync or ``async``; it returns ``None`` to continue, or a
    :class:`Decision`/:class:`Disposition` to stop. Synchronous methods (``open``,
    ``process``, ``prefetch``, ``flush``, ``close``) run off the event loop on the
    step's own worker thread (:mod:`mailpipe.worker`), one call at a time; after a
    call that ran past the pipeline's ``processing_budget`` (the message is then
    quarantined) later calls run on a new thread while the abandoned one finishes,
    so state shared between calls needs a ``threading.Lock`` and thread-bound
    resources (``sqlite3`` with ``check_same_thread``) must not be assumed. A step with ``commits = True`` must be
    durable when ``process`` returns, unless it defines ``flush()``, in which case the
    engine calls ``flush()`` (group commit) before any DELE of the messages it covers.
    Raising :class:`mailpipe.TemporaryFailure` means retry later without counting an
    attempt; any other exception counts towards ``max_attempts``.

    ``idempotent`` (default False) says that repeating the step for the same
    ``message.key`` changes nothing (an upsert, a file named by the key, a broker that
    de-duplicates by message id). The engine journals a committing step that is not
    idempotent durably the moment it succeeds; idempotent steps ride the group commit.

    ``concurrent`` (default False): mailboxes are polled concurrently, so the engine
    serialises calls to one processor instance unless it declares itself safe for
    concurrent ``process`` calls (no shared connection state across awaits).

    ``transparent`` (default False): the step never decides and never changes what
    later steps see from the headers (``parse``); header prefetch passes over it.

    ``requires`` (default ``()``): the ``use`` names of processors that must come
    before this step in its pipeline (``filter`` declares ``("parse",)``). A chain
    that does not honour it is a ConfigError naming the step
    (:mod:`mailpipe.prerequisites`). A classmethod ``requires_for(options)`` adds
    requirements that depend on the options, as (option key path, ``use`` name)
    pairs; an unmet one names the option's key.

    Optional methods: ``open()``/``close()`` (sync or async) around a session,
    ``flush()``, and ``prefetch(message) -> Result`` for decisions on headers alone
    (``message.headers_only`` is true, from ``TOP n 0``); set ``header_only`` to True when
    ``prefetch`` can decide every message that ``process`` would.

    ``process_nowait(message) -> Result | LATER`` (optional, synchronous): called on the
    event loop, in the step's turn (its lock, or a CPU slot), before ``process``. It
    either handles the message as ``process`` would, doing only bounded in-memory work
    and local file-system calls that wait for nothing (no fsync, no lock wait, no
    network), or returns :data:`LATER` having changed nothing that ``process`` would not
    redo the same way; then ``process`` runs on the step's thread as usual. It spares
    a cheap call the hand-over to the thread and back (two wake-ups; ~95 µs of CPU a
    message for store.maildir, bench/RESULTS.md §30). It is not charged to the budget
    (it cannot run away: it must not wait), and not called once the budget is spent
    (the message then fails as ``process`` would, never started). It must be a plain
    synchronous method: an ``async def process_nowait`` is refused when the class is
    registered (:class:`~mailpipe.errors.PluginError` naming the processor, so
    ``mailpipe check`` reports it), an async callable set on the instance when the
    chain is built (naming the step); an awaitable it returns fails that message,
    closed unrun and with the step not committed (never a success). After every
    :data:`~mailpipe.chain.NOWAIT_RUN` such calls in a row the chain yields to the
    event loop before the next, so a run of messages handled on the loop does not
    hold up the other mailboxes.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def process(self, message: Message) -> Result | Awaitable[Result]:
        """Handle one message; see the class docstring for the contract."""
        ...


def normalise(result: Any, processor: str) -> Decision | None:
    """Turn a processor's return value into a Decision or None; reject anything else."""
    if result is None:
        return None
    if isinstance(result, Decision):
        return result
    if isinstance(result, Disposition):
        return Decision(disposition=result, reason=processor)
    raise TypeError(
        f"processor {processor!r} returned {type(result).__name__}; "
        "expected None, Disposition or Decision"
    )
