"""Interop: the four defects of issue 21, each on the server that shows it.

Each test asserts the correct behaviour; each failed (as a strict xfail) until its fix
landed. Figures measured before the fixes (Debian 12 packages, the shared corpus) are
in the docstrings and in docs/conformance.md.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from datetime import datetime

import pytest

from mailpipe.testing.e2e import log_events
from mailpipe.testing.servers.courier import NOTICE_SUBJECT
from mailpipe.testing.servers.cyrus import Cyrus
from mailpipe.testing.servers.interop import (
    canonical,
    has_8bit_headers,
    lab_pipeline,
    mailpipe_once,
    stored_messages,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

HEADER_ONLY_RULES = [
    {"use": "parse"},
    {
        "use": "filter",
        "rules": [{"name": "lists", "when": {"mailing_list": True}, "then": "keep"}],
    },
]


def test_courier_8bit_headers_stored_as_sent(lab_servers, corpus, tmp_path) -> None:
    """Courier advertises ``UTF8 USER`` and, until a client sends UTF8, serves every
    message with 8-bit headers as a "Cannot display Unicode content" notice. Measured:
    25 of the 26 corpus messages with 8-bit headers (in the message or in a MIME
    part's header) were stored as the notice and DELE'd."""
    lab = lab_servers("courier")
    given = [raw for _, raw in corpus if has_8bit_headers(raw, parts=True)]
    lab.load(given)
    run, _ = mailpipe_once(lab_pipeline(tmp_path, lab))
    assert run.returncode == 0, run.stderr[-3000:]
    stored = stored_messages(tmp_path / "Maildir")
    notices = [m for m in stored if NOTICE_SUBJECT in m[:400]]
    assert notices == [], f"{len(notices)} of {len(stored)} stored as Courier's notice"
    assert Counter(map(canonical, stored)) == Counter(map(canonical, given))


NEWSLETTER = (
    "From: Jürgen <news@example.de>\r\nTo: mptest@example.org\r\n"
    "Subject: Grüße \u2013 Ausgabe 7\r\nDate: Tue, 04 Jun 2024 10:00:00 +0200\r\n"
    "Message-ID: <news-7@example.de>\r\nList-Id: Weekly <weekly.example.de>\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n\r\nHallo.\r\n"
).encode()
PERSONAL = (
    "From: Zoë <zoe@example.org>\r\nTo: mptest@example.org\r\n"
    "Subject: Café\r\nMessage-ID: <p-1@example.org>\r\n\r\nbody\r\n"
).encode()


@pytest.mark.parametrize("prefetch", [False, True], ids=["retr", "header-prefetch"])
def test_courier_notice_judged_by_the_original(
    lab_servers, tmp_path, prefetch: bool
) -> None:
    """Issue 21.1, second half: a client that does not send UTF8 (``utf8 = false``)
    still gets Courier's notices. Filter rules must judge the original inside: the
    newsletter a "keep" rule matches by its List-Id stays on the server (before:
    the notice, with no List-Id, was stored and DELE'd); the other is stored
    byte-exact as served (the notice) with a record of the original."""
    lab = lab_servers("courier")
    lab.load([NEWSLETTER, PERSONAL])
    served = [m.raw for m in lab.served()]
    assert all(NOTICE_SUBJECT in raw[:400] for raw in served)  # Courier wraps both
    records = tmp_path / "records.jsonl"
    config = lab_pipeline(
        tmp_path,
        lab,
        HEADER_ONLY_RULES[0],
        HEADER_ONLY_RULES[1],
        {"use": "store.jsonl", "path": str(records)},
        utf8=False,
        header_prefetch=prefetch,
    )
    run, _ = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    left = [m.raw for m in lab.messages()]
    assert len(left) == 1 and b"weekly.example.de" in left[0]  # kept on the server
    [stored] = stored_messages(tmp_path / "Maildir")
    # raw as received: the notice (its boundary changes with each session)
    assert b"p-1@example.org" in stored
    assert _same_boundary(stored) in [_same_boundary(raw) for raw in served]
    [line] = [json.loads(x) for x in records.read_text().splitlines()]
    assert (line["subject"], line["message_id"]) == ("Café", "p-1@example.org")
    assert line["defects"][0]["kind"] == "ServerWrapped"


def _same_boundary(raw: bytes) -> bytes:
    """``raw`` with Courier's per-session MIME boundary (``=_<pid>-<time>``) fixed."""
    return re.sub(rb"=_\d+-\d+", b"=_B", raw)


def test_gnu_short_retr_after_top_never_committed(
    lab_servers, corpus, tmp_path
) -> None:
    """After ``TOP n 0`` in the same session GNU pop3d answers ``RETR n`` with the
    header only for some messages. Measured on the corpus: 8 of 295 (81 of 1,793
    octets, 351 of 1,007, 164 of 648, ...), stored and DELE'd. A RETR shorter than
    its LIST size must be re-fetched or left on the server, never committed."""
    lab = lab_servers("gnu")
    lab.load([raw for _, raw in corpus])
    served = lab.served()
    full = Counter(m.raw for m in served)
    config = lab_pipeline(tmp_path, lab, *HEADER_ONLY_RULES, header_prefetch=True)
    for _poll in range(2):  # a re-fetch may take the next poll
        mailpipe_once(config)
    stored = Counter(stored_messages(tmp_path / "Maildir"))
    short = [(len(m), n) for m, n in stored.items() if m not in full]
    assert short == [], f"{len(short)} short copies stored (octets): {short[:8]}"
    # GNU pop3d stamps X-UIDL/X-UID/Status into a message when it serves it (so the
    # copies differ by read); nothing-lost is judged without the stamps.
    left = Counter(unstamped(m.raw) for m in lab.messages())
    whole = Counter(unstamped(m) for m in full.elements())
    kept = Counter(unstamped(m) for m in stored.elements())
    # Nothing lost: every message is stored complete, or still on the server.
    assert not whole - kept - left, [m[:200] for m in whole - kept - left]


GNU_STAMPS = (b"x-uidl:", b"x-uid:", b"status:", b"x-status:", b"x-imapbase:")


def unstamped(raw: bytes) -> bytes:
    """``raw`` without the header lines GNU pop3d adds to a message it has served."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(GNU_STAMPS)]
    return b"\r\n".join(lines) + sep + body


def test_popa3d_reused_uidl_in_keep_mode(lab_servers, tmp_path) -> None:
    """popa3d's UIDL hashes a few headers, so a new message can come back with the
    UIDL of one seen before (RFC 1939 allows reuse once the first is gone). In keep
    mode mailpipe skips it forever; delete mode handles it (``uidl_reused``)."""
    lab = lab_servers("popa3d")
    first = b"Subject: first\n\nshort\n"
    second = b"Subject: second\n\na longer body that changes the LIST size\n"
    config = lab_pipeline(tmp_path, lab, delete="never")
    lab.load([first])
    [before] = lab.messages()
    run, _ = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    lab.load([second])
    [after] = lab.messages()
    assert after.uid == before.uid and after.size != before.size  # the reuse
    run, _ = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    stored = stored_messages(tmp_path / "Maildir")
    assert Counter(stored) == Counter([before.raw, after.raw])


def _session_starts(stderr: str) -> list[datetime]:
    return [
        datetime.fromisoformat(e["timestamp"])
        for e in log_events(stderr)
        if e.get("event") == "pop3_authenticated"
    ]


def test_courier_login_delay_between_commit_windows(lab_servers, tmp_path) -> None:
    """Courier advertises ``LOGIN-DELAY 10``; with ``commit_window`` mailpipe logged in
    three times in 0.5 s. A poll must not log in again before the delay has passed
    (it may instead end and leave the rest for the next poll). The bound checked is
    the server's advertised delay, a protocol figure, not a speed."""
    lab = lab_servers("courier")
    messages = [b"Subject: window %d\n\nbody\n" % i for i in range(6)]
    lab.load(messages)
    run, _ = mailpipe_once(lab_pipeline(tmp_path, lab, commit_window=2))
    assert run.returncode == 0, run.stderr[-3000:]
    starts = _session_starts(run.stderr)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
    assert all(g >= lab.login_delay for g in gaps), f"logins {gaps} s apart"
    left = lab.messages()
    assert len(stored_messages(tmp_path / "Maildir")) + len(left) == len(messages)


@pytest.fixture
def cyrus_min_poll():
    """A private Cyrus enforcing ``popminpoll: 1`` (LOGIN-DELAY 60, enforced)."""
    reason = Cyrus.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    lab = Cyrus(tempfile.mkdtemp(prefix="mailpipe-cyrus-minpoll-"), popminpoll=1)
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()
        shutil.rmtree(lab.base_dir, ignore_errors=True)


def test_cyrus_login_delay_ends_poll_cleanly(cyrus_min_poll, tmp_path) -> None:
    """Cyrus with ``popminpoll`` refuses a second login within the delay
    (``-ERR [LOGIN-DELAY]``). Measured: the poll ended as SourceBusyError, exit 1,
    ``committed: false``, although the first window was committed and deleted."""
    lab = cyrus_min_poll
    messages = [b"Subject: window %d\n\nbody\n" % i for i in range(12)]
    # No POP3 login before mailpipe's: it would start the 60 s delay.
    assert lab._write_messages(messages) == []
    run, summary = mailpipe_once(lab_pipeline(tmp_path, lab, commit_window=5))
    stored = stored_messages(tmp_path / "Maildir")
    # Read what is left without the delay: restart with popminpoll 0 (same spool).
    lab.stop()
    lab.popminpoll = 0
    lab.start()
    left = lab.messages()
    assert len(stored) + len(left) == len(messages)  # nothing lost or doubled
    assert len(set(stored)) == len(stored)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary.get("committed") is True and summary.get("error") is None
