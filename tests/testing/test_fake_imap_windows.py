"""MP-06 against the in-process IMAP server: every commit window of a poll runs on one
session (one login), each window's acknowledgements applied before the next lists,
the cursor advanced per window; a refused acknowledgement leaves its window owed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mailpipe.plugins.imap.identity import message_uid

from mailpipe.journal.base import Status
from mailpipe.testing.imap_server import ImapFaults, ImapServer

from .test_fake_imap_selection import SCOPE, Recorder, Rig, raw

UIDS = [message_uid(b"INBOX", 1234, n) for n in range(1, 6)]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    Recorder.seen = []
    Recorder.failing = True
    yield


def commands(srv: ImapServer, word: str, start: int = 0) -> list[str]:
    """The client lines from ``start`` whose command (after the tag) is ``word``."""
    return [
        line.split(" ", 1)[1] for line in srv.transcript[start:]
        if line.split(" ", 2)[1:2] == [word]
        or line.split(" ", 1)[1].startswith(word + " ")
    ]


async def test_five_messages_in_windows_of_two_take_one_login(tmp_path: Path) -> None:
    with ImapServer() as srv:
        for i in range(5):
            srv.add_message(raw(i))
        rig = Rig(srv, tmp_path, delete="after_processing", commit_window=2)
        listings = await rig.poll()
        summary = await rig.runner.poll()  # nothing left: one more login, nothing run
        assert summary.retrieved == 0
    # The first poll: 1 login, 3 windows; the cursor stored after each window is
    # the next window's start.
    assert srv.connections == 2 and len(commands(srv, "LOGIN")) == 2
    assert listings == [
        "UID FETCH 1:* (UID RFC822.SIZE)",
        "UID FETCH 3:* (UID RFC822.SIZE)",
        "UID FETCH 5:* (UID RFC822.SIZE)",
    ]
    assert commands(srv, "UID EXPUNGE") == [
        "UID EXPUNGE 1:2", "UID EXPUNGE 3:4", "UID EXPUNGE 5"
    ]
    assert len(commands(srv, "LOGOUT")) == 2  # one per session, none per window
    assert srv.messages == [] and Recorder.seen == ["0", "1", "2", "3", "4"]
    entries = rig.journal.get_many("box", UIDS)
    assert {e.status for e in entries.values()} == {Status.DELETED}
    assert rig.cursors() == {SCOPE: 5}


async def test_a_refused_expunge_in_window_two_is_sent_by_the_next_session(
    tmp_path: Path,
) -> None:
    faults = ImapFaults(refuse=("UID EXPUNGE", "[SERVERBUG] try later"), refuse_skip=1)
    with ImapServer(faults) as srv:
        for i in range(5):
            srv.add_message(raw(i))
        rig = Rig(srv, tmp_path, delete="after_processing", commit_window=2)
        failed = await rig.runner.poll()
        assert failed.error is not None and failed.error_type == "CommitError"
        assert srv.connections == 1 and failed.windows == 2
        entries = rig.journal.get_many("box", UIDS)
        assert entries[UIDS[0]].status is Status.DELETED  # window 1 applied
        for uid in UIDS[2:4]:  # window 2: durable, its acknowledgement owed
            assert entries[uid].delete_due and entries[uid].status is Status.COMMITTED
        assert len(srv.messages) == 3
        start = len(srv.transcript)
        await rig.poll()
    assert srv.connections == 2 and srv.messages == []
    assert Recorder.seen == ["0", "1", "2", "3", "4"]  # nothing processed twice
    # The owed 3 and 4 go with the new 5 (one window, one login).
    assert commands(srv, "UID EXPUNGE", start) == ["UID EXPUNGE 3:5"]
    entries = rig.journal.get_many("box", UIDS)
    assert {e.status for e in entries.values()} == {Status.DELETED}
