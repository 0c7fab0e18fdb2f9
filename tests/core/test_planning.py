"""Pure planning (mailpipe.planning), table-driven: listing + journal + config -> plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailpipe.config import MailboxConfig
from mailpipe.journal.base import Entry, Status
from mailpipe.message import MessageRef
from mailpipe.oversize import OVERSIZE_MARK
from mailpipe.planning import (
    UNRETRIEVABLE,
    chunks,
    plan,
    plan_unkeyed,
    resting,
    tried_key,
    window,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SHA = "ab" * 32


def ref(uid: str, size: int = 100, number: int = 1) -> MessageRef:
    return MessageRef(mailbox="box", number=number, uid=uid, size=size)


def entry(uid: str, status: Status, **kw: Any) -> Entry:
    return Entry(mailbox="box", uid=uid, key=f"k-{uid}", status=status, **kw)


def cfg(**kw: Any) -> MailboxConfig:
    return MailboxConfig.model_validate({"name": "box", **kw})


CASES = [
    # (id, config, listed entry or None, listed size, expected bucket)
    ("new", {}, None, 100, "process"),
    ("pending-begun", {}, entry("u", Status.PENDING), 100, "process"),
    ("oversize-listed", {"max_message_size": 50}, None, 100, "oversize"),
    ("oversize-marked", {"max_message_size": 500},
     entry("u", Status.PENDING, last_error=f"{OVERSIZE_MARK} x"), 100, "oversize"),
    ("retry-goes-last", {}, entry("u", Status.PENDING, attempts=1, last_error="E"), 100,
     "retry"),
    ("resting", {"max_attempts": 2},
     entry("u", Status.PENDING, attempts=2, last_error=f"{UNRETRIEVABLE}short",
           updated=NOW - timedelta(hours=1)), 100, "resting"),
    ("rested-enough", {"max_attempts": 2},
     entry("u", Status.PENDING, attempts=2, last_error=f"{UNRETRIEVABLE}short",
           updated=NOW - timedelta(days=2)), 100, "retry"),
    ("owed", {}, entry("u", Status.COMMITTED, delete_due=True), 100, "ack"),
    ("kept", {"delete": "never"}, entry("u", Status.KEPT), 100, "none"),
    ("committed-keep-mode", {"delete": "never"},
     entry("u", Status.COMMITTED, size=100, sha256=SHA), 100, "none"),
    ("aged-out", {"delete": "after_days:7"},
     entry("u", Status.COMMITTED, first_seen=NOW - timedelta(days=8)), 100, "ack"),
    ("not-aged", {"delete": "after_days:7"},
     entry("u", Status.COMMITTED, first_seen=NOW - timedelta(days=6)), 100, "none"),
    ("kept-never-ages", {"delete": "after_days:7"},
     entry("u", Status.KEPT, first_seen=NOW - timedelta(days=80)), 100, "none"),
    ("deleted-reappears-hash", {}, entry("u", Status.DELETED, sha256=SHA), 100, "process"),
    ("deleted-reappears-nohash", {}, entry("u", Status.DELETED), 100, "reappeared"),
    ("size-changed", {"delete": "never"},
     entry("u", Status.COMMITTED, size=90, sha256=SHA), 100, "process"),
    ("size-changed-no-hash", {"delete": "never"},
     entry("u", Status.KEPT, size=90), 100, "none"),
]


@pytest.mark.parametrize(("config", "known", "size", "bucket"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_listed_message(config: dict[str, Any], known: Entry | None, size: int,
                            bucket: str) -> None:
    listed = [ref("u", size)]
    out = plan(listed, {"u": known} if known else {}, [], cfg(**config), NOW)
    got = {
        "process": out.process, "oversize": out.oversize, "ack": out.ack,
        "resting": [r for r, _ in out.resting],
    }
    if bucket == "retry":
        assert got["process"] == listed and not out.ack and not out.oversize
    elif bucket == "reappeared":
        assert out.reappeared == listed and out.ack == listed
    elif bucket == "none":
        assert all(v == [] for v in got.values())
    else:
        assert got[bucket] == listed
        assert all(v == [] for k, v in got.items() if k != bucket)


def test_retries_go_after_new_mail() -> None:
    listed = [ref("old", number=1), ref("new", number=2)]
    known = {"old": entry("old", Status.PENDING, attempts=1, last_error="E")}
    assert [r.uid for r in plan(listed, known, [], cfg(), NOW).process] == ["old", "new"][::-1]


def test_duplicates_and_gone_deletions() -> None:
    listed = [ref("a", number=1), ref("a", number=2), ref("b", number=3)]
    out = plan(listed, {}, ["a", "zz"], cfg(), NOW)
    assert [r.number for r in out.duplicates] == [2]
    assert [r.uid for r in out.process] == ["a", "b"]
    assert out.gone == ["zz"]  # owed but no longer listed: the server removed it


def test_unkeyed_plan_applies_only_the_size_policy() -> None:
    listed = [MessageRef(mailbox="box", number=1, uid="", size=10),
              MessageRef(mailbox="box", number=2, uid="", size=1000)]
    out = plan_unkeyed(listed, 100)
    assert ([r.number for r in out.process], [r.number for r in out.oversize]) == ([1], [2])


@pytest.mark.parametrize(
    ("config", "sizes", "chosen", "more"),
    [
        ({}, [10] * 5, 5, False),
        ({"commit_window": 2}, [10] * 5, 2, True),
        ({"max_messages": 2}, [10] * 5, 2, False),  # a per-session limit ends the poll
        ({"max_bytes": 25}, [10] * 5, 2, False),
        ({"max_bytes": 5}, [10] * 5, 1, False),  # one message always goes
    ],
)
def test_window(config: dict[str, Any], sizes: list[int], chosen: int, more: bool) -> None:
    refs = [ref(f"u{i}", s, i + 1) for i, s in enumerate(sizes)]
    got, again = window(refs, cfg(**config))
    assert (len(got), again) == (chosen, more)


def test_chunks_resting_and_tried_key() -> None:
    refs = [ref(f"u{i}", s) for i, s in enumerate([5, 5, 20, 1, 1])]
    assert [[r.size for r in c] for c in chunks(refs, 2, 12)] == [[5, 5], [20], [1, 1]]
    spent = entry("u", Status.PENDING, attempts=3, last_error=f"{UNRETRIEVABLE}x",
                  updated=NOW)
    assert resting(spent, 3, NOW) and not resting(spent, 4, NOW)
    assert tried_key(ref("u")) == "u"
    assert tried_key(MessageRef(mailbox="box", number=7, uid="", size=42)) == "#7:42"
