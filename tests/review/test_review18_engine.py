"""Review 18: end to end through the engine (FakeSource), store.sqlite with its new
default group_commit = true."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailpipe.plugins.store.sqlite import SqliteStore

from mailpipe.chain import Chain
from mailpipe.engine import MailboxRunner
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugin_manager import Hooks, get_plugin_manager
from mailpipe.quarantine import Quarantine
from mailpipe.registry import Registry
from mailpipe.testing.fakes import FakeSource
from mailpipe.validation import validate_config


def msg(subject: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


async def test_buffer_limit_commit_failure_loses_the_earlier_message(
    tmp_path: Path, monkeypatch
) -> None:
    """MAX_ROWS reached in b's process(); that write fails once (database busy past
    busy_timeout, disk full...). a's process() had returned, its rows were in that
    failed transaction. flush() then succeeds (nothing left to write), so the ledger
    takes a as durable and DELEs it: a is deleted from the server and not stored."""
    FakeSource.boxes.clear()
    monkeypatch.setattr(SqliteStore, "MAX_ROWS", 2)
    real = SqliteStore._write_rows
    failures = [1]

    def write_rows(self, conn, rows):  # type: ignore[no-untyped-def]
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real(self, conn, rows)

    monkeypatch.setattr(SqliteStore, "_write_rows", write_rows)
    registry = Registry()
    registry.add("source", FakeSource, "test")
    registry.add("processor", SqliteStore, "test")
    data = {
        "mailboxes": [{"name": "box", "source": "fake", "pipeline": "p"}],
        "pipelines": {"p": {"processors": [
            {"use": "store.sqlite", "path": "mail.sqlite3"}]}},
    }
    config = validate_config(data, path=tmp_path / "pipeline.toml", registry=registry)
    chain = Chain(config.pipelines, base_dir=tmp_path)
    runner = MailboxRunner(
        config.mailboxes[0], config=config, chain=chain,
        journal=SqliteJournal(tmp_path / "journal.sqlite3"),
        quarantine=Quarantine(tmp_path / "q"),
        hooks=Hooks(get_plugin_manager(entry_points=False)),
    )
    box = runner.source.box
    box.add("a", msg("a"))
    box.add("b", msg("b"))
    await runner.poll()
    conn = sqlite3.connect(tmp_path / "mail.sqlite3")
    stored = {s for (s,) in conn.execute("SELECT subject FROM messages")}
    conn.close()
    gone = {"a", "b"} - set(box.messages)
    # Every message deleted from the server must be in the store.
    assert gone <= stored, f"deleted from the server: {gone}, stored: {stored}"
