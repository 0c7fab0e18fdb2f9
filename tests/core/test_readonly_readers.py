"""`mailpipe status` and `search` only read: no journal is created or migrated, the
exit codes are the documented ones, and a read-only folder without the `-shm` file
is read (as user `nobody` when the tests run as root, since root ignores modes)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.journal.sqlite_schema import MIGRATIONS
from mailpipe.testing.e2e import run_cli as mp

pytestmark = pytest.mark.timeout(300)

SAMPLES = Path(__file__).resolve().parents[2] / "mailpipe" / "samples"


def write_config(root: Path) -> Path:
    cfg = root / "pipeline.toml"
    cfg.write_text(
        """
[state]
path = "var/journal.sqlite3"
[quarantine]
dir = "var/quarantine"
[[mailboxes]]
name = "box"
host = "127.0.0.1"
username = "user"
password = "pass"
[pipelines.default]
processors = [
  { use = "parse" },
  { use = "store.sqlite", path = "var/store.sqlite3" },
]
"""
    )
    return cfg


def closed_databases(root: Path) -> Path:
    """Write the config, archive one sample and record a poll (backlog 4); both
    databases closed cleanly. Return the config's path."""
    cfg = write_config(root)
    done = mp("process", str(cfg), str(SAMPLES / "01-ticket.eml"), cwd=root)
    assert done.returncode == 0, done.stderr
    journal = SqliteJournal(root / "var" / "journal.sqlite3")
    journal.record_poll("box", owner="test:1", backlog=4)
    journal.close()
    return cfg


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_status_help_states_the_exit_codes(tmp_path: Path) -> None:
    done = mp("status", "--help", cwd=tmp_path)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for line in (
        "0 every enabled mailbox is healthy",
        "1 an enabled mailbox is unhealthy by the rule of /healthz",
        "2 usage or configuration error",
        "3 the journal cannot be read",
    ):
        assert line in text


def test_status_without_a_journal_creates_nothing(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    done = mp("status", str(cfg), "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "journal.sqlite3 does not exist: no mailbox has been polled yet" in (
        done.stderr
    )
    doc = json.loads(done.stdout)
    assert doc["mailboxes"][0]["problem"] == "never polled"
    assert not (tmp_path / "var").exists()  # no journal, not even its folder


def test_status_leaves_an_older_journal_alone_and_exits_3(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    journal = tmp_path / "var" / "journal.sqlite3"
    journal.parent.mkdir()
    conn = sqlite3.connect(journal)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.commit()
    conn.close()
    before = digest(journal)
    done = mp("status", str(cfg), cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "schema version 1" in done.stderr
    assert "the next `mailpipe run` migrates it" in done.stderr
    assert digest(journal) == before
    check = sqlite3.connect(journal)
    assert check.execute("SELECT version FROM schema_version").fetchone() == (1,)
    assert check.execute(
        "SELECT count(*) FROM sqlite_master WHERE name = 'polls'"
    ).fetchone() == (0,)
    check.close()


def test_status_on_a_file_that_is_not_a_journal_exits_3(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    journal = tmp_path / "var" / "journal.sqlite3"
    journal.parent.mkdir()
    journal.write_bytes(b"not a database, just text\n" * 100)
    done = mp("status", str(cfg), cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "journal" in done.stderr and "Traceback" not in done.stderr


def test_status_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text("[metrics]\nunhealthy_after = 'soon'\n")
    done = mp("status", str(cfg), cwd=tmp_path)
    assert done.returncode == 2
    assert "unhealthy_after" in done.stderr


def test_status_and_search_leave_a_cleanly_closed_journal_folder_as_it_was(
    tmp_path: Path,
) -> None:
    """No -shm/-wal appears beside a closed database (it would belong to the status
    user, and a worker running as another user could then not write)."""
    cfg = closed_databases(tmp_path)
    var = tmp_path / "var"
    before = {p.name: digest(p) for p in var.iterdir() if p.is_file()}
    assert sorted(before) == ["journal.sqlite3", "store.sqlite3"]
    status = mp("status", str(cfg), cwd=tmp_path)
    assert "box" in status.stdout, status.stdout + status.stderr
    found = mp("search", str(cfg), "printer", cwd=tmp_path)
    assert "Printer on floor 3" in found.stdout, found.stdout + found.stderr
    after = {p.name: digest(p) for p in var.iterdir() if p.is_file()}
    assert after == before


# --- a read-only folder without -shm -----------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder that user `nobody` can reach (pytest's tmp folder is root's own)."""
    root = Path(tempfile.mkdtemp(prefix="mailpipe-ro-"))
    root.chmod(0o755)
    yield root
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(root)


def as_reader(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` as a user for whom the folders are read-only: ``nobody`` (in a
    forked child) when running as root, else the current user."""
    if os.geteuid() != 0:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = json.dumps(["ok", fn()])
        except BaseException as exc:
            out = json.dumps(["error", f"{type(exc).__name__}: {exc}"])
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = json.loads(data)
    assert kind == "ok", value
    return value


def lock_down(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)


def test_search_and_status_read_a_read_only_folder_without_shm(
    shared_dir: Path,
) -> None:
    from mailpipe.app import open_app
    from mailpipe.search import open_store, pick_store, search
    from mailpipe.status import collect

    cfg = closed_databases(shared_dir)
    var = shared_dir / "var"
    assert sorted(p.name for p in var.iterdir()) == ["journal.sqlite3", "store.sqlite3"]
    lock_down(var)
    app = open_app(cfg)

    def read() -> dict[str, Any]:
        conn = open_store(pick_store(app.config))
        try:
            hits = [h.subject for h in search(conn, "printer")]
        finally:
            conn.close()
        ro = app.journal(read_only=True)
        try:
            statuses = collect(app.config, ro, app.quarantine())
        finally:
            ro.close()
        return {"hits": hits, "backlog": statuses[0].backlog}

    result = as_reader(read)
    assert result == {
        "hits": ["Printer on floor 3 prints blank pages"],
        "backlog": 4,
    }
    # nothing was written beside them
    assert sorted(p.name for p in var.iterdir()) == ["journal.sqlite3", "store.sqlite3"]


def test_a_pending_wal_in_a_read_only_folder_is_an_error_not_stale_data(
    shared_dir: Path,
) -> None:
    from mailpipe.readonly import ReadOnlyOpenError, connect_read_only

    db = shared_dir / "db" / "x.sqlite3"
    db.parent.mkdir()
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE t (x)")
    writer.execute("INSERT INTO t VALUES (1)")
    writer.commit()
    # Copy the database with its uncheckpointed -wal but without -shm (as a crash or a
    # backup leaves it), then make the copy's folder read-only.
    copy = shared_dir / "copy"
    copy.mkdir()
    shutil.copy(db, copy / db.name)
    shutil.copy(db.with_name(db.name + "-wal"), copy / (db.name + "-wal"))
    writer.close()
    assert (copy / (db.name + "-wal")).stat().st_size > 0
    lock_down(copy)

    def read() -> str:
        try:
            conn = connect_read_only(copy / db.name)
        except ReadOnlyOpenError as exc:
            return str(exc)
        conn.close()
        return "opened"

    message = as_reader(read)
    assert "holds changes not yet in the database" in message


# --- PostgreSQL ---------------------------------------------------------------------


def pg_config(root: Path, url: str) -> Path:
    cfg = write_config(root)
    cfg.write_text(cfg.read_text().replace('"var/journal.sqlite3"', json.dumps(url)))
    return cfg


def pg_query(url: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url.split("?", 1)[0], autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


@pytest.mark.services
def test_status_creates_no_postgresql_schema(
    tmp_path: Path, pg_schema_url: str
) -> None:
    schema = pg_schema_url.rsplit("schema=", 1)[1]
    cfg = pg_config(tmp_path, pg_schema_url)
    done = mp("status", str(cfg), "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert (
        f"PostgreSQL journal (schema {schema}) has no mailpipe tables yet"
        in done.stderr
    )
    assert json.loads(done.stdout)["mailboxes"][0]["problem"] == "never polled"
    found = pg_query(
        pg_schema_url,
        f"SELECT 1 FROM information_schema.schemata WHERE schema_name = '{schema}'",
    )
    assert found == []


@pytest.mark.services
def test_status_leaves_an_older_postgresql_journal_alone(
    tmp_path: Path, pg_schema_url: str
) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    schema = pg_schema_url.rsplit("schema=", 1)[1]
    PostgresJournal.from_url(pg_schema_url).close()  # the current schema...
    pg_query(pg_schema_url, f"UPDATE {schema}.mailpipe_schema_version SET version = 1")
    cfg = pg_config(tmp_path, pg_schema_url)
    done = mp("status", str(cfg), cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "schema version 1" in done.stderr  # ...said to be older, and left so
    version = pg_query(
        pg_schema_url, f"SELECT version FROM {schema}.mailpipe_schema_version"
    )
    assert version == [(1,)]
