"""Reasons and error texts reach every journal storable (issue 18 review, item 3).

PostgreSQL refuses a NUL in ``text`` where SQLite stores it: a processor's reason or
an exception's text quoting a malformed header made the group commit fail on
PostgreSQL only. The ledger escapes such characters (:mod:`mailpipe.storable`), so
both journals store the same visible text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mailpipe.chain import ChainResult
from mailpipe.config import MailboxConfig
from mailpipe.journal import Entry, Journal, Status
from mailpipe.ledger import Ledger, Summary, error_text
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, load
from mailpipe.processor import Decision, Disposition
from mailpipe.quarantine import Quarantine
from mailpipe.source import SessionFacts
from mailpipe.storable import storable
from tests.journal.test_journal_contract import backend, journal  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)

#: (text, as journaled): a NUL alone (psycopg: "PostgreSQL text fields cannot contain
#: NUL (0x00) bytes"), then with a lone surrogate (not encodable) and a terminal escape.
TEXTS = [
    ("Subject: a\x00b", "Subject: a\\x00b"),
    ("Subject: a\x00b\udcff\x1b[2J", "Subject: a\\x00b\\udcff\\x1b[2J"),
]


class Flushed:
    """What the ledger asks of a chain at a group commit: nothing to flush."""

    async def flush(self) -> None:
        return None

    def flushed(self, result: ChainResult) -> bool:
        return True


async def settle(journal: Journal, tmp_path: Path, result: ChainResult) -> Entry:  # noqa: F811
    """What the journal holds once the ledger wrote ``result`` for a message."""
    config = MailboxConfig.model_validate({"name": "box", "max_attempts": 3})
    ledger = Ledger(journal, "box", config, Hooks(load(entry_points=False)[0]),
                    Quarantine(tmp_path / "q"), Summary(mailbox="box"), ack=config.ack)
    msg = Message.from_bytes(b"Subject: x\r\n\r\nbody\r\n", mailbox="box", uid="u1")
    outcome = ledger.processed(msg, ledger.begin(msg.ref), result)
    await ledger.commit_group(Flushed(), [outcome], SessionFacts())  # type: ignore[arg-type]
    return journal.get_many("box", ["u1"])["u1"]


@pytest.mark.parametrize(("bad", "shown"), TEXTS)
async def test_a_reason_with_a_nul_is_journaled_visibly(
    journal: Journal, tmp_path: Path, bad: str, shown: str  # noqa: F811
) -> None:
    result = ChainResult(decision=Decision(disposition=Disposition.KEEP, reason=bad))
    stored = await settle(journal, tmp_path, result)
    assert (stored.status, stored.reason) == (Status.KEPT, shown)


@pytest.mark.parametrize(("bad", "shown"), TEXTS)
async def test_an_error_with_a_nul_is_journaled_visibly(
    journal: Journal, tmp_path: Path, bad: str, shown: str  # noqa: F811
) -> None:
    result = ChainResult(error=ValueError(f"bad header {bad}"), failed_step="p/parse")
    stored = await settle(journal, tmp_path, result)
    assert (stored.status, stored.attempts) == (Status.PENDING, 1)
    assert stored.last_error == f"ValueError: bad header {shown}"


def test_storable_escapes_only_what_a_journal_may_refuse() -> None:
    assert storable("tab\tand\nnewline, é, 😀") == "tab\tand\nnewline, é, 😀"
    assert storable("cr\r del\x7f") == "cr\\x0d del\\x7f"
    assert error_text(OSError("a\x00b")) == "OSError: a\\x00b"
