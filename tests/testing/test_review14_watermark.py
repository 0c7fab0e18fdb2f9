"""Review 14: sequences where the IMAP UID watermark (MP-05) passes a message that
was never finished, or an acknowledgement that was never sent. Each test states what
the MP-05 row of docs/conformance.md promises; each fails on main at 2b3f3c6."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailpipe.chain import ChainResult
from mailpipe.journal.base import Status
from mailpipe.ledger import Ledger, forget, replay_done
from mailpipe.message import Message, MessageRef
from mailpipe.processor import Decision, Disposition
from mailpipe.testing.imap_server import ImapFaults, ImapServer

from .test_fake_imap_selection import SCOPE, Recorder, Rig, raw

UID1 = f"{SCOPE};UID=1"


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    Recorder.seen = []
    Recorder.failing = True
    yield


def set_flags(srv: ImapServer, uid: int, *, add: str = "", drop: str = "") -> None:
    """Another client changes a message's flags (a user reads it, marks it unread)."""
    for m in srv._folders["INBOX"]:
        if m.uid == uid:
            if add:
                m.flags.add(add)
            if drop:
                m.flags.discard(drop)


async def test_select_unseen_watermark_passes_a_failing_message(tmp_path: Path) -> None:
    """MP-05 says a cursor never passes a message 'failing and retried'. With
    select = "unseen" a PENDING message another client reads (\\Seen) drops out of
    the search; the next finished message moves the cursor over it, and when the
    user marks it unread again it is never retried: lost (PENDING forever)."""
    with ImapServer() as srv:
        srv.add_message(raw(0, "bad"))  # UID 1: fails, PENDING, retried
        rig = Rig(srv, tmp_path, select="unseen")
        await rig.runner.poll()
        assert Recorder.seen == ["bad0"]
        assert rig.journal.get_many("box", [UID1])[UID1].status is Status.PENDING
        set_flags(srv, 1, add="\\Seen")  # a human opened it in webmail
        srv.add_message(raw(1))  # UID 2: processed, finished
        await rig.runner.poll()
        # h-fixwm: the selection is part of the scope (finding 6); the held PENDING
        # UID 1 keeps the cursor below it.
        assert rig.cursors().get(f"{SCOPE};unseen", 0) < 1, "passed a PENDING message"
        set_flags(srv, 1, drop="\\Seen")  # ... and marked it unread again
        Recorder.failing = False
        await rig.runner.poll()
        assert Recorder.seen.count("bad0") == 2, "the failing message is never retried"
        # Both finished now: only then does the cursor pass UID 1.
        assert rig.journal.get_many("box", [UID1])[UID1].status is not Status.PENDING
        assert rig.cursors() == {f"{SCOPE};unseen": 2}


async def test_select_unseen_owed_acknowledgement_is_settled_as_gone(
    tmp_path: Path,
) -> None:
    """An acknowledgement owed (delete after processing, the UID STORE refused once)
    for a message the search no longer shows (read meanwhile) is taken as gone
    (plan.gone → mark_deleted): the journal says DELETED, the message stays on the
    server for ever, and the cursor then passes it."""
    faults = ImapFaults(refuse=("UID STORE", "[SERVERBUG] try later"))
    with ImapServer(faults) as srv:
        srv.add_message(raw(0))
        rig = Rig(srv, tmp_path, select="unseen", delete="after_processing")
        await rig.runner.poll()  # processed; the deletion's STORE is refused
        entry = rig.journal.get_many("box", [UID1])[UID1]
        assert entry.delete_due and srv.messages, "setup: the deletion is owed"
        set_flags(srv, 1, add="\\Seen")
        await rig.runner.poll()
        await rig.runner.poll()
        entry = rig.journal.get_many("box", [UID1])[UID1]
        assert not (entry.status is Status.DELETED and srv.messages), (
            "journal says DELETED, the message is still on the server"
        )


async def test_forget_during_a_poll_is_undone_by_the_cursor_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`state forget` takes no lease and may run while the daemon polls. The poll's
    advance_cursors writes a cursor computed from the cursors it read before the
    forget, so the forgotten message below it is never listed again, although
    `forget` promises 'they will be processed again'."""
    with ImapServer() as srv:
        srv.add_message(raw(0))
        rig = Rig(srv, tmp_path)
        await rig.poll()
        assert rig.cursors() == {SCOPE: 1}
        srv.add_message(raw(1))
        original = Ledger.commit
        calls = 0

        async def commit(self: Ledger, session: Any) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:  # the operator's `mailpipe state forget box <uid 1>`
                forget(rig.journal, "box", [UID1])
            return await original(self, session)

        monkeypatch.setattr(Ledger, "commit", commit)
        await rig.poll()
        await rig.poll()
        assert Recorder.seen.count("0") == 2, (
            f"forgotten UID 1 never processed again; cursors {rig.cursors()}"
        )


async def test_replay_during_a_poll_loses_the_owed_acknowledgement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay that makes a deletion owed drops the cursors (MP-05), but a poll
    running meanwhile writes them back from what it read before; the owed UID below
    the cursor is then not listed, settled as gone, and never deleted."""
    with ImapServer() as srv:
        srv.add_message(raw(0, "bad"))  # UID 1: quarantined, kept on the server
        rig = Rig(srv, tmp_path, delete="after_processing", on_quarantine="keep",
                  max_attempts=1)
        await rig.runner.poll()
        assert rig.journal.get_many("box", [UID1])[UID1].status is Status.QUARANTINED
        srv.add_message(raw(1))
        await rig.poll()
        assert rig.cursors() == {SCOPE: 2}
        srv.add_message(raw(2))
        data = srv.messages[0]
        ref = MessageRef(mailbox="box", number=1, uid=UID1, size=len(data))
        original = Ledger.commit
        calls = 0

        async def commit(self: Ledger, session: Any) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:  # `mailpipe quarantine replay` succeeds meanwhile
                replay_done(rig.journal, None, Message(ref=ref, data=data),
                            ChainResult(decision=Decision(disposition=Disposition.DONE)),
                            mailbox="box", uid=UID1, delete_policy="after_processing")
            return await original(self, session)

        monkeypatch.setattr(Ledger, "commit", commit)
        await rig.poll()
        await rig.poll()
        entry = rig.journal.get_many("box", [UID1])[UID1]
        assert data not in srv.messages, (
            f"replayed message never deleted; journal {entry.status}, "
            f"delete_due={entry.delete_due}, cursors {rig.cursors()}"
        )


async def test_changing_the_selection_starts_from_no_cursor(tmp_path: Path) -> None:
    """Finding 6: mail passed under select = "unseen" (seen at the time) is taken
    once the configuration selects "all": the selection is part of the cursor
    scope, so the new selection starts from no cursor."""
    with ImapServer() as srv:
        srv.add_message(raw(0), flags=("\\Seen",))  # UID 1: left out by "unseen"
        srv.add_message(raw(1))  # UID 2
        rig = Rig(srv, tmp_path, select="unseen")
        await rig.poll()
        assert Recorder.seen == ["1"]
        assert rig.cursors() == {f"{SCOPE};unseen": 2}
        rig.journal.close()
        later = Rig(srv, tmp_path, select="all")  # same journal, selection changed
        await later.poll()
        assert Recorder.seen == ["1", "0"], (
            f"UID 1 never taken after select = 'all'; cursors {later.cursors()}"
        )
        assert later.cursors() == {SCOPE: 2}


async def test_readopt_keeps_the_other_cursors(tmp_path: Path) -> None:
    """Finding 5: writing one entry's outcome again (adopt/readopt) deletes that
    entry only, not every cursor of the mailbox."""
    with ImapServer() as srv:
        srv.add_message(raw(0))
        rig = Rig(srv, tmp_path)
        await rig.poll()
        assert rig.cursors() == {SCOPE: 1}
        entry = rig.journal.get_many("box", [UID1])[UID1]
        ledger = rig.runner.ledger
        other = MessageRef(mailbox="box", number=9, uid="Other;UIDVALIDITY=1;UID=9",
                           size=entry.size)
        ledger.readopt(other, entry)
        assert rig.cursors() == {SCOPE: 1}, "readopt dropped the mailbox's cursors"


async def test_gmail_failing_message_holds_the_cursor_and_is_retried(
    tmp_path: Path,
) -> None:
    """MP-05 on Gmail (IC-46, ids by X-GM-MSGID, no UID in the key): a PENDING message
    the search leaves out holds the cursor and is retried once selected again."""
    with ImapServer(gmail=True) as srv:
        srv.add_message(raw(0, "bad"), gm_msgid=7)  # UID 1
        rig = Rig(srv, tmp_path, select="unseen")
        await rig.poll()
        key = "X-GM-MSGID=7"
        assert rig.journal.get_many("box", [key])[key].status is Status.PENDING
        set_flags(srv, 1, add="\\Seen")
        srv.add_message(raw(1), gm_msgid=8)  # UID 2
        await rig.poll()
        assert Recorder.seen == ["bad0", "1"]
        assert rig.cursors().get(f"{SCOPE};unseen", 0) < 1, "passed a PENDING message"
        set_flags(srv, 1, drop="\\Seen")
        Recorder.failing = False
        await rig.poll()
        assert Recorder.seen == ["bad0", "1", "bad0"]
        assert rig.journal.get_many("box", [key])[key].status is Status.COMMITTED
        assert rig.cursors() == {f"{SCOPE};unseen": 2}


async def test_gmail_owed_acknowledgement_is_not_settled_as_gone(tmp_path: Path) -> None:
    """MP-05 on Gmail: an owed deletion of a message the search no longer shows is
    still listed (by its X-GM-MSGID's UID), so it is not taken as gone."""
    faults = ImapFaults(refuse=("UID STORE", "[SERVERBUG] try later"))
    with ImapServer(faults, gmail=True) as srv:
        srv.add_message(raw(0), gm_msgid=7)
        rig = Rig(srv, tmp_path, select="unseen", delete="after_processing")
        await rig.runner.poll()
        key = "X-GM-MSGID=7"
        assert rig.journal.get_many("box", [key])[key].delete_due and srv.messages
        set_flags(srv, 1, add="\\Seen")
        await rig.runner.poll()
        await rig.runner.poll()
        entry = rig.journal.get_many("box", [key])[key]
        assert not (entry.status is Status.DELETED and srv.messages), (
            "journal says DELETED, the message is still on the server"
        )
        assert entry.status is Status.DELETED and not srv.messages, "deletion never sent"
