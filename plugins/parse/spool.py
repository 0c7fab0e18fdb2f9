"""Large leaf bodies kept out of memory: elided before parsing, decoded from the file.

Theory of operation
-------------------
The stdlib parser holds every body as a string (and, while parsing, as a list of line
strings), so a 137 MB message costs several times its size. :func:`skeleton` reads the
raw message once, in bounded pieces, and replaces every run of at least
:data:`RUN_MIN` octets of *leaf-body lines* (lines the parser puts verbatim into a
leaf's body, a preamble or an epilogue; see :mod:`.scan`) by one marker line
``!mailpipe-run-<nonce>-<n>!``. Such a run holds no boundary and no header, so the
skeleton has the same MIME structure as the message; it is small and parsed as usual.

A leaf whose payload holds markers is decoded from the payload text and the file's
byte ranges (:meth:`Runs.decode`) by a streaming decoder of its Content-Transfer-
Encoding (:class:`RunDecoder` for base64, :class:`~.transfer.QpDecoder`,
:class:`~.transfer.CopyDecoder` for 7bit, 8bit, binary and the rest) into a
:class:`SpooledPayload` (an unlinked temporary file, its size and sha256), never into
memory. Everywhere else (a nested message, a preamble, base64 with ``=`` inside a run)
:meth:`Runs.inflate` puts the original text back, so the result is always the same as
parsing the whole message in memory. ``parse_message`` parses a large message from
its skeleton too, with every run put back (:func:`.parser._message`): the stdlib
parser then skips the long bodies it would go through line by line.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from .base64_decode import NOT_ALPHABET, decode_clean
from .scan import LeafLines, pieces

#: Runs of leaf-body lines at least this long are elided from the skeleton.
RUN_MIN: Final = 256 * 1024
#: Read size when streaming a run back from the raw file.
CHUNK: Final = 1 << 20


# Any skeleton's marker line: nonce, number, line ending (when the parser kept it).
# One expression for all (a pattern per nonce cost a compile per message, issue 18);
# a marker line starts a line, so a lookalike in the text can never hide a real one.
_MARKER: Final = re.compile(r"!mailpipe-run-([0-9a-f]{16})-(\d+)!(\r\n|\r|\n)?")


@dataclass(slots=True)
class Skeleton:
    """The raw message with long runs of leaf-body lines replaced by marker lines."""

    data: bytes
    runs: list[tuple[int, int]]  # (offset, length) in the raw file, by marker number
    marker: str  # "!mailpipe-run-<nonce>-"; a marker line is marker + n + "!"
    sha256: str
    size: int

    def markers(self, text: str) -> Iterator[re.Match[str]]:
        """This skeleton's marker lines in ``text``: group 2 the number, group 3 the
        line ending (None when the parser cut it)."""
        nonce = self.marker[14:-1]
        return (m for m in _MARKER.finditer(text) if m.group(1) == nonce)


def skeleton(
    f: IO[bytes], run_min: int | None = None, max_headers: int | None = None
) -> Skeleton:
    """Read ``f`` to its end once; return its skeleton, sha256 and size.

    A run is a sequence of whole lines that :class:`~.scan.LeafLines` calls verbatim,
    not starting with a blank line (the parser drops an epilogue's first line end);
    one of at least ``run_min`` octets (default :data:`RUN_MIN`) becomes a marker line
    with the run's last line ending. ``f`` must be seekable. ``max_headers``: see
    :class:`~.scan.LeafLines` (no limit by default).
    """
    least = RUN_MIN if run_min is None else run_min
    marker = f"!mailpipe-run-{secrets.token_hex(8)}-"
    out: list[bytes] = []
    runs: list[tuple[int, int]] = []
    digest = hashlib.sha256()
    leaf = LeafLines(max_headers)
    offset = 0
    run: list[bytes] = []  # the run's pieces while it is shorter than run_min
    run_start = run_len = 0
    line_start = 0  # offset of the current line
    ending = b"\n"  # the line ending of the run's last whole line
    complete = True  # the run's last piece ends a line

    def flush(end: int) -> None:
        """Emit the run's octets before ``end`` (a line start) as marker or as is."""
        nonlocal run, run_len
        length = end - run_start
        if length >= least:
            out.append(f"{marker}{len(runs)}!".encode() + ending)
            runs.append((run_start, length))
        elif length == run_len:
            out.extend(run)
        elif length:
            out.extend(read_run(f, (run_start, length)))
        run, run_len = [], 0

    for piece, starts in pieces(f, bulk=leaf.bulk, rest=leaf.done):
        digest.update(piece)
        if starts:
            line_start = offset
            in_run = leaf.line(piece) and bool(run_len or piece[:1] not in b"\r\n")
            if in_run and not run_len:
                run_start = offset
            elif not in_run and run_len:
                flush(offset)
        else:
            leaf.more(piece)
            in_run = run_len > 0
        if in_run:
            if run_len < least:
                run.append(piece)
            else:
                run.clear()  # long enough to elide: only its extent is kept
            run_len += len(piece)
            complete = piece.endswith((b"\n", b"\r"))
            if complete:
                ending = b"\r\n" if piece.endswith(b"\r\n") else piece[-1:]
        else:
            out.append(piece)
        offset += len(piece)
    if run_len:
        end = offset if complete else line_start  # a run ends with a line ending
        flush(end)
        if end < offset:
            out.extend(read_run(f, (end, offset - end)))
    return Skeleton(b"".join(out), runs, marker, digest.hexdigest(), offset)


@dataclass(slots=True, eq=False)
class SpooledPayload:
    """Decoded attachment bytes in an unlinked temporary file (gone when closed).

    ``len()`` is the size; :meth:`chunks` reads it in pieces; ``bytes()`` loads it all
    (for consumers that need memory anyway).
    """

    file: IO[bytes]
    size: int
    sha256: str

    def __len__(self) -> int:
        return self.size

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """Yield the bytes in pieces of at most ``size`` (positional reads)."""
        fd, pos = self.file.fileno(), 0
        while pos < self.size:
            piece = os.pread(fd, min(size, self.size - pos), pos)
            if not piece:
                break
            pos += len(piece)
            yield piece

    def __bytes__(self) -> bytes:
        return b"".join(self.chunks())

    def head(self, size: int) -> bytes:
        """The first ``size`` octets (all when fewer)."""
        return os.pread(self.file.fileno(), min(size, self.size), 0) if size else b""


class NotStreamable(Exception):
    """The text cannot be decoded piecewise exactly as a whole (base64 ``=`` inside)."""


class SpoolWriter:
    """A streaming decoder's output: an unlinked spool file, its size and sha256.

    Subclasses implement :meth:`feed` (encoded octets, in order, in any pieces) and
    :meth:`finish` (the rest; the payload and a defect text or None).
    """

    def __init__(self, spool_dir: Path | None) -> None:
        if spool_dir is not None:
            spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Unlinked at once: it lives as long as the payload that owns it.
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.size = 0

    def feed(self, text: bytes) -> None:
        """Decode the next piece of encoded octets."""
        raise NotImplementedError

    def finish(self) -> tuple[SpooledPayload, str | None]:
        """Decode the rest; return the payload and a defect text or None."""
        raise NotImplementedError

    def payload(self) -> SpooledPayload:
        """The decoded octets written so far, as a payload."""
        self.file.flush()
        return SpooledPayload(self.file, self.size, self.digest.hexdigest())

    def close(self) -> None:
        """Drop the spool file (after NotStreamable)."""
        self.file.close()

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)


class RunDecoder(SpoolWriter):
    """Decode base64 text piece by piece into a spool file, as ``_b64decode`` would.

    Only the alphabet counts (RFC 2045 §6.8); whole quanta are decoded as they come.
    ``=`` anywhere but in the last quantum raises :class:`NotStreamable` (binascii
    stops at padding, which piecewise decoding cannot mimic): the caller then decodes
    in memory.
    """

    #: Every octet outside the alphabet and ``=``: deleted by ``bytes.translate``.
    _DROP: Final = NOT_ALPHABET

    def __init__(self, spool_dir: Path | None) -> None:
        super().__init__(spool_dir)
        self.seen = 0  # alphabet characters, for the defect text
        self._carry = b""

    def feed(self, text: bytes) -> None:
        """Add base64 text (line ends and other characters are ignored)."""
        clean = self._carry + text.translate(None, self._DROP)
        cut = len(clean) - len(clean) % 4
        if cut > 4:
            cut -= 4  # keep the last quantum back: it may carry the padding
            block = clean[:cut]
            if b"=" in block:
                raise NotStreamable("padding inside the base64 text")
            self.seen += len(block)
            self._write(decode_clean(block))  # binascii's result, vectorised (issue 18)
            clean = clean[cut:]
        self._carry = clean

    def finish(self) -> tuple[SpooledPayload, str | None]:
        """Decode the rest leniently; return the payload and a defect text or None."""
        tail = self._carry
        if b"=" in tail.rstrip(b"="):
            raise NotStreamable("padding inside the base64 text")
        total = self.seen_total(tail)
        problem: str | None = None
        try:
            data = binascii.a2b_base64(tail)
        except binascii.Error:
            clean = tail.replace(b"=", b"")
            extra = total % 4
            problem = f"base64 length {total} is not a multiple of 4"
            if extra == 1:
                clean = clean[:-1]
            elif extra:
                clean += b"=" * (4 - extra)
            data = binascii.a2b_base64(clean)
        self._write(data)
        return self.payload(), problem

    def seen_total(self, tail: bytes) -> int:
        """Alphabet characters (padding excluded) decoded so far plus ``tail``."""
        return self.seen + len(tail.replace(b"=", b""))


def read_run(f: IO[bytes], run: tuple[int, int]) -> Iterator[bytes]:
    """Yield the raw octets of ``run`` from ``f`` in pieces of at most :data:`CHUNK`."""
    start, length = run
    pos = 0
    while pos < length:
        f.seek(start + pos)
        piece = f.read(min(CHUNK, length - pos))
        if not piece:
            raise OSError(f"the message file ended inside a base64 run at {start + pos}")
        pos += len(piece)
        yield piece


class Runs:
    """The elided runs of one skeleton, read back from the raw file ``f`` on demand."""

    def __init__(self, sk: Skeleton, f: IO[bytes], spool_dir: Path | None) -> None:
        self.sk = sk
        self.f = f
        self.spool_dir = spool_dir

    def has(self, text: str | None) -> bool:
        """True when ``text`` holds a marker line."""
        return bool(text) and self.sk.marker in str(text)

    def inflate(self, text: str) -> str:
        """``text`` with every marker replaced by the original octets (as the parser
        would have given them: a marker whose line end was cut loses it too)."""
        out: list[str] = []
        pos = 0
        for m in self.sk.markers(text):
            data = b"".join(self.octets(m))
            # as BytesParser does
            out += (text[pos : m.start()], data.decode("ascii", "surrogateescape"))
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)

    def octets(self, m: re.Match[str]) -> Iterator[bytes]:
        """The original octets of marker ``m``, in pieces of at most :data:`CHUNK`;
        without the run's last line ending when the parser cut the marker's (before
        a boundary: RFC 2046 §5.1.1 gives that line ending to the delimiter)."""
        start, length = self.sk.runs[int(m.group(2))]
        if m.group(3) is None:
            self.f.seek(start + length - 2)
            length -= 2 if self.f.read(2) == b"\r\n" else 1
        return read_run(self.f, (start, length))

    def decode(
        self, text: str, decoder: type[SpoolWriter] = RunDecoder
    ) -> tuple[SpooledPayload, str | None] | None:
        """Decode ``text`` (with markers) with ``decoder`` into a spool file; None when
        only an in-memory decode gives the exact result (see :class:`RunDecoder`)."""
        out = decoder(self.spool_dir)
        try:
            pos = 0
            for m in self.sk.markers(text):
                out.feed(text[pos : m.start()].encode("utf-8", "surrogateescape"))
                for piece in self.octets(m):
                    out.feed(piece)
                pos = m.end()
            out.feed(text[pos:].encode("utf-8", "surrogateescape"))
            return out.finish()
        except NotStreamable:
            out.close()
            return None
