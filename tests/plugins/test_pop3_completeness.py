"""MP-01: the octet counts that tell a whole message from one cut short, whatever the
chunking of the body and however the server counts its LIST size."""

from __future__ import annotations

import itertools
import random

import pytest
from mailpipe.plugins.pop3.completeness import END_SLACK, OctetCount

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
