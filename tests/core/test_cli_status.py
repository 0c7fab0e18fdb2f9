"""`mailpipe status` end to end: real runs against the testing kit's POP3 server, the
real CLI in a subprocess, SQLite and PostgreSQL journals."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.testing.e2e import run_cli as mp
from mailpipe.testing.server import Pop3Server

pytestmark = pytest.mark.timeout(300)


def msg(n: int, subject: str) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\nMessage-ID: <m{n}@example.com>\r\n"
        f"Subject: {subject}\r\n\r\nbody {n}\r\n"
    ).encode()


def write_config(
    tmp_path: Path,
    srv: Pop3Server,
    *,
    state: str = "var/journal.sqlite3",
    extra: str = "",
) -> Path:
    script = tmp_path / "fwd.py"
    script.write_text(
        "import sys\nsys.exit(3 if b'poison' in sys.stdin.buffer.read() else 0)\n"
    )
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(
        f"""
[state]
path = "{state}"
[quarantine]
dir = "var/quarantine"
[metrics]
unhealthy_after = "1h"
[[mailboxes]]
name = "box"
host = "127.0.0.1"
port = {srv.port}
security = "tls"
ca_file = "{srv.ca_file}"
username = "user"
password = "pass"
max_attempts = 2
{extra}
[[mailboxes]]
name = "spare"
enabled = false
host = "127.0.0.1"
username = "user"
password = "pass"
[pipelines.default]
processors = [
  {{ use = "parse" }},
  {{ use = "store.jsonl", path = "var/out.jsonl" }},
  {{ use = "forward.command", command = {json.dumps([sys.executable, str(script)])} }},
]
"""
    )
    return cfg


def status(cfg: Path) -> tuple[int, dict[str, Any]]:
    done = mp("status", str(cfg), "--json", cwd=cfg.parent)
    assert done.returncode in (0, 1), done.stderr
    doc = json.loads(done.stdout)
    assert doc["healthy"] is (done.returncode == 0)
    return done.returncode, {m["mailbox"]: m for m in doc["mailboxes"]}


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_status_follows_runs_of_a_sqlite_journal(tmp_path: Path) -> None:
    with Pop3Server(
        [msg(1, "hello"), msg(2, "poison pill"), msg(3, "world")], tls="implicit"
    ) as srv:
        cfg = write_config(tmp_path, srv)

        code, boxes = status(cfg)  # before any run
        assert code == 1
        assert boxes["box"]["healthy"] is False
        assert boxes["box"]["problem"] == "never polled"
        assert (
            boxes["spare"]["healthy"] is None
            and boxes["spare"]["problem"] == "disabled"
        )
        table = mp("status", str(cfg), cwd=tmp_path)
        assert table.returncode == 1 and "UNHEALTHY: never polled" in table.stdout

        started = datetime.now(UTC)
        assert mp("run", str(cfg), "--once", cwd=tmp_path).returncode == 0
        code, boxes = status(cfg)
        box = boxes["box"]
        assert code == 0 and box["healthy"] is True and box["problem"] == "ok"
        assert started <= ts(box["last_success"]) == ts(box["last_poll"])
        assert box["last_error_at"] is None and box["last_error_type"] == ""
        assert (
            box["backlog"] == len(srv.messages) == 1
        )  # the poison pill, retried later
        assert started <= ts(box["oldest_pending"])  # ...so it is pending
        assert box["oldest_pending_age_seconds"] >= 0
        assert box["quarantined"] == 0
        assert box["next_poll"] is None  # --once schedules nothing
        assert (box["lock_kind"], box["lock_owner"]) == ("local lock", None)
        assert box["polled_by"].rsplit(":", 1)[0] == socket.gethostname()

        assert mp("run", str(cfg), "--once", cwd=tmp_path).returncode == 0
        code, boxes = status(cfg)
        box = boxes["box"]
        assert code == 0 and box["quarantined"] == 1  # second failure: quarantined
        assert (
            box["oldest_pending"] is None and box["backlog"] == len(srv.messages) == 0
        )

        # A failed poll: the error and its class are kept, health still holds (the
        # last success is recent), and the table names them.
        cfg.write_text(
            cfg.read_text().replace('password = "pass"', 'password = "bad"', 1)
        )
        assert mp("run", str(cfg), "--once", cwd=tmp_path).returncode == 1
        code, boxes = status(cfg)
        box = boxes["box"]
        assert code == 0 and box["last_error_type"] == "AuthenticationError"
        assert (
            ts(box["last_error_at"]) == ts(box["last_poll"]) > ts(box["last_success"])
        )
        assert box["backlog"] == 0  # never listed: the known count stays
        table = mp("status", str(cfg), cwd=tmp_path)
        assert table.returncode == 0
        assert "AuthenticationError" in table.stdout
        assert "box: last error" in table.stdout and "bad" not in table.stdout.split()

        # Someone holds the mailbox's lock: its owner shows; status takes nothing.
        journal = SqliteJournal(tmp_path / "var" / "journal.sqlite3")
        try:
            assert journal.lock_mailbox("box", owner="host-9:4242", ttl=60)
            code, boxes = status(cfg)
            assert boxes["box"]["lock_owner"] == "host-9:4242"
            assert boxes["box"]["lock_expires"] is None
            assert (
                "host-9:4242 (local lock)"
                in mp("status", str(cfg), cwd=tmp_path).stdout
            )
            assert journal.renew_mailbox("box", owner="host-9:4242", ttl=60)
        finally:
            journal.close()

        # The /healthz rule: no success for longer than unhealthy_after.
        cfg.write_text(
            cfg.read_text().replace('unhealthy_after = "1h"', 'unhealthy_after = "1s"')
        )
        time.sleep(1.2)
        code, boxes = status(cfg)
        assert code == 1 and boxes["box"]["problem"].startswith("no success for")


def test_status_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = mp("status", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert missing.returncode == 2


@pytest.mark.services
def test_status_of_a_running_worker_on_postgresql(
    tmp_path: Path, pg_schema_url: str
) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    with Pop3Server([msg(1, "hello")], tls="implicit") as srv:
        cfg = write_config(
            tmp_path, srv, state=pg_schema_url, extra='poll_interval = "1h"'
        )
        log = (tmp_path / "run.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailpipe", "--log-format", "json", "run", str(cfg)],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            box: dict[str, Any] = {}
            while time.monotonic() < deadline:
                code, boxes = status(cfg)
                box = boxes["box"]
                if box["last_success"] and box["next_poll"]:
                    break
                time.sleep(0.3)
            assert code == 0 and box["healthy"] is True, box
            assert box["polled_by"].endswith(f":{worker.pid}")
            ahead = ts(box["next_poll"]) - ts(box["last_poll"])
            assert timedelta(minutes=53) < ahead < timedelta(minutes=67)  # 1h ±10 %
            assert box["backlog"] == 0 and box["lock_kind"] == "lease"
            table = mp("status", str(cfg), cwd=tmp_path).stdout
            assert re.search(r"\bin (5\dm|6\dm|1h0\dm)", table), table

            other = PostgresJournal.from_url(pg_schema_url)
            try:
                assert other.lock_mailbox("box", owner="worker-7:99", ttl=120)
                _, boxes = status(cfg)
                box = boxes["box"]
                assert box["lock_owner"] == "worker-7:99"
                left = ts(box["lock_expires"]) - datetime.now(UTC)
                assert timedelta(seconds=60) < left <= timedelta(seconds=120)
                table = mp("status", str(cfg), cwd=tmp_path).stdout
                assert (
                    "worker-7:99 (lease, 1m" in table
                    or "worker-7:99 (lease, 2m" in table
                )
            finally:
                other.close()
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
            log.close()
        assert worker.returncode == 0, (tmp_path / "run.log").read_text()[-2000:]
