"""Review of h-lows item 3: the reason of a message quarantined after failures names
the failed step, which for a route to an unknown pipeline is the processor's route
text; it reaches the journal and the quarantine sidecar made storable too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailpipe.chain import ChainResult
from mailpipe.config import MailboxConfig
from mailpipe.journal import Journal, Status
from mailpipe.ledger import Ledger, Summary
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.source import SessionFacts
from tests.journal.test_journal_contract import backend, journal  # noqa: F401  (fixtures)
from tests.journal.test_journal_text import Flushed

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("route", "shown"),
    [("x\x00y", "x\\x00y"), ("x\udcffy", "x\\udcffy")],
)
async def test_a_route_text_in_a_quarantine_reason_is_journaled_visibly(
    journal: Journal, tmp_path: Path, route: str, shown: str  # noqa: F811
) -> None:
    # What Chain.run returns for Decision(route=route) naming no pipeline.
    result = ChainResult(error=KeyError(f"route to unknown pipeline {route!r}"),
                         failed_step=route)
    config = MailboxConfig.model_validate({"name": "box", "max_attempts": 1})
    quarantine = Quarantine(tmp_path / "q")
    ledger = Ledger(journal, "box", config, Hooks(load(entry_points=False)[0]),
                    quarantine, Summary(mailbox="box"), ack=config.ack)
    msg = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n", mailbox="box", uid="u1")
    outcome = ledger.processed(msg, ledger.begin(msg.ref), result)
    await ledger.commit_group(Flushed(), [outcome], SessionFacts())  # type: ignore[arg-type]
    stored = journal.get_many("box", ["u1"])["u1"]
    assert stored.status == Status.QUARANTINED
    assert stored.reason == f"failed 1 time(s) in {shown}"
    (side,) = (tmp_path / "q" / "box").glob("*.json")
    assert json.loads(side.read_text())["reason"] == stored.reason
