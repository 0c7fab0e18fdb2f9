"""P-14 through the whole delivery path (the pop3 source, the fake POP3 server, the
engine, the SQLite journal, store.jsonl): one RETR flight per commit window, each group
committed while the flight goes on, its DELEs joining the flight; a stop, a lost
connection or EXPIRE 0 lose nothing and double nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import mailpipe.engine
from mailpipe.journal.base import Status
from mailpipe.ledger import Ledger
from mailpipe.testing import Faults, Pop3Server

pytestmark = pytest.mark.timeout(120)

Factory = Callable[..., Pop3Server]


def msg(n: int) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <flight-{n}@example.com>\r\nSubject: m{n}\r\n\r\nbody {n}\r\n"
    ).encode()


def after_listing(srv: Pop3Server, session: int) -> list[str]:
    """The commands of ``session`` (1-based) after UIDL and LIST."""
    words = srv.transcript.commands(session)
    return words[words.index("LIST") + 1:]


@pytest.fixture
def groups_of_two(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """GROUP_SIZE = 2; returns the sizes of the group commits as they happen."""
    monkeypatch.setattr(mailpipe.engine, "GROUP_SIZE", 2)
    sizes: list[int] = []
    original = Ledger.commit_group

    async def counted(self: Ledger, chain: Any, group: list[Any], facts: Any) -> None:
        sizes.append(len(group))
        await original(self, chain, group, facts)

    monkeypatch.setattr(Ledger, "commit_group", counted)
    return sizes


async def test_p14_one_flight_per_window_and_the_groups_commit_while_it_runs(
    pop3_server_factory: Factory,
    rig: Any,
    groups_of_two: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    begun: list[int] = []  # new entries per begin_many call (one transaction each)
    original = Ledger.begin_many

    def counted(self: Ledger, refs: Any, entries: dict[str, Any]) -> None:
        begun.append(len([r for r in refs if r.uid not in entries]))
        original(self, refs, entries)

    monkeypatch.setattr(Ledger, "begin_many", counted)
    srv = pop3_server_factory(messages=[msg(n) for n in range(5)])
    r = rig(srv)
    s = await r.poll()
    assert s.processed == 5 and s.deleted == 5 and srv.messages == []
    assert groups_of_two == [2, 2, 1]  # three group commits, in one stream
    assert [n for n in begun if n] == [5]  # the window begun in one transaction
    # Before: RETR 1, RETR 2, NOOP, then DELE 1, DELE 2 leading RETR 3, RETR 4, NOOP...
    # (a NOOP and a turnaround per group). Now every RETR and the one NOOP leave in
    # the first refill, and each group's DELEs follow once it is durable (P-09).
    assert after_listing(srv, 1) == [
        *(f"RETR {n}" for n in range(1, 6)),
        "NOOP",
        *(f"DELE {n}" for n in range(1, 6)),
        "QUIT",
    ]
    assert Counter(rec["sha256"] for rec in r.stored()).most_common(1)[0][1] == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_p14_stop_commits_the_message_in_hand_reads_the_flight_and_quits(
    pop3_server_factory: Factory, rig: Any, groups_of_two: list[int], pipelining: bool
) -> None:
    srv = pop3_server_factory(messages=[msg(n) for n in range(6)], pipelining=pipelining)
    r = rig(srv, pipeline_window=2)
    await r.chain.open()
    r.opened = True
    original = r.runner.chain.run

    async def run_then_stop(*a: Any, **k: Any) -> Any:
        result = await original(*a, **k)
        r.runner.stop.set()
        return result

    r.runner.chain.run = run_then_stop
    s = await r.poll()
    assert s.processed == 1 and s.deleted == 1 and s.error is None
    assert srv.sessions[0].outcome == "committed" and len(srv.messages) == 5
    sent = after_listing(srv, 1)
    # The RETRs stop where the stop was seen (message 2 came in, the window of 2
    # was in flight behind it: never all 6); nothing but DELE 1 after them; QUIT last.
    assert sent.count("NOOP") == 0 and sent[-2:] == ["DELE 1", "QUIT"]
    assert all(c.startswith("RETR ") for c in sent[:-2]) and len(sent) - 2 <= 4
    # The rest is new in the journal (never started) and the next run takes it, once.
    uids = srv.uids
    entries = r.journal.get_many("box", uids)
    assert all(e.status == Status.PENDING and e.attempts == 0 and not e.steps
               for e in entries.values())
    r.runner.chain.run = original
    r.runner.stop.clear()
    s = await r.poll()
    assert s.processed == 5 and srv.messages == []
    shas = [rec["sha256"] for rec in r.stored()]
    assert len(shas) == 6 and len(set(shas)) == 6


async def test_p14_connection_lost_mid_window_loses_nothing_and_doubles_nothing(
    pop3_server_factory: Factory, rig: Any, groups_of_two: list[int]
) -> None:
    # Groups 1-2 are committed and their DELEs join the flight when the connection
    # drops in RETR 5: no QUIT, so the server deletes nothing; the journal owes the
    # DELEs of 1-4 and the next session sends them without running 1-4 again.
    srv = pop3_server_factory(
        messages=[msg(n) for n in range(6)],
        faults=[Faults(drop_in_retr=5)],  # the first session only
    )
    r = rig(srv)
    first = await r.poll()
    assert first.error is not None and first.processed == 4
    assert len(srv.messages) == 6 and "QUIT" not in srv.transcript.keywords(1)
    second = await r.poll()
    assert second.processed == 2 and srv.messages == []
    shas = [rec["sha256"] for rec in r.stored()]
    assert len(shas) == 6 and len(set(shas)) == 6
    assert after_listing(srv, 2)[:4] == [f"DELE {n}" for n in range(1, 5)]


async def test_p14_expire_zero_keeps_one_stream_per_group(
    pop3_server_factory: Factory, rig: Any, groups_of_two: list[int]
) -> None:
    # C-29: with EXPIRE 0 a QUIT deletes whatever was RETR'd, so no RETR may be in
    # flight past the group being committed: one stream (and NOOP) per group.
    srv = pop3_server_factory(messages=[msg(n) for n in range(4)], expire=0)
    r = rig(srv)
    s = await r.poll()
    assert s.processed == 4 and srv.messages == []
    assert after_listing(srv, 1) == [
        "RETR 1", "RETR 2", "NOOP", "DELE 1", "DELE 2", "RETR 3", "RETR 4", "NOOP",
        "DELE 3", "DELE 4", "QUIT",
    ]


async def test_p14_a_stop_before_retrieval_sends_no_retr(
    pop3_server_factory: Factory, rig: Any
) -> None:
    # A stop already requested when the window's retrieval would start: no flight at
    # all (not a window of RETRs to read and drop), the session still ends with QUIT.
    srv = pop3_server_factory(messages=[msg(n) for n in range(3)])
    r = rig(srv)
    r.runner.stop.set()
    s = await r.poll()
    assert s.retrieved == 0 and s.error is None and len(srv.messages) == 3
    assert after_listing(srv, 1) == ["QUIT"]


async def test_p14_a_failed_group_commit_mid_window_is_not_deleted_and_the_rest_goes_on(
    pop3_server_factory: Factory, rig: Any, groups_of_two: list[int],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    # P-09 across commits (review of P-14): the first group's flush fails while the
    # flight runs on; its messages get no DELE and stay PENDING, the later groups are
    # committed and deleted in the same session, and the poll reports the failure.
    from mailpipe.plugins.store.sqlite import SqliteStore

    calls: list[int] = []
    original = SqliteStore.flush

    def flaky(self: SqliteStore) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        original(self)

    monkeypatch.setattr(SqliteStore, "flush", flaky)
    srv = pop3_server_factory(messages=[msg(n) for n in range(5)])
    uids = srv.uids
    r = rig(srv, before=[{"use": "store.sqlite", "path": str(tmp_path / "s.db")}])
    s = await r.poll()
    assert groups_of_two == [2, 2, 1] and s.error and "disk full" in s.error
    sent = after_listing(srv, 1)
    assert "DELE 1" not in sent and "DELE 2" not in sent
    assert [c for c in sent if c.startswith("DELE")] == ["DELE 3", "DELE 4", "DELE 5"]
    assert srv.uids == uids[:2]  # the failed group is still on the server
    entries = r.journal.get_many("box", uids[:2])
    assert {e.status for e in entries.values()} == {Status.PENDING}
    s = await r.poll()
    assert s.error is None and srv.messages == []
