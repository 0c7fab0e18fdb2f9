"""A budget that runs out before the step's thread began the call (issue 18 review,
LOW item 4): nothing ran, so nothing is abandoned and the message is not quarantined
as a runaway; it is retried, the attempt counted.

The thread is starved deterministically: it is busy with a job of the test's own
when the call is handed to it, so it cannot begin the call before the budget's timer
fires (no wall-clock threshold is asserted).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mailpipe.chain import Chain
from mailpipe.config import MailboxConfig, StepSpec
from mailpipe.errors import BudgetExceeded
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.ledger import Ledger, Summary
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, load
from mailpipe.processor import Disposition
from mailpipe.quarantine import Quarantine
from mailpipe.worker import Budget, StepWorker, _Job

pytestmark = pytest.mark.timeout(60)

SAFETY = 10.0  # seconds; only reached when the property under test is broken


def starve(worker: StepWorker) -> threading.Event:
    """Keep the worker's idle thread busy until the returned event is set."""
    (thread,) = worker._idle
    release = threading.Event()
    loop = asyncio.get_running_loop()
    thread.queue.put(_Job(lambda: release.wait(SAFETY), loop, loop.create_future()))
    return release


async def test_a_call_not_begun_abandons_nothing_and_is_not_final() -> None:
    worker = StepWorker("p/0:s")
    first = await worker.call(lambda: threading.current_thread().name)
    release = starve(worker)
    ran: list[int] = []
    try:
        with pytest.raises(BudgetExceeded, match="not started") as info:
            await worker.call(lambda: ran.append(1), budget=Budget(0.05))
        assert info.value.final is False
        assert worker.abandoned == 0  # the thread runs no call of the message's
    finally:
        release.set()
    # The thread is still the step's: the next call runs on it, the skipped one never.
    after = await worker.call(lambda: threading.current_thread().name, budget=Budget(SAFETY))
    assert after == first and ran == []
    worker.shutdown()


class NoOptions(BaseModel):
    """Sync takes none."""


class Sync:
    """A step whose ``process`` runs on its thread."""

    def __init__(self, options: BaseModel, context: Any) -> None:
        self.seen: list[str] = []

    def process(self, message: Message) -> Disposition:
        self.seen.append(message.ref.uid)
        return Disposition.DONE


async def test_a_message_whose_call_never_began_is_retried_not_quarantined(
    tmp_path: Path,
) -> None:
    spec = StepSpec(index=0, step="0:sync", use="sync", cls=Sync, options=NoOptions())
    # The runs whose thread is not starved get a budget they cannot run out of (no
    # wall-clock threshold); only the starved run's budget is short.
    chain = Chain({"p": [spec]}, base_dir=tmp_path, budgets={"p": SAFETY})
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    try:
        step = chain.pipelines["p"][0]
        first = Message.from_bytes(b"Subject: 1\r\n\r\n", mailbox="box", uid="u1")
        assert (await chain.run("p", first)).ok  # the step's thread is idle now
        release = starve(step.worker)
        chain._budgets["p"] = 0.05
        try:
            msg = Message.from_bytes(b"Subject: 2\r\n\r\n", mailbox="box", uid="u2")
            result = await chain.run("p", msg)
        finally:
            release.set()
            chain._budgets["p"] = SAFETY
        assert isinstance(result.error, BudgetExceeded) and not result.final
        assert step.processor.seen == ["u1"]
        config = MailboxConfig.model_validate({"name": "box", "max_attempts": 3})
        ledger = Ledger(journal, "box", config, Hooks(load(entry_points=False)[0]),
                        Quarantine(tmp_path / "q"), Summary(mailbox="box"), ack=config.ack)
        outcome = ledger.processed(msg, ledger.begin(msg.ref), result)
        assert (outcome.status, outcome.attempts) == (Status.PENDING, 1)
        assert ledger.summary.quarantined == 0
        # Retried, it runs (on the same thread: nothing was abandoned).
        assert (await chain.run("p", msg)).ok and step.processor.seen == ["u1", "u2"]
        assert step.worker.abandoned == 0
    finally:
        journal.close()
        await chain.close()
