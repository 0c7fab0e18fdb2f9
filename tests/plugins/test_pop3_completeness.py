"""MP-01: the octet counts that tell a whole message from one cut short, whatever the
chunking of the body and however the server counts its LIST size."""

from __future__ import annotations

import io
import itertools
import random

import pytest
from mailpipe.plugins.pop3.completeness import END_SLACK, OctetCount, shortfall

BODY = b"Subject: s\r\n\r\n.dot line\r\nplain\r\n..two\r\nlast\r\n"


def counted(data: bytes, cuts: list[int]) -> OctetCount:
    count = OctetCount()
    edges = [0, *sorted(cuts), len(data)]
    for a, b in itertools.pairwise(edges):
        count.feed(data[a:b])
    return count


def test_counts_do_not_depend_on_chunk_boundaries() -> None:
    whole = counted(BODY, [])
    assert (whole.octets, whole.lf, whole.crlf, whole.dot_lines) == (
        len(BODY), 6, 6, 2,
    )
    rng = random.Random(7)
    for _ in range(2000):
        cuts = [rng.randrange(len(BODY) + 1) for _ in range(rng.randrange(5))]
        c = counted(BODY, cuts)
        assert (c.octets, c.lf, c.crlf, c.dot_lines) == (
            whole.octets, whole.lf, whole.crlf, whole.dot_lines,
        ), cuts


@pytest.mark.parametrize(
    ("listed", "short"),
    [
        (len(BODY), False),  # CRLF count, as Dovecot lists
        (len(BODY) - 6, False),  # LF count (an mbox-backed server)
        (len(BODY) + 2, False),  # with the two stuffed dots counted
        (len(BODY) + 2 + END_SLACK, False),  # ... and a final CRLF added
        (len(BODY) + 5, True),  # more than any way of counting allows
        (1000, True),
    ],
)
def test_shortfall_allows_every_counting_convention(listed: int, short: bool) -> None:
    assert bool(counted(BODY, [3]).shortfall(listed)) is short


def test_bare_lf_body_is_measured_as_crlf() -> None:
    lf = BODY.replace(b"\r\n", b"\n")
    assert counted(lf, [5, 9]).shortfall(len(BODY)) == 0
    assert counted(lf, []).widest == len(BODY) + 2 + END_SLACK


def test_shortfall_reads_the_body_back_only_when_the_octets_cannot_tell() -> None:
    # Issue 18: a body of at least listed - END_SLACK octets is whole whatever its
    # lines, so its lines are never counted (nor is the body opened again).
    def unreadable() -> io.BytesIO:
        raise AssertionError("opened")

    for listed in (0, len(BODY) - 6, len(BODY), len(BODY) + END_SLACK):
        assert shortfall(len(BODY), listed, unreadable) == 0
    opened: list[int] = []

    def body() -> io.BytesIO:
        opened.append(1)
        return io.BytesIO(BODY)

    # LIST counted the two stuffed dots: whole, found by counting the lines.
    assert shortfall(len(BODY), len(BODY) + 2 + END_SLACK, body) == 0
    assert shortfall(len(BODY), len(BODY) + 5, body) == 1
    assert len(opened) == 2


def test_shortfall_is_the_counted_shortfall_for_any_body_and_listing() -> None:
    # MP-01, differential: the same answer as counting every chunk as it arrives.
    rng = random.Random(18)
    alphabet = [b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"xyz "]
    for _ in range(3000):
        data = b"".join(rng.choices(alphabet, k=rng.randrange(40)))
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(4))]
        listed = rng.randrange(2 * len(data) + 8)
        expected = counted(data, cuts).shortfall(listed)
        assert shortfall(len(data), listed, lambda d=data: io.BytesIO(d)) == expected


def test_a_body_read_back_changed_is_never_whole() -> None:
    # MP-01: a spool file that lost octets since they arrived is not whole.
    cut = BODY[:-3]
    assert shortfall(len(BODY), len(BODY) + 5, lambda: io.BytesIO(cut)) > 0
    assert shortfall(len(BODY), len(BODY) + 3, lambda: io.BytesIO(BODY + b"x")) > 0
