"""``mailpipe search`` and ``mailpipe show``: read the archive a ``store.sqlite`` step wrote.

Theory of operation
-------------------
The database is found through the config: :func:`pick_store` takes the only
``store.sqlite`` step of all pipelines, or the one ``--store`` names (its step name or
its path); several steps writing one file count as one. It is opened read-only
(:func:`open_store`), so searching never creates, migrates or locks the archive for
writing, and works while ``mailpipe run`` writes (WAL).

:func:`search` runs the QUERY through the FTS5 index over subject, addresses and body
(FTS5 syntax: words, ``"phrases"``, ``OR``, ``NOT``, ``prefix*``). A query FTS5 cannot
parse (``alice@example.com``, ``INV-2024``) is searched again as plain words, each
quoted as a phrase, instead of failing. Filters narrow the match: ``sender`` (a
substring of a From name or address, case-insensitive), ``since`` (message date, or
storage time when the message had none), ``mailbox`` and ``tags`` (all of them).
:func:`show` returns one record (by key or a unique key prefix) with its body, tags and
attachments; where a ``store.attachments`` step keeps the blobs, each attachment
names its file.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from mailpipe.config import Config
from mailpipe.errors import MailpipeError
from mailpipe.readonly import ReadOnlyOpenError, connect_read_only

#: The store schema version that has the FTS5 index (plugins/store/_sqlite_schema.py, v2).
FTS_VERSION: Final = 2


class StoreChoiceError(MailpipeError):
    """The config has no ``store.sqlite`` step, several, or not the one asked for.

    The CLI prints it and exits 2 (a usage error).
    """


class KeyLookupError(MailpipeError):
    """No record, or several, match the key (prefix) given to ``show``; exit 2."""


@dataclass(frozen=True, slots=True)
class StoreRef:
    """A ``store.sqlite`` step: where it is in the config, its name and its file."""

    where: str  # e.g. "pipelines.tickets.processors[3]"
    step: str
    path: Path


@dataclass(slots=True, kw_only=True)
class Hit:
    """One search result (a row of ``messages`` with its tags and attachment count)."""

    key: str
    mailbox: str
    uid: str
    date: str | None
    sender: str
    subject: str | None
    size: int
    tags: list[str]
    attachments: int

    def as_json(self) -> dict[str, Any]:
        """Return the JSON-lines form (``from`` instead of ``sender``)."""
        return {
            "key": self.key,
            "mailbox": self.mailbox,
            "uid": self.uid,
            "date": self.date,
            "from": self.sender,
            "subject": self.subject,
            "size": self.size,
            "tags": self.tags,
            "attachments": self.attachments,
        }


def sqlite_stores(config: Config) -> list[StoreRef]:
    """Return the ``store.sqlite`` steps of every pipeline, one per database file."""
    found: dict[Path, StoreRef] = {}
    for pipeline, steps in config.pipelines.items():
        for spec in steps:
            if spec.use != "store.sqlite":
                continue
            path = config.resolve(str(spec.options.path))  # type: ignore[attr-defined]
            where = f"pipelines.{pipeline}.processors[{spec.index}]"
            found.setdefault(path.resolve(), StoreRef(where, spec.step, path))
    return list(found.values())


def pick_store(config: Config, wanted: str | None = None) -> StoreRef:
    """Return the store to read: the only one, or the one ``wanted`` names.

    ``wanted`` is a step name (``name = …`` in its table, else ``INDEX:store.sqlite``)
    or the database path (as written in the config, or resolved).

    :raises StoreChoiceError: none, several without ``wanted``, or no match; the
        message names the config keys to choose from.
    """
    stores = sqlite_stores(config)
    if not stores:
        raise StoreChoiceError(
            f"{config.path}: no pipeline has a store.sqlite step; search and show "
            "read the archive it writes"
        )
    listing = "; ".join(f"{s.where} (name {s.step!r}, path {s.path})" for s in stores)
    if wanted is None:
        if len(stores) == 1:
            return stores[0]
        raise StoreChoiceError(
            f"{config.path}: {len(stores)} store.sqlite steps: {listing}; "
            "choose one with --store NAME or --store PATH"
        )
    for store in stores:
        if (
            wanted == store.step
            or config.resolve(wanted).resolve() == store.path.resolve()
        ):
            return store
    raise StoreChoiceError(
        f"{config.path}: no store.sqlite step named {wanted!r}; the steps are: {listing}"
    )


def open_store(store: StoreRef) -> sqlite3.Connection:
    """Open ``store``'s database read-only (also in a read-only folder without its
    ``-shm`` file: :func:`mailpipe.readonly.connect_read_only`).

    :raises MailpipeError: the file does not exist (nothing stored yet), is not a
        store.sqlite database, or predates the FTS5 index (a run migrates it).
    """
    if not store.path.is_file():
        raise MailpipeError(
            f"{store.where}: {store.path} does not exist (nothing stored yet?)"
        )
    try:
        conn = connect_read_only(store.path)
    except ReadOnlyOpenError as exc:
        raise MailpipeError(f"{store.where}: {exc}") from exc
    try:
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    except sqlite3.Error as exc:
        conn.close()
        raise MailpipeError(f"{store.where}: cannot read {store.path}: {exc}") from exc
    version = int(row[0] or 0)
    if version < FTS_VERSION:
        conn.close()
        raise MailpipeError(
            f"{store.where}: {store.path} has schema version {version}, without the "
            "search index; the next `mailpipe run` migrates it"
        )
    return conn


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """Parse ``--since``: a date (``2025-03-01``), an ISO 8601 time (UTC unless it
    has an offset) or an age (``90m``, ``36h``, ``7d``, ``2w``) back from ``now``.

    :raises ValueError: none of these.
    """
    age = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", value)
    if age:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 604800}[age.group(2)]
        return (now or datetime.now(UTC)) - timedelta(
            seconds=float(age.group(1)) * unit
        )
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"--since {value!r}: expected a date (2025-03-01), a time "
            "(2025-03-01T09:00) or an age (90m, 36h, 7d, 2w)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _phrases(query: str) -> str:
    """Quote each word of ``query`` as an FTS5 phrase (its own syntax switched off)."""
    words = (w.replace('"', "") for w in query.split())
    return " ".join(f'"{word}"' for word in words if word) or '""'



def search(
    conn: sqlite3.Connection,
    query: str = "",
    *,
    sender: str | None = None,
    since: datetime | None = None,
    mailbox: str | None = None,
    tags: tuple[str, ...] = (),
    limit: int = 50,
) -> list[Hit]:
    """Return up to ``limit`` messages matching ``query`` and every filter.

    With a query, best matches first (FTS5 rank); without one, newest first. An empty
    query with no filter lists the newest messages.
    """
    where: list[str] = []
    params: list[Any] = []
    if sender:
        where.append(
            "EXISTS (SELECT 1 FROM json_each(m.from_addresses) AS a WHERE "
            "instr(lower(coalesce(json_extract(a.value, '$.address'), '') || ' ' || "
            "coalesce(json_extract(a.value, '$.name'), '')), lower(?)) > 0)"
        )
        params.append(sender)
    if since is not None:
        where.append("coalesce(m.date, m.stored_at) >= ?")
        params.append(since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    if mailbox:
        where.append("m.mailbox = ?")
        params.append(mailbox)
    for tag in tags:
        where.append("EXISTS (SELECT 1 FROM tags t WHERE t.key = m.key AND t.tag = ?)")
        params.append(tag)
    select = (
        "SELECT m.key, m.mailbox, m.uid, m.date, m.from_addresses, m.subject, m.size, "
        "(SELECT json_group_array(tag) FROM (SELECT tag FROM tags t "
        "WHERE t.key = m.key ORDER BY tag)), "
        "(SELECT count(*) FROM attachments x WHERE x.key = m.key) FROM messages m "
    )
    filters = " AND ".join(where)
    if not query.strip():
        sql = select + (f"WHERE {filters} " if filters else "")
        rows = conn.execute(
            sql + "ORDER BY coalesce(m.date, m.stored_at) DESC, m.id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_hit(r) for r in rows]
    sql = (
        select + "JOIN messages_fts ON messages_fts.rowid = m.id "
        "WHERE messages_fts MATCH ? "
        + (f"AND {filters} " if filters else "")
        + "ORDER BY messages_fts.rank LIMIT ?"
    )
    try:
        rows = conn.execute(sql, (query, *params, limit)).fetchall()
    except sqlite3.OperationalError:
        # Anything FTS5 cannot parse ("O"Brien", a lone "*", "a@b", "from:x") is
        # searched again as plain words, with FTS5's own syntax switched off.
        rows = conn.execute(sql, (_phrases(query), *params, limit)).fetchall()
    return [_hit(r) for r in rows]


def _first_sender(addresses: str) -> str:
    items = json.loads(addresses or "[]")
    if not items:
        return ""
    first = items[0]
    name, address = first.get("name") or "", first.get("address") or ""
    return f"{name} <{address}>" if name and address else name or address


def _hit(row: tuple[Any, ...]) -> Hit:
    return Hit(
        key=row[0],
        mailbox=row[1],
        uid=row[2],
        date=row[3],
        sender=_first_sender(row[4]),
        subject=row[5],
        size=int(row[6]),
        tags=list(json.loads(row[7])),
        attachments=int(row[8]),
    )


def show(
    conn: sqlite3.Connection, key: str, *, blob_dirs: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """Return the record of ``key`` (or of the one key starting with it).

    The result is the stored record document with ``text`` (the plain-text body),
    ``tags`` and ``attachments`` (the rows of the attachments table, each with
    ``file``: its blob under the first of ``blob_dirs`` that has it, else None).

    :raises KeyLookupError: no record, or several, match ``key``.
    """
    rows = conn.execute(
        "SELECT key, record, text FROM messages WHERE key >= ? AND key < ? LIMIT 2",
        (key, key + "\uffff"),
    ).fetchall()
    if not rows:
        raise KeyLookupError(f"no stored message with key {key!r}")
    if len(rows) > 1:
        raise KeyLookupError(f"key {key!r} is ambiguous: give more of it")
    full, record, text = rows[0]
    doc: dict[str, Any] = json.loads(record)
    doc["key"] = full
    doc["text"] = text
    doc["tags"] = [
        t
        for (t,) in conn.execute(
            "SELECT tag FROM tags WHERE key = ? ORDER BY tag", (full,)
        )
    ]
    columns = (
        "idx",
        "filename",
        "content_type",
        "disposition",
        "size",
        "sha256",
        "content_id",
        "inline",
        "part",
    )
    attachments = []
    for row in conn.execute(
        f"SELECT {', '.join(columns)} FROM attachments WHERE key = ? ORDER BY idx",
        (full,),
    ):
        item = dict(zip(columns, row, strict=True))
        item["inline"] = bool(item["inline"])
        item["file"] = _blob(item["sha256"], blob_dirs)
        attachments.append(item)
    doc["attachments"] = attachments
    return doc


def blob_dirs(config: Config) -> tuple[Path, ...]:
    """Return the folders of every ``store.attachments`` step (where blobs live)."""
    return tuple(
        config.resolve(str(spec.options.dir))  # type: ignore[attr-defined]
        for steps in config.pipelines.values()
        for spec in steps
        if spec.use == "store.attachments"
    )


def _blob(sha256: str, dirs: tuple[Path, ...]) -> str | None:
    # store.attachments keeps each decoded attachment once, as <dir>/<sha[:2]>/<sha>.
    for folder in dirs:
        path = folder / sha256[:2] / sha256
        if sha256 and path.is_file():
            return str(path)
    return None
