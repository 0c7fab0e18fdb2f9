"""store.postgres against the local PostgreSQL server; each test has its own prefix."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.parse.processor import parse_into
from mailpipe.plugins.store.postgres import (
    PostgresStore,
    PostgresStoreOptions,
    clean,
)
from pydantic import ValidationError

from mailpipe import Message, ProcessorContext, TemporaryFailure
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.registry import collect

pytestmark = [pytest.mark.timeout(60), pytest.mark.services]

PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
PAYLOAD = bytes(range(256))
RAW = (
    b"From: Alice Example <alice@example.org>\r\n"
    b"To: tickets@example.org\r\n"
    b"Subject: printer on fire\r\n"
    b"Date: Tue, 03 Mar 2026 10:00:00 +0100\r\n"
    b"Message-ID: <t-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"It is on fire.\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="log.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n" + base64.encodebytes(PAYLOAD).replace(b"\n", b"\r\n") + b"--b1--\r\n"
)


@pytest.fixture(scope="module")
def server() -> None:
    import psycopg

    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        reason = f"PostgreSQL unreachable at {PG_DSN}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def prefix(server: None) -> Iterator[str]:
    import psycopg

    name = f"t{uuid.uuid4().hex[:10]}_"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        for table in ("attachments", "messages", "store_schema_version"):
            conn.execute(f"DROP TABLE IF EXISTS {name}{table} CASCADE")


def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(PG_DSN) as conn:
        return conn.execute(sql, params).fetchall()


def make(
    tmp_path: Path, prefix: str, *, dry_run: bool = False, **opts: Any
) -> PostgresStore:
    table: dict[str, Any] = {"dsn": PG_DSN, "table_prefix": prefix, **opts}
    options = PostgresStoreOptions.model_validate(table, context={"base_dir": tmp_path})
    return PostgresStore(options, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))


@pytest.fixture
async def store(tmp_path: Path, prefix: str) -> AsyncIterator[PostgresStore]:
    processor = make(tmp_path, prefix)
    await processor.open()
    yield processor
    await processor.close()


def parsed(raw: bytes = RAW, uid: str = "UID-1") -> Message:
    message = Message.from_bytes(raw, mailbox="support", uid=uid)
    parse_into(message)
    message.tags.add("ticket")
    return message


async def test_parsed_message_is_stored_with_columns_record_and_attachments(
    store: PostgresStore, prefix: str
) -> None:
    message = parsed()
    await store.process(message)

    rows = query(
        f"SELECT key, mailbox, uid, sha256, size, parsed, message_id, date, subject, "
        f"from_address, tags, record, raw FROM {prefix}messages"
    )
    assert len(rows) == 1
    (
        key,
        mailbox,
        uid,
        sha,
        size,
        was_parsed,
        mid,
        date,
        subject,
        sender,
        tags,
        record,
        raw,
    ) = rows[0]
    assert (key, mailbox, uid) == (message.key, "support", "UID-1")
    assert (sha, size, bytes(raw)) == (message.sha256, len(RAW), RAW)
    assert (was_parsed, mid, subject, sender) == (
        True,
        "t-1@example.org",
        "printer on fire",
        "alice@example.org",
    )
    assert date.isoformat() == "2026-03-03T09:00:00+00:00"
    assert tags == ["ticket"]
    assert record["key"] == message.key
    assert "It is on fire." in record["text"]
    assert record["from_addresses"] == [
        {"name": "Alice Example", "address": "alice@example.org"}
    ]

    attachments = query(
        f"SELECT key, idx, filename, content_type, size, sha256 "
        f"FROM {prefix}attachments"
    )
    assert attachments == [
        (
            message.key,
            0,
            "log.bin",
            "application/octet-stream",
            256,
            hashlib.sha256(PAYLOAD).hexdigest(),
        )
    ]


async def test_processing_twice_upserts_one_row(
    store: PostgresStore, prefix: str
) -> None:
    message = parsed()
    await store.process(message)
    message.tags.add("escalated")
    message.record.subject = "printer still on fire"
    await store.process(message)

    rows = query(f"SELECT subject, tags, updated_at > stored_at FROM {prefix}messages")
    assert rows == [("printer still on fire", ["escalated", "ticket"], True)]
    assert query(f"SELECT count(*) FROM {prefix}attachments") == [(1,)]


async def test_message_without_a_record_is_stored_from_its_headers(
    tmp_path: Path, prefix: str
) -> None:
    store = make(tmp_path, prefix, raw="none")
    message = Message.from_bytes(RAW, mailbox="support", uid="UID-2")
    assert message.record is None
    try:
        await store.process(message)  # connects lazily without open()
    finally:
        await store.close()
    rows = query(
        f"SELECT key, parsed, message_id, subject, raw, record->>'uid' "
        f"FROM {prefix}messages"
    )
    assert rows == [
        (message.key, False, "t-1@example.org", "printer on fire", None, "UID-2")
    ]


async def test_text_postgresql_refuses_is_replaced_not_lost(
    store: PostgresStore, prefix: str
) -> None:
    raw = RAW.replace(b"It is on fire.", b"nul \x00 here")
    message = parsed(raw, uid="UID-3")
    await store.process(message)
    (text,) = query(f"SELECT record->>'text' FROM {prefix}messages")[0]
    assert "nul \ufffd here" in text
    assert clean({"a": ["\ud800x", "\x00"]}) == {"a": ["\ufffdx", "\ufffd"]}


async def test_dry_run_writes_nothing(tmp_path: Path, prefix: str) -> None:
    store = make(tmp_path, prefix, dry_run=True)
    await store.open()
    await store.process(parsed())
    await store.close()
    assert query("SELECT to_regclass(%s)", f"{prefix}messages") == [(None,)]


async def test_schema_option_and_secret_dsn(
    tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    monkeypatch.setenv("MAILPIPE_TEST_STORE_DSN", PG_DSN)
    schema = f"s_{prefix}"
    store = make(
        tmp_path, prefix, dsn={"env": "MAILPIPE_TEST_STORE_DSN"}, db_schema=schema
    )
    try:
        await store.process(parsed())
    finally:
        await store.close()
        rows = query(f"SELECT count(*) FROM {schema}.{prefix}messages")
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    assert rows == [(1,)]


async def test_unreachable_server_is_a_temporary_failure(
    tmp_path: Path, prefix: str
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = make(tmp_path, prefix, dsn=f"postgresql://postgres@127.0.0.1:{port}/test")
    with pytest.raises(TemporaryFailure, match="cannot connect"):
        await store.process(parsed())


def test_options_reject_unsafe_identifiers(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="table_prefix"):
        PostgresStoreOptions.model_validate(
            {"dsn": PG_DSN, "table_prefix": "x; DROP TABLE y"},
            context={"base_dir": tmp_path},
        )
    with pytest.raises(ValidationError, match="extra"):
        PostgresStoreOptions.model_validate(
            {"dsn": PG_DSN, "tabel_prefix": "x_"}, context={"base_dir": tmp_path}
        )


def test_registered_as_store_postgres() -> None:
    registry = collect(get_plugin_manager(entry_points=False))
    assert registry.processor("store.postgres") is PostgresStore
