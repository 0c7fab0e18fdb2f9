"""Shared pytest configuration: the mailpipe.testing fixtures (fake POP3, Dovecot, sinks)."""

import os
from collections.abc import Iterator

import pytest

pytest_plugins = ["mailpipe.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _isolated_secret_registry() -> Iterator[None]:
    """Each test starts with an empty redaction set (secrets are process-wide)."""
    from mailpipe.secrets import forget_secrets

    forget_secrets()
    yield
    forget_secrets()


POSTGRES_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL with a fresh ``?schema=`` (dropped afterwards).

    Skips when PostgreSQL is unreachable, but fails when ``CI`` is set.
    """
    import uuid

    import psycopg

    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        reason = f"PostgreSQL unreachable at {POSTGRES_DSN}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"mailpipe_test_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES_DSN}?schema={schema}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
