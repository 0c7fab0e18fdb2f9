"""store.maildir's keys: the file names that carry a message key, and per-key markers.

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

Contract: :class:`MaildirKeys` is the marker half of
:class:`~mailpipe.plugins.store.maildir.MaildirStore` (a mixin, never used alone); its
methods run under the store's lock, and a marker they return locked is the caller's to
close (closing it releases the flock).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

from mailpipe.errors import TemporaryFailure

#: The per-key markers' directory, beside cur/, new/ and tmp/ (see the module doc).
MARKERS = "mailpipe-keys"
_OURS = re.compile(r"^\d+\.M\d+P\d+\.([0-9a-f]{32})\.mailpipe,")
_LAST_STAMP = [0]
_STAMP_LOCK = threading.Lock()


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


class MaildirKeys:
    """The per-key markers of :class:`~mailpipe.plugins.store.maildir.MaildirStore`."""

    # The store's (see MaildirStore): its name, folder, tunables and helpers.
    name: ClassVar[str]
    CLAIM_TIMEOUT: ClassVar[float]
    path: Path
    _dir_fd: Callable[[str], int]
    _write: Callable[[str, Iterator[bytes] | list[bytes] | None], int]

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
