"""The in-flight marker: which message a mailbox's chain is running right now.

An exception in a processor counts an attempt (and quarantines after ``max_attempts``),
but a message that kills the process itself (a crash in a C extension, the kernel's
OOM killer, a parser that never returns and gets the worker killed) would otherwise be
retried forever and stop the mailbox: "bad input never stops the pipeline".

Before a message enters the chain its uid is written here; when the chain returns the
marker is cleared. A uid still present when the next poll starts means the process
died while running it. One attempt is charged to it only when it was *alone*: no other
chain of the same process (another mailbox, polled concurrently) was in flight at any
moment of its run, so the death cannot be someone else's. A message that kills the
process while others run is charged at a later death, when it runs alone (the others'
chains are short); innocent messages in flight beside it are never charged.

The marker is one page of a small file per mailbox, written whole when it is created
(not fsynced) so that the file system reserves its blocks: a full disk is an
``OSError`` then, never a SIGBUS later on ext4, XFS or tmpfs (a copy-on-write file
system such as btrfs or ZFS allocates again at each write-back, which no
preallocation prevents). It is mapped shared: setting and clearing it are memory
writes, no system call per message, and the page outlives the process in the page
cache (not a power loss, which is not the message's fault anyway).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

#: This process, as written into its markers (a later process knows it is not its own).
_TOKEN = os.urandom(4)
_ACTIVE: set[InflightMarker] = set()  # markers set now, in this process
_ACTIVE_LOCK = threading.Lock()

# Layout: 4 token, 1 alone flag, 2 uid length (big-endian; 0 = clear), then the uid;
# the page's last 4 octets hold the writer's pid (0 in markers written before it was).
_HEAD = 7
_PID = 4


class InflightMarker:
    """One mailbox's marker file (the caller holds the mailbox lease)."""

    SIZE = 4096

    def __init__(self, spool_dir: Path, mailbox: str) -> None:
        digest = hashlib.sha256(mailbox.encode()).hexdigest()[:24]
        self.path = spool_dir / f".inflight-{digest}"
        self._map: mmap.mmap | None = None

    def _open(self) -> mmap.mmap:
        if self._map is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size != self.SIZE:
                    # Real blocks, not a sparse ftruncate: a store into a mapped hole
                    # on a full disk is a SIGBUS that kills the process. Written (the
                    # file system reserves the blocks then), not synced: the page need
                    # only outlive the process (see the module docstring), and an fsync
                    # here held the event loop ~1 ms for each mailbox's first message
                    # in a process (issue 18).
                    os.pwrite(fd, bytes(self.SIZE), 0)
                self._map = mmap.mmap(fd, self.SIZE, access=mmap.ACCESS_WRITE)
            finally:
                os.close(fd)  # the mapping keeps the file
        return self._map

    def take(self) -> tuple[str, bool] | None:
        """Return ``(uid, alone)`` left by an earlier process (and clear it), or None.

        ``alone``: no other chain of that process was in flight during the uid's run.
        A mailbox whose chain never ran has no marker file; none is made here (a poll
        with no new mail writes nothing, issue 18), :meth:`set` makes it.
        """
        if self._map is None and not self.path.exists():
            return None
        m = self._open()
        token, alone, n = m[0:4], m[4] == 1, int.from_bytes(m[5:7], "big")
        if n == 0 or token == _TOKEN:
            return None
        if _alive(int.from_bytes(m[self.SIZE - _PID :], "big")):
            # Its writer lives: frozen or partitioned, its lease taken over, not dead.
            # Nothing to charge (review of issue 16, L1); it clears the marker itself.
            return None
        m[5:7] = b"\0\0"
        if n > self.SIZE - _HEAD - _PID:
            return None
        return m[_HEAD : _HEAD + n].decode("utf-8", "surrogateescape"), alone

    def set(self, uid: str) -> None:
        """Record that ``uid`` enters the chain now."""
        m = self._open()
        data = uid.encode("utf-8", "surrogateescape")[: self.SIZE - _HEAD - _PID]
        m[5:7] = b"\0\0"  # never a length with another uid's bytes
        m[_HEAD : _HEAD + len(data)] = data
        m[self.SIZE - _PID :] = os.getpid().to_bytes(_PID, "big")
        m[0:4] = _TOKEN
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
            alone = len(_ACTIVE) == 1
            if not alone:
                for other in _ACTIVE:  # they overlap this run: none of them is alone
                    if other._map is not None:
                        other._map[4] = 0
            m[4] = 1 if alone else 0
        m[5:7] = len(data).to_bytes(2, "big")

    def clear(self) -> None:
        """Record that no message is in the chain (a marker another process has taken
        over, after a lost lease, is left alone)."""
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self)
        m = self._open()
        if m[0:4] == _TOKEN:
            m[5:7] = b"\0\0"

    def close(self) -> None:
        """Unmap the file (its content stays)."""
        with _ACTIVE_LOCK:
            _ACTIVE.discard(self)
        if self._map is not None:
            self._map.close()
            self._map = None


def _alive(pid: int) -> bool:
    """True when ``pid`` (0: unknown) is a live process on this host other than us."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
