"""UIDL edge cases through the whole delivery path: the real pop3 source against the fake
POP3 server, the engine, the SQLite journal and a store (conformance T-23)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mailpipe.chain import Chain
from mailpipe.config import validate_config
from mailpipe.engine import MailboxRunner, Summary
from mailpipe.journal.base import Status
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.testing import Pop3Server

pytestmark = pytest.mark.timeout(120)

Factory = Callable[..., Pop3Server]


def msg(n: int, subject: str | None = None) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\n"
        f"Message-ID: <uidl-{n}@example.com>\r\nSubject: {subject or f'm{n}'}\r\n"
        f"\r\nbody {n}\r\n"
    ).encode()


class Rig:
    """One mailbox "box" on ``srv`` with a store.jsonl pipeline and a SQLite journal."""

    def __init__(self, tmp_path: Path, srv: Pop3Server, **mailbox: Any) -> None:
        self.out = tmp_path / "out.jsonl"
        _, registry = load(entry_points=False)
        data = {
            "mailboxes": [
                {
                    "name": "box",
                    "host": srv.host,
                    "port": srv.port,
                    "security": "none",
                    "allow_plaintext_password": True,
                    "username": "user",
                    "password": "pass",
                    "read_timeout": 10,
                    "greeting_timeout": 10,
                    **mailbox,
                }
            ],
            "pipelines": {
                "default": {
                    "processors": [{"use": "store.jsonl", "path": str(self.out)}]
                }
            },
        }
        self.config = validate_config(
            data, path=tmp_path / "pipeline.toml", registry=registry
        )
        self.journal = SqliteJournal(tmp_path / "journal.sqlite3")
        self.chain = Chain(self.config.pipelines, base_dir=tmp_path)
        self.opened = False
        self.runner = MailboxRunner(
            self.config.mailboxes[0],
            config=self.config,
            chain=self.chain,
            journal=self.journal,
            quarantine=Quarantine(tmp_path / "quarantine"),
            hooks=Hooks(load(entry_points=False)[0]),
        )

    async def poll(self) -> Summary:
        if not self.opened:
            await self.chain.open()
            self.opened = True
        return await self.runner.poll()

    def stored(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    async def close(self) -> None:
        await self.chain.close()
        self.journal.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(srv: Pop3Server, **mailbox: Any) -> Rig:
        made.append(Rig(tmp_path, srv, **mailbox))
        return made[-1]

    yield make
    for r in made:
        await r.close()


async def test_t23_duplicate_uids_are_all_delivered_and_deleted(
    pop3_server_factory: Factory, rig: Callable[..., Rig]
) -> None:
    srv = pop3_server_factory()
    copy = msg(1, "identical copy")
    srv.add_message(copy, uid="abc")
    srv.add_message(copy, uid="abc")  # RFC 1939 §7: same uid for an identical copy
    srv.add_message(msg(2), uid="other")
    r = rig(srv)
    summary = await r.poll()
    assert summary.error is None, summary.error
    assert (summary.listed, summary.processed, summary.deleted) == (3, 3, 3)
    stored = r.stored()
    assert sorted(d["uid"] for d in stored) == ["abc", "abc #2", "other"]
    assert len({d["key"] for d in stored}) == 3  # each copy stored under its own key
    assert srv.messages == []  # both copies deleted, after they were stored
    assert srv.sessions[-1].outcome == "committed"
    entries = r.journal.get_many("box", ["abc", "abc #2", "other"])
    assert {e.status for e in entries.values()} == {Status.DELETED}
    assert len(entries) == 3


async def test_t23_duplicate_uids_in_keep_mode_are_processed_once(
    pop3_server_factory: Factory, rig: Callable[..., Rig]
) -> None:
    srv = pop3_server_factory()
    for _ in range(2):
        srv.add_message(msg(1, "identical copy"), uid="abc")
    r = rig(srv, delete="never")
    first = await r.poll()
    second = await r.poll()  # the occurrence uids are stable: nothing new
    assert (first.processed, second.processed) == (2, 0)
    assert sorted(d["uid"] for d in r.stored()) == ["abc", "abc #2"]
    assert len(srv.messages) == 2
