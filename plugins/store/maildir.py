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

File names and the per-key markers that make a key stored once across processes:
:mod:`._maildir_keys` (:class:`MaildirKeys`). The staged group and its publishing
(syncfs, or an fsync each on writer threads): :mod:`._maildir_group`
(:class:`MaildirGroup`). :class:`MaildirStore` is built on both. Its options:
:mod:`._maildir_options`.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import structlog
from pydantic import BaseModel

from mailpipe.errors import TemporaryFailure
from mailpipe.message import Message
from mailpipe.processor import LATER, ProcessorContext

from . import _syncfs
from ._fs import classify_os_error, fsync_dir, make_dirs, write_all, write_fsync
from ._maildir_group import _NO_TMPFILE, MaildirGroup, _Staged
from ._maildir_keys import MARKERS, MaildirKeys, file_name, key_of
from ._maildir_options import MaildirOptions

log = structlog.get_logger()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import, before any writer thread exists


def _chunks(message: Message) -> Iterator[bytes]:
    with message.open() as f:
        yield from iter(lambda: f.read(1 << 20), b"")


class MaildirStore(MaildirKeys, MaildirGroup):
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
