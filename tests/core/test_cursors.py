"""MP-05: a listing cursor moves only over listed positions whose journal entries are
finished, and never past a message that may still need to be listed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailpipe import cursors
from mailpipe.chain import ChainResult
from mailpipe.config import MailboxConfig
from mailpipe.journal.base import Entry, Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.ledger import replay_done
from mailpipe.message import Message, MessageRef
from mailpipe.processor import Decision, Disposition
from mailpipe.source import Coverage


def entry(uid: str, status: Status, *, due: bool = False) -> Entry:
    return Entry(mailbox="box", uid=uid, key=uid, status=status, delete_due=due)


@pytest.mark.parametrize(
    ("status", "due", "finished"),
    [
        (Status.COMMITTED, False, True),
        (Status.KEPT, False, True),
        (Status.QUARANTINED, False, True),
        (Status.DELETED, False, True),
        (Status.PENDING, False, False),  # running, failed and retried, oversize, resting
        (Status.COMMITTED, True, False),  # an acknowledgement is owed: keep listing it
        (Status.QUARANTINED, True, False),
    ],
)
def test_finished_means_durable_and_nothing_owed(
    status: Status, due: bool, finished: bool
) -> None:
    assert cursors.finished(entry("u", status, due=due)) is finished
    assert cursors.finished(None) is False  # not in the journal: deferred, never begun


def test_advance_stops_at_the_first_unfinished_listed_position() -> None:
    done = {f"u{i}": entry(f"u{i}", Status.KEPT) for i in (3, 5, 9, 12)}
    done["u7"] = entry("u7", Status.PENDING)
    coverage = {
        "A": Coverage(2, {3: "u3", 5: "u5", 7: "u7", 9: "u9"}),  # stops below 7
        "B": Coverage(4, {12: "u12", 9: "u9"}),  # gaps are fine: unlisted UIDs
        "C": Coverage(8, {}),  # nothing new: the cursor stays
        "D": Coverage(0, {1: "absent", 3: "u3"}),  # absent from the journal: blocks
        "E": Coverage(10, {9: "u7", 11: "u12"}),  # at or below the start: ignored
    }
    # D stays at 0: left out (nothing to skip).
    assert cursors.advance(coverage, done) == {"A": 5, "B": 12, "C": 8, "E": 11}


def test_after_days_lists_without_cursors() -> None:
    assert cursors.usable(MailboxConfig.model_validate({"name": "b", "delete": "never"}))
    assert not cursors.usable(
        MailboxConfig.model_validate({"name": "b", "delete": "after_days:7"})
    )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[SqliteJournal]:
    j = SqliteJournal(tmp_path / "j.sqlite3")
    yield j
    j.close()


@pytest.mark.parametrize(("policy", "owed"), [("after_processing", True),
                                              ("never", False)])
def test_a_replay_that_owes_an_acknowledgement_makes_it_owed_whatever_the_cursor(
    journal: SqliteJournal, policy: str, owed: bool
) -> None:
    """A quarantined message kept on the server (below the watermark) whose replay
    makes its deletion due is owed: a CursorSession lists every owed uid whatever its
    cursor (tests/testing/test_review14_watermark.py proves the acknowledgement is
    sent), so the replay leaves the cursors alone (no second lock order against the
    cursor compare-and-set)."""
    raw = b"Subject: x\r\n\r\nbody\r\n"
    ref = MessageRef(mailbox="box", number=1, uid="INBOX;UIDVALIDITY=1;UID=1", size=len(raw))
    msg = Message(ref=ref, data=raw)
    journal.begin("box", ref.uid, key=ref.key, size=ref.size)
    journal.finish("box", ref.uid, status=Status.QUARANTINED, disposition="quarantine",
                   sha256=msg.sha256, delete_due=False)
    journal.set_cursors("box", {"INBOX;UIDVALIDITY=1": 1})
    result = ChainResult(decision=Decision(disposition=Disposition.DONE))
    replay_done(journal, None, msg, result, mailbox="box", uid=ref.uid,
                delete_policy=policy)
    assert journal.get_many("box", [ref.uid])[ref.uid].delete_due is owed
    assert (ref.uid in set(journal.owed("box"))) is owed
    assert journal.cursors("box") == {"INBOX;UIDVALIDITY=1": 1}
