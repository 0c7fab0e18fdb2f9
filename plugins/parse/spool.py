"""Large base64 bodies kept out of memory: elided before parsing, decoded from the file.

Theory of operation
-------------------
The stdlib parser holds every body as a string (and, while parsing, as a list of line
strings), so a 137 MB message costs several times its size. :func:`skeleton` reads the
raw message once, in bounded pieces, and replaces every run of at least
:data:`RUN_MIN` octets of *base64 lines* (only ``A-Z a-z 0-9 + /``, with ``=`` padding
on the run's last line) by one marker line ``!mailpipe-run-<nonce>-<n>!``. Such a run
can hold no boundary (``-`` is not in the alphabet) and no header, so the skeleton has
the same MIME structure as the message; it is small and parsed as usual.

A base64 leaf whose payload holds markers is decoded by :class:`RunDecoder` from the
payload text and the file's byte ranges into a :class:`SpooledPayload` (an unlinked
temporary file, its size and sha256), never into memory. Everywhere else (a text part,
a preamble, a part with ``=`` inside a run) :func:`inflate` puts the original text back,
so the result is always the same as parsing the whole message in memory.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

#: Runs of base64 lines at least this long are elided from the skeleton.
RUN_MIN: Final = 256 * 1024
#: Read size when streaming a run back from the raw file.
CHUNK: Final = 1 << 20
_LINE: Final = re.compile(rb"[A-Za-z0-9+/]+={0,2}(?:\r\n|\n)")
_PAD_END: Final = re.compile(rb"={1,2}(?:\r\n|\n)\Z")
_MAX_LINE: Final = 1000  # RFC 5322 §2.1.1: 998 + CRLF; longer lines end a run


@dataclass(slots=True)
class Skeleton:
    """The raw message with long base64 runs replaced by marker lines."""

    data: bytes
    runs: list[tuple[int, int]]  # (offset, length) in the raw file, by marker number
    marker: str  # "!mailpipe-run-<nonce>-"; a marker line is marker + n + "!"
    sha256: str
    size: int
    pattern: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        self.pattern = re.compile(re.escape(self.marker) + r"(\d+)!(\r\n|\n)?")


def skeleton(f: IO[bytes]) -> Skeleton:
    """Read ``f`` to its end once; return its skeleton, sha256 and size."""
    marker = f"!mailpipe-run-{secrets.token_hex(8)}-"
    out: list[bytes] = []
    runs: list[tuple[int, int]] = []
    digest = hashlib.sha256()
    offset = 0
    run: list[bytes] = []  # the run's lines while it is shorter than RUN_MIN
    run_start = run_len = 0
    ending = b"\n"

    def flush() -> None:
        nonlocal run, run_len
        if run_len >= RUN_MIN:
            out.append(f"{marker}{len(runs)}!".encode() + ending)
            runs.append((run_start, run_len))
        else:
            out.extend(run)
        run, run_len = [], 0

    while line := f.readline(_MAX_LINE + 1):
        digest.update(line)
        if _LINE.fullmatch(line) is not None:
            if not run_len:
                run_start = offset
            if run_len < RUN_MIN:
                run.append(line)
            else:
                run.clear()  # long enough to elide: only its extent is kept
            run_len += len(line)
            ending = b"\r\n" if line.endswith(b"\r\n") else b"\n"
            if _PAD_END.search(line) is not None:
                flush()  # padding ends a base64 stream: "=" is never inside a run
        else:
            if run_len:
                flush()
            out.append(line)
        offset += len(line)
    if run_len:
        flush()
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


class NotStreamable(Exception):
    """The base64 text cannot be decoded piecewise exactly as a whole (``=`` inside)."""


class RunDecoder:
    """Decode base64 text piece by piece into a spool file, as ``_b64decode`` would.

    Only the alphabet counts (RFC 2045 §6.8); whole quanta are decoded as they come.
    ``=`` anywhere but in the last quantum raises :class:`NotStreamable` (binascii
    stops at padding, which piecewise decoding cannot mimic): the caller then decodes
    in memory.
    """

    _DROP: Final = re.compile(rb"[^A-Za-z0-9+/=]")

    def __init__(self, spool_dir: Path | None) -> None:
        if spool_dir is not None:
            spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Unlinked at once: it lives as long as the payload that owns it.
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115
        self.digest = hashlib.sha256()
        self.size = 0
        self.seen = 0  # alphabet characters, for the defect text
        self._carry = b""

    def feed(self, text: bytes) -> None:
        """Add base64 text (line ends and other characters are ignored)."""
        clean = self._carry + self._DROP.sub(b"", text)
        cut = len(clean) - len(clean) % 4
        if cut > 4:
            cut -= 4  # keep the last quantum back: it may carry the padding
            block = clean[:cut]
            if b"=" in block:
                raise NotStreamable("padding inside the base64 text")
            self.seen += len(block)
            self._write(binascii.a2b_base64(block))
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
        self.file.flush()
        return SpooledPayload(self.file, self.size, self.digest.hexdigest()), problem

    def seen_total(self, tail: bytes) -> int:
        """Alphabet characters (padding excluded) decoded so far plus ``tail``."""
        return self.seen + len(tail.replace(b"=", b""))

    def close(self) -> None:
        """Drop the spool file (after NotStreamable)."""
        self.file.close()

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)


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

        def original(m: re.Match[str]) -> str:
            data = b"".join(read_run(self.f, self.sk.runs[int(m.group(1))]))
            if m.group(2) is None:  # the parser cut the line end before a boundary
                data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
            return data.decode("ascii")

        return self.sk.pattern.sub(original, text)

    def decode(self, text: str) -> tuple[SpooledPayload, str | None] | None:
        """Decode base64 ``text`` (with markers) into a spool file; None when only an
        in-memory decode gives the exact result (see :class:`RunDecoder`)."""
        decoder = RunDecoder(self.spool_dir)
        try:
            pos = 0
            for m in self.sk.pattern.finditer(text):
                decoder.feed(text[pos : m.start()].encode("utf-8", "surrogateescape"))
                for piece in read_run(self.f, self.sk.runs[int(m.group(1))]):
                    decoder.feed(piece)
                pos = m.end()
            decoder.feed(text[pos:].encode("utf-8", "surrogateescape"))
            return decoder.finish()
        except NotStreamable:
            decoder.close()
            return None
