"""Is a retrieved message whole? Its octets measured against the size LIST promised.

RFC 1939 §11 makes LIST's size a hint ("the exact size in octets ... may differ"),
and real servers count it several ways: with CRLF line ends (Dovecot, Courier), with
the LF of an mbox or Maildir file (GNU pop3d on mbox), with or without the dots they
stuff (C-50, T-21). So a received size that *differs* from LIST is normal. A message
that arrives *shorter* than any of those counts allows, though, is a message cut
short: a server that did not dot-stuff a lone "." line (the body ends there, the rest
follows as stray data), or one that serves the header only after an earlier TOP
(GNU Mailutils pop3d). Such a copy must never be committed: the engine would
acknowledge, and the server delete, the original (issue 20 item 1, issue 21 item 2).

A received size *above* the listing is never evidence of loss (nothing is missing);
the size policy bounds it separately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

#: Octets a server may add or drop at the end without anything being lost: the
#: final CRLF some servers append to a message that lacked one, or leave off.
END_SLACK = 2


@dataclass(slots=True)
class OctetCount:
    """Counts, across the chunks of one body, what the size comparison needs.

    Feed every chunk of the unstuffed body, in order, to :meth:`feed`; then
    :meth:`shortfall` says how many octets are missing against a listing.
    """

    octets: int = 0
    lf: int = 0  # line feeds (every line end, CRLF or bare LF)
    crlf: int = 0  # of which CRLF
    dot_lines: int = 0  # lines starting with "." (the server stuffed each one)
    _last: int = 0x0A  # the octet before the next chunk; LF = "at a line start"

    def feed(self, data: bytes) -> None:
        """Count one chunk of the body."""
        if not data:
            return
        self.octets += len(data)
        self.lf += data.count(b"\n")
        self.crlf += data.count(b"\r\n")
        if self._last == 0x0D and data[0] == 0x0A:
            self.crlf += 1  # a CRLF split between two chunks
        self.dot_lines += data.count(b"\n.")
        if self._last == 0x0A and data[0] == 0x2E:
            self.dot_lines += 1  # a line starting with "." at the chunk's start
        self._last = data[-1]

    @property
    def widest(self) -> int:
        """The largest size a server could list for these octets: every line end
        counted as CRLF, every stuffed dot counted, and the end slack."""
        return self.octets + (self.lf - self.crlf) + self.dot_lines + END_SLACK

    def shortfall(self, listed: int) -> int:
        """Octets missing against ``listed`` beyond every counting convention; 0 when
        the message is whole as far as its size can tell."""
        return max(0, listed - self.widest)


#: Octets read at a time when a body is read back to count its lines.
READ_BACK = 1 << 20


def shortfall(octets: int, listed: int, body: Callable[[], BinaryIO]) -> int:
    """:meth:`OctetCount.shortfall` of a body of ``octets`` octets, counting its lines
    only when the octets alone cannot settle it (issue 18).

    ``body()`` opens the body's octets again (a spooled one is read back in
    :data:`READ_BACK` pieces); it is called only when ``octets + END_SLACK <
    listed``. A body of at least ``listed - END_SLACK`` octets is never short,
    whatever its lines hold (:attr:`OctetCount.widest` is at least ``octets +
    END_SLACK``), and that is every body a server lists as it sends it: the three
    line counts of every chunk on the event loop (about 2 ms a MB) are spent only
    on the bodies that may be cut short (MP-01). A body read back with other than
    ``octets`` octets is never whole.
    """
    if octets + END_SLACK >= listed:
        return 0
    count = OctetCount()
    with body() as f:
        for chunk in iter(lambda: f.read(READ_BACK), b""):
            count.feed(chunk)
    if count.octets != octets:  # the copy changed since it arrived: never whole
        return max(1, count.shortfall(listed))
    return count.shortfall(listed)


__all__ = ["END_SLACK", "OctetCount", "shortfall"]
