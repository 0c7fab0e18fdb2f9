"""One retrieval flight: the commands of a RETR stream, which may grow while it runs.

A :class:`Flight` is the iterable :meth:`.client.Pop3Client.stream` reads its commands
from, one refill of the window at a time (P-06). It hands out, in this order:

1. the DELEs it holds (those queued before the flight, P-13, then those an
   acknowledgement added while it runs, P-14): they are tiny, and the sooner they are
   on the wire the less is owed when the session ends;
2. the RETRs of its refs, in order, while the LIST sizes of the RETRs sent and not yet
   answered stay within ``max_declared`` octets (one RETR always goes, whatever its
   size): so a session that stops early has at most that much in flight to read
   and throw away (P-14);
3. one NOOP after the last RETR (MP-01: the last body is delivered only once a
   further reply's status line parsed).

:meth:`stop` ends the RETRs (and the NOOP) not yet sent; DELEs added later still go
out. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from mailpipe.message import MessageRef

from .events import Command, Dele, Noop, Retr

#: Default bound on the LIST octets of RETRs sent and not yet answered (P-14).
MAX_DECLARED_IN_FLIGHT = 16 * 2**20


class Flight(Iterator[Command]):
    """The commands of one RETR stream; see the module docstring."""

    def __init__(
        self,
        deles: Iterable[Dele],
        refs: Iterable[MessageRef],
        *,
        max_declared: int = MAX_DECLARED_IN_FLIGHT,
    ) -> None:
        self._deles: deque[Dele] = deque(deles)
        self._refs: deque[MessageRef] = deque(refs)
        self._fence = bool(self._refs)  # MP-01: a NOOP closes a flight of RETRs
        self._declared = 0  # LIST octets of the RETRs sent and not yet answered
        self.max_declared = max_declared
        #: DELEs were added since the stream last refilled from this flight: the
        #: stream then refills at once, within its bounds (P-06), not only once part
        #: of its window drained, so a group's DELEs cost no wait of their own (P-14).
        self.added = False

    def __next__(self) -> Command:
        if self._deles:
            return self._deles.popleft()
        if self._refs:
            size = self._refs[0].size
            if self._declared and self._declared + size > self.max_declared:
                raise StopIteration  # asked again once an answer made room
            self._declared += size
            return Retr(number=self._refs.popleft().number)
        if self._fence:
            self._fence = False
            return Noop()
        raise StopIteration

    def add(self, deles: Iterable[Dele]) -> None:
        """Send ``deles`` with the flight's next refill (P-14): after the reply or body
        chunk the stream reads next, or the one it is reading now."""
        self._deles.extend(deles)
        self.added = bool(self._deles)

    def answered(self, ref: MessageRef) -> None:
        """The reply to ``ref``'s RETR ended (its body, or ``-ERR``): room in flight."""
        self._declared = max(0, self._declared - ref.size)

    def stop(self) -> None:
        """Send no further RETR nor the NOOP; DELEs held or added later still go."""
        self._refs.clear()
        self._fence = False

    @property
    def dele_next(self) -> bool:
        """True when the next command handed out is a DELE (P-06: it may go while the
        window is full, since it counts towards the 4 KiB bound only)."""
        return bool(self._deles)


__all__ = ["MAX_DECLARED_IN_FLIGHT", "Flight"]
