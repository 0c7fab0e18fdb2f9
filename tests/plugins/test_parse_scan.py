"""The skeleton scanner's bulk spans (issue 18): the same skeleton as the line-by-line
scan it replaced, and parse_file still the same as parse_message, on random and
adversarial MIME input (boundaries cut at read sizes, CR/LF mixes, long lines, lines
like boundaries, padding in the middle of base64)."""

from __future__ import annotations

import base64
import functools
import io
import random
import re
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import IO

import pytest
from mailpipe.plugins.parse import parse_file, parse_message, parser, scan, spool

_NL = re.compile(rb"\r\n|\r|\n")


def old_pieces(f: IO[bytes], size: int = scan.PIECE) -> Iterator[tuple[bytes, bool]]:
    """The oracle: scan.pieces before issue 18 (one piece per line, at most ``size``)."""
    buf = b""
    start = True
    eof = False
    while not eof:
        more = f.read(size)
        eof = not more
        buf += more
        pos, end = 0, len(buf)
        for m in _NL.finditer(buf):
            if m.end() == end and not eof and buf.endswith(b"\r"):
                break  # maybe the CR of a CRLF cut by the read
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


NLS = (b"\n", b"\r\n", b"\r")


def _nl(rng: random.Random, mixed: bool, nl: bytes) -> bytes:
    return rng.choice(NLS) if mixed else nl


def _body(rng: random.Random, nl: bytes, mixed: bool, bnd: bytes) -> bytes:
    """Leaf-body lines: base64 (padding in the middle at times), text, lines that start
    like boundaries, blank lines, long lines, lines without their ending."""
    out: list[bytes] = []
    for _ in range(rng.randrange(1, 40)):
        kind = rng.randrange(10)
        if kind < 3:
            data = base64.encodebytes(rng.randbytes(rng.randrange(1, 400)))
            if rng.random() < 0.3:
                data += base64.encodebytes(rng.randbytes(rng.randrange(1, 50)))
            out.append(data.replace(b"\n", _nl(rng, mixed, nl)))
        elif kind == 3:
            out.append(b"x" * rng.randrange(1, 300) + _nl(rng, mixed, nl))
        elif kind == 4:
            out.append(_nl(rng, mixed, nl) * rng.randrange(1, 4))
        elif kind == 5:  # like a boundary, or one with padding after it
            tail = rng.choice([b"", b"--", b" \t ", b"x", b"-", b" " * 120, b"-- x"])
            out.append(b"--" + rng.choice([bnd, bnd[:-1], b"", b"-"]) + tail)
            out.append(_nl(rng, mixed, nl))
        elif kind == 6:
            out.append(b"-" * rng.randrange(1, 5) + b"\r" * rng.randrange(0, 3))
        elif kind == 7:
            out.append(b"Header-Like: value" + _nl(rng, mixed, nl))
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 90))))
            out.append(_nl(rng, mixed, nl))
    return b"".join(out)


def message(rng: random.Random) -> bytes:
    """A random MIME message, nested at times, with adversarial bodies."""
    nl = rng.choice(NLS)
    mixed = rng.random() < 0.4

    def entity(depth: int) -> bytes:
        kind = rng.randrange(6) if depth < 3 else 0
        e = _nl(rng, mixed, nl)
        if kind in (0, 1):
            cte = rng.choice([b"base64", b"7bit", b"quoted-printable", b"binary"])
            head = b"Content-Type: application/octet-stream" + e
            head += b"Content-Transfer-Encoding: " + cte + e
            return head + e + _body(rng, nl, mixed, b"b%d" % depth)
        if kind == 2:
            return b"Content-Type: message/rfc822" + e + e + b"From: x@y" + e + entity(
                depth + 1
            )
        if kind == 3:
            return (
                b"Content-Type: message/delivery-status" + e + e
                + b"Reporting-MTA: dns; x" + e + e + _body(rng, nl, mixed, b"q")
            )
        bnd = b"b%d" % depth
        parts = [
            b"Content-Type: multipart/mixed; boundary=" + bnd + e + e,
            _body(rng, nl, mixed, bnd) if rng.random() < 0.5 else b"",
        ]
        for _ in range(rng.randrange(1, 4)):
            parts.append(b"--" + bnd + rng.choice([b"", b" ", b"\t"]) + e)
            parts.append(entity(depth + 1))
            parts.append(_nl(rng, mixed, nl))
        if rng.random() < 0.8:
            parts.append(b"--" + bnd + b"--" + e)
            parts.append(_body(rng, nl, mixed, bnd) if rng.random() < 0.5 else b"")
        return b"".join(parts)

    raw = b"From: a@b.example" + nl + b"Subject: t" + nl + b"MIME-Version: 1.0" + nl
    raw += entity(0)
    if rng.random() < 0.3:
        raw = raw.rstrip(b"\r\n")  # no line end at the end
    return raw


def shape(sk: spool.Skeleton) -> tuple[bytes, list[tuple[int, int]], str, int]:
    """A skeleton without its random nonce."""
    return sk.data.replace(sk.marker.encode(), b"!M-"), sk.runs, sk.sha256, sk.size


@pytest.mark.parametrize("seed", range(150))
def test_bulk_skeleton_is_the_line_by_line_one(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    raw = message(rng)
    size = rng.choice([3, 7, 16, 61, 256])  # reads, and cuts of long lines
    run_min = rng.choice([1, 40, 200])
    monkeypatch.setattr(spool, "RUN_MIN", run_min)
    headers = rng.choice([None, 1500, 4000])  # nothing elided past it: the rest whole
    monkeypatch.setattr(spool, "pieces", functools.partial(scan.pieces, size=size))
    new = spool.skeleton(io.BytesIO(raw), max_headers=headers)
    monkeypatch.setattr(
        spool, "pieces", lambda f, bulk=None, rest=None: old_pieces(f, size)
    )
    old = spool.skeleton(io.BytesIO(raw), max_headers=headers)
    assert shape(new) == shape(old), (size, run_min, raw)


@pytest.mark.parametrize("seed", range(150, 250))
def test_parse_file_with_bulk_spans_matches_parse_message(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    raw = message(rng)
    monkeypatch.setattr(spool, "RUN_MIN", rng.choice([1, 40, 200]))
    # Reads of 3 octets cut "--b1" lines before the first piece can match (both scans
    # then differ from the parser): the scanner assumes boundary lines fit a piece.
    size = rng.choice([7, 16, 61, 256])
    monkeypatch.setattr(spool, "pieces", functools.partial(scan.pieces, size=size))
    want, want_payloads = parse_message(raw)
    got, got_payloads = parse_file(io.BytesIO(raw))
    assert got.model_dump() == want.model_dump()
    assert [bytes(p) for p in got_payloads] == [bytes(p) for p in want_payloads]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64])
def test_pieces_without_bulk_are_the_old_pieces_and_spans_cover_the_file(
    size: int,
) -> None:
    rng = random.Random(size)
    for _ in range(40):
        raw = message(rng)
        assert list(scan.pieces(io.BytesIO(raw), size)) == list(
            old_pieces(io.BytesIO(raw), size)
        )
        spans = list(scan.pieces(io.BytesIO(raw), size, bulk=lambda: True))
        assert b"".join(p for p, _ in spans) == raw
        for piece, starts in spans:  # a span: no line but its first starts with "--"
            lines = piece.splitlines(keepends=True)
            assert not any(line.startswith(b"--") for line in lines[1:])
            assert not starts or lines[0][:1] not in (b"\r", b"\n") or len(lines) == 1


def test_delimiter_check_is_the_feedparser_expression() -> None:
    """scan._delimits answers as email.feedparser's boundary expression does."""
    tails = [b"", b"--", b"---", b"-- ", b" ", b"\t \t", b"x", b" x", b"-- x", b"--\t"]
    ends = [b"", b"\n", b"\r", b"\r\n"]
    for boundary in (b"b", b"=_x.y", b"", b"a+b?"):
        sep = b"--" + boundary
        expression = re.compile(
            b"(?P<sep>" + re.escape(sep)
            + rb")(?P<end>--)?(?P<ws>[ \t]*)(?P<linesep>\r\n|\r|\n)?$"
        )
        for head in (sep, sep[:-1], b"--", b"--" + boundary + b"1"):
            for tail in tails:
                for end in ends:
                    line = head + tail + end
                    want = expression.match(line) is not None
                    assert scan._delimits(line, sep) is want, (line, sep)


def tree(msg: Message) -> object:
    """Everything of a parsed message tree that the record is built from."""
    payload = msg._payload  # the stored payload, as parser.py reads it
    return (
        msg.get_unixfrom(),
        list(msg.raw_items()),
        msg.get_default_type(),
        msg.preamble,
        msg.epilogue,
        [(type(d).__name__, str(d)) for d in msg.defects],
        [tree(p) for p in payload] if isinstance(payload, list) else payload,
    )


CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


@pytest.mark.parametrize(("run", "headers"), [(1, 1 << 16), (64, 2500), (4096, 1 << 16)])
def test_in_memory_parse_from_the_skeleton_is_the_whole_parse(
    run: int, headers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """parse_message parses a large message from its skeleton and puts every run back
    (issue 18): the same tree as the stdlib parser's on the whole message, so the same
    record and payloads. Small thresholds make every input take that path."""
    rng = random.Random(run)
    inputs = [message(rng) for _ in range(120)]
    inputs += [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]
    elided = 0
    for raw in inputs:
        whole = parser._PARSER.parsebytes(raw)
        monkeypatch.setattr(parser, "_ELIDE_FROM", 0)
        monkeypatch.setattr(parser, "_ELIDE_RUN", run)
        monkeypatch.setattr(parser, "_ELIDE_HEADERS", headers)  # eliding stops early
        got = parser._message(raw)
        elided += bool(spool.skeleton(io.BytesIO(raw), run, headers).runs)
        assert tree(got) == tree(whole), raw[:200]
        record, payloads = parse_message(raw)
        monkeypatch.setattr(parser, "_ELIDE_FROM", len(raw) + 1)  # the plain parse
        want, want_payloads = parse_message(raw)
        assert record.model_dump() == want.model_dump()
        assert payloads == want_payloads
    assert elided > 50  # the skeleton path was taken, with runs, on many inputs


def test_surrogate_check_is_the_regex_search() -> None:
    """parser._has_surrogate answers as the search for [\\ud800-\\udfff] it replaced."""
    lone = re.compile("[\ud800-\udfff]")
    rng = random.Random(18)
    alphabet = ["a", "\n", "\u00e9", "\u20ac", "\U0001f600", "\ud800", "\udce9", "\udfff"]
    texts = ["", "plain", "caf\u00e9", "Caf\udce9", "\ud83d\ude00", "x" * 5000 + "\udc80"]
    texts += ["".join(rng.choices(alphabet, k=rng.randrange(1, 30))) for _ in range(500)]
    for text in texts:
        assert parser._has_surrogate(text) is (lone.search(text) is not None), text


def test_clean_keeps_clean_values_and_replaces_every_lone_surrogate() -> None:
    """parser._clean with its ASCII shortcut (issue 18): the same object back when
    nothing changes, every surrogate replaced at any depth otherwise."""
    from mailpipe.plugins.parse import Address, Defect

    clean = {
        "headers": [("Subject", "caf\u00e9"), ("X", "plain")],
        "to": [Address(name="A", address="a@b")],
        "defects": [Defect(part="", kind="K", detail="d")],
        "n": 3,
    }
    assert parser._clean(clean) is clean
    dirty = {
        "headers": [("Subject", "plain"), ("X", "Caf\udce9")],
        "to": [Address(name="\ud800", address="a@b")],
        "ids": ("ok", "x\udfff"),
        "n": 3,
    }
    got = parser._clean(dirty)
    assert got["headers"][0] is dirty["headers"][0]
    assert got["headers"][1] == ("X", "Caf\ufffd")
    assert got["to"][0].name == "\ufffd" and isinstance(got["to"][0], Address)
    assert got["ids"] == ("ok", "x\ufffd") and isinstance(got["ids"], tuple)
    assert dirty["headers"][1] == ("X", "Caf\udce9")  # the input is left as it was


def old_span_end(buf: bytes, pos: int, lim: int) -> int:
    """The oracle: scan._span_end before issue 18's dash check."""
    if buf.startswith((b"--", b"\r", b"\n"), pos):
        return pos
    lf = buf.find(b"\n--", pos, lim)
    cr = buf.find(b"\r--", pos, lim if lf < 0 else lf)
    if cr >= 0 or lf >= 0:
        return (cr if cr >= 0 else lf) + 1
    return max(pos, buf.rfind(b"\n", pos, lim) + 1, buf.rfind(b"\r", pos, lim) + 1)


def test_span_end_is_the_old_span_end_for_any_piece_and_range() -> None:
    rng = random.Random(18)
    atoms = [b"-", b"--", b"\r", b"\n", b"\r\n", b"a", b"QUJD", b" "]
    for _ in range(20000):
        buf = b"".join(rng.choices(atoms, k=rng.randrange(24)))
        pos = rng.randrange(len(buf) + 1)
        lim = rng.randrange(pos, len(buf) + 1)
        assert scan._span_end(buf, pos, lim) == old_span_end(buf, pos, lim), (
            buf, pos, lim,
        )


class _Searches(bytes):
    """A piece that records every find() made in it."""

    made: list[bytes]

    def find(self, sub: bytes, *args: int) -> int:  # type: ignore[override]
        self.made.append(sub)
        return super().find(sub, *args)


def test_span_end_of_base64_lines_makes_no_substring_search() -> None:
    # Issue 18: a piece without "-" (base64 text) costs one memchr, not two searches
    # of the piece for a line that starts with "--".
    text = base64.encodebytes(random.Random(1).randbytes(3000)).replace(b"\n", b"\r\n")
    piece = _Searches(text)
    piece.made = []
    assert scan._span_end(piece, 0, len(piece)) == len(text)
    assert piece.made == [b"-"]


def test_clean_decodes_undecoded_octets_that_form_utf8() -> None:
    """What cleaning.py's docstring says: undecoded octets (surrogate escapes) that
    form UTF-8 become its characters, the others U+FFFD; a string holding any other
    lone surrogate has every one replaced by U+FFFD."""
    assert parser._clean("Caf\udcc3\udca9 \udcff") == "Caf\u00e9 \ufffd"
    assert parser._clean("\udcc3\udca9 \ud800") == "\ufffd\ufffd \ufffd"
