"""Review of the one-wake-up step call (issue 18, h-hop): what a failed call leaves."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from mailpipe.worker import Budget, StepWorker

pytestmark = pytest.mark.timeout(60)


class Big:
    """Stands for the message a processor's frame holds."""


async def test_a_raising_call_leaves_no_cycle_holding_the_message() -> None:
    """The error is raised in the caller's frame, which its traceback then holds; the
    waiter held the error too, so the processor's frames (and the message in them)
    outlived the dropped error until the cyclic collector ran."""
    worker = StepWorker("p/0:s")
    seen: list[weakref.ref[Big]] = []

    def process() -> None:
        message = Big()
        seen.append(weakref.ref(message))
        raise ValueError("bad input")

    enabled = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(ValueError, match="bad input"):
            await worker.call(process, budget=Budget(10.0))
        await asyncio.sleep(0)  # nothing left on the loop
        # The thread drops its own references after handing the outcome over; it may
        # not have got there yet (the loop can resume first): let it finish, so what
        # is checked is what the loop side (waiter, job) still holds.
        threads = [t.thread for t in worker._idle]
        worker.shutdown()
        for thread in threads:
            thread.join(10)
        assert seen[0]() is None
    finally:
        if enabled:
            gc.enable()
        worker.shutdown()
