"""store.sqlite's rows: the holder of one message's rows for the tables of
:mod:`._sqlite_schema`, their checks before they are held, the ``messages`` UPSERT
and the statements that write a group of rows (the store builds the rows with
``SqliteStore._prepare`` and runs the statements).

Contract: :data:`_UPSERT` upserts a ``messages`` row from its values in :data:`_COLUMNS`
order (``key`` and ``stored_at`` kept on update); :func:`_program` is the statements of
one transaction that write a group of prepared rows (a program of
:mod:`._sqlite_writes`); :class:`_Rows` holds one message's
prepared rows (built by ``SqliteStore._prepare``, without database access);
:func:`_check` raises, before anything is held, what SQLite would refuse for that
message alone. :func:`_json` is the compact JSON of every JSON column. Nothing here
opens a connection or a transaction.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

from mailpipe.message import Message

from ._sqlite_schema import _ADDRESS_COLUMNS, _ADDRESS_FIELDS, _INDEX_UNINDEXED
from ._sqlite_writes import Op


def _address_count(record: Any) -> int:
    """The number of addresses in ``record`` (a MessageRecord or its dict)."""
    get = record.get if isinstance(record, dict) else partial(getattr, record)
    return sum(len(get(field, None) or ()) for field, _ in _ADDRESS_FIELDS)


def _flatten_addresses(doc: dict[str, Any]) -> str:
    parts = []
    for field, _ in _ADDRESS_FIELDS:
        for a in doc.get(field) or ():
            parts.append(f"{a.get('name') or ''} {a.get('address') or ''}".strip())
    return " ".join(parts)


#: ``json.dumps(value, ensure_ascii=True, separators=(",", ":"), default=str)``,
#: built once: ``dumps`` with arguments builds a new encoder on every call, and a
#: message's row takes seven documents (issue 18). Without the check for circular
#: references (a tenth of the time): a message's document is built from JSON values
#: (``model_dump(mode="json")``), and the output is the same.
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=True, separators=(",", ":"), default=str, check_circular=False
)


def _json(value: Any) -> str:
    return _ENCODER.encode(value)


_COLUMNS: Final = (
    "key", "mailbox", "uid", "sha256", "size", "parsed", "message_id", "date",
    "date_raw", *_ADDRESS_COLUMNS, "addresses", "subject", "thread_key", "list_id",
    "auto_reply", "text", "text_from_html", "html", "record", "stored_at",
    "updated_at", "attachment_text",
)
_KEEP_ON_UPDATE: Final = ("key", "stored_at")
_UPSERT: Final = (
    f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ("
    + ", ".join("?" for _ in _COLUMNS)
    + ") ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in _KEEP_ON_UPDATE)
)


@dataclass(slots=True)
class _Rows:
    """One message's prepared rows, written at flush()."""

    key: str
    message: list[Any]  # the messages row, in _COLUMNS order
    attachments: list[tuple[Any, ...]]
    tags: list[tuple[str, str]]
    raw: Message | None  # in memory (``data``) or spooled; None with raw = "none"
    octets: int


def _check(rows: _Rows) -> None:
    """Raise, before anything is buffered, what SQLite would refuse for this message
    alone at flush(): a repeated attachment index or tag (the primary keys), text it
    cannot encode, an integer out of its range. Only failures of the database itself
    (busy, full, I/O) are left for flush()."""
    for table, names in (
        ("attachments.key, attachments.idx", [a[1] for a in rows.attachments]),
        ("tags.key, tags.tag", [t[1] for t in rows.tags]),
    ):
        if len(set(names)) != len(names):
            raise sqlite3.IntegrityError(f"UNIQUE constraint failed: {table}")
    for row in (rows.message, *rows.attachments, *rows.tags):
        for value in row:
            if isinstance(value, str):
                if not value.isascii():  # a flag of the string: ASCII encodes
                    value.encode("utf-8")  # lone surrogates: UnicodeEncodeError
            elif isinstance(value, int) and not -(1 << 63) <= value < (1 << 63):
                raise OverflowError("Python int too large to convert to SQLite INTEGER")


def _program(group: Sequence[_Rows]) -> list[Op]:
    """The statements that write the prepared rows of ``group`` (distinct keys),
    as a program of :mod:`._sqlite_writes` for one transaction: each statement
    once for the whole group (``executemany``), not once per message (issue 18).
    The result is the rows that writing each message alone gives: its messages
    row upserted, then its raw bytes, attachments and tags replaced.

    The FTS5 entries of the rows it inserts are written in it too
    (:data:`_INDEX_UNINDEXED`, once before the UPSERTs and once after; the update
    trigger re-indexes a replaced row): a committed row always has its index
    entry and an index entry its row, as with the insert trigger of versions
    2-4."""
    if not group:
        return []
    # The rows of the group's keys not indexed yet (inserted by another writer)
    # before the update trigger forgets their old values, then the rows inserted.
    group_keys = (_json([rows.key for rows in group]),)
    keys = [(rows.key,) for rows in group]
    return [
        ("execute", _INDEX_UNINDEXED, group_keys),
        ("execute", "UPDATE store_writing SET active = 1", ()),  # insert trigger off
        ("executemany", _UPSERT, [rows.message for rows in group]),
        ("execute", "UPDATE store_writing SET active = 0", ()),  # before anyone sees
        ("execute", _INDEX_UNINDEXED, group_keys),
        ("executemany", "DELETE FROM message_raw WHERE key = ?", keys),
        ("executemany", "DELETE FROM attachments WHERE key = ?", keys),
        ("executemany", "DELETE FROM tags WHERE key = ?", keys),
        (
            "executemany",
            "INSERT INTO message_raw (key, raw) VALUES (?, ?)",
            [
                (rows.key, rows.raw.data)
                for rows in group
                if rows.raw is not None and rows.raw.data is not None
            ],
        ),
        *(
            ("raw_file", rows.key, str(rows.raw.spool_path), rows.raw.size)
            for rows in group
            if rows.raw is not None and rows.raw.data is None  # spooled
        ),
        (
            "executemany",
            "INSERT INTO attachments (key, idx, filename, content_type, "
            "disposition, size, sha256, content_id, inline, part) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [a for rows in group for a in rows.attachments],
        ),
        (
            "executemany",
            "INSERT INTO tags (key, tag) VALUES (?, ?)",
            [t for rows in group for t in rows.tags],
        ),
    ]
