"""Review of h-lows item 3, end to end: a processor that routes by a message's text
(here a lone surrogate, as a header's undecodable byte reads) to no pipeline fails
the message; once its attempts are spent it is quarantined and acknowledged, and the
mailbox's polls go on (bad input never stops the pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from mailpipe.message import Message
from mailpipe.processor import Decision, Disposition
from mailpipe.testing.fakes import FakeSource, fake_runner

pytestmark = pytest.mark.timeout(60)


class NoOptions(BaseModel):
    """Router takes none."""


class Router:
    """Routes every message to the pipeline its text names (none exists)."""

    name: ClassVar[str] = "router"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel, context: Any) -> None:
        pass

    def process(self, message: Message) -> Decision:
        return Decision(route="to-\udcff", reason="routed by header")


async def test_a_route_text_that_no_journal_can_store_does_not_stop_the_mailbox(
    tmp_path: Path,
) -> None:
    FakeSource.boxes.clear()
    runner = fake_runner(tmp_path, [{"use": "router"}], Router)
    box = runner.source.box
    box.add("u1", b"Subject: x\r\n\r\nbody\r\n")
    errors = []
    for _ in range(runner.cfg.max_attempts + 1):  # and one poll after
        summary = await runner.poll()
        errors.append(summary.error)
    assert errors == [None] * (runner.cfg.max_attempts + 1), errors
    assert box.messages == {}  # quarantined, then acknowledged (deleted)
    (side,) = (tmp_path / "q" / "box").glob("*.json")
    assert "\\udcff" in side.read_text()


class Unreasoned:
    """Quarantines with the reason it read from a header that is absent (None)."""

    name: ClassVar[str] = "unreasoned"
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel, context: Any) -> None:
        pass

    def process(self, message: Message) -> Decision:
        return Decision(disposition=Disposition.QUARANTINE,
                        reason=message.header("x-spam-rule"))  # type: ignore[arg-type]


async def test_a_quarantine_decision_without_a_reason_string_is_still_quarantined(
    tmp_path: Path,
) -> None:
    """A reason of None (a plugin's type slip) failed every poll: before h-lows at
    the journal's NOT NULL, with it in storable()."""
    FakeSource.boxes.clear()
    runner = fake_runner(tmp_path, [{"use": "unreasoned"}], Unreasoned)
    box = runner.source.box
    box.add("u1", b"Subject: x\r\n\r\nbody\r\n")
    summary = await runner.poll()
    assert (summary.error, summary.quarantined) == (None, 1)
    assert box.messages == {}
    (side,) = (tmp_path / "q" / "box").glob("*.json")
    assert '"reason": "quarantined by rule"' in side.read_text()
