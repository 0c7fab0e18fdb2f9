"""store.mbox: append messages to an mboxrd file under fcntl and dot-lock locks, once.

Each entry is written as::

    From <envelope sender> <asctime UTC>\\n
    X-Mailpipe-Key: <32 hex>\\n
    X-Mailpipe-Octets: <n>\\n
    <the message, CRLF → LF, every line matching ^>*From  prefixed with '>'>\\n
    \\n

``n`` counts the octets of the quoted message (from the line after ``X-Mailpipe-Octets``
to its final ``\\n``, the blank separator excluded). mboxrd quoting is reversible:
:func:`unquote` removes one ``>`` from each ``^>+From `` line.

Idempotency guarantee, across processes: under both locks, before appending, the keys
of the file are looked up (the file is scanned on first use; when another process has
appended since our last look, only what it appended is read, and the whole file again
when it was rewritten or shrank). An entry counts as stored when its ``X-Mailpipe-Key`` line is
present and, for the last entry of the file, when it is complete (``n`` octets follow).
A re-run of a message whose entry is stored appends nothing. An incomplete last entry
left by a crash is cut off when it is a prefix of what the re-run would write (it can
only be our own torn write); otherwise it is left as is and the file continues after a
blank line. Deleting the entry from the mbox makes a later re-run append it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.units import Duration

from ._fs import classify_os_error, fsync_dir, make_dirs

log = structlog.get_logger()

KEY_HEADER = b"X-Mailpipe-Key: "
OCTETS_HEADER = b"X-Mailpipe-Octets: "
_FROM_QUOTED = re.compile(rb"^(>*From )", re.MULTILINE)
_FROM_UNQUOTE = re.compile(rb"^>(>*From )", re.MULTILINE)
_LOCK_POLL = 0.05


def quote(raw: bytes) -> bytes:
    """Return ``raw`` as an mboxrd entry body: LF line ends, ``>`` added, final LF."""
    data = raw.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    return _FROM_QUOTED.sub(rb">\1", data)


def unquote(body: bytes) -> bytes:
    """Reverse :func:`quote`'s ``>`` quoting (line ends stay LF)."""
    return _FROM_UNQUOTE.sub(rb"\1", body)


def _envelope_sender(message: Message) -> str:
    value = message.header("Return-Path") or message.header("From") or ""
    addr = parseaddr(value)[1]
    if not addr or any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in addr):
        return "MAILER-DAEMON"
    return addr


def entry_bytes(message: Message) -> tuple[bytes, bytes]:
    """Return (From_ line, rest of the entry) for ``message`` (see the module doc)."""
    body = quote(message.raw)
    from_line = (
        f"From {_envelope_sender(message)} {time.asctime(time.gmtime())}\n".encode()
    )
    rest = b"".join(
        [
            KEY_HEADER, message.key.encode(), b"\n",
            OCTETS_HEADER, str(len(body)).encode(), b"\n",
            body, b"\n",
        ]
    )
    return from_line, rest


@dataclass(slots=True)
class _Entry:
    start: int
    key: str | None = None
    octets: int | None = None
    header_end: int = 0  # offset just after the X-Mailpipe-Octets line


def scan(path: Path, start: int = 0) -> tuple[list[_Entry], int]:
    """Return the entries of the mbox at ``path`` from offset ``start`` (an entry's
    first octet, or the end of the file) and the file's size."""
    entries: list[_Entry] = []
    offset = start
    in_headers = False
    with path.open("rb") as f:
        f.seek(start)
        for line in f:
            if line.startswith(b"From "):
                entries.append(_Entry(start=offset))
                in_headers = True
            elif in_headers:
                if line in (b"\n", b"\r\n"):
                    in_headers = False
                elif line.startswith(KEY_HEADER):
                    value = line[len(KEY_HEADER):].strip()
                    entries[-1].key = value.decode("ascii", "replace")
                elif line.startswith(OCTETS_HEADER):
                    with contextlib.suppress(ValueError):
                        entries[-1].octets = int(line[len(OCTETS_HEADER):].strip())
                        entries[-1].header_end = offset + len(line)
            offset += len(line)
    return entries, offset


def read_entries(path: Path) -> Iterator[tuple[str | None, bytes]]:
    """Yield (key, message bytes unquoted, without our two headers) for each entry."""
    data = path.read_bytes()
    starts = [m.start() for m in re.finditer(rb"^From ", data, re.MULTILINE)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        chunk = data[start:end]
        chunk = chunk[chunk.index(b"\n") + 1:]  # the From_ line
        key = None
        if chunk.startswith(KEY_HEADER):
            line, chunk = chunk.split(b"\n", 1)
            key = line[len(KEY_HEADER):].decode()
            if chunk.startswith(OCTETS_HEADER):
                chunk = chunk.split(b"\n", 1)[1]
        if chunk.endswith(b"\n\n"):
            chunk = chunk[:-1]  # the blank separator line
        yield key, unquote(chunk)


def _dead_holder(lock: Path) -> bool:
    """Whether ``lock`` names a process of this host that no longer exists (a worker
    killed while holding it). Only called with the fcntl lock held, so the holder is
    not a live mailpipe writer; a lock without a readable pid is never judged dead."""
    try:
        lines = lock.read_text("ascii").split()
    except (OSError, UnicodeDecodeError):
        return False
    if not lines or not lines[0].isdigit():
        return False
    if len(lines) > 1 and lines[1] != socket.gethostname():
        return False  # another host's process: its liveness is unknown here
    try:
        os.kill(int(lines[0]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


def _separator(tail: bytes) -> bytes:
    """What to write before a From_ line after ``tail`` (the file's last 2 octets)."""
    # mbox: a From_ line starts a line and follows a blank line.
    if tail.endswith(b"\n\n") or not tail:
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


class MboxOptions(BaseModel):
    """Options of ``store.mbox``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: Path = Field(description="The mbox file (mboxrd); created when missing.")
    lock_timeout: Duration = Field(
        default=30.0,
        description="How long to wait for the fcntl lock and the dot-lock; "
        "then the message is retried later.",
    )
    dotlock: bool = Field(
        strict=True,
        default=True, description="Also take <path>.lock, as mail readers expect."
    )
    stale_dotlock: Duration = Field(
        default=600.0,
        description="Remove a dot-lock older than this (its owner died). A dot-lock "
        "naming a process of this host that no longer exists is removed at once.",
    )


class MboxStore:
    """Append each message to an mboxrd file, durably and once per key.

    ``process`` returns after the entry is written and fsynced under both an fcntl
    (``lockf``) lock and a ``<path>.lock`` dot-lock. A failed write is truncated away
    before the locks are released. Lock timeouts and disk errors raise
    TemporaryFailure. See the module docstring for the idempotency guarantee.
    """

    name: ClassVar[str] = "store.mbox"
    Options: ClassVar[type[BaseModel]] = MboxOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: MboxOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.path = context.resolve(options.path)
        self._keys: set[str] = set()
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime_ns)
        self._last: _Entry | None = None  # the last entry, if incomplete
        self._lock = threading.Lock()

    def close(self) -> None:
        """Forget the key index (the next append scans the file again)."""
        with self._lock:
            self._seen = None
            self._keys.clear()

    def process(self, message: Message) -> None:
        """Append the message unless an entry with its key is stored."""
        key = message.key
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=key)
            return
        from_line, rest = entry_bytes(message)
        with self._lock:
            try:
                self._append(key, from_line, rest)
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    # -- locking ---------------------------------------------------------------------
    def _open_locked(self, deadline: float) -> int:
        make_dirs(self.path.parent)
        while True:
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o600)
            try:
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() > deadline:
                            raise TemporaryFailure(
                                f"{self.name}: {self.path} is locked by another program"
                            ) from exc
                        time.sleep(_LOCK_POLL)
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # replaced while we waited: lock the new file

    def _dotlock(self, deadline: float) -> Path | None:
        lock = self.path.with_name(self.path.name + ".lock")
        tmp = self.path.with_name(
            f"{self.path.name}.lock.{socket.gethostname()}.{os.getpid()}."
            f"{secrets.token_hex(4)}"
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS):
                return None  # no write access to the folder: fcntl alone protects us
            raise
        try:
            # The holder, as liblockfile writes it (its pid), plus our host name.
            os.write(fd, f"{os.getpid()}\n{socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
        try:
            while True:
                try:
                    os.link(tmp, lock)
                    return lock
                except FileExistsError:
                    try:
                        age = time.time() - os.stat(lock).st_mtime
                    except FileNotFoundError:
                        continue
                    dead = _dead_holder(lock)
                    if dead or age > self.options.stale_dotlock:
                        log.warning("mbox_stale_dotlock_removed", path=str(lock),
                                    reason="holder dead" if dead else "too old")
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(lock)
                        continue
                    if time.monotonic() > deadline:
                        raise TemporaryFailure(
                            f"{self.name}: {lock} is held by another program"
                        ) from None
                    time.sleep(_LOCK_POLL)
        finally:
            os.unlink(tmp)

    # -- appending -------------------------------------------------------------------
    def _refresh(self, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if self._seen == (st.st_ino, st.st_size, st.st_mtime_ns):
            return st
        # Another process appended since our last look: read only what it added when
        # the file grew from an entry boundary we saw (an O(appended) catch-up, not a
        # rescan per message); anything else (a reader rewrote or shrank it, a torn
        # last entry) is read whole again.
        start = 0
        if (
            self._seen is not None
            and self._last is None
            and self._seen[0] == st.st_ino
            and st.st_size >= self._seen[1]
            and os.pread(fd, 5, self._seen[1]) in (b"From ", b"")
        ):
            start = self._seen[1]
        entries, size = scan(self.path, start)
        if start == 0:
            self._keys = set()
        self._last = None
        for i, e in enumerate(entries):
            if e.key is None:
                continue
            last = i == len(entries) - 1
            end = e.header_end + (e.octets or 0) + 1
            if last and e.octets is not None and end > size:
                self._last = e  # torn: not stored
                continue
            self._keys.add(e.key)
        return st

    def _append(self, key: str, from_line: bytes, rest: bytes) -> None:
        deadline = time.monotonic() + self.options.lock_timeout
        fd = self._open_locked(deadline)
        lock: Path | None = None
        try:
            lock = self._dotlock(deadline) if self.options.dotlock else None
            st = self._refresh(fd)
            if key in self._keys:
                log.info("store_already_committed", store=self.name, key=key)
                self._seen = (st.st_ino, st.st_size, st.st_mtime_ns)
                return
            size = st.st_size
            torn = self._last
            if torn is not None and torn.key == key:
                head = os.pread(fd, 4096, torn.start)
                from_end = torn.start + head.find(b"\n") + 1
                have = os.pread(fd, size - from_end, from_end)
                if from_end > torn.start and rest.startswith(have):
                    os.ftruncate(fd, torn.start)  # our own torn write of this message
                    log.warning(
                        "mbox_torn_entry_removed", key=key, octets=size - torn.start
                    )
                    size = torn.start
            pad = _separator(os.pread(fd, 2, max(0, size - 2)) if size else b"\n\n")
            data = pad + from_line + rest
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
            if size == 0:
                fsync_dir(self.path.parent)
            self._keys.add(key)
            self._last = None
            st = os.fstat(fd)
            self._seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        finally:
            if lock is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
            os.close(fd)  # closing releases the lockf lock
        log.debug("message_stored", store=self.name, key=key, octets=len(data))


PROCESSORS = [MboxStore]
