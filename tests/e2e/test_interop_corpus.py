"""Interop: the corpus through six real POP3 servers, stored byte for byte.

For each server the corpus (all of it on Cyrus, an even sample of 30 elsewhere, to
keep CI short) is loaded, read once with the independent reference client, then
fetched by ``mailpipe run --once`` in delete mode: every stored file must be exactly
what the server serves, the mailbox must be empty, and a second run must fetch
nothing. What each server refuses or rewrites is asserted as recorded here.
"""

from __future__ import annotations

from collections import Counter

import pytest

from mailpipe.testing.servers.interop import (
    has_8bit_headers,
    lab_pipeline,
    mailpipe_once,
    sample,
    served_as_given,
    stored_messages,
)
from mailpipe.testing.servers.solid import REFUSED_CORPUS as SOLID_REFUSED

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

SERVERS = ["dovecot", "courier", "cyrus", "gnu", "solid", "popa3d"]
FULL_CORPUS = "cyrus"
SAMPLE = 30

#: Corpus files Cyrus' lmtpd refuses (554 5.6.0 "Message contains invalid header",
#: mostly an mbox "From " line or a bare-LF/space oddity in the header); measured.
CYRUS_REFUSED_COUNT = 45
#: Corpus files whose line endings Cyrus rewrites (bare CR); measured.
CYRUS_REWRITTEN = {
    "line-endings__rspamd__numeric_urls.eml",
    "line-endings__sisimai__mac_lhost-postfix-01.eml",
}


def corpus_for(server: str, corpus: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The messages ``server`` gets: what it can take, sampled unless FULL_CORPUS.

    solid-pop3d refuses every login ("-ERR message is damaged") while one message
    lacks a final line break (26 corpus files, test_solid_damaged_message_blocks_login);
    Courier serves messages with 8-bit headers as a notice until UTF8 is sent (issue 21
    defect 1, test_interop_defects.py), so they are left to that test.
    """
    items = corpus
    if server == "solid":
        items = [(n, raw) for n, raw in items if n not in SOLID_REFUSED]
    if server == "courier":
        items = [(n, raw) for n, raw in items if not has_8bit_headers(raw, parts=True)]
    return items if server == FULL_CORPUS else sample(items, SAMPLE)


@pytest.mark.parametrize("server", SERVERS)
def test_corpus_byte_exact_then_nothing(lab_servers, corpus, tmp_path, server) -> None:
    lab = lab_servers(server)
    given = corpus_for(server, corpus)
    refused = lab.load([raw for _, raw in given])
    if server == "cyrus":
        assert len(refused) == CYRUS_REFUSED_COUNT
    else:
        assert refused == []
    kept = [item for i, item in enumerate(given) if i not in set(refused)]
    served = lab.served()
    assert len(served) == len(kept) or server == "gnu"  # GNU re-splits its mbox
    if server in ("dovecot", "courier", "solid", "cyrus"):
        rewritten = {
            n
            for (n, raw), m in zip(kept, served, strict=True)
            if not served_as_given(server, raw, m.raw)
        }
        assert rewritten == (CYRUS_REWRITTEN if server == "cyrus" else set())

    security = "tls" if lab.implicit_tls else "none"
    config = lab_pipeline(tmp_path, lab, security=security)
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    stored = stored_messages(tmp_path / "Maildir")
    assert Counter(stored) == Counter(m.raw for m in served)  # byte for byte
    assert summary["retrieved"] == len(served) and summary["deleted"] == len(served)
    assert lab.messages() == []

    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["listed"] == 0 and summary["retrieved"] == 0
    assert len(stored_messages(tmp_path / "Maildir")) == len(stored)


@pytest.mark.parametrize("server", SERVERS)
def test_keep_mode_stores_once_and_leaves_mail(
    lab_servers, corpus, tmp_path, server
) -> None:
    lab = lab_servers(server)
    given = sample(corpus_for(server, corpus), 8)
    lab.load([raw for _, raw in given])  # refusals: test_corpus_byte_exact_then_nothing
    served = lab.served()
    uids = Counter(m.uid for m in served)
    if max(uids.values()) > 1:
        # popa3d's UIDL hashes a few headers: messages sharing one are issue 21
        # defect 3 (test_interop_defects.py), not this test's subject.
        assert server == "popa3d"
        lab.load([m.raw for m in served if uids[m.uid] == 1])
        served = lab.served()
    config = lab_pipeline(tmp_path, lab, delete="never")
    for poll in range(2):
        run, summary = mailpipe_once(config)
        assert run.returncode == 0, run.stderr[-3000:]
        assert summary["deleted"] == 0
        assert summary["retrieved"] == (len(served) if poll == 0 else 0)
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(
        m.raw for m in served
    )
    assert [m.raw for m in lab.messages()] == [m.raw for m in served]


def test_solid_damaged_message_blocks_login(lab_servers, corpus, tmp_path) -> None:
    """solid-pop3d answers PASS with -ERR while one message lacks its final line
    break: mailpipe reports the refusal and changes nothing."""
    lab = lab_servers("solid")
    damaged = next(raw for name, raw in corpus if name in SOLID_REFUSED)
    assert not damaged.endswith(b"\n")
    lab.clear()
    lab._write_messages([b"Subject: fine\n\nbody\n", damaged])
    config = lab_pipeline(tmp_path, lab, security="tls")
    run, _ = mailpipe_once(config)
    assert run.returncode != 0
    assert "message is damaged" in run.stderr
    assert stored_messages(tmp_path / "Maildir") == []
    # Nothing was deleted: the good message is still there once the bad one is gone.
    for p in (lab.home / "Maildir" / "new").iterdir():
        if not p.read_bytes().endswith(b"\n"):
            p.unlink()
    assert [m.raw for m in lab.messages()] == [b"Subject: fine\r\n\r\nbody\r\n"]
