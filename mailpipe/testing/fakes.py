"""In-memory fakes for unit tests: a Source whose sessions record every call.

For protocol-level truth use the fake POP3 server (:mod:`mailpipe.testing.server`) or a
real Dovecot; this fake exists to test the engine's ordering rules in isolation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from mailpipe.errors import CommitError, OversizeError, SourceConnectionError
from mailpipe.message import Message, MessageRef
from mailpipe.source import SessionFacts


class FakeOptions(BaseModel):
    """Options of the fake source (none)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class FakeMailbox:
    """Server-side state shared by sessions: messages by uid, and a call log.

    ``fail_after_retr``: raise a connection error after that many RETRs in a session.
    ``fail_quit``: QUIT answers -ERR (nothing deleted). ``uidl``: whether UIDL works.
    ``page``: list at most that many messages per session (Gmail lists a batch of the
    oldest and shows the next only after QUIT, checklist T-44).
    ``facts``: when set, what sessions state (the current contract); when None they
    are first-contract sessions (facts read from ``capabilities``), which the engine
    takes to page like Gmail (T-44). ``checkpoints``: sessions apply their
    acknowledgements at ``checkpoint()`` and stay open (MP-06); ``fail_checkpoint``
    makes the checkpoint with that number (1 = the first) fail with nothing applied.
    ``logins`` counts the sessions opened.
    """

    messages: dict[str, bytes] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    fail_after_retr: int | None = None
    fail_quit: bool = False
    uidl: bool = True
    capabilities: dict[str, Any] = field(default_factory=dict)
    page: int | None = None
    facts: SessionFacts | None = None
    checkpoints: bool = False
    fail_checkpoint: int | None = None
    logins: int = 0

    def add(self, uid: str, data: bytes) -> None:
        """Deliver a message."""
        self.messages[uid] = data


class FakeSession:
    """A session over a :class:`FakeMailbox`; deletions apply only on commit."""

    def __init__(self, box: FakeMailbox, mailbox: str) -> None:
        self.box = box
        self.mailbox = mailbox
        self.supports_uidl = box.uidl
        self.capabilities = box.capabilities
        self.facts = box.facts
        self.marked: set[str] = set()
        self.closed = False
        self.retrs = 0
        self._order = list(box.messages)[: box.page]

    async def list(self) -> list[MessageRef]:
        self.box.calls.append(("list", None))
        return [
            MessageRef(
                mailbox=self.mailbox,
                number=i + 1,
                uid=uid if self.supports_uidl else "",
                size=len(self.box.messages[uid]),
            )
            for i, uid in enumerate(self._order)
        ]

    def _uid(self, ref: MessageRef) -> str:
        return self._order[ref.number - 1]

    async def headers(self, ref: MessageRef) -> bytes:
        self.box.calls.append(("top", ref.uid))
        data = self.box.messages[self._uid(ref)]
        end = data.find(b"\r\n\r\n")
        return data if end < 0 else data[: end + 4]

    async def retrieve(
        self,
        refs: Sequence[MessageRef],
        *,
        spool_dir: Path,
        spool_threshold: int,
        max_size: int | None = None,
    ) -> AsyncIterator[Message]:
        for ref in refs:
            if (
                self.box.fail_after_retr is not None
                and self.retrs >= self.box.fail_after_retr
            ):
                raise SourceConnectionError("fake connection dropped")
            self.retrs += 1
            self.box.calls.append(("retr", ref.uid))
            data = self.box.messages[self._uid(ref)]
            if max_size is not None and len(data) > max_size:
                raise OversizeError(
                    f"fake: RETR {ref.number} sent more than {max_size} octets",
                    number=ref.number, limit=max_size, received=max_size + 1, ref=ref,
                )
            yield Message(ref=ref, data=data)

    async def mark_deleted(self, refs: Sequence[MessageRef]) -> None:
        for ref in refs:
            self.box.calls.append(("dele", ref.uid))
            self.marked.add(self._uid(ref))

    async def commit(self) -> None:
        self.box.calls.append(("quit", sorted(self.marked)))
        self.closed = True
        if self.box.fail_quit:
            raise CommitError("-ERR some deleted messages not removed")
        self._apply()

    def _apply(self) -> None:
        for uid in self.marked:
            self.box.messages.pop(uid, None)
        self.marked = set()

    async def abort(self) -> None:
        if not self.closed:
            self.box.calls.append(("abort", None))
        self.closed = True


class CheckpointFakeSession(FakeSession):
    """A :class:`FakeSession` that applies acknowledgements and stays open (MP-06),
    like an IMAP session's UID EXPUNGE."""

    checkpoints = 0

    async def checkpoint(self) -> None:
        self.checkpoints += 1
        self.box.calls.append(("checkpoint", sorted(self.marked)))
        if self.checkpoints == self.box.fail_checkpoint:
            self.closed = True
            raise CommitError("fake: the expunge was refused")
        self._apply()
        self._order = list(self.box.messages)[: self.box.page]


class FakeSource:
    """A :class:`mailpipe.Source` over a shared :class:`FakeMailbox` (``box``)."""

    name: ClassVar[str] = "fake"
    Options: ClassVar[type[BaseModel]] = FakeOptions
    boxes: ClassVar[dict[str, FakeMailbox]] = {}

    def __init__(self, options: BaseModel, context: Any, *, mailbox: str = "") -> None:
        self.mailbox = mailbox or getattr(context, "mailbox", "")
        self.box = FakeSource.boxes.setdefault(self.mailbox, FakeMailbox())

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSession]:
        """Open a session; exit aborts unless committed."""
        self.box.logins += 1
        kind = CheckpointFakeSession if self.box.checkpoints else FakeSession
        s = kind(self.box, self.mailbox)
        try:
            yield s
        finally:
            await s.abort()


def fake_runner(
    base_dir: Path, processors: list[dict[str, Any]], *classes: type,
    mailbox: str = "box",
) -> Any:
    """A ``MailboxRunner`` polling the :class:`FakeSource` mailbox ``mailbox`` (its
    :class:`FakeMailbox` is ``runner.source.box``) through the chain ``processors``,
    with the processor ``classes`` registered (plugins need not be installed); its
    journal and quarantine live under ``base_dir``, relative paths resolve there."""
    from mailpipe.chain import Chain
    from mailpipe.engine import MailboxRunner
    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.plugin_manager import Hooks, get_plugin_manager
    from mailpipe.quarantine import Quarantine
    from mailpipe.registry import Registry
    from mailpipe.validation import validate_config

    registry = Registry()
    registry.add("source", FakeSource, "test")
    for cls in classes:
        registry.add("processor", cls, "test")
    data = {
        "mailboxes": [{"name": mailbox, "source": "fake", "pipeline": "p"}],
        "pipelines": {"p": {"processors": processors}},
    }
    config = validate_config(data, path=base_dir / "pipeline.toml", registry=registry)
    return MailboxRunner(
        config.mailboxes[0],
        config=config,
        chain=Chain(config.pipelines, base_dir=base_dir),
        journal=SqliteJournal(base_dir / "journal.sqlite3"),
        quarantine=Quarantine(base_dir / "q"),
        hooks=Hooks(get_plugin_manager(entry_points=False)),
    )
