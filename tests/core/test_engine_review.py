"""Review of the delivery contract: each test pins one bug found by reading the engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from mailpipe.chain import Chain
from mailpipe.config import Config
from mailpipe.engine import MailboxRunner
from mailpipe.errors import TemporaryFailure
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.message import Message, MessageRef
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.processor import Decision, Disposition
from mailpipe.quarantine import Quarantine
from mailpipe.registry import Registry
from mailpipe.replay import replay
from mailpipe.testing.fakes import FakeMailbox, FakeSession, FakeSource
from mailpipe.validation import validate_config


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flag: str = ""


SEEN: list[str] = []  # uids in the order the ``see`` step saw them


class See:
    """Records each message; raises on subjects listed in ``See.fail``."""

    name: ClassVar[str] = "see"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True
    fail: ClassVar[dict[str, BaseException]] = {}

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        SEEN.append(message.ref.uid)
        exc = See.fail.get(message.header("subject") or "")
        if exc is not None:
            raise exc


class Gate:
    """Fails while its ``flag`` is in ``Gate.closed``."""

    name: ClassVar[str] = "gate"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = False
    closed: ClassVar[set[str]] = set()

    def __init__(self, options: Opts, context: Any) -> None:
        self.flag = options.flag

    def process(self, message: Message) -> None:
        if self.flag in Gate.closed:
            raise RuntimeError(f"gate {self.flag} closed")


class Send:
    """A non-idempotent side effect (a mail sent); counts every call."""

    name: ClassVar[str] = "send"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    sent: ClassVar[list[str]] = []
    reply: ClassVar[Any] = None

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> Any:
        Send.sent.append(message.ref.uid)
        return Send.reply


class Decide:
    """Returns the Decision of the message's subject from ``Decide.by_subject``."""

    name: ClassVar[str] = "decide"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = False
    by_subject: ClassVar[dict[str, Decision]] = {}

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> Decision | None:
        return Decide.by_subject.get(message.header("subject") or "")


class Buffered:
    """A group-commit store shared by mailboxes: ``flush()`` makes the buffer durable.

    A failing flush rolls the whole buffer back (as a SQLite group transaction does),
    whichever mailbox's messages are in it.
    """

    name: ClassVar[str] = "buffered"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    concurrent: ClassVar[bool] = True
    buffer: ClassVar[list[str]] = []
    durable: ClassVar[list[str]] = []
    fail_next: ClassVar[bool] = False
    barrier: ClassVar[asyncio.Barrier | None] = None

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    async def process(self, message: Message) -> None:
        Buffered.buffer.append(message.key)
        if Buffered.barrier is not None:
            await Buffered.barrier.wait()

    def flush(self) -> None:
        if Buffered.fail_next:
            Buffered.fail_next = False
            Buffered.buffer.clear()
            raise OSError("group transaction rolled back: disk full")
        Buffered.durable.extend(Buffered.buffer)
        Buffered.buffer.clear()


class ExpireZeroSession(FakeSession):
    """RFC 2449 §6.7 EXPIRE 0: QUIT also deletes every message RETR'd in the session."""

    def __init__(self, box: FakeMailbox, mailbox: str) -> None:
        super().__init__(box, mailbox)
        self.retrieved: set[str] = set()

    async def retrieve(
        self, refs: Sequence[MessageRef], *, spool_dir: Path, spool_threshold: int
    ) -> AsyncIterator[Message]:
        async for message in super().retrieve(
            refs, spool_dir=spool_dir, spool_threshold=spool_threshold
        ):
            self.retrieved.add(self._uid(message.ref))
            yield message

    async def commit(self) -> None:
        await super().commit()
        for uid in self.retrieved:
            self.box.messages.pop(uid, None)


class ExpireZeroSource(FakeSource):
    name: ClassVar[str] = "fake0"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSession]:
        s = ExpireZeroSession(self.box, self.mailbox)
        try:
            yield s
        finally:
            await s.abort()


PROCESSORS = (See, Gate, Send, Decide, Buffered)


@pytest.fixture(autouse=True)
def _clean() -> None:
    SEEN.clear()
    FakeSource.boxes.clear()
    See.fail = {}
    Gate.closed = set()
    Send.sent = []
    Send.reply = None
    Decide.by_subject = {}
    Buffered.buffer = []
    Buffered.durable = []
    Buffered.fail_next = False
    Buffered.barrier = None


def configure(
    tmp_path: Path,
    processors: list[dict[str, Any]],
    *,
    names: Sequence[str] = ("box",),
    source: str = "fake",
    **mailbox: Any,
) -> Config:
    registry = Registry()
    registry.add("source", FakeSource, "test")
    registry.add("source", ExpireZeroSource, "test")
    registry.add("source", ClashSource, "test")
    for cls in PROCESSORS:
        registry.add("processor", cls, "test")
    data = {
        "mailboxes": [
            {"name": n, "source": source, "pipeline": "p", **mailbox} for n in names
        ],
        "pipelines": {"p": {"processors": processors}},
        "quarantine": {"dir": str(tmp_path / "q")},
    }
    return validate_config(data, path=tmp_path / "pipeline.toml", registry=registry)


def runners(
    tmp_path: Path, config: Config, chain: Chain | None = None
) -> tuple[list[MailboxRunner], SqliteJournal]:
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    chain = chain or Chain(config.pipelines, base_dir=tmp_path)
    made = [
        MailboxRunner(
            spec,
            config=config,
            chain=chain,
            journal=journal,
            quarantine=Quarantine(tmp_path / "q"),
            hooks=Hooks(get_plugin_manager(entry_points=False)),
        )
        for spec in config.mailboxes
    ]
    return made, journal


def make(
    tmp_path: Path, processors: list[dict[str, Any]], **mailbox: Any
) -> tuple[MailboxRunner, FakeMailbox, SqliteJournal]:
    (runner,), journal = runners(tmp_path, configure(tmp_path, processors, **mailbox))
    return runner, runner.source.box, journal


def msg(subject: str, body: str = "") -> bytes:
    text = body or f"body of {subject}"
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\n{text}\r\n".encode()


async def poll(runner: MailboxRunner) -> Any:
    return await asyncio.wait_for(runner.poll(), 30)


# --- commit windows: a failing message must not be retried in every window -------------


async def test_temporary_failure_does_not_livelock_commit_windows(
    tmp_path: Path,
) -> None:
    runner, box, _ = make(tmp_path, [{"use": "see"}], commit_window=1)
    See.fail = {"x": TemporaryFailure("relay said 451")}
    box.add("x", msg("x"))
    box.add("good", msg("good"))

    original = runner.chain.run

    async def bounded(*a: Any, **k: Any) -> Any:
        # Safety net for the unfixed engine, which re-runs "x" in every window.
        result = await original(*a, **k)
        if SEEN.count("x") >= 5:
            runner.stop.set()
        return result

    runner.chain.run = bounded  # type: ignore[method-assign]
    await poll(runner)
    assert SEEN.count("x") == 1  # once per poll, not once per commit window
    assert "good" in SEEN and list(box.messages) == ["x"]


async def test_permanent_failure_is_tried_once_per_poll(tmp_path: Path) -> None:
    runner, box, journal = make(
        tmp_path, [{"use": "see"}], commit_window=1, max_attempts=3
    )
    See.fail = {"bad": RuntimeError("cannot parse")}
    box.add("bad", msg("bad"))
    box.add("ok", msg("ok"))
    await poll(runner)
    # max_attempts counts polls (with back-off between them), not commit windows.
    assert journal.get_many("box", ["bad"])["bad"].attempts == 1
    assert Quarantine(tmp_path / "q").list() == []
    assert list(box.messages) == ["bad"]


async def test_failed_messages_do_not_starve_new_ones_under_max_messages(
    tmp_path: Path,
) -> None:
    runner, box, _ = make(tmp_path, [{"use": "see"}], max_messages=2)
    See.fail = {
        "x1": TemporaryFailure("451"),
        "x2": TemporaryFailure("451"),
    }
    for uid in ("x1", "x2", "n1", "n2"):
        box.add(uid, msg(uid))
    await poll(runner)  # x1, x2 fail (temporarily)
    await poll(runner)  # new mail goes first; the retries wait their turn
    assert "n1" in SEEN and "n2" in SEEN
    assert list(box.messages) == ["x1", "x2"]


async def test_no_uidl_failure_does_not_livelock_commit_windows(
    tmp_path: Path,
) -> None:
    runner, box, _ = make(tmp_path, [{"use": "see"}], commit_window=1)
    box.uidl = False
    See.fail = {"x": TemporaryFailure("451")}
    box.add("x", msg("x"))
    box.add("good", msg("good"))
    original = runner.chain.run

    async def bounded(*a: Any, **k: Any) -> Any:
        result = await original(*a, **k)
        if len(SEEN) >= 5:
            runner.stop.set()
        return result

    runner.chain.run = bounded  # type: ignore[method-assign]
    summary = await poll(runner)
    assert len(SEEN) == 1 and summary.sessions <= 2  # no hammering in one poll


# --- oversize quarantine is journaled like any quarantined message ---------------------


async def test_oversize_quarantine_is_journaled_and_not_refetched(
    tmp_path: Path,
) -> None:
    runner, box, journal = make(
        tmp_path,
        [{"use": "see"}],
        max_message_size=80,
        on_oversize="quarantine",
        on_quarantine="keep",
    )
    box.add("big", msg("big", "x" * 200))
    s1 = await poll(runner)
    assert s1.quarantined == 1
    await poll(runner)
    assert box.calls.count(("retr", "big")) == 1  # never downloaded again
    assert journal.get_many("box", ["big"])["big"].status == Status.QUARANTINED
    assert len(Quarantine(tmp_path / "q").list()) == 1


async def test_oversize_quarantine_after_failed_quit_only_deles(
    tmp_path: Path,
) -> None:
    runner, box, journal = make(
        tmp_path, [{"use": "see"}], max_message_size=80, on_oversize="quarantine"
    )
    box.add("big", msg("big", "x" * 200))
    box.fail_quit = True
    await poll(runner)
    box.fail_quit = False
    await poll(runner)
    assert box.messages == {} and box.calls.count(("retr", "big")) == 1
    assert journal.get_many("box", ["big"])["big"].status == Status.DELETED


# --- EXPIRE 0: QUIT must not follow a failed group commit -------------------------------


async def test_expire_zero_flush_failure_loses_nothing(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "buffered"}], source="fake0")
    box.capabilities = {"EXPIRE": "0"}
    box.add("a", msg("a"))
    Buffered.fail_next = True
    await poll(runner)
    # The store never made "a" durable, so the server must still have it.
    assert "a" in box.messages
    await poll(runner)
    assert box.messages == {} and len(Buffered.durable) == 1


# --- shared group-commit processors across concurrent mailboxes ------------------------


async def test_flush_failure_seen_by_another_mailbox_is_not_durable(
    tmp_path: Path,
) -> None:
    config = configure(tmp_path, [{"use": "buffered"}], names=("a", "b"))
    (ra, rb), _journal = runners(tmp_path, config)
    FakeSource.boxes["a"].add("ma", msg("ma"))
    FakeSource.boxes["b"].add("mb", msg("mb"))
    Buffered.barrier = asyncio.Barrier(2)  # both messages buffered before any flush
    Buffered.fail_next = True  # the first flush (whoever calls it) rolls back both
    await asyncio.wait_for(asyncio.gather(ra.poll(), rb.poll()), 30)
    Buffered.barrier = None
    for runner, uid in ((ra, "ma"), (rb, "mb")):
        if uid not in runner.source.box.messages:  # DELE'd: must be durable
            key = MessageRef(mailbox=runner.name, number=0, uid=uid, size=0).key
            assert key in Buffered.durable, f"{uid} deleted but never durable"
    await asyncio.wait_for(asyncio.gather(ra.poll(), rb.poll()), 30)
    assert FakeSource.boxes["a"].messages == {} == FakeSource.boxes["b"].messages
    assert len(set(Buffered.durable)) == 2


# --- the chain: commits are recorded even when the return value is wrong ----------------


async def test_commit_recorded_even_if_return_value_is_invalid(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "send"}], max_attempts=5)
    Send.reply = "250 sent"  # not None/Disposition/Decision: a processor bug
    box.add("a", msg("a"))
    s1 = await poll(runner)
    assert s1.failed == 1  # the bug is reported
    await poll(runner)
    assert Send.sent == ["a"]  # but the mail that was sent is never sent again


# --- BaseException from a processor is one message's failure, not the pipeline's --------


@pytest.mark.parametrize(
    "exc", [SystemExit(3), GeneratorExit(), asyncio.CancelledError()]
)
async def test_base_exception_in_processor_fails_only_that_message(
    tmp_path: Path, exc: BaseException
) -> None:
    runner, box, journal = make(tmp_path, [{"use": "see"}])
    See.fail = {"boom": exc}
    box.add("boom", msg("boom"))
    box.add("fine", msg("fine"))
    summary = await poll(runner)
    assert summary.failed == 1 and summary.deleted == 1
    assert list(box.messages) == ["boom"]
    assert journal.get_many("box", ["boom"])["boom"].attempts == 1


async def test_real_cancellation_still_propagates(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "see"}, {"use": "buffered"}])
    Buffered.barrier = asyncio.Barrier(2)  # never released: the poll hangs in process
    box.add("a", msg("a"))
    task = asyncio.create_task(runner.poll())
    for _ in range(100):
        await asyncio.sleep(0)
        if Buffered.buffer:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert list(box.messages) == ["a"] and "dele" not in [c[0] for c in box.calls]


# --- replay --------------------------------------------------------------------------


async def test_replay_that_quarantines_again_keeps_the_item(tmp_path: Path) -> None:
    config = configure(tmp_path, [{"use": "decide"}, {"use": "see"}])
    (runner,), journal = runners(tmp_path, config)
    box = runner.source.box
    Decide.by_subject = {
        "q": Decision(disposition=Disposition.QUARANTINE, reason="suspicious")
    }
    box.add("q", msg("q"))
    await poll(runner)
    # on_quarantine = delete: the quarantine holds the only copy
    assert box.messages == {}
    quarantine = Quarantine(tmp_path / "q")
    items = quarantine.list()
    assert len(items) == 1
    await replay(config, journal, quarantine, items)
    assert len(quarantine.list()) == 1  # still quarantined, not dropped


async def test_replay_keep_decision_does_not_delete_server_copy(tmp_path: Path) -> None:
    config = configure(
        tmp_path,
        [{"use": "gate", "flag": "g"}, {"use": "decide"}],
        max_attempts=1,
        on_quarantine="keep",
    )
    (runner,), journal = runners(tmp_path, config)
    box = runner.source.box
    Gate.closed = {"g"}
    box.add("k", msg("k"))
    await poll(runner)
    assert list(box.messages) == ["k"]
    quarantine = Quarantine(tmp_path / "q")
    Gate.closed = set()
    Decide.by_subject = {"k": Decision(disposition=Disposition.KEEP, reason="keep it")}
    await replay(config, journal, quarantine, quarantine.list())
    (runner2,), journal2 = runners(tmp_path, config)
    await poll(runner2)
    assert list(box.messages) == ["k"]  # KEEP: leave it on the server
    assert journal2.get_many("box", ["k"])["k"].status == Status.KEPT


async def test_replay_journals_a_send_even_when_a_later_step_fails(
    tmp_path: Path,
) -> None:
    config = configure(
        tmp_path,
        [{"use": "gate", "flag": "g1"}, {"use": "send"}, {"use": "gate", "flag": "g2"}],
        max_attempts=1,
    )
    (runner,), journal = runners(tmp_path, config)
    box = runner.source.box
    Gate.closed = {"g1", "g2"}
    box.add("a", msg("a"))
    await poll(runner)
    quarantine = Quarantine(tmp_path / "q")
    assert len(quarantine.list()) == 1
    Gate.closed = {"g2"}
    await replay(config, journal, quarantine, quarantine.list())  # send, then g2 fails
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    await replay(config, journal, quarantine, quarantine.list())
    assert Send.sent == ["a"]  # the mail was sent once, not once per replay


# --- UIDL clashes: a UIDL seen again is verified by content before DELE ----------------


class ClashSession(FakeSession):
    """A broken server: ``UIDL`` answers ``ClashSession.uidl_of[id]`` (ids may clash)."""

    uidl_of: ClassVar[dict[str, str]] = {}

    async def list(self) -> list[MessageRef]:
        refs = await super().list()
        return [
            MessageRef(
                mailbox=r.mailbox,
                number=r.number,
                uid=ClashSession.uidl_of.get(self._order[r.number - 1], r.uid),
                size=r.size,
            )
            for r in refs
        ]


class ClashSource(FakeSource):
    name: ClassVar[str] = "clash"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[FakeSession]:
        s = ClashSession(self.box, self.mailbox)
        try:
            yield s
        finally:
            await s.abort()


async def test_duplicate_uidl_never_deletes_an_unprocessed_message(
    tmp_path: Path,
) -> None:
    config = configure(tmp_path, [{"use": "see"}], source="clash")
    (runner,), _journal = runners(tmp_path, config)
    box = runner.source.box
    ClashSession.uidl_of = {"m1": "X", "m2": "X"}  # two messages, one UIDL
    box.add("m1", msg("first"))
    box.add("m2", msg("second"))
    await poll(runner)
    await poll(runner)
    await poll(runner)
    # Both left the server, so both must have run through the chain first.
    assert box.messages == {}
    assert len(SEEN) == 2, SEEN


async def test_reappearing_message_is_deleted_not_reprocessed(tmp_path: Path) -> None:
    runner, box, _journal = make(tmp_path, [{"use": "see"}])
    box.add("a", msg("a"))
    await poll(runner)
    box.add("a", msg("a"))  # a server that did not delete it after all
    await poll(runner)
    assert box.messages == {} and SEEN == ["a"]
    box.add("a", msg("other"))  # the UIDL reused for new mail
    await poll(runner)
    assert box.messages == {} and len(SEEN) == 2 and SEEN[1].startswith("sha256:")


async def test_deletion_confirmed_by_listing_after_crash_past_quit(
    tmp_path: Path,
) -> None:
    runner, box, journal = make(tmp_path, [{"use": "see"}])
    box.add("a", msg("a"))
    real = journal.mark_deleted

    def crash_once(mailbox: str, uids: Any) -> None:
        journal.mark_deleted = real  # type: ignore[method-assign]
        raise RuntimeError("killed between QUIT +OK and the journal write")

    journal.mark_deleted = crash_once  # type: ignore[method-assign]
    await poll(runner)
    assert box.messages == {}  # the server deleted it at QUIT
    await poll(runner)  # the UIDL listing no longer has it: it is gone
    assert journal.get_many("box", ["a"])["a"].status == Status.DELETED
    box.add("a", msg("new mail, reused UIDL"))
    await poll(runner)  # never DELE'd unread on the strength of a stale delete_due
    assert len(SEEN) == 2 and box.messages == {}
