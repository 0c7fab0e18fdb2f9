"""``process_nowait``: a call that waits for nothing runs on the event loop, without
the step thread's hand-over; ``LATER`` sends it to the thread as before (issue 18,
bench/RESULTS.md §30)."""

from __future__ import annotations

import threading
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
