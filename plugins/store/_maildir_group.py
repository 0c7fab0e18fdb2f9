"""store.maildir's group commit: messages staged as unnamed files, published at once.

With group commit, an in-memory message is written unnamed (``O_TMPFILE``) by
``process()`` itself and stays unnamed (its marker locked) until the group is
published: the group's files are made durable, linked into new/, and their markers
released. Durable by one ``syncfs(2)`` of the Maildir's file system where syncfs
reports write-back errors (``sync = "auto"``, see ``_syncfs``), through a descriptor
opened before the group's first write; else by an fsync of each file on writer threads
(``BATCH`` files a hand-off, at most ``MAX_BATCHES`` in flight).

Contract: :class:`MaildirGroup` is the staging half of
:class:`~mailpipe.plugins.store.maildir.MaildirStore` (a mixin, never used alone); its
methods run under the store's lock (a writer thread runs only
:meth:`MaildirGroup._publish_slice`, which never raises). A file is never named in new/
before its content is durable; a file whose write, fsync or syncfs failed is never
named, its key is written inline next time (``_write_failed``) and the next
``flush()`` fails. The store fsyncs new/ at ``flush()``.
"""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from . import _syncfs
from ._fs import write_all

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


class MaildirGroup:
    """The staged unnamed files of :class:`~mailpipe.plugins.store.maildir.MaildirStore`."""

    # The store's (see MaildirStore): its tunables, folder, state and helpers.
    TMPFILE: ClassVar[bool]
    WRITERS: ClassVar[int]
    MAX_BATCHES: ClassVar[int]
    path: Path
    _anonymous: bool | None
    _by_syncfs: bool
    _group_fd: int | None
    _staged: list[_Staged]
    _staged_octets: int
    _writer: ThreadPoolExecutor | None
    _publishing: deque[Future[list[tuple[str, Exception]]]]
    _open_unnamed: Callable[[int], int | None]
    _tmp_fd: Callable[[], int]
    _dir_fd: Callable[[str], int]
    _write: Callable[[str, list[bytes] | _Staged], int]
    _write_failed: Callable[[str, Exception], None]

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
