"""The fake POP3 server's maildrop: messages shared by every session and user,
optionally backed by a Maildir (a file's name up to ``:`` is its UIDL)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(eq=False)
class StoredMessage:
    """One message of the maildrop: its unique id, its bytes, its Maildir file."""

    uid: str
    data: bytes
    path: Path | None = None


class Maildrop:
    """The messages of the fake server; ``lock`` guards ``items`` and ``locked_by``.

    ``locked_by`` is the number of the session holding the maildrop lock (RFC 1939
    §4), or None. Removal happens only at a committed QUIT (RFC 1939 §6).
    """

    def __init__(self, messages: Iterable[bytes], maildir: Path | None) -> None:
        self.lock = threading.Lock()
        self.items: list[StoredMessage] = []
        self.maildir = maildir
        self.locked_by: int | None = None
        self._serial = itertools.count(1)
        for data in messages:
            self.add(data)
        self.sync()

    def add(self, data: bytes, uid: str | None = None) -> str:
        """Append ``data`` (bytes) under ``uid`` or a fresh one; returns the uid."""
        if not isinstance(data, bytes | bytearray):
            raise TypeError("messages are bytes")
        with self.lock:
            n = next(self._serial)
            uid = uid if uid is not None else f"mp{n:08d}"
            self.items.append(StoredMessage(uid, bytes(data)))
            return uid

    def sync(self) -> None:
        """Pick up Maildir files added or removed since the last look."""
        if self.maildir is None:
            return
        files = sorted(
            (p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*")),
            key=lambda p: p.name,
        )
        with self.lock:
            known = {s.path for s in self.items if s.path is not None}
            self.items = [s for s in self.items if s.path is None or s.path.exists()]
            for p in files:
                if p not in known:
                    uid = p.name.split(":", 1)[0]
                    self.items.append(StoredMessage(uid, p.read_bytes(), p))

    def remove(self, gone: list[StoredMessage]) -> None:
        """Remove ``gone`` for good (their Maildir files too)."""
        with self.lock:
            ids = {id(s) for s in gone}
            self.items = [s for s in self.items if id(s) not in ids]
        for s in gone:
            if s.path is not None:
                s.path.unlink(missing_ok=True)
