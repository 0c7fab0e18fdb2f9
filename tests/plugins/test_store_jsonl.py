"""store.jsonl on the real file system: the line format, once per key, rotation."""

from __future__ import annotations

import email.policy
import json
import os
import time
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore
from pydantic import ValidationError

from mailpipe import Message, ProcessorContext, TemporaryFailure


def make_message(uid: str, body: str = "hello") -> Message:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = f"message {uid}"
    msg["Message-ID"] = f"<{uid}@example.com>"
    msg.set_content(body)
    return Message.from_bytes(msg.as_bytes(policy=email.policy.SMTP), mailbox="mb", uid=uid)


def parsed(m: Message) -> Message:
    parse_into(m)
    return m


def store(tmp_path: Path, *, dry_run: bool = False, **options: object) -> JsonlStore:
    opts = JsonlOptions.model_validate({"path": "out/messages.jsonl", **options})
    s = JsonlStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))
    s.open()
    return s


def lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


def all_lines(folder: Path) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for p in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        out.extend(lines(p))
    return out


def test_one_line_per_message_with_the_record(tmp_path: Path) -> None:
    m = parsed(make_message("1", "body words"))
    m.tags.add("vip")
    store(tmp_path, exclude=["headers"]).process(m)
    path = tmp_path / "out" / "messages.jsonl"
    assert path.read_bytes().startswith(b'{"key":"' + m.key.encode() + b'"')
    (doc,) = lines(path)
    assert (doc["key"], doc["mailbox"], doc["uid"], doc["sha256"], doc["size"]) == (
        m.key, "mb", "1", m.sha256, m.size,
    )
    assert doc["parsed"] is True and doc["tags"] == ["vip"]
    assert doc["subject"] == "message 1" and doc["message_id"] == "1@example.com"
    assert doc["text"] == "body words\n"
    assert doc["from_addresses"] == [{"name": "Alice", "address": "alice@example.com"}]
    assert "headers" not in doc and "html" in doc
    datetime.fromisoformat(str(doc["stored_at"]))


def test_without_parse_the_line_holds_header_fields(tmp_path: Path) -> None:
    m = make_message("1", "plain words")
    store(tmp_path).process(m)
    (doc,) = lines(tmp_path / "out" / "messages.jsonl")
    assert doc["parsed"] is False
    assert (doc["subject"], doc["message_id"], doc["text"]) == (
        "message 1", "1@example.com", "plain words\n",
    )


def test_rerun_writes_nothing_twice(tmp_path: Path) -> None:
    ms = [parsed(make_message(str(i))) for i in range(3)]
    s = store(tmp_path)
    for m in ms:
        s.process(m)
    s.process(ms[0])
    for m in ms:
        store(tmp_path).process(m)  # a new process each time
    assert [d["uid"] for d in lines(tmp_path / "out" / "messages.jsonl")] == ["0", "1", "2"]


def test_rotation_by_size_keeps_every_line_once(tmp_path: Path) -> None:
    ms = [parsed(make_message(str(i))) for i in range(6)]
    s = store(tmp_path, rotate_size=2500)
    for m in ms:
        s.process(m)
    folder = tmp_path / "out"
    names = sorted(os.listdir(folder))
    today = datetime.now(UTC).date().isoformat()
    assert "messages.jsonl" in names and f"messages.{today}.jsonl" in names
    assert len(names) >= 3
    for name in names:
        assert (folder / name).stat().st_size <= 2500
    assert sorted(str(d["uid"]) for d in all_lines(folder)) == [str(i) for i in range(6)]
    # A new process re-running the last two messages (one now in a rotated file).
    s2 = store(tmp_path, rotate_size=2500)
    s2.process(ms[-1])
    s2.process(ms[-2])
    assert len(all_lines(folder)) == 6


def test_rotation_by_day(tmp_path: Path) -> None:
    s = store(tmp_path, rotate_daily=True)
    s.process(parsed(make_message("1")))
    path = tmp_path / "out" / "messages.jsonl"
    yesterday = time.time() - 86400
    os.utime(path, (yesterday, yesterday))
    s.process(parsed(make_message("2")))
    day = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    rotated = tmp_path / "out" / f"messages.{day}.jsonl"
    assert [d["uid"] for d in lines(rotated)] == ["1"]
    assert [d["uid"] for d in lines(path)] == ["2"]


def test_a_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    a, b = parsed(make_message("1")), parsed(make_message("2"))
    store(tmp_path).process(a)
    path = tmp_path / "out" / "messages.jsonl"
    good = path.stat().st_size
    store(tmp_path).process(b)
    with path.open("r+b") as f:
        f.truncate(good + 40)  # the crash hit in the middle of b's line
    store(tmp_path).process(b)
    assert [d["uid"] for d in lines(path)] == ["1", "2"]


def test_exclude_cannot_drop_the_key() -> None:
    with pytest.raises(ValidationError, match="key"):
        JsonlOptions.model_validate({"path": "x.jsonl", "exclude": ["key"]})


def test_unwritable_path_is_a_temporary_failure(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"a file, not a folder")
    with pytest.raises(TemporaryFailure):
        store(tmp_path).process(make_message("1"))


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    store(tmp_path, dry_run=True).process(make_message("1"))
    assert not (tmp_path / "out").exists()
