"""The PostgreSQL journal's schema: its migrations, applied by one worker at a time.

Contract: ``MIGRATIONS[N - 1]`` brings a schema from version N - 1 to N and is never
edited once released (a change is a new migration); :data:`SCHEMA_VERSION` is the
version this code writes. :func:`migrate` runs inside the caller's transaction and
holds the migration advisory lock until it ends, so workers starting together migrate
once; :func:`stored_version` only reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from mailpipe.journal.base import OAUTH_TOKENS_TABLE, apply_migrations

if TYPE_CHECKING:
    import psycopg

#: Schema migrations; version N is reached by applying ``MIGRATIONS[N - 1]``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE mailpipe_journal (
            seq         bigint      GENERATED ALWAYS AS IDENTITY,
            mailbox     text        NOT NULL,
            uid         text        NOT NULL,
            key         text        NOT NULL,
            status      text        NOT NULL,
            attempts    integer     NOT NULL DEFAULT 0,
            size        bigint      NOT NULL DEFAULT 0,
            sha256      text,
            steps       jsonb       NOT NULL DEFAULT '[]',
            disposition text,
            reason      text        NOT NULL DEFAULT '',
            last_error  text        NOT NULL DEFAULT '',
            delete_due  boolean     NOT NULL DEFAULT false,
            first_seen  timestamptz NOT NULL,
            updated     timestamptz NOT NULL,
            PRIMARY KEY (mailbox, uid)
        )
        """,
        "CREATE INDEX mailpipe_journal_status "
        "ON mailpipe_journal (mailbox, status, updated)",
        "CREATE INDEX mailpipe_journal_first_seen "
        "ON mailpipe_journal (first_seen, seq)",
        """
        CREATE TABLE mailpipe_leases (
            mailbox    text        PRIMARY KEY,
            owner      text        NOT NULL,
            expires_at timestamptz NOT NULL
        )
        """,
    ),
    (
        """
        CREATE TABLE mailpipe_polls (
            mailbox         text        PRIMARY KEY,
            owner           text        NOT NULL,
            first_polled    timestamptz NOT NULL,
            polled_at       timestamptz NOT NULL,
            last_success    timestamptz,
            last_error_at   timestamptz,
            last_error      text        NOT NULL DEFAULT '',
            last_error_type text        NOT NULL DEFAULT '',
            backlog         bigint,
            next_poll       timestamptz
        )
        """,
    ),
    # 3: the OAuth token cache (mailpipe.oauth.cache), shared by the workers.
    (
        OAUTH_TOKENS_TABLE.format(
            table="mailpipe_oauth_tokens", real="double precision"
        ),
    ),
    # 4: lease epochs (fencing tokens), raised by every take of a mailbox's lease;
    # a released lease keeps its row (expired), so an epoch is never reused.
    ("ALTER TABLE mailpipe_leases ADD COLUMN epoch bigint NOT NULL DEFAULT 0",),
    # 5: listing cursors (a source's per-scope watermark, e.g. an IMAP folder's UID
    # under its UIDVALIDITY): see Journal.cursors.
    (
        """
        CREATE TABLE mailpipe_cursors (
            mailbox  text   NOT NULL,
            scope    text   NOT NULL,
            position bigint NOT NULL,
            PRIMARY KEY (mailbox, scope)
        )
        """,
        # The unfinished entries (PENDING or owed) every cursor poll reads.
        "CREATE INDEX mailpipe_journal_unfinished ON mailpipe_journal (mailbox) "
        "WHERE status = 'pending' OR delete_due",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# Serialises schema creation and migrations between workers starting together.
_MIGRATION_LOCK: Final = 0x6D61696C70697065  # "mailpipe"


def migrate(conn: psycopg.Connection[tuple[Any, ...]], schema: str | None) -> int:
    """Create ``schema`` (when named and missing) and bring it to
    :data:`SCHEMA_VERSION`, inside the caller's transaction; return the version found."""
    from psycopg import sql

    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    if schema:
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
        )
    return apply_migrations(
        conn.execute,
        table="mailpipe_schema_version",
        param="%s",
        migrations=MIGRATIONS,
        where="PostgreSQL journal",
    )


def stored_version(conn: psycopg.Connection[tuple[Any, ...]]) -> int | None:
    """Return the schema version stored, None when there are no tables yet."""
    import psycopg

    try:
        row = conn.execute("SELECT version FROM mailpipe_schema_version").fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return None if row is None else int(row[0])
