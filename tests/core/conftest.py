"""Fixtures for tests/core: a real pop3 source against the fake POP3 server, with the
engine, the SQLite journal and a store (the whole delivery path in one process)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner, Summary
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, load
from mailpipe.quarantine import Quarantine
from mailpipe.testing import Pop3Server
from mailpipe.validation import validate_config


class Rig:
    """One mailbox "box" on ``srv`` with a store.jsonl pipeline and a SQLite journal."""

    def __init__(
        self,
        tmp_path: Path,
        srv: Pop3Server,
        *,
        on_complete: str = "done",
        before: list[dict[str, Any]] | None = None,
        **mailbox: Any,
    ) -> None:
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
                    "processors": [
                        *(before or []),
                        {"use": "store.jsonl", "path": str(self.out)},
                    ],
                    "on_complete": on_complete,
                }
            },
        }
        self.config = validate_config(
            data, path=tmp_path / "pipeline.toml", registry=registry
        )
        self.journal = SqliteJournal(tmp_path / "journal.sqlite3")
        self.chain = Chain(
            self.config.pipelines,
            base_dir=tmp_path,
            on_complete={
                n: p.on_complete for n, p in self.config.model.pipelines.items()
            },
        )
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

    def make(srv: Pop3Server, **options: Any) -> Rig:
        made.append(Rig(tmp_path, srv, **options))
        return made[-1]

    yield make
    for r in made:
        await r.close()
