"""Which lines of a raw message are leaf-body lines: the ones a skeleton may elide.

The stdlib parser (``email.feedparser``) gives a line a meaning of its own in three
places only: in a header block (a message's, a MIME part's, or one of the blocks of a
``message/delivery-status`` body), and as a boundary delimiter of an enclosing
multipart. Every other line goes verbatim into a string: a leaf part's body, a
preamble or an epilogue. :class:`LeafLines` follows a raw message line by line as the
feedparser does and answers, at each line start, whether the line is such a verbatim
line.

It errs on one side only: a line it calls verbatim is one for the parser, whatever
follows it; a line it is unsure of is not. To that end

* lines are split exactly as the feedparser splits them (CRLF, CR or LF; see
  :func:`pieces`);
* a header block is parsed with the stdlib's own header parser (policy compat32) to
  learn its Content-Type and boundary; every boundary ever declared counts as one
  from then on (the parser only honours those of enclosing multiparts: a superset);
  a boundary line is matched with the feedparser's own expression;
* after a header block without Content-Type (a ``multipart/digest`` part defaults to
  ``message/rfc822``) or of type ``message/*``, another header block may follow;
  a ``message/delivery-status`` body is never verbatim, and a boundary line in one
  ends all eliding (it may be a stray one the parser keeps in the body, where blank
  lines split the blocks); a header block larger than
  :data:`MAX_BLOCK` (or header blocks larger together than a caller's limit), or one
  the header parser fails on, ends all eliding for the rest of the message.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from email import policy as email_policy
from email.parser import BytesHeaderParser
from enum import Enum
from typing import IO, Final

#: Largest header block followed; past it nothing more of the message is elided.
MAX_BLOCK: Final = 1 << 20
#: What a header block counts toward a ``max_headers`` budget beyond its octets.
BLOCK_COST: Final = 1024
#: Most octets of one piece (a line longer than this comes in several pieces).
PIECE: Final = 1 << 16
_NL: Final = re.compile(rb"\r\n|\r|\n")
# email.feedparser.headerRE, on bytes (8-bit octets are surrogates there: no match)
_HEADER: Final = re.compile(rb"^(From |[\041-\071\073-\176]*:|[\t ])")
_PARSER = BytesHeaderParser(policy=email_policy.compat32)


def pieces(
    f: IO[bytes],
    size: int = PIECE,
    bulk: Callable[[], bool] | None = None,
    rest: Callable[[], bool] | None = None,
) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(piece, starts_line)``: the file's octets in order, cut after every line
    ending (CRLF, CR or LF, as the feedparser splits lines) and within a longer line
    every ``size`` octets. A CR at a cut is never parted from the LF after it.

    With ``bulk``: at a line start where ``bulk()`` is true (asked afresh at every line
    start, after the previous piece was taken), whole lines up to the next line that
    starts with ``--`` may come as one piece, a *span*: its first line is not blank and
    none of its lines starts with ``--``. The cuts inside longer lines are the same as
    without ``bulk`` (the file is read ``size`` octets at a time either way), so
    :class:`LeafLines` sees the same first piece of every line that starts with ``--``.
    With ``rest``: at a line start where ``rest()`` is true, all the rest of the file
    comes as one last piece.
    """
    buf = b""
    start = True
    eof = False
    while not eof:
        more = f.read(size)
        eof = not more
        buf += more
        pos, end = 0, len(buf)
        held = not eof and buf.endswith(b"\r")  # maybe the CR of a CRLF cut by the read
        while pos < end:
            if start and rest is not None and rest():
                yield buf[pos:] + f.read(), True
                return
            if start and bulk is not None and bulk():
                span = _span_end(buf, pos, end - 1 if held else end)
                if span > pos:
                    yield buf[pos:span], True
                    pos = span
                    continue
            m = _NL.search(buf, pos)
            if m is None or (held and m.end() == end):
                break
            yield buf[pos : m.end()], start
            start, pos = True, m.end()
        buf = buf[pos:]
        if eof:
            if buf:
                yield buf, start
            return
        keep = 1 if buf.endswith(b"\r") else 0
        if len(buf) - keep >= size:
            yield buf[: len(buf) - keep], start
            start, buf = False, buf[len(buf) - keep :]


def _span_end(buf: bytes, pos: int, lim: int) -> int:
    """Where the span that starts at line start ``pos`` ends: at the next line start
    followed by ``--``, else after the last line ending before ``lim``; ``pos`` when
    the line at ``pos`` starts with ``--`` or is blank, or has no ending before ``lim``.
    """
    if buf.startswith((b"--", b"\r", b"\n"), pos):
        return pos
    # A line starts after an LF, or after a CR that no LF follows ("\r--" is one).
    # Both searches start one octet before the first "-" (memchr), and none is made
    # without one (base64 text has none): not two searches of every piece (issue 18).
    dash = buf.find(b"-", pos, lim)
    if dash >= 0:
        first = max(pos, dash - 1)
        lf = buf.find(b"\n--", first, lim)
        cr = buf.find(b"\r--", first, lim if lf < 0 else lf)
        if cr >= 0 or lf >= 0:
            return (cr if cr >= 0 else lf) + 1
    return max(pos, buf.rfind(b"\n", pos, lim) + 1, buf.rfind(b"\r", pos, lim) + 1)


class _State(Enum):
    HEADERS = "headers"  # in a header block (or where one may start)
    BODY = "body"  # in a leaf body, a preamble or an epilogue: lines are verbatim
    FROZEN = "frozen"  # a delivery-status body: nothing verbatim until a boundary
    OFF = "off"  # unsure for good: nothing verbatim to the end


class LeafLines:
    """Follow a raw message's MIME structure; see the module docstring.

    Call :meth:`line` with the first piece of every line and :meth:`more` with every
    other piece (from :func:`pieces`), in order; a span of whole lines from
    ``pieces(f, bulk=leaf.bulk)`` counts as one line.
    """

    def __init__(self, max_headers: int | None = None) -> None:
        """``max_headers``: the most octets of header blocks, all together and each
        counted :data:`BLOCK_COST` octets larger (a parse has a cost of its own), that
        are parsed; past it nothing more is elided (the message is mostly headers: the
        scan would parse them twice for nothing). None: no such limit."""
        self._max_headers = max_headers
        self._headers_len = 0
        self._state = _State.HEADERS
        self._block: list[bytes] = []
        self._block_len = 0
        self._separators: list[bytes] = []  # b"--" + boundary, for every boundary
        self._seen: set[str] = set()

    def line(self, first: bytes) -> bool:
        """A line starts with ``first``: True when the parser takes it verbatim."""
        state = self._state
        if state is _State.OFF:
            return False
        if first.startswith(b"--") and any(_delimits(first, s) for s in self._separators):
            if state is _State.HEADERS:
                self._end_block(blank=False)
            if self._state is _State.FROZEN:
                # Every boundary ever declared counts (a superset), so this line may
                # be a closed or a sibling multipart's boundary that the parser takes
                # as a line of the delivery-status body, whose blank lines split its
                # blocks: eliding after it could swallow them. Stop for good.
                self._state = _State.OFF
            elif self._state is not _State.OFF:
                self._state = _State.HEADERS
            return False
        if state is _State.BODY:
            return True
        if state is _State.FROZEN:
            return False
        if first[:1] in (b"\r", b"\n"):  # the blank line that ends a header block
            self._end_block(blank=True)
            return False
        if _HEADER.match(first) is not None or not _ends_line(first):
            # a header line, or a line too long to tell: one more of the block
            self._add(first)
            return False
        self._end_block(blank=False)  # the parser takes this line as the body's first
        return self.line(first)

    def bulk(self) -> bool:
        """True when every line that does not start with ``--`` gets the same answer
        from :meth:`line` and leaves the state as it is (outside a header block): a
        span of such lines (see :func:`pieces`) may then be given as one line."""
        return self._state is not _State.HEADERS

    def done(self) -> bool:
        """True when no line of the rest of the message is verbatim, whatever it is."""
        return self._state is _State.OFF

    def more(self, piece: bytes) -> None:
        """The rest of the current line."""
        if self._state is _State.HEADERS:
            self._add(piece)

    def _add(self, piece: bytes) -> None:
        self._block_len += len(piece)
        self._headers_len += len(piece)
        if self._block_len > MAX_BLOCK or (
            self._max_headers is not None and self._headers_len > self._max_headers
        ):
            self._state = _State.OFF
            self._block = []
        else:
            self._block.append(piece)

    def _end_block(self, *, blank: bool) -> None:
        """The header block ends: learn its boundary and what follows it."""
        block, self._block, self._block_len = self._block, [], 0
        self._headers_len += BLOCK_COST
        if self._max_headers is not None and self._headers_len > self._max_headers:
            self._state = _State.OFF
        if self._state is _State.OFF:
            return
        if not block:
            ctype = None
        else:
            try:
                headers = _PARSER.parsebytes(b"".join(block))
                ctype = (
                    headers.get_content_type()
                    if headers.get("content-type") is not None
                    else None
                )
                boundary = headers.get_boundary() if ctype else None
            except Exception:  # the header parser never should; stop eliding
                self._state = _State.OFF
                return
            # boundary="" is a boundary to the stdlib parser too ("--" lines split).
            if ctype is not None and ctype.startswith("multipart/") and boundary is not None:
                self._learn(boundary)
        if ctype == "message/delivery-status":
            self._state = _State.FROZEN
        elif blank and (ctype is None or ctype.startswith("message/")):
            self._state = _State.HEADERS  # a nested message's header block may follow
        else:
            self._state = _State.BODY

    def _learn(self, boundary: str) -> None:
        if boundary in self._seen:
            return
        self._seen.add(boundary)
        # the same (surrogate-escaped) text as email.feedparser's
        self._separators.append(("--" + boundary).encode("utf-8", "surrogateescape"))


def _delimits(first: bytes, separator: bytes) -> bool:
    """True when email.feedparser's boundary expression for ``separator`` matches the
    line that starts with ``first``: ``(?P<sep>separator)(?P<end>--)?(?P<ws>[ \t]*)
    (?P<linesep>\r\n|\r|\n)?$``, here without compiling it per boundary (issue 18).
    ``first`` holds one line ending at most, at its end."""
    if not first.startswith(separator):
        return False
    rest = first[len(separator) :]
    if rest.startswith(b"--"):
        rest = rest[2:]
    return rest.lstrip(b" \t") in (b"", b"\r\n", b"\r", b"\n")


def _ends_line(piece: bytes) -> bool:
    return piece.endswith((b"\n", b"\r"))
