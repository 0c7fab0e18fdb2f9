"""A thread-safe record of fake POP3 sessions: commands, replies and events, secrets masked."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["MASK", "Entry", "Transcript", "mask_command"]

MASK = "****"
Kind = Literal["C", "S", "*"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a transcript: a client command (``C``), a server reply line (``S``)
    or a session event (``*``: connected, tls, dropped, committed, closed)."""

    session: int
    kind: Kind
    text: str

    def __str__(self) -> str:
        return f"{self.session} {self.kind}: {self.text}"


def mask_command(line: str) -> str:
    """The command as it may be recorded: PASS, APOP digests and SASL responses hidden."""
    parts = line.split(" ")
    keyword = parts[0].upper()
    if keyword == "PASS" and len(parts) > 1:
        return f"{parts[0]} {MASK}"
    if keyword == "APOP" and len(parts) > 2:
        return f"{parts[0]} {parts[1]} {MASK}"
    if keyword == "AUTH" and len(parts) > 2:
        return f"{parts[0]} {parts[1]} {MASK}"
    return line


class Transcript:
    """Every session of a server, in order; safe to read while the server runs.

    ``str(transcript)`` renders ``<session> <kind>: <text>`` lines, handy in assertion
    messages. Multi-line replies are recorded as their status line plus an event such
    as ``body 3 lines 120 octets``; message bodies are never recorded.
    """

    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._lock = threading.Lock()

    def add(self, session: int, kind: Kind, text: str) -> None:
        """Append one entry (the server calls this; text must already be masked)."""
        with self._lock:
            self._entries.append(Entry(session, kind, text))

    def entries(self, session: int | None = None) -> list[Entry]:
        """All entries, or those of one session (numbered from 1)."""
        with self._lock:
            return [e for e in self._entries if session is None or e.session == session]

    def _texts(self, kind: Kind, session: int | None) -> list[str]:
        return [e.text for e in self.entries(session) if e.kind == kind]

    def commands(self, session: int | None = None) -> list[str]:
        """The client's command lines as received (secrets masked)."""
        return self._texts("C", session)

    def keywords(self, session: int | None = None) -> list[str]:
        """Just the upper-cased command keywords, e.g. ``["CAPA", "USER", ...]``."""
        return [c.split(" ", 1)[0].upper() for c in self.commands(session)]

    def replies(self, session: int | None = None) -> list[str]:
        """The server's reply lines (status lines and SASL challenges)."""
        return self._texts("S", session)

    def events(self, session: int | None = None) -> list[str]:
        """Session events such as ``connected``, ``dropped after 120 octets``."""
        return self._texts("*", session)

    @property
    def sessions(self) -> int:
        """Number of sessions seen so far."""
        with self._lock:
            return max((e.session for e in self._entries), default=0)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.entries())
