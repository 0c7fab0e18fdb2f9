"""PostgreSQL DSNs get verified TLS for remote hosts unless the user chose a mode."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from mailpipe.pgtls import secure_dsn


@pytest.fixture(autouse=True)
def _no_pg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGSSLMODE", "PGHOST", "PGSSLROOTCERT"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://u@db.example.com/x",
        "host=10.1.2.3 dbname=x",
        "postgresql://u:p@[2001:db8::1]/x",
    ],
)
def test_remote_hosts_get_verify_full(dsn: str) -> None:
    params = conninfo_to_dict(secure_dsn(dsn))
    assert params["sslmode"] == "verify-full" and params["sslrootcert"] == "system"


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgresql://postgres@localhost/test",
        "dbname=test",
        "host=/var/run/postgresql dbname=test",
        "postgresql://u@db.example.com/x?sslmode=disable",
    ],
)
def test_local_or_explicit_modes_are_left_alone(dsn: str) -> None:
    assert secure_dsn(dsn) == dsn


def test_pgsslmode_env_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSSLMODE", "require")
    assert (
        secure_dsn("postgresql://u@db.example.com/x")
        == "postgresql://u@db.example.com/x"
    )
