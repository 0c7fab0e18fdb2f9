"""The cost of a step call's thread hop (issue 18): one wake-up of the loop per call.

A synchronous step call used to wake the event loop twice (the thread said "started",
then handed back the result through ``asyncio.wrap_future``); the budget clock now
starts when the call is handed to the step's thread, which is idle then, so only the
outcome crosses back. These tests count the cross-thread wake-ups and check that the
rules around them (cancellation before the call begins, an outcome arriving after the
budget ran out, a BaseException from the call) are kept. Ordering by threading
events, never by wall-clock thresholds; the waits are safety nets.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from mailpipe.errors import BudgetExceeded
from mailpipe.worker import Budget, StepWorker, _Job, _Thread

pytestmark = pytest.mark.timeout(60)

SAFETY = 10.0  # seconds; only reached when the property under test is broken


def count_wakeups(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    """Count ``loop.call_soon_threadsafe`` calls (each one writes the self-pipe)."""
    seen = [0]
    original = loop.call_soon_threadsafe

    def counting(callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        seen[0] += 1
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    return seen


async def test_a_call_wakes_the_loop_once_and_keeps_its_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    worker = StepWorker("p/0:s")
    budget = Budget(SAFETY)
    try:
        seen = count_wakeups(loop, monkeypatch)
        threads = [await worker.call(threading.current_thread, budget=budget)
                   for _ in range(3)]
        with pytest.raises(ValueError, match="bad input"):
            await worker.call(lambda: int("bad input"), budget=budget)
        threads.append(await worker.call(threading.current_thread))
        assert seen[0] == 5  # one per call, whatever its outcome, budget or not
        # A serial step keeps its calls on one thread (thread-bound libraries).
        assert len(set(threads)) == 1
        assert threads[0] is not threading.current_thread()
        assert 0 < budget.left < SAFETY
    finally:
        monkeypatch.undo()
        worker.shutdown()


async def test_a_job_cancelled_before_it_begins_never_runs() -> None:
    loop = asyncio.get_running_loop()
    gate, ran = threading.Event(), []
    thread = _Thread("test-hop")
    first = _Job(lambda: gate.wait(SAFETY), loop, loop.create_future())
    second = _Job(lambda: ran.append(1), loop, loop.create_future())
    thread.queue.put(first)
    thread.queue.put(second)
    assert second.cancel()  # the thread is still in the first call
    gate.set()
    assert await asyncio.wait_for(first.waiter, SAFETY) == (None, True)
    thread.stop()
    await asyncio.to_thread(thread.thread.join, SAFETY)
    assert not thread.thread.is_alive()
    assert ran == []
    assert not second.waiter.done()
    assert not first.cancel()  # it had begun: too late to keep it from running


async def test_an_outcome_after_the_budget_ran_out_is_dropped() -> None:
    """The abandoned call's outcome still reaches the loop; it must find the caller
    gone and drop it (no InvalidStateError in the loop's exception handler)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    gate, done = threading.Event(), threading.Event()
    worker = StepWorker("p/0:s")

    def runaway() -> int:
        gate.wait(SAFETY)
        done.set()
        return 1

    try:
        with pytest.raises(BudgetExceeded):
            await worker.call(runaway, budget=Budget(0.05))
        gate.set()
        assert await asyncio.to_thread(done.wait, SAFETY)
        for _ in range(int(SAFETY * 100)):
            if worker.abandoned == 0:
                break
            await asyncio.sleep(0.01)
        assert worker.abandoned == 0
        await asyncio.sleep(0)  # let the delivered outcome run on the loop
        assert errors == []
        assert await worker.call(lambda: 2, budget=Budget(SAFETY)) == 2
    finally:
        gate.set()
        loop.set_exception_handler(None)
        worker.shutdown()


@pytest.mark.parametrize("exc", [SystemExit(3), GeneratorExit()])
async def test_a_base_exception_from_the_call_reaches_the_caller_and_retires_the_thread(
    exc: BaseException,
) -> None:
    """Raised in the caller's frame: a GeneratorExit thrown into the awaiting task
    would close the chain's coroutines instead of reaching its isolation of the
    processor's failure (tests/core/test_engine_review.py)."""
    worker = StepWorker("p/0:s")

    def leave() -> None:
        raise exc

    async def caller() -> str:
        try:
            await worker.call(leave, budget=Budget(SAFETY))
        except BaseException as seen:  # what the chain does
            return type(seen).__name__
        return "nothing raised"

    try:
        first = await worker.call(threading.current_thread)
        assert await caller() == type(exc).__name__
        second = await worker.call(threading.current_thread)
        assert first is not second  # not reused after a BaseException
        await asyncio.to_thread(first.join, SAFETY)
        assert not first.is_alive()
    finally:
        worker.shutdown()
