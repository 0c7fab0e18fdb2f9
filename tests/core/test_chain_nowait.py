"""``process_nowait``: a call that waits for nothing runs on the event loop, without
the step thread's hand-over; ``LATER`` sends it to the thread as before (issue 18,
bench/RESULTS.md §30)."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mailpipe import LATER, Disposition
from mailpipe.chain import Chain, ChainResult
from mailpipe.config import StepSpec
from mailpipe.message import Message

pytestmark = pytest.mark.timeout(60)


class NoOptions(BaseModel):
    """Quick takes none."""


class Quick:
    """Handles messages whose subject says ``now`` on the loop; the rest on a thread
    (a committing, idempotent step, as store.maildir)."""

    commits, idempotent = True, True

    def __init__(self, options: BaseModel, context: Any) -> None:
        self.calls: list[tuple[str, str]] = []  # (method, thread)

    def process_nowait(self, message: Message) -> object:
        self.calls.append(("nowait", threading.current_thread().name))
        if message.header("subject") == "now":
            return Disposition.KEEP
        return LATER

    def process(self, message: Message) -> Disposition:
        self.calls.append(("process", threading.current_thread().name))
        return Disposition.DONE


def message(subject: str) -> Message:
    return Message.from_bytes(f"Subject: {subject}\r\n\r\nbody\r\n".encode(), uid=subject)


async def run(tmp_path: Path, subject: str) -> tuple[ChainResult, list[tuple[str, str]]]:
    """One message through a one-step chain of :class:`Quick`: its result, and
    Quick's calls with the thread of each."""
    spec = StepSpec(index=0, step="1:quick", use="quick", cls=Quick, options=NoOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        result = await c.run("p", message(subject))
        return result, c.pipelines["p"][0].processor.calls
    finally:
        await c.close()


async def test_a_call_that_waits_for_nothing_runs_on_the_loop(tmp_path: Path) -> None:
    result, calls = await run(tmp_path, "now")
    assert result.ok and result.decision is not None
    assert result.decision.disposition == Disposition.KEEP  # nowait's own result
    assert calls == [("nowait", threading.current_thread().name)]  # no process()
    assert result.committed == ["p/1:quick"]  # a commit like any process()


async def test_later_hands_the_message_to_the_steps_thread(tmp_path: Path) -> None:
    result, calls = await run(tmp_path, "later")
    assert result.ok and result.decision is not None
    assert result.decision.disposition == Disposition.DONE
    assert [m for m, _ in calls] == ["nowait", "process"]
    assert calls[0][1] == threading.current_thread().name
    assert calls[1][1] != threading.current_thread().name  # on the step's thread


async def test_a_failing_nowait_fails_only_its_message(tmp_path: Path) -> None:
    class Broken(Quick):
        def process_nowait(self, message: Message) -> object:
            raise OSError("disk full (injected)")

    spec = StepSpec(index=0, step="1:broken", use="quick", cls=Broken, options=NoOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        result = await c.run("p", message("now"))
        assert not result.ok and isinstance(result.error, OSError)
        assert result.failed_step == "p/1:broken" and result.committed == []
    finally:
        await c.close()


async def test_a_spent_budget_is_not_bypassed_on_the_loop(tmp_path: Path) -> None:
    """A message whose processing_budget earlier steps spent is not started by the
    thread (BudgetExceeded, final: quarantined); nor is it handled on the loop."""
    from mailpipe.errors import BudgetExceeded
    from mailpipe.worker import Budget

    spec = StepSpec(index=0, step="1:quick", use="quick", cls=Quick, options=NoOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        step = c.pipelines["p"][0]
        spent = Budget(1.0)
        spent.left = 0.0
        with pytest.raises(BudgetExceeded, match="not started"):
            await step.gated("process", message("now"), budget=spent)
        assert step.processor.calls == []  # neither on the loop nor on a thread
    finally:
        await c.close()


# --- issue 18 review: process_nowait is synchronous, and the loop still turns ------


class AsyncNowait(Quick):
    """A third-party mistake: ``process_nowait`` written ``async``."""

    async def process_nowait(self, message: Message) -> object:  # type: ignore[override]
        self.calls.append(("nowait", "async"))
        return Disposition.KEEP


class AsyncCallable:
    """An object whose ``__call__`` is a coroutine function."""

    async def __call__(self, message: Message) -> object:
        return Disposition.KEEP


class CallableNowait(Quick):
    def __init__(self, options: BaseModel, context: Any) -> None:
        super().__init__(options, context)
        self.process_nowait = AsyncCallable()  # type: ignore[method-assign]


@pytest.mark.parametrize("cls", [AsyncNowait, CallableNowait])
def test_an_async_process_nowait_is_refused_when_the_chain_is_built(
    tmp_path: Path, cls: type[Quick]
) -> None:
    from mailpipe.errors import PluginError

    spec = StepSpec(index=0, step="1:quick", use="quick", cls=cls, options=NoOptions())
    with pytest.raises(PluginError, match=r"'p/1:quick' \(use = 'quick'\).*synchronous"):
        Chain({"p": [spec]}, base_dir=tmp_path)


async def test_an_awaitable_from_process_nowait_fails_the_message_uncommitted(
    tmp_path: Path,
) -> None:
    """A synchronous ``process_nowait`` that returns a coroutine (a wrapper around an
    async function) cannot be told at construction: the message fails, its step is
    not recorded as committed (a retry runs it again), and the coroutine never runs."""

    class Wrapper(Quick):
        def process_nowait(self, message: Message) -> object:
            return self.store(message)

        async def store(self, message: Message) -> Disposition:
            self.calls.append(("stored", ""))
            return Disposition.DONE

    spec = StepSpec(index=0, step="1:wrapped", use="quick", cls=Wrapper, options=NoOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" too
            result = await c.run("p", message("now"))
            gc.collect()
        assert not result.ok and isinstance(result.error, TypeError)
        assert "awaitable" in str(result.error) and result.failed_step == "p/1:wrapped"
        assert result.committed == [] and result.pending == []
        assert c.pipelines["p"][0].processor.calls == []  # the work never ran
    finally:
        await c.close()


async def test_a_run_of_nowait_messages_lets_other_tasks_progress(tmp_path: Path) -> None:
    """Messages whose every step finishes on the loop: another task still gets a turn
    at least every NOWAIT_RUN calls (counted, not timed)."""
    from mailpipe.chain import NOWAIT_RUN

    spec = StepSpec(index=0, step="1:quick", use="quick", cls=Quick, options=NoOptions())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    ticks = 0
    done = False

    async def other_mailbox() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0)

    count = 4 * NOWAIT_RUN
    task = asyncio.create_task(other_mailbox())
    try:
        for n in range(count):
            result = await c.run("p", message("now"))
            assert result.ok, n
        seen = ticks
        assert len(c.pipelines["p"][0].processor.calls) == count  # all on the loop
        assert seen >= count // NOWAIT_RUN - 1
    finally:
        done = True
        await task
        await c.close()
