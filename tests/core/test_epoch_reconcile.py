"""IC-25: after an epoch change (an IMAP folder recreated with a new UIDVALIDITY) a
message the journal settled under a superseded id is adopted by content hash, never run
again, and its acknowledgement follows the mailbox's policy; the lookup reads only
what the session names as superseded."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from mailpipe import identity
from mailpipe.config import MailboxConfig
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.ledger import Ledger, Summary
from mailpipe.message import Message, MessageRef
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.source import EpochSession

OLD = "Support;UIDVALIDITY=1;UID={}"
NEW = "Support;UIDVALIDITY=2;UID={}"
RAWS = [b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]


class Session:
    """An EpochSession naming every id of the old epoch superseded."""

    def __init__(self, changed: bool = True) -> None:
        self.epoch_changed = changed
        self.asked: list[list[str]] = []

    def superseded(self, uids: Sequence[str]) -> list[str]:
        self.asked.append(list(uids))
        return [u for u in uids if u.startswith("Support;UIDVALIDITY=1;")]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[SqliteJournal]:
    j = SqliteJournal(tmp_path / "j.sqlite3")
    yield j
    j.close()


def ledger(journal: SqliteJournal, tmp_path: Path, **cfg: Any) -> Ledger:
    config = MailboxConfig.model_validate({"name": "box", **cfg})
    return Ledger(journal, "box", config, Hooks(load(entry_points=False)[0]),
                  Quarantine(tmp_path / "q"), Summary(mailbox="box"), ack=config.ack)


def message(uid: str, n: int) -> Message:
    raw = RAWS[n]
    return Message(ref=MessageRef(mailbox="box", number=n + 1, uid=uid, size=len(raw)),
                   data=raw)


def settle(journal: SqliteJournal, n: int, *, status: Status, due: bool) -> None:
    msg = message(OLD.format(n), n)
    journal.begin("box", msg.ref.uid, key=msg.ref.key, size=msg.ref.size)
    journal.finish("box", msg.ref.uid, status=status, disposition="done",
                   sha256=msg.sha256, reason="on_complete", delete_due=due)


def test_session_protocol_is_checkable() -> None:
    assert isinstance(Session(), EpochSession)
    assert not isinstance(object(), EpochSession)


def test_superseded_by_hash_reads_only_unlisted_settled_ids(journal: SqliteJournal) -> None:
    settle(journal, 0, status=Status.COMMITTED, due=False)
    settle(journal, 1, status=Status.DELETED, due=False)
    journal.begin("box", OLD.format(2), key="k", size=1)  # PENDING: never adopted
    session = Session()
    found = identity.superseded_by_hash(journal, "box", {NEW.format(9)}, session)
    assert {e.uid for e in found.values()} == {OLD.format(0), OLD.format(1)}
    assert set(found) == {message("x", 0).sha256, message("x", 1).sha256}
    assert session.asked == [[OLD.format(0), OLD.format(1)]]
    # A listed old id is not superseded (still on the server under that id).
    found = identity.superseded_by_hash(journal, "box", {OLD.format(0)}, session)
    assert {e.uid for e in found.values()} == {OLD.format(1)}


def test_no_epoch_change_reads_nothing(journal: SqliteJournal) -> None:
    settle(journal, 0, status=Status.COMMITTED, due=False)
    session = Session(changed=False)
    assert identity.superseded_by_hash(journal, "box", set(), session) == {}
    assert session.asked == []


def test_resolve_adopts_by_hash_and_runs_other_mail(journal: SqliteJournal) -> None:
    settle(journal, 0, status=Status.COMMITTED, due=False)
    found = identity.superseded_by_hash(journal, "box", set(), Session())
    log = structlog.get_logger()
    same = identity.resolve(message(NEW.format(5), 0), None, journal, "box", log, found)
    assert same.adopt is not None and same.adopt.uid == OLD.format(0) and not same.run
    other = identity.resolve(message(NEW.format(6), 1), None, journal, "box", log, found)
    assert other.adopt is None and other.run
    # Without the map (no epoch change) the same message would run again.
    plain = identity.resolve(message(NEW.format(5), 0), None, journal, "box", log)
    assert plain.run and plain.adopt is None


@pytest.mark.parametrize(
    ("status", "due", "owed", "written"),
    [
        (Status.COMMITTED, False, False, Status.COMMITTED),  # delete = "never": kept
        (Status.COMMITTED, True, True, Status.COMMITTED),  # still owed: owed again
        (Status.DELETED, False, True, Status.COMMITTED),  # done: the new copy too
    ],
    ids=["kept", "owed", "acknowledged"],
)
def test_ledger_adopt_writes_the_outcome_and_says_if_owed(
    journal: SqliteJournal, tmp_path: Path, status: Status, due: bool, owed: bool,
    written: Status,
) -> None:
    settle(journal, 0, status=status, due=due)
    earlier = journal.get_many("box", [OLD.format(0)])[OLD.format(0)]
    book = ledger(journal, tmp_path)
    new = message(NEW.format(7), 0).ref
    with structlog.testing.capture_logs() as logs:
        assert book.adopt(new, earlier) is owed
    entry = journal.get_many("box", [new.uid])[new.uid]
    assert entry.status == written and entry.delete_due is owed
    assert entry.sha256 == earlier.sha256
    assert book.summary.reconciled == 1
    assert [e["event"] for e in logs] == ["epoch_reconciled"]
    if owed:
        book.owe_settled([new])  # durable: the gate accepts it
        assert book.pending() == [new]
