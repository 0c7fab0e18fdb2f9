"""store.sqlite's writes as programs: run in the step's thread or in a writer process.

A *program* is one transaction's statements, built by ``_sqlite_rows._program`` from
prepared rows: a list of operations, each a tuple of plain values (so it pickles):

- ``("execute", sql, params)`` and ``("executemany", sql, rows)``;
- ``("raw_file", key, path, size)``: insert ``key``'s raw bytes from the file at
  ``path`` (a spooled message) in bounded memory: the row with ``zeroblob(size)``, then
  filled in 1 MiB pieces through incremental blob I/O.

:func:`run_program` executes one in a ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction
(rolled back on any error: nothing of a failed program is stored). :func:`serve` is the
loop of the writer process (``python -I -S`` this file, see
:mod:`._sqlite_writer`): it reads framed requests ``(seq, program)`` from stdin, runs
each in order on its own connection and answers ``(seq, error)``, where ``error`` is
``None`` once the transaction has committed (``synchronous=FULL``: durable) or a
description of what failed (:func:`describe`, rebuilt by ``_sqlite_writer.rebuild``).

Contract: this module imports the standard library only (the writer process starts
without mailpipe's imports; issue 18), and it holds the one definition of the store's
connection settings (:func:`open_connection`) and of the raw bytes' piecewise copy
(:func:`copy_into`).
"""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

#: One operation of a program (see the module docstring).
Op = tuple[Any, ...]

#: A frame: 8-byte little-endian length, then that many octets of pickle.
_HEADER: Final = struct.Struct("<Q")
_RAW_CHUNK: Final = 1 << 20


def open_connection(path: Path | str, *, timeout: float = 30.0) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode with WAL, synchronous=FULL, foreign keys and
    temporary storage in memory."""
    conn = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Statement journals (the FTS triggers make each upsert of a group commit keep
    # one) stay in memory instead of spilling to temporary files: they only undo a
    # statement, never serve crash recovery (the WAL does), so durability is the same.
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def copy_into(dst: sqlite3.Blob, src: sqlite3.Blob | BinaryIO) -> None:
    """Copy ``src`` to ``dst`` in 1 MiB pieces (``dst`` already has the right size)."""
    for chunk in iter(lambda: src.read(_RAW_CHUNK), b""):
        dst.write(chunk)


def run_ops(conn: sqlite3.Connection, program: Sequence[Op]) -> None:
    """Execute ``program``'s operations in the caller's transaction."""
    for op in program:
        kind = op[0]
        if kind == "executemany":
            conn.executemany(op[1], op[2])
        elif kind == "execute":
            conn.execute(op[1], op[2])
        elif kind == "raw_file":
            _, key, path, size = op
            rowid = conn.execute(
                "INSERT INTO message_raw (key, raw) VALUES (?, zeroblob(?))", (key, size)
            ).lastrowid
            assert rowid is not None
            with conn.blobopen("message_raw", "raw", rowid) as blob, open(path, "rb") as f:
                copy_into(blob, f)
        else:
            raise ValueError(f"unknown operation {kind!r}")


def run_program(conn: sqlite3.Connection, program: Sequence[Op]) -> None:
    """Run ``program`` as one write transaction: committed (durable at
    ``synchronous=FULL``) when this returns, nothing of it stored when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        run_ops(conn, program)
    except BaseException:
        # (see _sqlite_schema._migrate: never hide the cause)
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def describe(exc: BaseException) -> tuple[str, str, str, str | None, int | None]:
    """What the parent needs to rebuild ``exc``: its module and class names, its text
    and SQLite's error name and code (when it has them)."""
    return (
        type(exc).__module__,
        type(exc).__name__,
        str(exc),
        getattr(exc, "sqlite_errorname", None),
        getattr(exc, "sqlite_errorcode", None),
    )


def frame(value: object) -> tuple[bytes, bytes]:
    """``value`` as one frame: its length header and its pickle."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)), data


def write_frame(out: IO[bytes], value: object) -> None:
    """Write ``value`` as one frame (:func:`frame`)."""
    for part in frame(value):
        out.write(part)


def _read_exactly(inp: IO[bytes], size: int) -> bytes | None:
    parts = []
    while size:
        part = inp.read(size)  # (a raw pipe returns what is there)
        if not part:
            return None
        parts.append(part)
        size -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_frame(inp: IO[bytes]) -> Any:
    """The next frame's value; ``None`` at the end of the stream (a frame cut short
    by the writer's death counts as the end: its program is never run)."""
    header = _read_exactly(inp, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read_exactly(inp, size) if size else b""
    if data is None:
        return None
    return pickle.loads(data)  # noqa: S301 (our own parent's frames, on our own pipe)


def serve(path: str, timeout: float, inp: IO[bytes], out: IO[bytes]) -> None:
    """The writer process's loop: run each request's program in order and answer it;
    return at the end of ``inp`` (the parent closed it, or died) or when the answer
    finds the parent gone. A request read in full is run to its end (committed or
    rolled back) before the next is read."""
    conn: sqlite3.Connection | None = None
    try:
        while (request := read_frame(inp)) is not None:
            seq, program = request
            error: tuple[str, str, str, str | None, int | None] | None = None
            try:
                if conn is None:
                    conn = open_connection(path, timeout=timeout)
                run_program(conn, program)
            except Exception as exc:
                error = describe(exc)
            try:
                write_frame(out, (seq, error))
                out.flush()
            except BrokenPipeError:
                return  # the parent is gone: nobody to answer (and nothing to say)
    finally:
        if conn is not None:
            conn.close()


def main(argv: Sequence[str]) -> int:
    """``python -I -S _sqlite_writes.py PATH BUSY_TIMEOUT``: serve stdin/stdout."""
    # The parent decides when the writer ends (it closes the pipe): Ctrl-C in a
    # terminal or a service manager's SIGTERM reaches the whole process group, and
    # the parent's graceful stop still flushes through this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path, timeout = argv[1], float(argv[2])
    serve(path, timeout, sys.stdin.buffer, sys.stdout.buffer)
    # An answer that found the parent gone is still in stdout's buffer: the exit's
    # flush would fail again, print "Exception ignored ... BrokenPipeError" on the
    # shared stderr and exit with status 120 (the recipe of the signal module's docs).
    # Every answer given is flushed, so this drops only one that nobody can read.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
