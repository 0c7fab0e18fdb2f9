"""``process_nowait``: a call that waits for nothing runs on the event loop, without
the step thread's hand-over; ``LATER`` sends it to the thread as before (issue 18,
bench/RESULTS.md §92)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict

from mailpipe import LATER, Disposition
from mailpipe.chain import Chain
from mailpipe.config import StepSpec
from mailpipe.message import Message

pytestmark = pytest.mark.timeout(60)


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quick:
    """Handles messages whose subject says ``now`` on the loop; the rest on a thread."""

    name: ClassVar[str] = "quick"
    Options: ClassVar[type[BaseModel]] = Opts
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True

    def __init__(self, options: Opts, context: Any) -> None:
        self.calls: list[tuple[str, str]] = []  # (method, thread)

    def process_nowait(self, message: Message) -> object:
        self.calls.append(("nowait", threading.current_thread().name))
        if message.header("subject") == "now":
            return Disposition.KEEP
        return LATER

    def process(self, message: Message) -> Disposition:
        self.calls.append(("process", threading.current_thread().name))
        return Disposition.DONE


def chain(tmp_path: Path) -> Chain:
    spec = StepSpec(index=0, step="1:quick", use="quick", cls=Quick, options=Opts())
    return Chain({"p": [spec]}, base_dir=tmp_path)


def message(subject: str) -> Message:
    return Message.from_bytes(f"Subject: {subject}\r\n\r\nbody\r\n".encode(), uid=subject)


async def test_a_call_that_waits_for_nothing_runs_on_the_loop(tmp_path: Path) -> None:
    c = chain(tmp_path)
    quick = c.pipelines["p"][0].processor
    loop_thread = threading.current_thread().name
    try:
        result = await c.run("p", message("now"))
        assert result.ok and result.decision is not None
        assert result.decision.disposition == Disposition.KEEP  # nowait's own result
        assert quick.calls == [("nowait", loop_thread)]  # process() never called
        assert result.committed == ["p/1:quick"]  # a commit like any process()
    finally:
        await c.close()


async def test_later_hands_the_message_to_the_steps_thread(tmp_path: Path) -> None:
    c = chain(tmp_path)
    quick = c.pipelines["p"][0].processor
    loop_thread = threading.current_thread().name
    try:
        result = await c.run("p", message("later"))
        assert result.ok and result.decision is not None
        assert result.decision.disposition == Disposition.DONE
        assert [m for m, _ in quick.calls] == ["nowait", "process"]
        assert quick.calls[0][1] == loop_thread
        assert quick.calls[1][1] != loop_thread  # process() on the step's thread
    finally:
        await c.close()


async def test_a_failing_nowait_fails_only_its_message(tmp_path: Path) -> None:
    class Broken(Quick):
        def process_nowait(self, message: Message) -> object:
            raise OSError("disk full (injected)")

    spec = StepSpec(index=0, step="1:broken", use="quick", cls=Broken, options=Opts())
    c = Chain({"p": [spec]}, base_dir=tmp_path)
    try:
        result = await c.run("p", message("now"))
        assert not result.ok and isinstance(result.error, OSError)
        assert result.failed_step == "p/1:broken" and result.committed == []
    finally:
        await c.close()
