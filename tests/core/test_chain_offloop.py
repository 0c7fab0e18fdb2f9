"""Synchronous processors run off the event loop, within a per-message time budget.

Issue 20 item 4: one CPU-bound message stalled every other mailbox (and SIGTERM)
because ``process()`` ran on the event loop. Each test proves its point by ordering
(threading events), never by wall-clock thresholds; the waits below are safety nets
so that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from mailpipe.chain import Chain
from mailpipe.errors import BudgetExceeded, ConfigError, TemporaryFailure
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.quarantine import Quarantine
from mailpipe.registry import Registry
from mailpipe.scheduler import Scheduler
from mailpipe.testing.fakes import FakeMailbox, FakeSource
from mailpipe.validation import validate_config
from mailpipe.worker import Budget, StepWorker

pytestmark = pytest.mark.timeout(60)

SAFETY = 10.0  # seconds; only reached when the property under test is broken


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hold:
    """Blocks its thread on ``gate`` (the hostile, CPU-bound message)."""

    name: ClassVar[str] = "hold"
    Options: ClassVar[type[BaseModel]] = Opts
    started: ClassVar[threading.Event]
    gate: ClassVar[threading.Event]
    released_by_other: ClassVar[bool | None]
    threads: ClassVar[list[str]]

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        Hold.threads.append(threading.current_thread().name)
        Hold.started.set()
        Hold.released_by_other = Hold.gate.wait(SAFETY)


class SharedHold:
    """``hold`` for the hostile subject, ``afterhold`` for others; safe to call
    concurrently (like ``parse``), so one pipeline can serve both mailboxes."""

    name: ClassVar[str] = "sharedhold"
    Options: ClassVar[type[BaseModel]] = Opts
    concurrent: ClassVar[bool] = True

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        if message.header("subject") == "hostile":
            Hold.process(self, message)  # type: ignore[arg-type]
        else:
            AfterHold.process(self, message)  # type: ignore[arg-type]


class AfterHold:
    """Waits until the hostile message is in hand (orders the two mailboxes)."""

    name: ClassVar[str] = "afterhold"
    Options: ClassVar[type[BaseModel]] = Opts
    saw_hold: ClassVar[bool | None]

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        AfterHold.saw_hold = Hold.started.wait(SAFETY)


class Store:
    """A store: records the message and releases the held one."""

    name: ClassVar[str] = "store"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    stored: ClassVar[list[str]]

    def __init__(self, options: Opts, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        Store.stored.append(message.ref.mailbox)
        Hold.gate.set()


@pytest.fixture(autouse=True)
def _reset() -> Any:
    FakeSource.boxes.clear()
    Hold.started = threading.Event()
    Hold.gate = threading.Event()
    Hold.released_by_other = None
    Hold.threads = []
    AfterHold.saw_hold = None
    Store.stored = []
    yield
    Hold.gate.set()  # never leave a thread behind


def _config(tmp_path: Path, pipelines: dict[str, Any], mailboxes: list[Any]) -> Any:
    registry = Registry()
    registry.add("source", FakeSource, "test")
    for cls in (Hold, SharedHold, AfterHold, Store):
        registry.add("processor", cls, "test")
    data = {
        "scheduler": {"concurrency": 2},
        "mailboxes": mailboxes,
        "pipelines": pipelines,
    }
    return validate_config(data, path=tmp_path / "p.toml", registry=registry)


def _deliver(mailbox: str, subject: str) -> None:
    FakeSource.boxes.setdefault(mailbox, FakeMailbox()).add(
        "u1", f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()
    )


def _scheduler(config: Any, tmp_path: Path, *, once: bool = True) -> Scheduler:
    return Scheduler(
        config,
        journal=SqliteJournal(tmp_path / "j.sqlite3"),
        hooks=Hooks(get_plugin_manager(entry_points=False)),
        once=once,
    )


async def test_a_blocked_processor_does_not_stall_another_mailbox(
    tmp_path: Path,
) -> None:
    """The plain mailbox's message reaches its store while the hostile one is still
    held inside a synchronous processor: the event loop stayed free."""
    config = _config(
        tmp_path,
        {
            "hostile": {"processors": [{"use": "hold"}]},
            "plain": {"processors": [{"use": "afterhold"}, {"use": "store"}]},
        },
        [
            {"name": "a", "source": "fake", "pipeline": "hostile"},
            {"name": "b", "source": "fake", "pipeline": "plain"},
        ],
    )
    _deliver("a", "hostile")
    _deliver("b", "plain")
    summaries = await asyncio.wait_for(_scheduler(config, tmp_path).run(), 2 * SAFETY)
    assert AfterHold.saw_hold is True  # the hostile message was in hand first...
    assert Hold.released_by_other is True  # ...and b's store released it
    assert Store.stored == ["b"]
    assert sorted(s.processed for s in summaries) == [1, 1]
    assert Hold.threads and Hold.threads[0] != threading.current_thread().name


async def test_a_concurrent_step_serves_another_mailbox_while_one_call_is_held(
    tmp_path: Path,
) -> None:
    """One pipeline for both mailboxes (the usual set-up): a step declared
    ``concurrent`` (as ``parse`` is) takes b's message on another thread while a's
    call is still held in it."""
    config = _config(
        tmp_path,
        {"p": {"processors": [{"use": "sharedhold"}, {"use": "store"}]}},
        [
            {"name": "a", "source": "fake", "pipeline": "p"},
            {"name": "b", "source": "fake", "pipeline": "p"},
        ],
    )
    _deliver("a", "hostile")
    _deliver("b", "plain")
    await asyncio.wait_for(_scheduler(config, tmp_path).run(), 2 * SAFETY)
    assert AfterHold.saw_hold is True
    assert Hold.released_by_other is True
    assert Store.stored == ["b", "a"]


async def test_a_processor_over_the_budget_quarantines_its_message_at_once(
    tmp_path: Path,
) -> None:
    """A runaway call is abandoned when the budget expires: the message is quarantined
    on its first attempt with a reason naming the budget, and the poll ends although
    the processor's thread is still running."""
    config = _config(
        tmp_path,
        {"hostile": {"processors": [{"use": "hold"}], "processing_budget": "50ms"}},
        [{"name": "a", "source": "fake", "pipeline": "hostile", "max_attempts": 5}],
    )
    _deliver("a", "hostile")
    sched = _scheduler(config, tmp_path)
    journal = sched.journal
    (summary,) = await asyncio.wait_for(sched.run(), SAFETY)
    assert not Hold.gate.is_set()  # the runaway thread is still blocked
    assert summary.failed == 1 and summary.quarantined == 1
    entry = journal.get_many("a", ["u1"]).get("u1")
    # quarantined, then deleted from the server (on_quarantine = "delete")
    assert entry is not None and entry.status == Status.DELETED
    assert entry.attempts == 1
    (item,) = Quarantine(config.resolve("var/quarantine")).list()
    assert item.attempts == 1
    assert "processing_budget" in item.reason and "hostile/0:hold" in item.reason
    assert FakeSource.boxes["a"].messages == {}  # on_quarantine = "delete"


async def test_stop_is_not_delayed_by_a_runaway_thread(tmp_path: Path) -> None:
    """SIGTERM (request_stop) while a processor runs away: the scheduler returns
    after the message's budget, not when the thread ends; chain.close() does not
    wait for the abandoned thread either."""
    config = _config(
        tmp_path,
        {"hostile": {"processors": [{"use": "hold"}], "processing_budget": "100ms"}},
        [{"name": "a", "source": "fake", "pipeline": "hostile", "poll_interval": 0.01}],
    )
    _deliver("a", "hostile")
    sched = _scheduler(config, tmp_path, once=False)
    task = asyncio.create_task(sched.run())
    assert await asyncio.to_thread(Hold.started.wait, SAFETY)
    sched.request_stop()
    await asyncio.wait_for(task, SAFETY)
    assert not Hold.gate.is_set()  # returned while the thread is still blocked


async def test_chain_close_is_bounded_while_a_call_is_stuck(tmp_path: Path) -> None:
    """close() of a step whose worker is busy gives up after the grace period."""
    config = _config(
        tmp_path,
        {"hostile": {"processors": [{"use": "hold"}], "processing_budget": "100ms"}},
        [{"name": "a", "source": "fake", "pipeline": "hostile"}],
    )
    chain = Chain.from_config(config)
    await chain.open()
    msg = Message.from_bytes(b"Subject: x\r\n\r\nx\r\n", uid="1")
    result = await chain.run("hostile", msg)
    assert not result.ok and result.final
    await asyncio.wait_for(chain.close(), SAFETY)
    assert not Hold.gate.is_set()


def test_processing_budget_is_validated(tmp_path: Path) -> None:
    for bad in (0, -1, "0s", "forever"):
        with pytest.raises(ConfigError, match="processing_budget"):
            _config(
                tmp_path,
                {"p": {"processors": [], "processing_budget": bad}},
                [{"name": "a", "source": "fake", "pipeline": "p"}],
            )
    config = _config(
        tmp_path,
        {"p": {"processors": []}},
        [{"name": "a", "source": "fake", "pipeline": "p"}],
    )
    assert config.model.pipelines["p"].processing_budget == 60.0


async def test_a_call_that_times_out_behind_a_runaway_one_is_only_temporary() -> None:
    """While an abandoned call still runs (it may hold the processor's locks), the
    next call past the budget is a TemporaryFailure: not quarantined for it."""
    gate = threading.Event()
    worker = StepWorker("p/0:s")
    try:
        with pytest.raises(BudgetExceeded, match=r"processing_budget of 0\.05 s"):
            await worker.call(lambda: gate.wait(SAFETY), budget=Budget(0.05))
        with pytest.raises(TemporaryFailure):
            await worker.call(lambda: gate.wait(SAFETY), budget=Budget(0.05))
        gate.set()
        for _ in range(int(SAFETY * 100)):  # the abandoned threads end on their own
            if worker.abandoned == 0:
                break
            await asyncio.sleep(0.01)
        assert worker.abandoned == 0
        assert await worker.call(lambda: 42, budget=Budget(SAFETY)) == 42
    finally:
        gate.set()
        worker.shutdown()


async def test_calls_see_the_callers_context_and_spend_the_budget() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="")
    var.set("mailbox-a")
    worker = StepWorker("p/0:s")
    budget = Budget(SAFETY)
    try:
        assert await worker.call(var.get, budget=budget) == "mailbox-a"
        assert await worker.call(threading.current_thread, budget=budget) is not (
            threading.current_thread()
        )
        assert 0 < budget.left < SAFETY
    finally:
        worker.shutdown()


async def test_a_concurrent_step_quarantines_every_runaway_message() -> None:
    """Review of item 4: a concurrent step (parse, filter) shares nothing between
    calls, so a second overrun while the first runaway thread still runs is the new
    message's own: quarantined too (BudgetExceeded), never retried for ever as a
    TemporaryFailure that adds one more runaway thread per poll."""
    gate = threading.Event()
    worker = StepWorker("p/0:parse", serial=False)
    try:
        for _ in range(2):
            with pytest.raises(BudgetExceeded):
                await worker.call(lambda: gate.wait(SAFETY), budget=Budget(0.05))
        assert worker.abandoned == 2
    finally:
        gate.set()
        worker.shutdown()


async def test_a_step_never_starts_with_its_budget_spent() -> None:
    """A call that could only be abandoned at once is not started at all (its side
    effect would go on after the message was quarantined)."""
    ran: list[int] = []
    worker = StepWorker("p/1:store")
    budget = Budget(0.05)
    budget.left = 0.0
    try:
        with pytest.raises(BudgetExceeded, match="not started"):
            await worker.call(lambda: ran.append(1), budget=budget)
        assert ran == []
    finally:
        worker.shutdown()
