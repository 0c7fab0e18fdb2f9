"""IMAP selection of new mail against the in-process server (MP-05, IC-26): the
journal's per-folder UID watermark makes a poll list only past it, a message not yet
finished holds it back, the ``n:*`` rule never brings old mail back, and ``select``,
``since`` and ``since_days`` narrow the listing with ``UID SEARCH``."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from mailpipe.plugins.imap.source import ImapOptions, imap_date
from pydantic import BaseModel, ValidationError

from mailpipe import Message
from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.ledger import forget
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.source import CursorSession
from mailpipe.testing.imap_server import ImapFaults, ImapServer
from mailpipe.validation import validate_config

SCOPE = "INBOX;UIDVALIDITY=1234"


def raw(n: int, subject: str = "") -> bytes:
    return b"From: a@example.org\r\nSubject: %s%d\r\n\r\nbody %d\r\n" % (
        subject.encode(), n, n
    )


class _Opts(BaseModel):
    pass


class Recorder:
    """Records every message it sees; fails (counted) on a subject starting "bad"
    while ``failing`` is set."""

    name: ClassVar[str] = "rec"
    Options: ClassVar[type[BaseModel]] = _Opts
    commits: ClassVar[bool] = False
    seen: ClassVar[list[str]] = []
    failing: ClassVar[bool] = True

    def __init__(self, options: Any, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        subject = message.header("subject") or ""
        Recorder.seen.append(subject)
        if Recorder.failing and subject.startswith("bad"):
            raise ValueError("refused by the test")


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    Recorder.seen = []
    Recorder.failing = True
    yield


class Rig:
    def __init__(self, srv: ImapServer, tmp_path: Path, **mailbox: Any) -> None:
        pm, registry = load(entry_points=False)
        registry.add("processor", Recorder, "test")
        imap = {
            "host": srv.host, "port": srv.port, "security": "none",
            "allow_plaintext_password": True, "username": "user", "password": "pass",
            "read_timeout": 10, "greeting_timeout": 10,
        }
        config = validate_config(
            {
                "mailboxes": [{"name": "box", "source": "imap", "delete": "never",
                               **imap, **mailbox}],
                "pipelines": {"default": {"processors": [{"use": "rec"}]}},
            },
            path=tmp_path / "pipeline.toml",
            registry=registry,
        )
        self.srv = srv
        self.journal = SqliteJournal(tmp_path / "journal.sqlite3")
        self.runner = MailboxRunner(
            config.mailboxes[0], config=config, chain=Chain(config.pipelines,
                                                           base_dir=tmp_path),
            journal=self.journal, quarantine=Quarantine(tmp_path / "q"),
            hooks=Hooks(pm),
        )

    async def poll(self) -> list[str]:
        """One poll; the client lines it sent that list (UID FETCH of sizes, UID
        SEARCH)."""
        start = len(self.srv.transcript)
        summary = await self.runner.poll()
        assert summary.error is None, summary
        return [
            line.split(" ", 1)[1] for line in self.srv.transcript[start:]
            if "RFC822.SIZE" in line or "UID SEARCH" in line
        ]

    def cursors(self) -> dict[str, int]:
        return self.journal.cursors("box")


@pytest.fixture
def server() -> Iterator[ImapServer]:
    with ImapServer() as srv:
        yield srv


async def test_second_poll_lists_past_the_watermark_not_the_whole_folder(
    server: ImapServer, tmp_path: Path
) -> None:
    for i in range(3):
        server.add_message(raw(i))
    rig = Rig(server, tmp_path)
    # T-44: an IMAP server lists everything, so no follow-up session lists again.
    assert await rig.poll() == ["UID FETCH 1:* (UID RFC822.SIZE)"]
    assert Recorder.seen == ["0", "1", "2"]
    assert rig.cursors() == {SCOPE: 3}
    server.add_message(raw(3))
    assert (await rig.poll())[0] == "UID FETCH 4:* (UID RFC822.SIZE)"
    assert Recorder.seen == ["0", "1", "2", "3"]  # nothing twice
    assert rig.cursors() == {SCOPE: 4}
    start = len(server.transcript)
    assert await rig.poll() == ["UID FETCH 5:* (UID RFC822.SIZE)"]
    assert not any("1:*" in line for line in server.transcript[start:])


async def test_n_star_rule_never_lists_the_last_message_again(
    server: ImapServer, tmp_path: Path
) -> None:
    """IC-26: ``UID FETCH 3:*`` with no UID above 2 still returns UID 2 (``*`` is the
    largest UID): the source drops it, so the journal is not even asked about it."""
    for i in range(2):
        server.add_message(raw(i))
    rig = Rig(server, tmp_path)
    await rig.poll()
    assert rig.cursors() == {SCOPE: 2}
    async with rig.runner.source.session() as session:
        assert isinstance(session, CursorSession)
        session.resume(rig.cursors())
        assert await session.list() == []
        assert session.coverage()[SCOPE].listed == {}
    assert server.transcript[-1].endswith("UID FETCH 3:* (UID RFC822.SIZE)")
    assert Recorder.seen == ["0", "1"]


async def test_a_failing_message_holds_the_watermark_below_it_and_is_retried(
    server: ImapServer, tmp_path: Path
) -> None:
    server.add_message(raw(0))
    server.add_message(raw(1, "bad"))
    server.add_message(raw(2))
    rig = Rig(server, tmp_path)
    await rig.poll()
    assert Recorder.seen == ["0", "bad1", "2"]
    assert rig.cursors() == {SCOPE: 1}  # UID 2 failed: the watermark stays below it
    entry = rig.journal.get_many("box", [f"{SCOPE};UID=2"])[f"{SCOPE};UID=2"]
    assert entry.status is Status.PENDING and entry.attempts == 1
    assert (await rig.poll())[0] == "UID FETCH 2:* (UID RFC822.SIZE)"
    assert Recorder.seen[3:] == ["bad1"]  # retried; UID 3 (done) not run again
    Recorder.failing = False
    await rig.poll()
    assert Recorder.seen[4:] == ["bad1"]
    assert rig.cursors() == {SCOPE: 3}
    assert await rig.poll() == ["UID FETCH 4:* (UID RFC822.SIZE)"]
    assert Recorder.seen[5:] == []


async def test_a_deferred_message_is_never_skipped(server: ImapServer, tmp_path: Path) -> None:
    """A message left for a later session (``max_messages``) has no journal entry:
    the watermark stops below it."""
    for i in range(4):
        server.add_message(raw(i))
    rig = Rig(server, tmp_path, max_messages=2)
    await rig.poll()
    assert Recorder.seen == ["0", "1"] and rig.cursors() == {SCOPE: 2}
    assert await rig.poll() == ["UID FETCH 3:* (UID RFC822.SIZE)"]
    assert Recorder.seen == ["0", "1", "2", "3"] and rig.cursors() == {SCOPE: 4}


async def test_uidvalidity_change_starts_from_no_watermark(
    server: ImapServer, tmp_path: Path
) -> None:
    for i in range(2):
        server.add_message(raw(i))
    rig = Rig(server, tmp_path)
    await rig.poll()
    assert rig.cursors() == {SCOPE: 2}
    server.uidvalidity += 1
    server.add_message(raw(2))
    assert (await rig.poll())[0] == "UID FETCH 1:* (UID RFC822.SIZE)"
    # IC-25: the two known messages are adopted by content hash, the new one runs.
    assert Recorder.seen == ["0", "1", "2"]
    assert rig.cursors() == {"INBOX;UIDVALIDITY=1235": 3}  # the old scope is dropped


async def test_forget_lists_the_whole_folder_again(server: ImapServer, tmp_path: Path) -> None:
    server.add_message(raw(0))
    rig = Rig(server, tmp_path)
    await rig.poll()
    forget(rig.journal, "box", [f"{SCOPE};UID=1"])
    assert rig.cursors() == {}
    assert (await rig.poll())[0] == "UID FETCH 1:* (UID RFC822.SIZE)"
    assert Recorder.seen == ["0", "0"]


async def test_after_days_lists_the_whole_folder(server: ImapServer, tmp_path: Path) -> None:
    server.add_message(raw(0))
    rig = Rig(server, tmp_path, delete="after_days:30")
    await rig.poll()
    assert await rig.poll() == ["UID FETCH 1:* (UID RFC822.SIZE)"]
    assert rig.cursors() == {}


async def test_flag_acknowledgement_advances_after_the_flag_is_set(
    server: ImapServer, tmp_path: Path
) -> None:
    for i in range(2):
        server.add_message(raw(i))
    rig = Rig(server, tmp_path, delete="after_processing",
              acknowledge={"flag": "$Processed"})
    await rig.poll()
    assert server.flags() == [{"$Processed"}, {"$Processed"}]
    assert rig.cursors() == {SCOPE: 2}
    assert await rig.poll() == ["UID FETCH 3:* (UID RFC822.SIZE FLAGS)"]


async def test_select_unseen_takes_only_unseen_mail_and_never_sets_seen(
    server: ImapServer, tmp_path: Path
) -> None:
    server.add_message(raw(0), flags=("\\Seen",))
    server.add_message(raw(1))
    rig = Rig(server, tmp_path, select="unseen")
    assert (await rig.poll())[:2] == ["UID SEARCH UNSEEN", "UID FETCH 2 (UID RFC822.SIZE)"]
    assert Recorder.seen == ["1"]
    assert server.flags() == [{"\\Seen"}, set()]  # IC-30: BODY.PEEK only
    assert rig.cursors() == {f"{SCOPE};unseen": 2}  # the selection is in the scope
    server.add_message(raw(2))
    server.add_message(raw(3), flags=("\\Seen",))
    assert (await rig.poll())[:2] == [
        "UID SEARCH UID 3:* UNSEEN", "UID FETCH 3 (UID RFC822.SIZE)"
    ]
    assert Recorder.seen == ["1", "2"]
    # The watermark moves only over listed UIDs: the seen UID 4 is searched again,
    # never fetched.
    assert await rig.poll() == ["UID SEARCH UID 4:* UNSEEN"]
    assert Recorder.seen == ["1", "2"]


async def test_since_and_since_days_search_by_internal_date(
    server: ImapServer, tmp_path: Path
) -> None:
    today = datetime.now(UTC).date()
    server.add_message(raw(0), received=today - timedelta(days=40))
    server.add_message(raw(1), received=today - timedelta(days=2))
    server.add_message(raw(2))
    rig = Rig(server, tmp_path, since_days=7)
    lines = await rig.poll()
    assert lines[0] == f"UID SEARCH SINCE {imap_date(today - timedelta(days=7))}"
    assert lines[1] == "UID FETCH 2:3 (UID RFC822.SIZE)"
    assert Recorder.seen == ["1", "2"]
    rig2 = Rig(server, tmp_path / "b", since=str(today - timedelta(days=1)))
    (tmp_path / "b").mkdir(exist_ok=True)
    await rig2.poll()
    assert Recorder.seen == ["1", "2", "2"]


def test_imap_date_is_the_rfc_form_whatever_the_locale() -> None:
    assert imap_date(date(2026, 2, 1)) == "1-Feb-2026"
    assert imap_date(date(2025, 12, 31)) == "31-Dec-2025"


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ({"select": "new"}, ["select", "'new'", "'all' or 'unseen'"]),
        ({"since": "1 Feb 2026"}, ["since", "'1 Feb 2026'", "YYYY-MM-DD"]),
        ({"since": "2026-02-30"}, ["since", "'2026-02-30'", "YYYY-MM-DD"]),
        ({"since_days": -1}, ["since_days", "greater than or equal to 0"]),
        ({"since": "2026-02-01", "since_days": 3}, ["since or since_days, not both"]),
    ],
)
def test_bad_selection_keys_are_refused_naming_key_value_and_choices(
    keys: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ValidationError) as info:
        ImapOptions.model_validate({"host": "h", "username": "u", "password": "p",
                                    **keys})
    text = str(info.value)
    assert all(w in text for w in words), text


def test_search_criteria_combine_the_range_and_the_filters() -> None:
    base = {"host": "h", "username": "u", "password": "p"}
    plain = ImapOptions.model_validate(base)
    assert plain.search_criteria(0) is None and plain.search_criteria(9) is None
    both = ImapOptions.model_validate({**base, "select": "unseen", "since_days": 3})
    assert both.search_criteria(41, today=date(2026, 2, 4)) == (
        "UID 42:* UNSEEN SINCE 1-Feb-2026"
    )
    toml_day = ImapOptions.model_validate({**base, "since": date(2026, 2, 1)})
    assert toml_day.search_criteria(0) == "SINCE 1-Feb-2026"


def test_ic33_esearch_all_and_legacy_search_are_both_read() -> None:
    from mailpipe.plugins.imap.events import Atom, esearch_all, search_uids

    tagged = ((Atom("TAG"), b"A9"), Atom("UID"), Atom("ALL"), Atom("4:7,9"))
    assert esearch_all(tagged) == [4, 5, 6, 7, 9]
    assert esearch_all(((Atom("TAG"), b"A9"), Atom("UID"))) == []
    assert search_uids((Atom("3"), Atom("12"))) == [3, 12]


async def test_without_uidplus_the_folder_is_always_listed_whole(tmp_path: Path) -> None:
    """IC-38 leaves deleted mail in the folder: a cursor must not hide it (its entry
    is pruned once DELETED and unlisted; a later full listing would run it again)."""
    with ImapServer(extensions=("MOVE",)) as srv:
        srv.add_message(raw(0))
        rig = Rig(srv, tmp_path)
        await rig.poll()
        assert rig.cursors() == {}, "a cursor stored for a session that listed whole"
        assert await rig.poll() == ["UID FETCH 1:* (UID RFC822.SIZE)"]
        assert Recorder.seen == ["0"]


async def test_an_oversize_skipped_message_holds_the_watermark(
    server: ImapServer, tmp_path: Path
) -> None:
    server.add_message(raw(0))
    server.add_message(raw(1, "x" * 400))  # over max_message_size: skipped, kept
    server.add_message(raw(2))
    rig = Rig(server, tmp_path, max_message_size=200)
    await rig.poll()
    assert Recorder.seen == ["0", "2"]
    assert rig.cursors() == {SCOPE: 1}
    assert (await rig.poll())[0] == "UID FETCH 2:* (UID RFC822.SIZE)"
    assert Recorder.seen == ["0", "2"]


async def test_an_unretrievable_message_holds_the_watermark_and_is_retried(
    tmp_path: Path,
) -> None:
    # The listing's UID FETCH goes through; the first body fetch (UID 1) is refused.
    faults = ImapFaults(refuse=("UID FETCH", "[SERVERBUG] try later"), refuse_skip=1)
    with ImapServer(faults) as srv:
        srv.add_message(raw(0))
        srv.add_message(raw(1))
        rig = Rig(srv, tmp_path)
        await rig.runner.poll()
        assert Recorder.seen == ["1"]
        assert rig.cursors() == {}  # UID 1 unretrievable: nothing passed
        assert (await rig.poll())[0] == "UID FETCH 1:* (UID RFC822.SIZE)"
        assert Recorder.seen == ["1", "0"]
        assert rig.cursors() == {SCOPE: 2}


async def test_gmail_label_copies_advance_every_folders_watermark(tmp_path: Path) -> None:
    """IC-46: a message under two labels is listed (and run) once, and both folders'
    watermarks pass it."""
    with ImapServer(gmail=True) as srv:
        srv.add_message(raw(0), "INBOX", gm_msgid=7)
        srv.add_message(raw(0), "Support", gm_msgid=7)
        srv.add_message(raw(1), "Support", gm_msgid=8)
        rig = Rig(srv, tmp_path, folders=["INBOX", "Support"])
        await rig.poll()
        assert Recorder.seen == ["0", "1"]
        assert rig.cursors() == {SCOPE: 1, "Support;UIDVALIDITY=1234": 2}
        assert await rig.poll() == [
            "UID FETCH 2:* (UID RFC822.SIZE X-GM-MSGID)",
            "UID FETCH 3:* (UID RFC822.SIZE X-GM-MSGID)",
        ]
