"""store.postgres: message records and attachment metadata in PostgreSQL.

Schema (created on open; version in ``<prefix>store_schema_version``):

- ``<prefix>messages``: one row per message key. A few columns to query by (``mailbox``,
  ``uid``, ``sha256``, ``size``, ``parsed``, ``message_id``, ``date``, ``subject``,
  ``from_address``, ``thread_key``, ``tags``), the whole ``mailpipe.message/1``
  document of :func:`mailpipe.document.message_document` with ``stored_at`` as
  ``record`` (JSONB, bodies included) and ``raw`` (the message bytes when
  ``raw = "inline"``).
- ``<prefix>attachments``: (key, idx) → file name, type, size, sha256, … of each
  attachment (the bytes stay with ``store.attachments``).

Idempotent by ``message.key``: an upsert replaces the row in place and rewrites its
attachment rows, in one transaction committed before ``process`` returns. Text that
PostgreSQL refuses (NUL characters, lone surrogates) is stored with U+FFFD instead.
"""

from __future__ import annotations

import re
import zlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.document import message_document
from mailpipe.errors import MailpipeError, PermanentFailure, TemporaryFailure
from mailpipe.message import Message
from mailpipe.pgtls import secure_dsn
from mailpipe.processor import ProcessorContext
from mailpipe.secrets import Secret, redact
from mailpipe.units import Duration

if TYPE_CHECKING:
    import psycopg

log = structlog.get_logger()

SCHEMA_VERSION: Final = 1
_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,40}")


def schema_statements(prefix: str) -> tuple[str, ...]:
    """Return the statements of schema version 1 for table ``prefix``."""
    return (
        f"""CREATE TABLE {prefix}messages (
            key          text PRIMARY KEY,
            mailbox      text NOT NULL,
            uid          text NOT NULL,
            sha256       text NOT NULL,
            size         bigint NOT NULL,
            parsed       boolean NOT NULL,
            message_id   text,
            date         timestamptz,
            subject      text,
            from_address text,
            thread_key   text,
            tags         text[] NOT NULL DEFAULT '{{}}',
            record       jsonb NOT NULL,
            raw          bytea,
            stored_at    timestamptz NOT NULL DEFAULT now(),
            updated_at   timestamptz NOT NULL DEFAULT now()
        )""",
        f"CREATE INDEX {prefix}messages_message_id ON {prefix}messages (message_id)",
        f"CREATE INDEX {prefix}messages_date ON {prefix}messages (date)",
        f"CREATE INDEX {prefix}messages_mailbox ON {prefix}messages (mailbox, uid)",
        f"""CREATE TABLE {prefix}attachments (
            key          text NOT NULL
                         REFERENCES {prefix}messages (key) ON DELETE CASCADE,
            idx          integer NOT NULL,
            filename     text,
            content_type text NOT NULL,
            disposition  text,
            size         bigint NOT NULL,
            sha256       text NOT NULL,
            content_id   text,
            inline       boolean NOT NULL DEFAULT false,
            part         text,
            PRIMARY KEY (key, idx)
        )""",
        f"CREATE INDEX {prefix}attachments_sha256 ON {prefix}attachments (sha256)",
    )


def clean(value: Any) -> Any:
    """Return ``value`` with NULs and lone surrogates in strings replaced by U+FFFD.

    PostgreSQL text and JSONB refuse U+0000, and UTF-8 cannot encode a lone surrogate.
    """
    if isinstance(value, str):
        if "\x00" in value:
            value = value.replace("\x00", "\ufffd")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo is not None else None
    return None


def _first_address(doc: dict[str, Any]) -> str | None:
    for item in doc.get("from_addresses") or ():
        if isinstance(item, dict) and item.get("address"):
            return str(item["address"])
    return None


class PostgresStoreOptions(BaseModel):
    """Options of ``store.postgres``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    dsn: Secret = Field(
        description="libpq connection string or postgresql:// URL; may be a secret "
        "({ env = ... }) when it holds a password."
    )
    table_prefix: str = Field(
        default="mailpipe_",
        description="Prefix of the table names (lower-case letters, digits, '_').",
    )
    db_schema: str | None = Field(
        default=None,
        description="PostgreSQL schema for the tables (created when missing); default: "
        "the connection's search_path.",
    )
    raw: Literal["inline", "none"] = Field(
        default="inline",
        description="'inline' keeps the raw message bytes in messages.raw; 'none' not.",
    )
    connect_timeout: Duration = Field(
        default=10.0, description="Timeout of connecting to the server."
    )

    @field_validator("table_prefix", "db_schema")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and not _IDENTIFIER.fullmatch(value):
            raise ValueError(
                "expected lower-case letters, digits and '_' (not first a digit)"
            )
        return value


def classify(exc: Exception, what: str) -> MailpipeError:
    """Map a psycopg error: connection and server trouble → TemporaryFailure."""
    import psycopg

    text = redact(f"{what}: {exc}")
    # Lost connections, shutdowns, deadlocks, serialisation failures, full disks.
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError):
        return TemporaryFailure(text)
    return PermanentFailure(text)


class PostgresStore:
    """Upsert each message's record and attachment metadata into PostgreSQL.

    Idempotent by ``message.key`` (one row per key, attachments rewritten); durable on
    return (one committed transaction per message). Works without a ``parse`` step:
    the row then holds the fields of :func:`mailpipe.document.minimal_record`.
    Connection failures raise TemporaryFailure; the next message reconnects.
    """

    name: ClassVar[str] = "store.postgres"
    Options: ClassVar[type[BaseModel]] = PostgresStoreOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(
        self, options: PostgresStoreOptions, context: ProcessorContext
    ) -> None:
        self.options = options
        self.context = context
        self.prefix = options.table_prefix
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def open(self) -> None:
        """Connect and create the schema when missing (nothing in dry-run)."""
        if not self.context.dry_run:
            await self._connection()

    async def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return self._conn
        import psycopg
        from psycopg import sql

        try:
            conn = await psycopg.AsyncConnection.connect(
                secure_dsn(self.options.dsn.get()),
                autocommit=True,
                connect_timeout=max(1, round(self.options.connect_timeout)),
            )
        except (psycopg.Error, OSError) as exc:
            raise TemporaryFailure(
                redact(f"{self.name}: cannot connect: {exc}")
            ) from exc
        try:
            async with conn.transaction():
                # Serialise schema creation between workers starting together.
                lock = zlib.crc32(f"mailpipe.store.postgres:{self.prefix}".encode())
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                if self.options.db_schema:
                    schema = sql.Identifier(self.options.db_schema)
                    await conn.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema)
                    )
                    await conn.execute(sql.SQL("SET search_path TO {}").format(schema))
                await self._migrate(conn)
        except BaseException as exc:
            await conn.close()
            if isinstance(exc, psycopg.Error):
                raise classify(exc, f"{self.name}: schema") from exc
            raise
        self._conn = conn
        return conn

    async def _migrate(self, conn: psycopg.AsyncConnection[Any]) -> None:
        table = f"{self.prefix}store_schema_version"
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {table} (version integer NOT NULL)"
        )
        cur = await conn.execute(f"SELECT max(version) FROM {table}")
        row = await cur.fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise PermanentFailure(
                f"{self.name}: schema version {current} is newer than this mailpipe "
                f"({SCHEMA_VERSION}); upgrade mailpipe"
            )
        if current < 1:
            for statement in schema_statements(self.prefix):
                await conn.execute(statement)
            await conn.execute(f"INSERT INTO {table} (version) VALUES (1)")
            log.info("postgres_store_schema_created", prefix=self.prefix)

    async def process(self, message: Message) -> None:
        """Upsert the message; committed before this returns."""
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=message.key)
            return
        import psycopg
        from psycopg.types.json import Jsonb

        doc = clean(message_document(message, stored_at=datetime.now(UTC)))
        raw = message.raw if self.options.raw == "inline" else None
        attachments = [a for a in doc.get("attachments") or () if isinstance(a, dict)]
        p = self.prefix
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {p}messages (key, mailbox, uid, sha256, size, parsed,"
                    " message_id, date, subject, from_address, thread_key, tags, "
                    "record, raw) VALUES "
                    "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET mailbox = EXCLUDED.mailbox, "
                    "uid = EXCLUDED.uid, sha256 = EXCLUDED.sha256, "
                    "size = EXCLUDED.size, parsed = EXCLUDED.parsed, "
                    "message_id = EXCLUDED.message_id, date = EXCLUDED.date, "
                    "subject = EXCLUDED.subject, "
                    "from_address = EXCLUDED.from_address, "
                    "thread_key = EXCLUDED.thread_key, tags = EXCLUDED.tags, "
                    "record = EXCLUDED.record, raw = EXCLUDED.raw, updated_at = now()",
                    (
                        doc["key"],
                        doc["mailbox"],
                        doc["uid"],
                        doc["sha256"],
                        doc["size"],
                        bool(doc.get("parsed")),
                        doc.get("message_id"),
                        _timestamp(doc.get("date")),
                        doc.get("subject"),
                        _first_address(doc),
                        doc.get("thread_key") or None,
                        list(doc.get("tags") or ()),
                        Jsonb(doc),
                        raw,
                    ),
                )
                await conn.execute(
                    f"DELETE FROM {p}attachments WHERE key = %s", (doc["key"],)
                )
                if attachments:
                    async with conn.cursor() as cur:
                        await cur.executemany(
                            f"INSERT INTO {p}attachments (key, idx, filename, "
                            "content_type, disposition, size, sha256, content_id, "
                            "inline, part) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            [
                                (
                                    doc["key"],
                                    int(a.get("index", i)),
                                    a.get("filename"),
                                    a.get("content_type") or "application/octet-stream",
                                    a.get("disposition"),
                                    int(a.get("size") or 0),
                                    a.get("sha256") or "",
                                    a.get("content_id"),
                                    bool(a.get("inline")),
                                    a.get("part"),
                                )
                                for i, a in enumerate(attachments)
                            ],
                        )
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self._conn = None
            raise classify(exc, f"{self.name}: upsert") from exc
        log.debug(
            "message_stored",
            store=self.name,
            key=message.key,
            attachments=len(attachments),
        )


PROCESSORS = [PostgresStore]
