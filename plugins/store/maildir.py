"""store.maildir: deliver each message into a Maildir (tmp → fsync → new), once per key.

Where the system allows it, "tmp" is an unnamed ``O_TMPFILE`` file linked into new/ once
durable, so nothing is ever named in tmp/ (see ``MaildirStore.TMPFILE``). With group
commit, an in-memory message is written unnamed by ``process()`` itself and stays unnamed
(its marker locked) until the group's ``flush()`` makes the group's files durable, links
them into new/ and fsyncs new/ once: a file is never named in new/ before its content is
durable, so a crash leaves nothing half-written to be mistaken for a stored key. The
group's files are made durable by one ``syncfs(2)`` of the Maildir's file system where
syncfs reports write-back errors (Linux ≥ 5.8, ``sync = "auto"``, see ``_syncfs``), else
by an fsync of each file on writer threads (``sync = "file"``, or older systems).

File names are ``<sec>.M<usec>P<pid>.<key>.mailpipe,S=<size>``: the Maildir unique name
with the message key in place of the host name, and the Maildir++ ``S=`` size hint.
The time prefix matters: Dovecot numbers new messages in file-name time order, so
readers see arrival order. A reader that moves the file to ``cur/`` appends
``:2,<flags>``; the key stays in the name, so a re-run still recognises it.

Across processes (several workers, a worker that takes over a dead one's mailbox), each
key has a marker ``mailpipe-keys/<key>`` beside cur/new/tmp: a small file, ``flock``-ed
by the writer from before the message is named in new/ until after, holding the name the
message was given. A key is stored when its marker names a file present in new/ (or, once
a reader moved it, in cur/). The lookup is O(1) (open, lock, read one name, stat one
file); cur/ is listed only when a marker names a file that left new/. The directory has
no leading dot, so Maildir++ readers (Dovecot) do not take it for a folder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import LATER, ProcessorContext
from mailpipe.units import Duration

from . import _syncfs
from ._fs import classify_os_error, fsync_dir, make_dirs, write_all, write_fsync

log = structlog.get_logger()

#: The per-key markers' directory, beside cur/, new/ and tmp/ (see the module doc).
MARKERS = "mailpipe-keys"
_OURS = re.compile(r"^\d+\.M\d+P\d+\.([0-9a-f]{32})\.mailpipe,")
_LAST_STAMP = [0]
_STAMP_LOCK = threading.Lock()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import, before any writer thread exists
#: errno values that mean "no O_TMPFILE here" (or no /proc to link one through).
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


@dataclass(slots=True)
class _Staged:
    """A message written to an unnamed file, not yet fsynced nor named in new/."""

    key: str
    name: str
    fd: int  # the unnamed file (O_TMPFILE)
    marker: int  # the key's marker, flock-ed until the file is named in new/
    size: int


def file_name(key: str, size: int) -> str:
    """A new unique name for a message with ``key`` and ``size`` octets."""
    with _STAMP_LOCK:  # strictly increasing, so names also order messages by arrival
        now = max(time.time_ns() // 1000, _LAST_STAMP[0] + 1)
        _LAST_STAMP[0] = now
    sec, usec = divmod(now, 1_000_000)
    return f"{sec}.M{usec:06d}P{os.getpid()}.{key}.mailpipe,S={size}"


def key_of(name: str) -> str | None:
    """The message key in a file name written by this store, or None."""
    m = _OURS.match(name)
    return m.group(1) if m else None


class MaildirOptions(BaseModel):
    """Options of ``store.maildir``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    path: Path = Field(description="The Maildir root (holds cur/, new/ and tmp/).")
    folder: str | None = Field(
        default=None,
        description="A Maildir++ subfolder name (stored in <path>/.<folder>); "
        "dots separate levels, e.g. 'Archive.2024'.",
    )
    tmp_max_age: Duration = Field(
        default=36 * 3600.0,
        description="Remove mailpipe's own files left in tmp/ by a crash once they "
        "are this old (the Maildir convention is 36 hours).",
    )
    group_commit: bool = Field(
        strict=True,
        default=True,
        description="Make a group durable at flush (before any DELE) instead of "
        "before each process() returns: messages held in memory are written as "
        "unnamed files, made durable (see sync) and linked into new/ at flush (no "
        "file is named in new/ before its content is durable), and new/ is fsynced "
        "once per group; flush fails the group if one write failed.",
    )
    sync: Literal["auto", "file"] = Field(
        default="auto",
        description="How group commit makes a group's files durable before naming "
        "them in new/. 'auto': one syncfs() of the Maildir's file system per group "
        "(at most 128 files) where syncfs reports write-back errors (Linux 5.8 or "
        "later, on ext4, XFS, Btrfs or tmpfs: not overlayfs nor FUSE, 9p or NFS), "
        "else 'file'. 'file': one fsync per file, on writer threads; choose "
        "it when the Maildir shares its file system with a busy database or other "
        "heavy writers, whose dirty data a syncfs would also have to write.",
    )

    @field_validator("folder")
    @classmethod
    def _plain_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if (
            not value
            or "/" in value
            or "\\" in value
            or "\0" in value
            or value.startswith(".")
            or value.endswith(".")
            or ".." in value
        ):
            raise ValueError(
                "a folder name must be non-empty, without slashes or "
                "leading, trailing or double dots"
            )
        return value


def _chunks(message: Message) -> Iterator[bytes]:
    with message.open() as f:
        yield from iter(lambda: f.read(1 << 20), b"")


class MaildirStore:
    """Write each message to ``new/`` of a Maildir, durably and once per key.

    Delivery: the bytes go to an unnamed file on tmp/'s file system (``O_TMPFILE``; else
    ``tmp/<name>``), are fsynced, then linked (renamed) into ``new/``, by writer threads
    with group commit; ``new/`` is fsynced at ``flush()`` (group commit, the default; the engine flushes
    before any DELE) or, with ``group_commit = false``, before ``process`` returns. Idempotent by
    ``message.key``, across processes: keys found in ``new/`` and ``cur/`` when the
    store opens and keys this instance delivered are known stored; any other key is
    looked up in its marker (``mailpipe-keys/<key>``, see the module doc) under an
    exclusive ``flock`` held until the message is in new/, so a key another process
    delivered, or is delivering, is never written twice. A marker still locked after
    ``CLAIM_TIMEOUT`` (its writer is stopped) is a TemporaryFailure: the message stays
    on the server and is retried. With group commit the marker's lock is held from
    ``process()`` until the file is named in new/: by a writer thread once its batch
    (``BATCH`` staged files) is handed off, else at ``flush()``; so another process
    delivering the same key meanwhile waits up to ``CLAIM_TIMEOUT`` for it. A file
    left in ``tmp/`` by a crash is never moved to ``new/``; ``open`` removes it once
    ``tmp_max_age`` old.

    With ``sync = "auto"`` where syncfs reports write-back errors (Linux ≥ 5.8, tmp/
    on a file system that records them in its own superblock: see ``_syncfs``), the
    staged (unnamed) files are not fsynced one by one nor handed to writer threads: a group
    opens a descriptor on tmp/'s file system before its first write, and publishing
    it (at ``flush()``, or in ``process()`` once ``GROUP_FILES`` files or ``MAX_HELD``
    octets are staged) is one ``syncfs`` through that descriptor, then the links into
    new/ and the markers' release. A syncfs error names none of the group: each key
    is written inline next time and ``flush()`` fails, so nothing is acknowledged.
    Spooled messages, and systems without O_TMPFILE, keep the per-file fsync.
    """

    name: ClassVar[str] = "store.maildir"
    Options: ClassVar[type[BaseModel]] = MaildirOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: MaildirOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        root = context.resolve(options.path)
        self.root = root
        self.path = root / f".{options.folder}" if options.folder else root
        self._keys: set[str] | None = None
        self._lock = threading.Lock()
        self._unsynced = False  # renamed into new/ since the last directory fsync
        self._resync = False  # a key found stored elsewhere: sync cur/ at flush() too
        # Write-behind (group_commit): (key, write) in submission order, the octets
        # they hold, and keys whose background write failed (written inline next time,
        # so a persistent error reaches its own message and counts an attempt).
        self._writer: ThreadPoolExecutor | None = None
        self._writes: deque[tuple[str, int, Future[int]]] = deque()
        self._held = 0
        self._inline: set[str] = set()
        self._failure: Exception | None = None  # first failed write, until flush()
        self._anonymous: bool | None = None  # O_TMPFILE works here (None: not tried)
        self._dir_fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        # Written unnamed (O_TMPFILE), not yet fsynced nor linked: handed to a writer
        # thread BATCH at a time (fsync, link), all published by flush().
        self._staged: list[_Staged] = []
        self._staged_octets = 0
        self._publishing: deque[Future[list[tuple[str, Exception]]]] = deque()
        # sync = "auto" where syncfs reports write-back errors (decided at open):
        # the staged files of a group are made durable by one syncfs through
        # _group_fd, opened before the group's first write (the errseq sample).
        self._by_syncfs = False
        self._group_fd: int | None = None

    def open(self) -> None:
        """Create the Maildir if needed, list stored keys and clean stale tmp files."""
        if self.context.dry_run:
            return
        with self._lock:
            try:
                self._prepare()
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    def close(self) -> None:
        """Wait for background writes, then forget the key index (the next open lists
        the Maildir again). Writes not yet flushed are not durable: their messages
        stay on the server; a write that failed is still reported by the next
        ``flush()``, so no group sharing this instance is taken for durable."""
        with self._lock:
            self._settle(0, 0)  # a failure stays recorded: the next flush() raises it
            self._publish()
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self._forget_dirs()

    def _prepare(self) -> set[str]:
        if self._keys is not None:
            return self._keys
        for sub in ("cur", "new", "tmp", MARKERS):
            make_dirs(self.path / sub)
        if self.options.folder:
            marker = self.path / "maildirfolder"
            if not marker.exists():
                marker.touch()
        keys: set[str] = set()
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                key = key_of(entry.name)
                if key is not None:
                    keys.add(key)
        self._clean_tmp()
        self._by_syncfs = (
            self.options.sync == "auto"
            and _syncfs.available()
            and _syncfs.reports_errors_on(self.path / "tmp")
        )
        self._keys = keys
        return keys

    def _clean_tmp(self) -> None:
        cutoff = time.time() - self.options.tmp_max_age
        removed = 0
        for entry in os.scandir(self.path / "tmp"):
            if key_of(entry.name) is None:
                continue  # other delivery agents own their tmp files
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("maildir_tmp_cleaned", path=str(self.path), files=removed)

    def process(self, message: Message) -> None:
        """Deliver the message into ``new/`` unless its key is already stored."""
        key = message.key
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=key)
            return
        with self._lock:
            try:
                self._deliver(message, key)
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    def process_nowait(self, message: Message) -> object:
        """:meth:`process` on the event loop when it waits for nothing (issue 18): an
        in-memory message staged as an unnamed file of a syncfs group that it does not
        fill, its key's marker neither locked by another writer nor naming an earlier
        write, and not larger than NOWAIT_OCTETS. Anything else (no O_TMPFILE here, a
        dry run, a key met before, a spooled or large message) returns ``LATER`` having
        written nothing (the key's marker file may exist, empty, as ``process`` would
        make it), and :meth:`process` runs on the step's thread."""
        data = message.data
        if (
            data is None
            or self.context.dry_run
            or not self.options.group_commit
            or len(data) > self.NOWAIT_OCTETS
        ):
            return LATER
        key = message.key
        if not self._lock.acquire(blocking=False):  # (a close() or process() running)
            return LATER
        try:
            # The store's state is read under its lock: a close() (process() opens the
            # store again) or a call abandoned on a thread may change it.
            if (
                self._keys is None
                or not self._by_syncfs
                or key in self._keys
                or key in self._inline
                or len(self._staged) + 1 >= self.GROUP_FILES
                or self._staged_octets + len(data) >= self.MAX_HELD
            ):
                return LATER
            try:
                marker = self._claim_nowait(key)
                if marker is None:
                    return LATER
                try:
                    staged = self._stage(key, file_name(key, message.size), data, marker)
                except BaseException:
                    os.close(marker)  # (an OSError closes it in _stage)
                    raise
                if not staged:
                    os.close(marker)  # (no O_TMPFILE after all: nothing written)
                    return LATER
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc
            self._unsynced = True  # durable at flush(), which precedes any DELE
            if key not in self._inline:  # (a failed staged write is not stored)
                self._keys.add(key)
        finally:
            self._lock.release()
        return None

    def _claim_nowait(self, key: str) -> int | None:
        """:meth:`_claim` without waiting: the key's marker locked and empty, or None
        (the marker closed) when another writer holds it or it names a write (stored,
        or stale: :meth:`_claim` on the thread decides)."""
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644,
                     dir_fd=self._dir_fd(MARKERS))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.pread(fd, 1, 0):
                os.close(fd)  # (releases the flock)
                return None
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def flush(self) -> None:
        """Wait for every background write, make the staged files durable (one
        syncfs, or an fsync each) and link them into ``new/``, then make the names in
        ``new/`` durable (one directory fsync per group).

        Raises the first write error (classified) when a write failed: the engine then
        deletes nothing of the group, and the failed keys are written inline next time.
        """
        with self._lock:
            self._settle(0, 0)
            self._publish()
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if not self._unsynced:
                return
            try:
                moved = self._moved_dir()
                if moved is not None:
                    # Files were named through a kept descriptor of a directory no
                    # longer at the path that fsync_dir syncs and a restart lists: not
                    # acknowledged; the next message lists the Maildir again.
                    self._forget_dirs()
                    raise TemporaryFailure(
                        f"{self.name}: {self.path / moved} was replaced while the store "
                        "was open; its messages are stored again in the new one"
                    )
                fsync_dir(self.path / "new")
                if self._resync:  # a key found stored may have been moved to cur/
                    fsync_dir(self.path / "cur")
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc
            self._unsynced = self._resync = False

    #: Write-behind bounds: process() waits for the oldest write beyond these.
    MAX_WRITES: ClassVar[int] = 256
    MAX_HELD: ClassVar[int] = 32 << 20
    #: Write in-memory messages as unnamed files linked into new/ (O_TMPFILE) where
    #: the system allows it; else through a named file in tmp/.
    TMPFILE: ClassVar[bool] = True
    #: The largest message process_nowait() writes on the event loop: a copy into
    #: the page cache costs about its size in time, and past the dirty limits the
    #: kernel makes the writer sleep (write-back throttling), which would stall every
    #: mailbox; a larger one is written on the step's thread, where the hand-over
    #: costs little beside the write.
    NOWAIT_OCTETS: ClassVar[int] = 1 << 20
    #: How long process() waits for another process's lock on a key's marker.
    CLAIM_TIMEOUT: ClassVar[float] = 5.0
    #: Writer threads: file creation and fsync wait in the kernel, and several
    #: writers overlap those waits (names are taken in arrival order at submit).
    WRITERS: ClassVar[int] = 8
    #: Staged files handed to a writer thread together (one hand-off per batch, so
    #: their fsyncs overlap the retrieval of the next messages), and batches in
    #: flight at most. These are the bound on unnamed files: fewer than BATCH
    #: staged plus MAX_BATCHES batches in flight, so under BATCH * (MAX_BATCHES + 1)
    #: unnamed files (160), each holding two descriptors (the file and its key's
    #: locked marker) until it is named; their octets are bounded by MAX_HELD
    #: (beyond it process() publishes what is staged).
    BATCH: ClassVar[int] = 32
    MAX_BATCHES: ClassVar[int] = 4
    #: With syncfs: staged files per group at most (published by process() when
    #: reached). Each holds two descriptors until named (the unnamed file, its key's
    #: locked marker), so 256 per store plus the group's own: under the 320 of the
    #: fsync path's bound above, a quarter of the usual RLIMIT_NOFILE of 1024. One
    #: store instance serves every mailbox of its pipeline, so concurrent mailboxes
    #: share this bound; each store.maildir step of each pipeline has its own. A
    #: syncfs costs about the same however many of the files it covers (one pass
    #: over the file system's dirty inodes, one journal commit or cache flush), so
    #: 128 costs 2,000 messages 16 syncfs calls instead of 2,000 fsyncs.
    GROUP_FILES: ClassVar[int] = 128

    def _settle(self, writes: int, held: int) -> None:
        """Wait for the oldest writes until at most ``writes`` writes holding ``held``
        octets are in flight (none: the staged files are published too); a failure
        forgets its key and is kept for flush()."""
        if writes == 0:
            self._publish()
        while self._writes and (len(self._writes) > writes or self._held > held):
            key, octets, fut = self._writes.popleft()
            self._held -= octets
            try:
                fut.result()
            except Exception as exc:
                self._write_failed(key, exc)

    def _write_failed(self, key: str, exc: Exception) -> None:
        """Forget ``key`` (written inline next time) and keep the first failure for
        flush()."""
        if self._keys is not None:
            self._keys.discard(key)
        self._inline.add(key)
        log.warning(
            "maildir_write_failed",
            store=self.name,
            key=key,
            error=f"{type(exc).__name__}: {exc}",
        )
        if self._failure is None:
            self._failure = (
                classify_os_error(exc, f"{self.name} {self.path}")
                if isinstance(exc, OSError)
                else exc
            )

    def _deliver(self, message: Message, key: str) -> None:
        keys = self._prepare()
        if key in keys or (marker := self._claim(key)) is None:
            # Found, but perhaps written by a process that died before its flush()
            # made the rename durable: this group's flush() syncs the folders too, so
            # the engine never acknowledges a message resting on an unsynced rename
            # (review of issue 16, M1).
            log.info("store_already_committed", store=self.name, key=key)
            keys.add(key)
            self._unsynced = self._resync = True
            return
        name = file_name(key, message.size)
        behind = self.options.group_commit and key not in self._inline
        try:
            if behind and message.data is not None and self._stage(
                key, name, message.data, marker
            ):
                pass  # fsynced and linked into new/ by flush()
            elif behind and message.data is not None:
                self._submit(key, name, message.data, marker)
            elif behind and message.spool_path is not None and self._link(message, name):
                self._submit(key, name, None, marker)  # zero-copy: the spool file
            else:
                owned, marker = marker, None  # _write_marked closes it
                size = self._write_marked(name, _chunks(message), owned)
                self._inline.discard(key)
                if not self.options.group_commit:
                    fsync_dir(self.path / "new")
                log.debug("message_stored", store=self.name, key=key, octets=size)
            marker = None  # the writer thread (or _publish) closes it
        finally:
            if marker is not None:
                os.close(marker)
        if self._staged_octets >= self.MAX_HELD:
            self._publish()  # bounded: octets held unnamed
        elif self._by_syncfs and len(self._staged) >= self.GROUP_FILES:
            self._publish()  # bounded: descriptors (GROUP_FILES)
        elif not self._by_syncfs and len(self._staged) >= self.BATCH:
            self._hand_off()  # bounded: descriptors (BATCH, MAX_BATCHES)
        if self.options.group_commit:
            self._unsynced = True  # durable at flush(), which precedes any DELE
        if key not in self._inline:  # (a failed staged write is not stored)
            keys.add(key)

    def _claim(self, key: str) -> int | None:
        """Lock the key's marker; None (the marker closed) when another process or
        an earlier run stored the key, else the locked marker's fd for the write."""
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644,
                     dir_fd=self._dir_fd(MARKERS))
        try:
            deadline = time.monotonic() + self.CLAIM_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TemporaryFailure(
                            f"{self.name}: key {key} is being delivered by another "
                            "process (its marker stays locked)"
                        ) from None
                    time.sleep(0.02)
            name = os.pread(fd, 512, 0).decode("ascii", "replace")
            if name and self._present(name):
                os.close(fd)
                return None
            if name:  # a write that never completed: the next one records its name
                os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _present(self, name: str) -> bool:
        """Whether the file named ``name`` is in new/ or, moved by a reader, in cur/."""
        if os.path.lexists(self.path / "new" / name):
            return True
        for entry in os.scandir(self.path / "cur"):  # only when it left new/
            if entry.name == name or entry.name.startswith(name + ":"):
                return True
        return False

    def _write_marked(
        self, name: str, chunks: Iterator[bytes] | list[bytes] | None, marker: int
    ) -> int:
        """Record ``name`` in the locked marker, write the message (``_write``), then
        release the marker. The name is recorded before the file appears in new/, so
        a marker naming a missing file is a write that never completed (re-done).
        Neither needs an fsync: a file that reached new/ without its marker after a
        power loss is found by the listing every process makes when it opens."""
        try:
            os.pwrite(marker, name.encode("ascii"), 0)  # empty since _claim
            return self._write(name, chunks)
        finally:
            os.close(marker)  # releases the flock

    def _link(self, message: Message, name: str) -> bool:
        """Hard-link a spooled message into tmp/ (no copy); False when the spool is on
        another file system or links are refused (the caller copies instead)."""
        assert message.spool_path is not None
        tmp = self.path / "tmp" / name
        try:
            os.link(message.spool_path, tmp)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                return False
            raise
        os.chmod(tmp, 0o644 & ~_UMASK)  # as a file written here would be
        return True

    def _write(
        self, name: str, chunks: Iterator[bytes] | list[bytes] | _Staged | None
    ) -> int:
        """tmp/<name> → fsync → new/<name>; with ``chunks`` None, tmp/<name> is a
        linked spool file that is only fsynced here; a staged unnamed file is
        fsynced and linked as new/<name> (the caller closes its descriptors)."""
        tmp, final = self.path / "tmp" / name, self.path / "new" / name
        if isinstance(chunks, _Staged):
            os.fsync(chunks.fd)
            self._link_staged(chunks)
            return chunks.size
        if chunks is None:
            try:
                fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                    size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            except BaseException:
                os.unlink(tmp)
                raise
        elif self.TMPFILE and self._anonymous is not False and isinstance(chunks, list):
            # (a list: the bytes can be written again through tmp/ if this fails)
            anonymous = self._write_anonymous(final, chunks)
            if anonymous is not None:
                return anonymous
            size = write_fsync(tmp, chunks)
        else:
            size = write_fsync(tmp, chunks)
        # Maildir: the file appears in new/ only once complete and fsynced; the name
        # is unique (time, pid), so a rename cannot replace another message.
        os.rename(tmp, final)
        return size

    def _write_anonymous(self, final: Path, chunks: list[bytes]) -> int | None:
        """Write an unnamed file on tmp/'s file system (O_TMPFILE), fsync it, then link
        it into new/ under its final name: complete and durable before it has any name,
        so a crash leaves nothing in tmp/, and creating it does not hold tmp/'s
        directory lock, so the writer threads allocate inodes in parallel. None when
        the system cannot (no O_TMPFILE, no /proc): the caller writes via tmp/ and this
        store stops trying."""
        unsupported = _NO_TMPFILE
        fd = self._open_unnamed(os.O_WRONLY)
        if fd is None:
            return None
        try:
            written = write_all(fd, chunks)
            os.fsync(fd)
            try:
                # linkat(AT_SYMLINK_FOLLOW) through /proc: AT_EMPTY_PATH needs a
                # capability; a dir fd makes Python call linkat instead of link.
                os.link(f"/proc/self/fd/{fd}", final, src_dir_fd=self._tmp_fd(),
                        follow_symlinks=True)
            except OSError as exc:
                if exc.errno in unsupported or exc.errno == errno.EXDEV:
                    self._anonymous = False
                    return None
                raise
        finally:
            os.close(fd)
        self._anonymous = True
        return written

    def _open_unnamed(self, mode: int) -> int | None:
        """A new unnamed file (O_TMPFILE) on tmp/'s file system, or None (and this
        store stops trying) when the system has none."""
        flag = getattr(os, "O_TMPFILE", 0)
        if not flag:
            self._anonymous = False
            return None
        try:
            return os.open(".", flag | mode | os.O_CLOEXEC, 0o644, dir_fd=self._tmp_fd())
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                self._anonymous = False
                return None
            raise

    def _moved_dir(self) -> str | None:
        """The kept subdirectory (see :meth:`_dir_fd`) that is no longer the one at its
        path (the Maildir moved or replaced while open), or None."""
        for sub, fd in list(self._dir_fds.items()):
            kept = os.fstat(fd)
            try:
                now = os.stat(self.path / sub)
            except FileNotFoundError:
                return sub
            if (kept.st_dev, kept.st_ino) != (now.st_dev, now.st_ino):
                return sub
        return None

    def _forget_dirs(self) -> None:
        """Close the kept descriptors and forget the key index: the next message opens
        the Maildir again at its path (:meth:`_prepare`)."""
        with self._fd_lock:
            for fd in self._dir_fds.values():
                os.close(fd)
            self._dir_fds.clear()
        self._keys = None

    def _tmp_fd(self) -> int:
        return self._dir_fd("tmp")

    def _dir_fd(self, sub: str) -> int:
        """A descriptor of the subdirectory ``sub`` (tmp, new, the markers'), opened
        once and kept until :meth:`close`: names are resolved from it, not from the
        root's path at each call (issue 18)."""
        fd = self._dir_fds.get(sub)
        if fd is None:
            with self._fd_lock:
                fd = self._dir_fds.get(sub)
                if fd is None:
                    fd = self._dir_fds[sub] = os.open(
                        self.path / sub, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    )
        return fd

    def _stage(self, key: str, name: str, data: bytes, marker: int) -> bool:
        """Write ``data`` to a new unnamed file (O_TMPFILE) without fsync and keep it,
        with the key's locked marker, for :meth:`_publish`. False (nothing written)
        when the system has no O_TMPFILE: the caller writes through the writer
        threads instead. True also when the write failed (the marker closed): like a
        failed background write, the failure fails the next flush() and the key is
        written inline next time (issue 20 item 9: a full disk is a failed group
        commit, never a message stored)."""
        if not self.TMPFILE or self._anonymous is False:
            return False
        fd: int | None = None
        try:
            fd = self._open_unnamed(os.O_RDWR)  # where /proc cannot link it: read back
            if fd is None:
                return False
            if self._by_syncfs and self._group_fd is None:  # before the group's writes
                self._group_fd = _syncfs.open_handle(self.path / "tmp")
            # The name is recorded before the file can appear in new/ (_write_marked);
            # the marker is empty since _claim.
            os.pwrite(marker, name.encode("ascii"), 0)
            size = write_all(fd, [data])
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            os.close(marker)
            self._write_failed(key, exc)
            return True
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._staged.append(_Staged(key, name, fd, marker, size))
        self._staged_octets += size
        return True

    def _publish(self) -> None:
        """fsync every staged file (in parallel, one slice per writer thread), link
        each into new/ once fsynced, and release its marker; then wait for the
        batches handed off earlier. A file that fails is not named (its key is
        written inline next time) and fails the next flush(). With syncfs, the
        group is made durable at once instead (:meth:`_publish_synced`)."""
        staged, self._staged, self._staged_octets = self._staged, [], 0
        if self._group_fd is not None:
            group_fd, self._group_fd = self._group_fd, None
            self._publish_synced(group_fd, staged)
            return
        for i in range(min(self.WRITERS, len(staged))):
            self._submit_slice(staged[i::self.WRITERS])
        self._collect(0)

    def _publish_synced(self, group_fd: int, staged: list[_Staged]) -> None:
        """One syncfs through the group's descriptor ``group_fd`` (opened before the
        group's first write; closed here), then link each file into new/ and release
        its marker. When syncfs fails (a write-back error on the file system since
        the group began), no file of the group is named: each key is written inline
        next time and the next flush() fails, so the engine acknowledges none of
        them."""
        try:
            if staged:
                _syncfs.syncfs(group_fd)
        except OSError as exc:
            for item in staged:
                os.close(item.fd)
                os.close(item.marker)  # the marker names a file never named: re-done
                self._write_failed(item.key, exc)
            return
        finally:
            os.close(group_fd)
        for item in staged:
            try:
                self._link_staged(item)  # durable: named in new/ (fsync_dir at flush)
            except Exception as exc:
                self._write_failed(item.key, exc)
            finally:
                os.close(item.fd)
                os.close(item.marker)  # releases the flock, after the file is named

    def _hand_off(self) -> None:
        """Hand the staged files to a writer thread as one batch, without waiting
        (beyond MAX_BATCHES in flight, for the oldest)."""
        staged, self._staged, self._staged_octets = self._staged, [], 0
        self._collect(self.MAX_BATCHES - 1)
        self._submit_slice(staged)

    def _submit_slice(self, items: list[_Staged]) -> None:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(
                self.WRITERS, thread_name_prefix="maildir-writer"
            )
        self._publishing.append(self._writer.submit(self._publish_slice, items))

    def _collect(self, batches: int) -> None:
        """Wait for the oldest batches until at most ``batches`` are in flight."""
        while len(self._publishing) > batches:
            for key, exc in self._publishing.popleft().result():
                self._write_failed(key, exc)

    def _publish_slice(self, items: list[_Staged]) -> list[tuple[str, Exception]]:
        """fsync then link each staged file into new/; never raises (a writer
        thread's errors are returned with their keys)."""
        failures: list[tuple[str, Exception]] = []
        for item in items:
            try:
                self._write(item.name, item)
            except Exception as exc:
                failures.append((item.key, exc))
            finally:
                os.close(item.fd)
                os.close(item.marker)  # releases the flock, after the file is named
        return failures

    def _link_staged(self, item: _Staged) -> None:
        """Name the fsynced unnamed file ``new/<name>`` (linkat through /proc); where
        /proc cannot link it, copy its bytes through tmp/ (fsync, rename) instead."""
        if self._anonymous is not False:
            try:
                os.link(f"/proc/self/fd/{item.fd}", item.name, src_dir_fd=self._tmp_fd(),
                        dst_dir_fd=self._dir_fd("new"), follow_symlinks=True)
                self._anonymous = True
                return
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE and exc.errno != errno.EXDEV:
                    raise
                self._anonymous = False
        chunks, offset = [], 0
        while offset < item.size:
            piece = os.pread(item.fd, min(1 << 20, item.size - offset), offset)
            if not piece:
                break
            chunks.append(piece)
            offset += len(piece)
        self._write(item.name, chunks)

    def _submit(self, key: str, name: str, data: bytes | None, marker: int) -> None:
        """Hand one message (its bytes, or None for a file linked into tmp/) and its
        locked marker to the writer threads (bounded; see MAX_*)."""
        held = len(data) if data is not None else 0
        self._settle(self.MAX_WRITES - 1, self.MAX_HELD - held)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(
                self.WRITERS, thread_name_prefix="maildir-writer"
            )
        chunks = [data] if data is not None else None
        write = self._writer.submit(self._write_marked, name, chunks, marker)
        self._writes.append((key, held, write))
        self._held += held


PROCESSORS = [MaildirStore]
