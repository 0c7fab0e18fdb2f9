"""Engine ordering rules against the in-memory fake source (protocol truth lives in e2e)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any, ClassVar

import pytest
from mailpipe.plugins.store.sqlite import SqliteStore
from pydantic import BaseModel, ConfigDict

from mailpipe import hookimpl
from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.errors import ProcessorError, TemporaryFailure
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.leases import LeaseLostError
from mailpipe.message import Message
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.processor import Decision, Disposition
from mailpipe.quarantine import Quarantine
from mailpipe.registry import Registry
from mailpipe.source import SessionFacts
from mailpipe.testing.fakes import FakeMailbox, FakeSource, fake_runner
from mailpipe.validation import validate_config


class RecOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_on: list[str] = []
    temporary: bool = False


LOG: dict[str, list[str]] = {}


class Recorder:
    """Records the uid of every message it sees; fails on chosen subjects."""

    name: ClassVar[str] = "rec"
    Options: ClassVar[type[BaseModel]] = RecOptions
    commits: ClassVar[bool] = True

    def __init__(self, options: RecOptions, context: Any) -> None:
        self.options = options
        self.seen = LOG.setdefault(context.pipeline, [])

    def process(self, message: Message) -> None:
        subject = message.header("subject") or ""
        if subject in self.options.fail_on:
            if self.options.temporary:
                raise TemporaryFailure("relay said 451")
            raise RuntimeError(f"cannot handle {subject}")
        self.seen.append(message.ref.uid)


class Dropper:
    """Header-only decision: drop messages whose subject starts with 'spam'."""

    name: ClassVar[str] = "drop"
    Options: ClassVar[type[BaseModel]] = RecOptions
    commits: ClassVar[bool] = False
    header_only: ClassVar[bool] = True

    def __init__(self, options: RecOptions, context: Any) -> None:
        pass

    def prefetch(self, message: Message) -> Decision | None:
        return self.process(message)

    def process(self, message: Message) -> Decision | None:
        if (message.header("subject") or "").startswith("spam"):
            return Decision(disposition=Disposition.DONE, reason="spam rule")
        return None


class Flaky:
    """Group-commit processor whose flush can be made to fail."""

    name: ClassVar[str] = "flaky"
    Options: ClassVar[type[BaseModel]] = RecOptions
    commits: ClassVar[bool] = True
    fail_flush = False

    def __init__(self, options: RecOptions, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        return None

    def flush(self) -> None:
        if Flaky.fail_flush:
            raise OSError("disk full")


def msg(subject: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


@pytest.fixture(autouse=True)
def _clean() -> None:
    LOG.clear()
    FakeSource.boxes.clear()
    Flaky.fail_flush = False


def make(
    tmp_path: Path, processors: list[dict[str, Any]], **mailbox: Any
) -> tuple[MailboxRunner, FakeMailbox, SqliteJournal]:
    registry = Registry()
    registry.add("source", FakeSource, "test")
    for cls in (Recorder, Dropper, Flaky):
        registry.add("processor", cls, "test")
    data = {
        "mailboxes": [{"name": "box", "source": "fake", "pipeline": "p", **mailbox}],
        "pipelines": {"p": {"processors": processors}},
    }
    config = validate_config(data, path=tmp_path / "pipeline.toml", registry=registry)
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    chain = Chain(config.pipelines, base_dir=tmp_path)
    runner = MailboxRunner(
        config.mailboxes[0],
        config=config,
        chain=chain,
        journal=journal,
        quarantine=Quarantine(tmp_path / "q"),
        hooks=Hooks(get_plugin_manager(entry_points=False)),
    )
    return runner, runner.source.box, journal


def kinds(box: FakeMailbox) -> list[str]:
    return [c[0] for c in box.calls]


async def test_dele_only_after_chain_and_quit_commits(tmp_path: Path) -> None:
    # P-09: DELE only after the chain committed; QUIT last.
    runner, box, journal = make(tmp_path, [{"use": "rec"}])
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    summary = await runner.poll()
    assert summary.processed == 3 and summary.deleted == 3 and summary.error is None
    assert box.messages == {}
    calls = kinds(box)
    assert calls.index("dele") > calls.index("retr")
    assert calls[-1] == "quit"
    assert LOG["p"] == ["u0", "u1", "u2"]
    assert {e.status for e in journal.list("box")} == {Status.DELETED}


async def test_failing_message_stays_then_is_quarantined(tmp_path: Path) -> None:
    runner, box, journal = make(
        tmp_path, [{"use": "rec", "fail_on": ["bad"]}], max_attempts=2
    )
    box.add("good", msg("good"))
    box.add("bad", msg("bad"))
    s1 = await runner.poll()
    assert s1.failed == 1 and s1.deleted == 1
    assert list(box.messages) == ["bad"]
    assert journal.get_many("box", ["bad"])["bad"].attempts == 1
    s2 = await runner.poll()
    assert s2.quarantined == 1 and box.messages == {}
    items = Quarantine(tmp_path / "q").list()
    assert len(items) == 1 and items[0].uid == "bad" and items[0].attempts == 2
    assert Path(items[0].eml).read_bytes() == msg("bad")
    sidecar = json.loads(Path(items[0].eml).with_suffix(".json").read_text())
    assert "cannot handle bad" in sidecar["error"]


async def test_temporary_failure_does_not_count_attempts(tmp_path: Path) -> None:
    runner, box, journal = make(
        tmp_path, [{"use": "rec", "fail_on": ["x"], "temporary": True}], max_attempts=1
    )
    box.add("x", msg("x"))
    for _ in range(3):
        await runner.poll()
    assert list(box.messages) == ["x"]
    assert journal.get_many("box", ["x"])["x"].attempts == 0
    assert Quarantine(tmp_path / "q").list() == []


async def test_connection_drop_never_reprocesses_committed(tmp_path: Path) -> None:
    # C-58 / P-09: a failure mid-session closes without QUIT; dedupe covers re-fetches.
    runner, box, _journal = make(tmp_path, [{"use": "rec"}])
    for i in range(5):
        box.add(f"u{i}", msg(f"m{i}"))
    box.fail_after_retr = 3
    s1 = await runner.poll()
    assert s1.error is not None and not s1.committed
    assert len(box.messages) == 5  # aborted: nothing deleted
    assert ("abort", None) in box.calls
    box.fail_after_retr = None
    s2 = await runner.poll()
    assert s2.error is None and box.messages == {}
    assert LOG["p"] == ["u0", "u1", "u2", "u3", "u4"]  # each exactly once


async def test_failed_quit_leaves_deletions_owed(tmp_path: Path) -> None:
    runner, box, journal = make(tmp_path, [{"use": "rec"}])
    box.add("a", msg("a"))
    box.fail_quit = True
    s1 = await runner.poll()
    assert s1.error is not None and "a" in box.messages
    assert journal.get_many("box", ["a"])["a"].delete_due
    box.fail_quit = False
    await runner.poll()
    assert box.messages == {} and LOG["p"] == ["a"]


async def test_keep_mode_processes_each_uid_once(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}], delete="never")
    box.add("a", msg("a"))
    await runner.poll()
    box.add("b", msg("b"))
    await runner.poll()
    box.add("c", msg("c"))
    await runner.poll()
    assert LOG["p"] == ["a", "b", "c"]
    assert list(box.messages) == ["a", "b", "c"]
    assert "dele" not in kinds(box)


async def test_no_uidl_refuses_keep_mode(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}], delete="never")
    box.uidl = False
    box.add("a", msg("a"))
    s = await runner.poll()
    assert s.error is not None and "UIDL" in s.error
    assert "retr" not in kinds(box)


async def test_no_uidl_falls_back_to_content_hash(tmp_path: Path) -> None:
    runner, box, _journal = make(tmp_path, [{"use": "rec"}])
    box.uidl = False
    box.add("a", msg("a"))
    box.fail_quit = True
    await runner.poll()
    box.fail_quit = False
    await runner.poll()
    assert box.messages == {}
    assert len(LOG["p"]) == 1 and LOG["p"][0].startswith("sha256:")


async def test_commit_window_reconnects(tmp_path: Path) -> None:
    # C-56: later sessions renumber the survivors (fakes.py lists 1..n); uids still match.
    runner, box, _ = make(tmp_path, [{"use": "rec"}], commit_window=2)
    for i in range(5):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    # 2 + 2 + 1, then a follow-up session that finds nothing new (T-44)
    assert s.sessions == 4 and s.deleted == 5
    assert kinds(box).count("quit") == 4


async def test_max_messages_limits_one_poll(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}], max_messages=2)
    for i in range(5):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    assert s.sessions == 1 and s.deleted == 2 and len(box.messages) == 3


async def test_header_prefetch_skips_retr_of_dropped(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "drop"}, {"use": "rec"}])
    box.add("s", msg("spam offer"))
    box.add("h", msg("hello"))
    s = await runner.poll()
    assert ("retr", "s") not in box.calls and ("top", "s") in box.calls
    assert ("retr", "h") in box.calls
    assert box.messages == {} and LOG["p"] == ["h"] and s.dropped == 1


async def test_flush_failure_means_no_dele(tmp_path: Path) -> None:
    # P-09: no DELE for a message whose commit failed.
    runner, box, journal = make(tmp_path, [{"use": "flaky"}])
    box.add("a", msg("a"))
    Flaky.fail_flush = True
    await runner.poll()
    assert "dele" not in kinds(box) and "a" in box.messages
    assert journal.get_many("box", ["a"])["a"].status == Status.PENDING
    Flaky.fail_flush = False
    await runner.poll()
    assert box.messages == {}


async def test_failed_group_commit_is_reported_as_a_failure(tmp_path: Path) -> None:
    # Issue 20 item 9: nothing was lost, but the summary said processed 3, failed 0,
    # no error (status ok, exit 0) and message_done fired for unflushed messages.
    runner, box, _journal = make(tmp_path, [{"use": "flaky"}])
    done: list[str] = []

    class Done:
        @hookimpl
        def mailpipe_message_done(
            self, mailbox: str, uid: str, key: str, disposition: str
        ) -> None:
            done.append(uid)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Done())
    runner.hooks = Hooks(pm)
    for uid in ("a", "b", "c"):
        box.add(uid, msg(uid))
    Flaky.fail_flush = True
    summary = await runner.poll()
    assert (summary.processed, summary.failed) == (0, 3)
    assert summary.error is not None
    assert "group commit failed for 3 message(s)" in summary.error
    assert "OSError: disk full" in summary.error
    assert done == [] and sorted(box.messages) == ["a", "b", "c"]
    # The scheduler backs off for it like any failed poll (review finding).
    assert isinstance(runner.last_exception, ProcessorError)
    Flaky.fail_flush = False
    summary = await runner.poll()
    assert (summary.processed, summary.failed, summary.error) == (3, 0, None)
    assert runner.last_exception is None
    assert sorted(done) == ["a", "b", "c"] and box.messages == {}


async def test_committed_step_is_not_repeated(tmp_path: Path) -> None:
    runner, box, journal = make(
        tmp_path,
        [{"use": "rec"}, {"use": "rec", "fail_on": ["a"], "name": "fwd"}],
        max_attempts=5,
    )
    box.add("a", msg("a"))
    await runner.poll()
    await runner.poll()
    entry = journal.get_many("box", ["a"])["a"]
    assert entry.steps == ["p/0:rec"] and entry.attempts == 2
    assert LOG["p"] == ["a"]  # the first step ran once, not on the re-run


async def test_stop_finishes_message_in_hand_and_commits(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    for i in range(4):
        box.add(f"u{i}", msg(f"m{i}"))
    stop = runner.stop
    orig = runner.chain.run

    async def run_then_stop(*a: Any, **k: Any) -> Any:
        result = await orig(*a, **k)
        stop.set()
        return result

    runner.chain.run = run_then_stop  # type: ignore[method-assign]
    s = await runner.poll()
    assert s.processed == 1 and s.deleted == 1 and kinds(box)[-1] == "quit"
    assert len(box.messages) == 3


async def test_expire_zero_quarantines_failures_before_quit(tmp_path: Path) -> None:
    # C-29: EXPIRE 0 makes RETR + QUIT destructive; keep failures before QUIT.
    runner, box, _ = make(tmp_path, [{"use": "rec", "fail_on": ["x"]}])
    box.capabilities = {"EXPIRE": "0"}
    box.add("x", msg("x"))
    s = await runner.poll()
    assert s.quarantined == 1
    assert len(Quarantine(tmp_path / "q").list()) == 1


async def test_oversize_policies(tmp_path: Path) -> None:
    runner, box, _ = make(
        tmp_path, [{"use": "rec"}], max_message_size=60, on_oversize="delete"
    )
    box.add("big", msg("x" * 100))
    box.add("small", msg("s"))
    s = await runner.poll()
    assert (
        box.messages == {}
        and LOG["p"] == ["small"]
        and ("retr", "big") not in box.calls
    )
    assert s.dropped == 1


async def test_poll_survives_many_rounds_without_leaks(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    for r in range(5):
        box.add(f"r{r}", msg(f"r{r}"))
        await asyncio.wait_for(runner.poll(), 10)
    assert LOG["p"] == [f"r{r}" for r in range(5)]


async def test_after_days_deletes_only_old_messages(tmp_path: Path) -> None:
    import sqlite3
    from datetime import UTC, datetime, timedelta

    runner, box, journal = make(tmp_path, [{"use": "rec"}], delete="after_days:3")
    box.add("old", msg("old"))
    await runner.poll()  # processed, kept on the server
    assert list(box.messages) == ["old"] and LOG["p"] == ["old"]
    journal.close()
    with sqlite3.connect(tmp_path / "journal.sqlite3") as db:  # five days pass
        five_days_ago = (datetime.now(UTC) - timedelta(days=5)).timestamp()
        db.execute("UPDATE entries SET first_seen = ?", (five_days_ago,))
    db.close()
    runner.journal = SqliteJournal(tmp_path / "journal.sqlite3")
    box.add("new", msg("new"))
    await runner.poll()  # "old" is past three days: DELE; "new" is processed and kept
    assert list(box.messages) == ["new"]
    assert LOG["p"] == ["old", "new"]


class Sender:
    """A non-idempotent side effect (like an SMTP send) that can crash afterwards."""

    name: ClassVar[str] = "send"
    Options: ClassVar[type[BaseModel]] = RecOptions
    commits: ClassVar[bool] = True
    sent: ClassVar[list[str]] = []

    def __init__(self, options: RecOptions, context: Any) -> None:
        pass

    def process(self, message: Message) -> None:
        Sender.sent.append(message.ref.uid)


async def test_non_idempotent_step_is_journaled_before_later_steps(
    tmp_path: Path,
) -> None:
    Sender.sent = []
    registry_runner, box, journal = make(tmp_path, [{"use": "rec"}])
    runner = registry_runner
    runner.config.registry.add("processor", Sender, "test")
    from mailpipe.validation import validate_config

    data = {
        "mailboxes": [{"name": "box", "source": "fake", "pipeline": "p"}],
        "pipelines": {
            "p": {"processors": [{"use": "send"}, {"use": "rec", "fail_on": ["a"]}]}
        },
    }
    config = validate_config(
        data, path=tmp_path / "p.toml", registry=runner.config.registry
    )
    runner.chain = Chain(config.pipelines, base_dir=tmp_path)
    box.add("a", msg("a"))
    seen: list[list[str]] = []
    original = runner.chain.run

    async def spy(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        # right after the chain, before any group commit: the send is already durable
        seen.append(journal.get_many("box", ["a"])["a"].steps)
        return result

    runner.chain.run = spy  # type: ignore[method-assign]
    await runner.poll()
    await runner.poll()
    assert seen[0] == ["p/0:send"]
    assert Sender.sent == ["a"]  # the failing later step never made the send repeat


async def test_chain_serialises_a_processor_without_concurrent() -> None:
    class Slow:
        name: ClassVar[str] = "slow"
        Options: ClassVar[type[BaseModel]] = RecOptions
        commits: ClassVar[bool] = False
        concurrent: ClassVar[bool] = False
        active = 0
        peak = 0

        def __init__(self, options: RecOptions, context: Any) -> None:
            pass

        async def process(self, message: Message) -> None:
            Slow.active += 1
            Slow.peak = max(Slow.peak, Slow.active)
            await asyncio.sleep(0.01)
            Slow.active -= 1

    from mailpipe.config import StepSpec

    for concurrent, expected in ((False, 1), (True, 5)):
        Slow.concurrent = concurrent  # type: ignore[misc]
        Slow.peak = 0
        spec = StepSpec(
            index=0, step="0:slow", use="slow", cls=Slow, options=RecOptions()
        )
        chain = Chain({"p": [spec]}, base_dir=Path("."))
        await asyncio.gather(
            *(chain.run("p", Message.from_bytes(msg(str(i)))) for i in range(5))
        )
        assert Slow.peak == expected


async def test_deletions_owed_for_mail_already_gone_are_settled(tmp_path: Path) -> None:
    runner, box, journal = make(tmp_path, [{"use": "rec"}])
    box.add("a", msg("a"))
    box.add("b", msg("b"))
    original = journal.mark_deleted
    journal.mark_deleted = lambda *a, **k: None  # type: ignore[method-assign]
    await runner.poll()  # QUIT +OK deleted both, but the journal never heard of it
    journal.mark_deleted = original  # type: ignore[method-assign]
    assert sorted(journal.owed("box")) == ["a", "b"] and box.messages == {}
    box.add("c", msg("c"))
    await runner.poll()
    assert journal.owed("box") == []
    statuses = {e.uid: e.status for e in journal.list("box")}
    assert statuses == {"a": Status.DELETED, "b": Status.DELETED, "c": Status.DELETED}
    assert LOG["p"] == ["a", "b", "c"]


async def test_prefetch_stops_at_the_first_step_that_cannot_decide(
    tmp_path: Path,
) -> None:
    """A later header-only DONE must not override an earlier rule that needs the body."""

    class BodyRule:
        name: ClassVar[str] = "bodyrule"
        Options: ClassVar[type[BaseModel]] = RecOptions
        commits: ClassVar[bool] = False
        header_only: ClassVar[bool] = True

        def __init__(self, options: RecOptions, context: Any) -> None:
            pass

        def prefetch(self, message: Message) -> None:
            return None  # needs the body: cannot decide on headers

        def process(self, message: Message) -> Decision | None:
            if b"keep me" in message.raw:
                return Decision(disposition=Disposition.KEEP, reason="body rule")
            return None

    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    runner.config.registry.add("processor", BodyRule, "test")
    data = {
        "mailboxes": [{"name": "box", "source": "fake", "pipeline": "p"}],
        "pipelines": {
            "p": {"processors": [{"use": "bodyrule"}, {"use": "drop"}, {"use": "rec"}]}
        },
    }
    config = validate_config(
        data, path=tmp_path / "p.toml", registry=runner.config.registry
    )
    runner.chain = Chain(config.pipelines, base_dir=tmp_path)
    box.add("s", msg("spam but keep me"))
    await runner.poll()
    assert ("retr", "s") in box.calls  # downloaded: the body rule decided
    assert list(box.messages) == ["s"]  # kept, not dropped by the later header rule


def test_chunks_cap_count_and_octets() -> None:
    from mailpipe.message import MessageRef
    from mailpipe.planning import chunks as _chunks

    refs = [
        MessageRef(mailbox="m", number=i, uid=str(i), size=s)
        for i, s in enumerate([5, 5, 5, 20, 1, 1, 1])
    ]
    sizes = [[r.size for r in c] for c in _chunks(refs, 3, 12)]
    assert sizes == [[5, 5], [5], [20], [1, 1, 1]]
    assert sum(len(c) for c in _chunks(refs, 2, 10**9)) == 7


@pytest.mark.parametrize("policy", ["skip", "delete", "quarantine"])
async def test_oversize_policy_applies_without_uidl(tmp_path: Path, policy: str) -> None:
    runner, box, _ = make(
        tmp_path,
        [{"use": "rec"}],
        max_message_size=60,
        on_oversize=policy,
        on_quarantine="keep",
    )
    box.uidl = False
    box.add("big", msg("x" * 100))
    box.add("small", msg("s"))
    first = await runner.poll()
    second = await runner.poll()
    retrs = kinds(box).count("retr")
    assert len(LOG["p"]) == 1 and LOG["p"][0].startswith("sha256:")  # small, once
    quarantined = Quarantine(tmp_path / "q").list()
    if policy == "skip":
        assert retrs == 1 and list(box.messages) == ["big"]  # never downloaded
        assert (first.skipped, second.skipped) == (1, 1)
    elif policy == "delete":
        assert retrs == 1 and box.messages == {} and first.dropped == 1
    else:
        # Downloaded to be quarantined (kept on the server by on_quarantine), and
        # known by its content hash the next time: not quarantined twice.
        assert list(box.messages) == ["big"] and len(quarantined) == 1
        assert (first.quarantined, second.quarantined) == (1, 0)
    if policy != "quarantine":
        assert quarantined == []


def _dead_process_left(
    monkeypatch: pytest.MonkeyPatch, spool: Path, marks: dict[str, str]
) -> None:
    """Markers as a process killed with ``marks`` (mailbox -> uid) in flight left them."""
    import os

    import mailpipe.inflight as inflight

    monkeypatch.setattr(inflight, "_TOKEN", os.urandom(4))
    for mailbox, uid in marks.items():
        inflight.InflightMarker(spool, mailbox).set(uid)
    monkeypatch.setattr(inflight, "_TOKEN", os.urandom(4))  # the next process
    inflight._ACTIVE.clear()


async def test_a_death_alone_in_the_chain_is_charged_then_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, box, journal = make(tmp_path, [{"use": "rec"}], max_attempts=3)
    box.add("a", msg("a"))
    box.add("b", msg("b"))
    key = Message.from_bytes(msg("a"), mailbox="box", uid="a").key
    journal.begin("box", "a", key=key, size=10)
    for _ in range(2):
        journal.fail("box", "a", error="the process died", counted=True)
    _dead_process_left(monkeypatch, runner.spool_dir, {"box": "a"})
    s = await runner.poll()
    assert LOG["p"] == ["b"]  # "a" never ran again: its 3rd death was counted
    assert s.quarantined == 1 and box.messages == {}
    (q,) = Quarantine(tmp_path / "q").list()
    assert "died 3 time(s)" in q.reason


async def test_a_death_beside_other_chains_charges_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, box, journal = make(tmp_path, [{"use": "rec"}], max_attempts=1)
    box.add("a", msg("a"))
    key = Message.from_bytes(msg("a"), mailbox="box", uid="a").key
    journal.begin("box", "a", key=key, size=10)
    _dead_process_left(monkeypatch, runner.spool_dir, {"box": "a", "other": "x"})
    s = await runner.poll()
    assert LOG["p"] == ["a"] and s.quarantined == 0  # innocent until alone
    assert box.messages == {}


async def test_a_death_in_the_header_prefetch_is_charged_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, box, _journal = make(
        tmp_path, [{"use": "drop"}, {"use": "rec"}], max_attempts=1
    )
    box.add("h", msg("hangs the header rule"))
    _dead_process_left(monkeypatch, runner.spool_dir, {"box": "h"})  # no entry yet
    s = await runner.poll()
    assert s.quarantined == 1 and ("top", "h") not in box.calls
    assert LOG.get("p", []) == []


async def test_t44_a_server_listing_one_batch_per_session_is_drained_in_one_poll(
    tmp_path: Path,
) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    box.page = 2  # like Gmail: the next batch is listed only after QUIT
    for i in range(5):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    assert box.messages == {} and s.deleted == 5
    assert s.sessions == 4  # 2 + 2 + 1, then one that finds nothing new
    assert LOG["p"] == [f"u{i}" for i in range(5)]


async def test_t44_follow_up_sessions_stop_when_nothing_is_new(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}], delete="never")
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    first = await runner.poll()
    second = await runner.poll()
    assert (first.sessions, second.sessions) == (2, 1)  # kept mail is not new again
    assert LOG["p"] == ["u0", "u1", "u2"]


async def test_t44_no_follow_up_under_login_delay(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    box.page = 2
    box.capabilities = {"LOGIN-DELAY": ["900"]}  # RFC 2449 §6.5: wait between logins
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    assert s.sessions == 1 and list(box.messages) == ["u2"]


async def test_t44_no_follow_up_session_for_a_server_that_lists_everything(
    tmp_path: Path,
) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    box.facts = SessionFacts(pages_listing=False)  # IMAP, or POP3 other than Gmail
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    assert box.messages == {} and s.deleted == 3
    assert (box.logins, s.sessions, kinds(box).count("list")) == (1, 1, 1)
    box.add("u3", msg("m3"))  # what arrives later: the next poll lists it
    s = await runner.poll()
    assert box.messages == {} and box.logins == 2 and LOG["p"][-1] == "u3"


async def test_t44_a_source_that_states_paging_gets_the_follow_up(tmp_path: Path) -> None:
    runner, box, _ = make(tmp_path, [{"use": "rec"}])
    box.facts = SessionFacts(pages_listing=True)  # Gmail's POP3
    box.page = 2
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    s = await runner.poll()
    assert box.messages == {} and (box.logins, s.sessions) == (3, 3)  # 2 + 1 + none


def checkpointing(
    tmp_path: Path, processors: list[dict[str, Any]], count: int, **mailbox: Any
) -> tuple[MailboxRunner, FakeMailbox, SqliteJournal]:
    """A mailbox of ``count`` messages whose sessions checkpoint (MP-06), like IMAP."""
    runner, box, journal = make(tmp_path, processors, commit_window=2, **mailbox)
    box.checkpoints = True
    box.facts = SessionFacts(pages_listing=False)
    for i in range(count):
        box.add(f"u{i}", msg(f"m{i}"))
    return runner, box, journal


async def test_mp06_every_window_runs_on_one_session(tmp_path: Path) -> None:
    runner, box, journal = checkpointing(tmp_path, [{"use": "rec"}], 5)
    s = await runner.poll()
    assert (s.error, s.processed, s.deleted) == (None, 5, 5)
    assert (box.logins, s.sessions, s.windows) == (1, 1, 3)
    assert box.messages == {} and LOG["p"] == [f"u{i}" for i in range(5)]
    # Each window: listed, run, its deletions applied, before the next lists again.
    assert [c for c in box.calls if c[0] in ("list", "checkpoint", "quit")] == [
        ("list", None), ("checkpoint", ["u0", "u1"]),
        ("list", None), ("checkpoint", ["u2", "u3"]),
        ("list", None), ("quit", ["u4"]),
    ]
    entries = journal.get_many("box", [f"u{i}" for i in range(5)])
    assert {e.status for e in entries.values()} == {Status.DELETED}


async def test_mp06_a_refused_checkpoint_leaves_its_window_owed(tmp_path: Path) -> None:
    runner, box, journal = checkpointing(tmp_path, [{"use": "rec"}], 5)
    box.fail_checkpoint = 2  # window 2's deletions are refused
    s = await runner.poll()
    assert s.error is not None and not s.committed
    assert sorted(box.messages) == ["u2", "u3", "u4"]  # window 1's are gone
    entries = journal.get_many("box", ["u0", "u2", "u3"])
    assert entries["u0"].status is Status.DELETED
    assert all(entries[u].delete_due and entries[u].status is not Status.DELETED
               for u in ("u2", "u3"))  # durable, the acknowledgement owed
    box.fail_checkpoint = None
    start = len(box.calls)
    s = await runner.poll()
    assert s.error is None and box.messages == {} and box.logins == 2
    assert LOG["p"] == [f"u{i}" for i in range(5)]  # u2, u3 never ran again
    later = box.calls[start:]
    assert ("dele", "u2") in later and ("dele", "u3") in later  # sent now
    entries = journal.get_many("box", [f"u{i}" for i in range(5)])
    assert {e.status for e in entries.values()} == {Status.DELETED}


async def test_mp06_a_failed_group_commit_in_window_two_acknowledges_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushes: list[None] = []

    def flush(self: Flaky) -> None:
        flushes.append(None)
        if len(flushes) == 2:  # window 2's group commit
            raise OSError("disk full")

    monkeypatch.setattr(Flaky, "flush", flush)
    runner, box, journal = checkpointing(
        tmp_path, [{"use": "flaky"}, {"use": "rec"}], 5
    )
    s = await runner.poll()
    assert s.error is not None and "group commit failed" in s.error
    assert (box.logins, s.windows) == (1, 3)  # window 3 ran on the same session
    assert sorted(box.messages) == ["u2", "u3"]  # never acknowledged
    assert ("dele", "u2") not in box.calls and ("dele", "u3") not in box.calls
    entries = journal.get_many("box", ["u2", "u3"])
    assert all(e.status is Status.PENDING for e in entries.values())
    s = await runner.poll()  # run again, then acknowledged
    assert s.error is None and box.messages == {} and box.logins == 2


async def test_mp06_a_lost_lease_stops_the_checkpoint(tmp_path: Path) -> None:
    runner, box, journal = checkpointing(tmp_path, [{"use": "rec"}], 5)

    def ack_check() -> None:
        if ("dele", "u0") in box.calls:  # the DELEs went out: this is the checkpoint
            raise LeaseLostError("another worker holds the lease")

    runner.lease_check = lambda: None
    runner.ack_check = ack_check
    s = await runner.poll()
    assert s.error_type == "LeaseLostError"
    assert len(box.messages) == 5 and "checkpoint" not in kinds(box)
    entries = journal.get_many("box", ["u0", "u1"])
    assert all(e.delete_due and e.status is not Status.DELETED for e in entries.values())


async def test_the_journal_is_pruned_once_per_interval_not_every_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: pruning is housekeeping; a mailbox polled again and again (no new
    mail) does not open a journal transaction for it each time."""
    import mailpipe.engine as engine

    runner, box, journal = make(tmp_path, [{"use": "rec"}])
    pruned: list[list[str]] = []
    original = SqliteJournal.prune

    def counting(self: SqliteJournal, mailbox: str, present: Any, days: float) -> int:
        pruned.append(list(present))
        return original(self, mailbox, present, days)

    monkeypatch.setattr(SqliteJournal, "prune", counting)
    box.add("u1", msg("m1"))
    for _ in range(3):
        summary = await runner.poll()
        assert summary.error is None
    assert len(pruned) == 1  # the first poll of the process
    monkeypatch.setattr(engine, "PRUNE_INTERVAL", 0.0)
    runner._next_prune = 0.0
    await runner.poll()
    assert len(pruned) == 2  # due again
    journal.close()


def _review18_msg(subject: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


def _sqlite_runner_of_a_and_b(tmp_path: Path, **options: object) -> Any:
    """A runner into store.sqlite (``mail.sqlite3``, ``options``) whose mailbox holds
    the messages "a" and "b"."""
    runner = fake_runner(
        tmp_path,
        [{"use": "store.sqlite", "path": "mail.sqlite3", **options}],
        SqliteStore,
    )
    runner.source.box.add("a", _review18_msg("a"))
    runner.source.box.add("b", _review18_msg("b"))
    return runner


async def test_buffer_limit_commit_failure_loses_the_earlier_message(
    tmp_path: Path, monkeypatch
) -> None:
    """MAX_ROWS reached in b's process(); that write fails once (database busy past
    busy_timeout, disk full...). a's process() had returned, its rows were in that
    failed transaction. flush() then succeeds (nothing left to write), so the ledger
    takes a as durable and DELEs it: a is deleted from the server and not stored."""
    FakeSource.boxes.clear()
    monkeypatch.setattr(SqliteStore, "MAX_ROWS", 2)
    from mailpipe.plugins.store import _sqlite_writes

    real = _sqlite_writes.run_ops
    failures = [1]

    def run_ops(conn, program):  # type: ignore[no-untyped-def]
        if failures[0]:  # (inside the write transaction, as the thread path runs it)
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real(conn, program)

    monkeypatch.setattr(_sqlite_writes, "run_ops", run_ops)
    runner = _sqlite_runner_of_a_and_b(tmp_path, writer="thread")
    box = runner.source.box
    await runner.poll()
    conn = sqlite3.connect(tmp_path / "mail.sqlite3")
    stored = {s for (s,) in conn.execute("SELECT subject FROM messages")}
    conn.close()
    gone = {"a", "b"} - set(box.messages)
    # Every message deleted from the server must be in the store.
    assert gone <= stored, f"deleted from the server: {gone}, stored: {stored}"


async def test_a_chunk_the_writer_process_cannot_commit_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writer = "process" (the default): a's and b's process() returned once their
    chunk (CHUNK_ROWS = 2) was handed to the writer process, which cannot commit it
    (another connection holds the write lock past busy_timeout). The flush before any
    DELE raises, so neither is deleted from the server; the next poll stores and
    deletes both (MP-04)."""
    FakeSource.boxes.clear()
    monkeypatch.setattr(SqliteStore, "CHUNK_ROWS", 2)
    runner = _sqlite_runner_of_a_and_b(tmp_path, busy_timeout="0.2s")
    box = runner.source.box
    path = tmp_path / "mail.sqlite3"
    from mailpipe.plugins.store._sqlite_schema import connect, migrate

    blocker = connect(path)
    migrate(blocker)  # (the schema first: the store's open() must not wait)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        await runner.poll()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    def stored() -> set[str]:
        conn = sqlite3.connect(path)
        try:
            return {s for (s,) in conn.execute("SELECT subject FROM messages")}
        finally:
            conn.close()

    assert set(box.messages) == {"a", "b"} and stored() == set()
    await runner.poll()
    assert not box.messages and stored() == {"a", "b"}


async def test_a_source_without_p14_has_its_group_stream_read_to_the_end_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plugin contract (docs/plugins.md, P-14, review of P-14): a session that does not
    # retrieve across commits gets one retrieve() per group, read to its end before the
    # group commits and is acknowledged. A source may still have work after its last
    # message (a trailing reply on the same connection, a cursor to close); its
    # acknowledgement must not interleave with it.
    import mailpipe.engine
    from mailpipe.testing.fakes import FakeSession

    monkeypatch.setattr(mailpipe.engine, "GROUP_SIZE", 2)
    original = FakeSession.retrieve

    async def retrieve(self: FakeSession, refs: Any, **kwargs: Any) -> Any:
        async for item in original(self, refs, **kwargs):
            yield item
        self.box.calls.append(("stream_end", None))

    monkeypatch.setattr(FakeSession, "retrieve", retrieve)
    runner, box, _journal = make(tmp_path, [{"use": "rec"}])
    for i in range(3):
        box.add(f"u{i}", msg(f"m{i}"))
    summary = await runner.poll()
    assert summary.processed == 3 and summary.deleted == 3 and box.messages == {}
    assert kinds(box)[1:] == [
        "retr", "retr", "stream_end", "dele", "dele",
        "retr", "stream_end", "dele", "quit",
        "list", "quit",  # T-44: a window that ran new mail is followed by another
    ]
