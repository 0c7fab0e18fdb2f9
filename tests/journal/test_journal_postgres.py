"""PostgresJournal specifics: reconnects, lost connections in a batch, lease races."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from mailpipe import message_key
from mailpipe.journal import JournalError

pytestmark = [pytest.mark.timeout(60), pytest.mark.services]

PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def url(pg_schema_url: str) -> str:
    """A journal URL with a fresh schema (tests/conftest.py)."""
    return pg_schema_url


def terminate(journal: Any) -> None:
    """Kill the journal's server backend, as a server restart or a proxy would."""
    import psycopg

    pid = journal._conn.info.backend_pid
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_from_url_takes_the_schema_out_of_the_dsn(url: str) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    with PostgresJournal.from_url(url + "&application_name=mp") as journal:
        assert journal.schema == url.rsplit("schema=", 1)[1]
        assert "schema=" not in journal.dsn
        assert "application_name=mp" in journal.dsn


def test_a_dropped_connection_is_reopened_between_writes(url: str) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    with PostgresJournal.from_url(url) as journal:
        journal.begin("support", "u1", key=message_key("support", "u1"), size=1)
        terminate(journal)
        with pytest.raises(JournalError):
            journal.get_many("support", ["u1"])  # this call finds the link dead
        assert set(journal.get_many("support", ["u1"])) == {"u1"}  # reconnected


def test_a_connection_lost_inside_a_batch_loses_the_batch(url: str) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    with PostgresJournal.from_url(url) as journal:
        with pytest.raises(JournalError), journal.batch():
            journal.begin("support", "u1", key=message_key("support", "u1"), size=1)
            terminate(journal)
            journal.begin("support", "u2", key=message_key("support", "u2"), size=1)
        assert journal.get_many("support", ["u1", "u2"]) == {}


def test_only_one_of_many_racing_workers_gets_the_lease(url: str) -> None:
    from mailpipe.journal.postgres import PostgresJournal

    workers = [PostgresJournal.from_url(url) for _ in range(6)]
    start = threading.Barrier(len(workers))
    won: list[int] = []

    def race(n: int) -> None:
        start.wait(timeout=30)
        if workers[n].lock_mailbox("support", owner=f"w{n}", ttl=60):
            won.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert len(won) == 1
        assert workers[won[0]].renew_mailbox("support", owner=f"w{won[0]}", ttl=60)
    finally:
        for journal in workers:
            journal.close()
