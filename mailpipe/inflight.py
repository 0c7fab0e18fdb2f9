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
message's fault anyway. Writes cost a ``pwrite`` and an ``ftruncate`` per message.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class InflightMarker:
    """One mailbox's marker file (the caller holds the mailbox lease)."""

    def __init__(self, spool_dir: Path, mailbox: str) -> None:
        digest = hashlib.sha256(mailbox.encode()).hexdigest()[:24]
        self.path = spool_dir / f".inflight-{digest}"
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def take(self) -> str | None:
        """Return the uid a dead process left behind (and clear it), or None."""
        fd = self._open()
        data = os.pread(fd, 4096, 0)
        if not data:
            return None
        os.ftruncate(fd, 0)
        return data.decode("utf-8", "surrogateescape") or None

    def set(self, uid: str) -> None:
        """Record that ``uid`` enters the chain now."""
        fd = self._open()
        data = uid.encode("utf-8", "surrogateescape")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def clear(self) -> None:
        """Record that no message is in the chain."""
        os.ftruncate(self._open(), 0)

    def close(self) -> None:
        """Close the file (the marker's content stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
