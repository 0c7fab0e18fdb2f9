"""store.jsonl: one JSON object per message, appended with fsync, rotated by size/day.

Each line is the message's ``mailpipe.message/1`` document (:mod:`mailpipe.document`,
described field by field in ``docs/message-document.md``) with ``stored_at``: UTF-8,
compact, ``\\n``-terminated, ``"key"`` always first. ``exclude`` drops record fields
(e.g. ``html``, ``headers``), never the envelope.

Idempotency guarantee: before appending, under an exclusive ``flock`` on the active
file, the key is looked up in the keys of the active file and of the newest rotated file
(scanned when the processor opens; whenever another writer appended, only its new
lines are read, and when another writer rotated the file, the lines it added before
rotating are read from the rotated file), plus every key this process wrote. A re-run
of a message whose line sits in one of those files writes nothing, whichever process
wrote it. Rotation happens only when a new line is about to be appended,
after that lookup, so the line of the last committed message is always found after a
crash; only a key older than one full rotation could be written twice.

A line whose write was interrupted (no final ``\\n``) was never acknowledged: the next
writer truncates it under the lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.document import ENVELOPE, STORED_AT, encode, message_document
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.units import ByteSize

from ._fs import classify_os_error, fsync_dir, make_dirs

log = structlog.get_logger()

_KEY_PREFIX = re.compile(rb'^\{"key":"([0-9a-f]{32})"')
_MAX_REOPEN = 10


def encode_line(doc: dict[str, Any]) -> bytes:
    """Serialise ``doc`` as one compact JSON line (:func:`mailpipe.document.encode`)."""
    return encode(doc) + b"\n"


def scan_keys(path: Path, start: int = 0) -> set[str]:
    """Return the keys of the complete lines of ``path`` from offset ``start``."""
    keys: set[str] = set()
    try:
        with path.open("rb") as f:
            f.seek(start)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                m = _KEY_PREFIX.match(line)
                if m:
                    keys.add(m.group(1).decode())
    except FileNotFoundError:
        pass
    return keys


def _end_of_last_line(fd: int, size: int) -> int:
    """Return the offset just after the last ``\\n`` of the file (0 when none)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        chunk = os.pread(fd, end - start, start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


class JsonlOptions(BaseModel):
    """Options of ``store.jsonl``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: Path = Field(
        description="The active JSONL file; rotated files sit beside it as "
        "<stem>.<YYYY-MM-DD>[.<n>]<suffix>."
    )
    rotate_size: ByteSize | None = Field(
        default=None,
        description="Rotate before a line would make the active file bigger than this.",
    )
    rotate_daily: bool = Field(
        strict=True,
        default=False,
        description="Rotate on the first append of a new UTC day.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Record fields left out of each line, e.g. ['html', 'headers'].",
    )

    @field_validator("exclude")
    @classmethod
    def _keep_envelope(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) & {*ENVELOPE, STORED_AT, "raw"})
        if bad:
            raise ValueError(f"cannot exclude {', '.join(bad)}: they identify the line")
        return value


class JsonlStore:
    """Append each message's JSON document to a JSONL file, durably and once.

    Idempotent by ``message.key`` (see the module docstring for the exact guarantee).
    ``process`` returns after the line is fsynced (and the directory, when the file was
    created). Disk errors raise TemporaryFailure; encoding problems PermanentFailure.
    """

    name: ClassVar[str] = "store.jsonl"
    Options: ClassVar[type[BaseModel]] = JsonlOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: JsonlOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.path = context.resolve(options.path)
        self._exclude = frozenset(options.exclude)
        self._keys: set[str] = set()
        self._seen: tuple[int, int] | None = None  # (inode, size) after our last look
        self._opened = False
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> None:
        """Load the keys of the active file and the newest rotated file."""
        if self._opened:
            return
        newest = self._newest_rotated()
        if newest is not None:
            self._keys |= scan_keys(newest)
        self._opened = True

    def close(self) -> None:
        """Nothing to release: each append opens and closes the file."""

    # -- rotation --------------------------------------------------------------------
    def _rotated_glob(self) -> str:
        return f"{self.path.stem}.????-??-??*{self.path.suffix}"

    def _newest_rotated(self) -> Path | None:
        try:
            pattern = self._rotated_glob()
            found = [p for p in self.path.parent.glob(pattern) if p.is_file()]
        except OSError:
            return None
        return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)

    def _rotated_name(self, day: str) -> Path:
        stem, suffix = self.path.stem, self.path.suffix
        candidate = self.path.with_name(f"{stem}.{day}{suffix}")
        n = 1
        while candidate.exists():  # bounded by the number of rotations that day
            candidate = self.path.with_name(f"{stem}.{day}.{n}{suffix}")
            n += 1
        return candidate

    def _should_rotate(self, st: os.stat_result, incoming: int) -> bool:
        if st.st_size == 0:
            return False
        limit = self.options.rotate_size
        if limit is not None and st.st_size + incoming > limit:
            return True
        if self.options.rotate_daily:
            last = datetime.fromtimestamp(st.st_mtime, UTC).date()
            if last != datetime.now(UTC).date():
                return True
        return False

    # -- appending -------------------------------------------------------------------
    def _open_locked(self) -> int:
        """Open the active file to append, holding ``flock``; reopen if rotated."""
        make_dirs(self.path.parent)
        for _ in range(_MAX_REOPEN):
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # another writer rotated the file under us
        raise OSError(11, "the JSONL file keeps being rotated")  # EAGAIN: temporary

    def _refresh(self, fd: int) -> os.stat_result:
        """Bring the key set up to date with the file; truncate a torn last line."""
        st = os.fstat(fd)
        if self._seen is not None and self._seen[0] != st.st_ino:
            self._catch_up_rotated(*self._seen)
        if self._seen != (st.st_ino, st.st_size):
            start = 0
            if self._seen is not None and self._seen[0] == st.st_ino:
                start = self._seen[1] if st.st_size >= self._seen[1] else 0
            self._keys |= scan_keys(self.path, start)
            if st.st_size:
                cut = _end_of_last_line(fd, st.st_size)
                if cut != st.st_size:
                    os.ftruncate(fd, cut)
                    os.fsync(fd)
                    log.warning("jsonl_torn_line_truncated", path=str(self.path),
                                octets=st.st_size - cut)
                    st = os.fstat(fd)
        return st

    def _catch_up_rotated(self, inode: int, seen: int) -> None:
        """Read the lines another process appended to the file we last saw (inode
        ``inode``, ``seen`` octets) before it rotated it away."""
        try:
            for path in self.path.parent.glob(self._rotated_glob()):
                if path.stat().st_ino == inode:
                    self._keys |= scan_keys(path, seen)
                    return
        except OSError:
            return

    def process(self, message: Message) -> None:
        """Append the message's line unless its key is already stored."""
        key = message.key
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=key)
            return
        with self._lock:
            self.open()
            if key in self._keys:
                log.info("store_already_committed", store=self.name, key=key)
                return
            doc = message_document(
                message, exclude=self._exclude, stored_at=datetime.now(UTC)
            )
            line = encode_line(doc)
            try:
                self._append(key, line)
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    def _append(self, key: str, line: bytes) -> None:
        fd = self._open_locked()
        try:
            st = self._refresh(fd)
            if key in self._keys:
                log.info("store_already_committed", store=self.name, key=key)
                self._seen = (st.st_ino, st.st_size)
                return
            if self._should_rotate(st, len(line)):
                day = datetime.fromtimestamp(st.st_mtime, UTC).date().isoformat()
                target = self._rotated_name(day)
                os.rename(self.path, target)
                fsync_dir(self.path.parent)
                log.info("jsonl_rotated", path=str(self.path), rotated=str(target))
                os.close(fd)
                fd = self._open_locked()
                st = self._refresh(fd)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, st.st_size)  # never leave half a line behind
                raise
            if st.st_size == 0:
                fsync_dir(self.path.parent)  # the file is new: make its entry durable
            self._keys.add(key)
            self._seen = (st.st_ino, st.st_size + len(line))
        finally:
            os.close(fd)
        log.debug("message_stored", store=self.name, key=key, octets=len(line))


PROCESSORS = [JsonlStore]
