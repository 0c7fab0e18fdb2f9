"""Review of issue 18's scheduler defaults (concurrency 4 -> 64 in all, 32 per server).

A ``concurrent`` step (``parse``, ``filter``, ``extract``, ``unwrap``...) gets a thread
per call in flight, and a message's ``processing_budget`` is wall-clock time; past it
the message is quarantined at once (BudgetExceeded is final). With 64 polls at a time,
64 CPU-bound calls share one GIL, so each runs at about 1/64 of a core: a message
whose processing needs 1/64 of the budget in CPU time can be quarantined under a
burst, where 4 polls at a time left it 1/4. Nothing is wrong with such a message.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.registry import Registry
from mailpipe.scheduler import Scheduler
from mailpipe.testing.fakes import FakeMailbox, FakeSource
from mailpipe.validation import validate_config

pytestmark = pytest.mark.timeout(120)

MAILBOXES = 64
MESSAGES = 8
CPU = 0.02  # seconds of the thread's own CPU time per message


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Burn:
    """A CPU-bound step safe to call concurrently (as ``parse`` is): ``CPU`` seconds
    of its thread's CPU time per message, whatever else runs."""

    name: ClassVar[str] = "burn"
    Options: ClassVar[type[BaseModel]] = _Opts
    concurrent: ClassVar[bool] = True

    def __init__(self, options: _Opts, context: Any) -> None:
        pass

    lock: ClassVar[threading.Lock] = threading.Lock()
    running: ClassVar[int] = 0
    peak: ClassVar[int] = 0  # the most calls ever running at once

    def process(self, message: Message) -> None:
        with Burn.lock:
            Burn.running += 1
            Burn.peak = max(Burn.peak, Burn.running)
        try:
            began = time.thread_time()
            while time.thread_time() - began < CPU:
                pass
        finally:
            with Burn.lock:
                Burn.running -= 1


async def _quarantined(tmp_path: Path, scheduler_options: dict[str, Any]) -> int:
    FakeSource.boxes.clear()
    Burn.peak = 0
    registry = Registry()
    registry.add("source", FakeSource, "test")
    registry.add("processor", Burn, "test")
    data = {
        "scheduler": scheduler_options,
        "mailboxes": [{"name": f"m{i}", "source": "fake"} for i in range(MAILBOXES)],
        "pipelines": {"default": {"processors": [{"use": "burn"}]}},
    }
    config = validate_config(data, path=tmp_path / "p.toml", registry=registry)
    for i in range(MAILBOXES):
        box = FakeSource.boxes.setdefault(f"m{i}", FakeMailbox())
        for n in range(MESSAGES):
            box.add(f"u{n}", f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    journal = SqliteJournal(tmp_path / "j.sqlite3")
    try:
        scheduler = Scheduler(
            config,
            journal=journal,
            hooks=Hooks(get_plugin_manager(entry_points=False)),
            once=True,
        )
        summaries = await asyncio.wait_for(scheduler.run(), 100)
    finally:
        journal.close()
    assert len(summaries) == MAILBOXES
    assert sum(s.retrieved for s in summaries) == MAILBOXES * MESSAGES
    return sum(s.quarantined for s in summaries)


async def test_a_burst_at_the_default_concurrency_runs_one_call_per_cpu_slot(
    tmp_path: Path,
) -> None:
    """The review's finding, fixed: calls of concurrent steps wait for one of the
    chain's CPU slots (mailpipe.chain.CPU_SLOTS) before their budget starts, so 64
    polls at a time never run 64 CPU-bound calls at once on one GIL (checked by
    counting the calls in flight, not by timing them)."""
    assert await _quarantined(tmp_path, {}) == 0
    assert 1 <= Burn.peak <= (os.cpu_count() or 1)  # one call per CPU at most


async def test_a_mailbox_cancelled_while_waiting_for_a_global_slot_frees_its_host_slot() -> (
    None
):
    """Issue 18's ``_Slots``: the host's slot is taken first; a mailbox cancelled
    (SIGTERM) while it waits for a global slot gives its host slot back, so its
    server's other mailboxes are not locked out, and the global slot it never got is
    not released (no slot made out of nothing)."""
    from mailpipe.scheduler import _Slots

    total = asyncio.Semaphore(1)
    host_a = asyncio.Semaphore(1)
    holder = _Slots(None, total)
    await holder.__aenter__()  # another server's poll has the only global slot
    waiting = asyncio.create_task(_Slots(host_a, total).__aenter__())
    await asyncio.sleep(0)
    assert host_a.locked() and not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not host_a.locked()  # given back
    after = asyncio.create_task(_Slots(host_a, total).__aenter__())
    await asyncio.sleep(0)
    assert not after.done()  # waits for the global slot, not for a leaked one
    await holder.__aexit__(None, None, None)
    await asyncio.wait_for(after, 5)
    assert total.locked() and host_a.locked()
