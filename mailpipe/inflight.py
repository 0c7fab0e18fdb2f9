"""The in-flight marker: which message a mailbox's chain is running right now.

An exception in a processor counts an attempt (and quarantines after ``max_attempts``),
but a message that kills the process itself (a crash in a C extension, the kernel's
OOM killer, a parser that never returns and gets the worker killed) would otherwise be
retried forever and stop the mailbox: "bad input never stops the pipeline".

Before a message enters the chain its uid is written here; when the chain returns the
marker is cleared. A uid still present when the next poll starts means the process
died while running it, so one attempt is counted against that message. The marker is
a small file per mailbox written without fsync: it survives the death of the process
(the data is in the kernel's page cache), not a power loss, which is not the
message's fault anyway. Setting and clearing it are memory writes into a shared
mapping: no system call per message.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path


class InflightMarker:
    """One mailbox's marker file (the caller holds the mailbox lease).

    The file is one page mapped shared: a write is a memory copy (no system call, no
    metadata update per message), and the page outlives the process in the page
    cache, so the next process reads what a dead one left. Layout: 2 octets of length
    (big-endian), then the uid (UTF-8, surrogateescape), at most ``SIZE - 2`` octets.
    """

    SIZE = 4096

    def __init__(self, spool_dir: Path, mailbox: str) -> None:
        digest = hashlib.sha256(mailbox.encode()).hexdigest()[:24]
        self.path = spool_dir / f".inflight-{digest}"
        self._map: mmap.mmap | None = None

    def _open(self) -> mmap.mmap:
        if self._map is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size != self.SIZE:
                    os.ftruncate(fd, self.SIZE)
                self._map = mmap.mmap(fd, self.SIZE, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)  # the mapping keeps the file
        return self._map

    def take(self) -> str | None:
        """Return the uid a dead process left behind (and clear it), or None."""
        m = self._open()
        n = int.from_bytes(m[0:2], "big")
        if not 0 < n <= self.SIZE - 2:
            m[0:2] = b"\0\0"
            return None
        uid = m[2 : 2 + n].decode("utf-8", "surrogateescape")
        m[0:2] = b"\0\0"
        return uid

    def set(self, uid: str) -> None:
        """Record that ``uid`` enters the chain now."""
        m = self._open()
        data = uid.encode("utf-8", "surrogateescape")[: self.SIZE - 2]
        m[0:2] = b"\0\0"  # never a length with another uid's bytes
        m[2 : 2 + len(data)] = data
        m[0:2] = len(data).to_bytes(2, "big")

    def clear(self) -> None:
        """Record that no message is in the chain."""
        self._open()[0:2] = b"\0\0"

    def close(self) -> None:
        """Unmap the file (its content stays)."""
        if self._map is not None:
            self._map.close()
            self._map = None
