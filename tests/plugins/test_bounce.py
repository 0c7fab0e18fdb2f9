"""The `bounce` processor (RFC 3464 DSNs, non-standard bounces) and `loopguard`."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.bounce import parse_delivery_status
from mailpipe.plugins.loopguard import ReplyBudget
from mailpipe.plugins.parse import parse_into

from mailpipe.message import Message
from mailpipe.processor import Disposition, ProcessorContext

DSN = b"""From: MAILER-DAEMON@mx.example\r
To: support@desk.example\r
Subject: Undelivered Mail Returned to Sender\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r
\r
--b\r
Content-Type: text/plain\r
\r
This is the mail system at host mx.example.\r
--b\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.example\r
\r
Final-Recipient: rfc822; gone@customer.example\r
Original-Recipient: rfc822;gone@customer.example\r
Action: failed\r
Status: 5.1.1\r
Diagnostic-Code: smtp; 550 5.1.1 <gone@customer.example>: Recipient address\r
 rejected: User unknown\r
\r
Final-Recipient: rfc822; slow@customer.example\r
Action: delayed\r
Status: 4.4.1\r
--b\r
Content-Type: text/rfc822-headers\r
\r
Message-ID: <ticket-42@desk.example>\r
Subject: [#42] Your ticket\r
--b--\r
"""


def test_dsn_recipients_actions_status_and_original(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    message = make_message(DSN)
    assert processor("bounce").process(message) is None
    bounce = parse_into(message).bounce
    assert bounce is not None
    assert (bounce.kind, bounce.action, bounce.permanent) == ("dsn", "failed", True)
    assert bounce.reporting_mta == "mx.example"
    assert bounce.original_message_id == "ticket-42@desk.example"
    gone, slow = bounce.recipients
    assert (gone.address, gone.action, gone.status) == (
        "gone@customer.example", "failed", "5.1.1")
    assert gone.diagnostic is not None and "User unknown" in gone.diagnostic
    assert (slow.address, slow.action, slow.status) == (
        "slow@customer.example", "delayed", "4.4.1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # no blank line between recipients
        ("Final-Recipient: rfc822;a@x\nAction: failed\nFinal-Recipient: rfc822;b@x\n"
         "Action: delayed\n", [("a@x", "failed"), ("b@x", "delayed")]),
        # Action before the recipient, fields in any case, folded
        ("reporting-mta: dns; m\n\naction: Failed\nstatus: 5.0.0\nfinal-recipient:\n"
         " rfc822;c@x\n", [("c@x", "failed")]),
        # per-recipient group written as base64 (seen from one MTA)
        ("Reporting-MTA: dns; m\n\nRmluYWwtUmVjaXBpZW50OiByZmM4MjI7ZEB4CkFjdGlvbjogZmFpbGVk\n",
         [("d@x", "failed")]),
        ("Reporting-MTA: dns; m\n", None),
    ],
    ids=["no-blank-line", "order-case-folding", "base64-group", "no-recipient"],
)
def test_delivery_status_quirks(text: str, expected: list[tuple[str, str]] | None) -> None:
    bounce = parse_delivery_status([text])
    if expected is None:
        assert bounce is None
    else:
        assert bounce is not None
        assert [(r.address, r.action) for r in bounce.recipients] == expected


def test_ordinary_mail_and_auto_reply_are_not_bounces(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    for raw in (
        b"From: a@x.example\r\nSubject: Delivery failed for my parcel\r\n\r\nhi\r\n",
        b"From: a@x.example\r\nAuto-Submitted: auto-replied\r\nSubject: Out of "
        b"office\r\n\r\naway\r\n",
    ):
        message = make_message(raw)
        processor("bounce").process(message)
        assert parse_into(message).bounce is None


def test_nonstandard_bounce_from_mailer_daemon(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any]
) -> None:
    raw = (b"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n"
           b"Subject: Delivery Status Notification (Failure)\r\n\r\n"
           b"Delivery to the following recipient failed permanently:\r\n\r\n"
           b"     nobody@nowhere.example\r\n\r\nTechnical details of permanent failure:"
           b"\r\n550 5.1.1 The email account does not exist.\r\n")
    message = make_message(raw)
    processor("bounce").process(message)
    bounce = parse_into(message).bounce
    assert bounce is not None
    assert (bounce.kind, bounce.permanent) == ("non-standard", True)
    if pytest.importorskip("flufl.bounce"):
        assert [r.address for r in bounce.recipients] == ["nobody@nowhere.example"]
    message = make_message(raw)
    processor("bounce", nonstandard=False).process(message)
    assert parse_into(message).bounce is None


def test_flufl_bounce_gets_at_most_the_cap(
    make_message: Callable[[bytes], Message], processor: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report padded with 100,000 blank lines (flufl's detectors cost time per
    line): flufl.bounce is given the first FLUFL_MAX octets, never the whole."""
    from mailpipe.plugins.bounce import nonstandard

    given: list[int] = []
    real = nonstandard.flufl_failures

    def spy(raw: bytes) -> tuple[set[str], set[str]] | None:
        given.append(len(raw))
        return real(raw)

    monkeypatch.setattr(nonstandard, "flufl_failures", spy)
    raw = (b"From: MAILER-DAEMON@mx.example\r\nSubject: Undelivered Mail Returned to "
           b"Sender\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
           b"report-type=delivery-status; boundary=b\r\n\r\n--b\r\nContent-Type: "
           b"text/plain\r\n\r\n<nobody@nowhere.example>: host mx.nowhere.example "
           b"said: 550 5.1.1 unknown user\r\n" + b"\r\n" * 100_000 + b"--b--\r\n")
    assert len(raw) > 3 * nonstandard.FLUFL_MAX
    message = make_message(raw)
    assert processor("bounce").process(message) is None
    bounce = parse_into(message).bounce
    assert bounce is not None and (bounce.kind, bounce.permanent) == ("non-standard", True)
    assert len(given) == 1 and 0 < given[0] <= nonstandard.FLUFL_MAX


EXPECTED_CORPUS = {  # file: (kind, permanent, first failed recipient)
    "bounce__cpython__msg_16.eml": ("dsn", True, "jangel1@cougar.noc.ucla.edu"),
    "bounce__enmime__delayed_dsn.eml": ("dsn", False, "thomas@de-montfort.ac.uk"),
    "bounce__flanker__office365.eml": ("dsn", True, "noname@example.com"),
    "bounce__mimekit__bounce.eml": ("dsn", True, "netec.test@netecgc.com"),
    "bounce__mimekit__delivery-status-no-blank-line.eml":
        ("dsn", True, "newsletter-request@imusic.com"),
    "bounce__flanker__gmail-invalid-address.eml": ("non-standard", True, None),
    "bounce__mikel__report_422.eml": ("dsn", False, "fraser@oooooooo.com.au"),
}
NOT_BOUNCES = (
    "bounce__flanker__aol.eml",  # ARF abuse report
    "bounce__mimekit__disposition-notification.eml",  # read receipt
    "bounce__mimekit__feedback-report.eml",
)


@pytest.mark.timeout(300)
def test_bounce_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    step = processor("bounce")
    found = {}
    for path in corpus_files:
        message = make_message(path.read_bytes())
        assert step.process(message) is None, path.name
        found[path.name] = parse_into(message).bounce
    for name, (kind, permanent, first) in EXPECTED_CORPUS.items():
        bounce = found[name]
        assert bounce is not None, name
        assert (bounce.kind, bounce.permanent) == (kind, permanent), name
        if first is not None:
            assert bounce.recipients[0].address == first, name
    assert all(found[name] is None for name in NOT_BOUNCES)
    assert len(found["bounce__cpython__msg_43.eml"].recipients) == 11  # type: ignore[union-attr]
    # sisimai's bounce samples (Japanese carriers, Notes, Postfix) are found ...
    assert all(b is not None for n, b in found.items() if "__sisimai__lhost" in n)
    # ... and no plain mail is taken for a bounce
    assert not [n for n, b in found.items()
                if b is not None and n.startswith(("plain__", "charset__", "real-world"))]


def test_reply_budget_per_sender_and_window(tmp_path: Path) -> None:
    budget = ReplyBudget(tmp_path / "g.sqlite3", limit=2, window=100)
    assert budget.take("A@x", "k1", now=0) and budget.take("a@x", "k2", now=1)
    assert not budget.take("a@x", "k3", now=2)
    assert budget.take("a@x", "k2", now=2)  # already counted: passes, not again
    assert budget.take("b@x", "k3", now=2)
    assert budget.take("a@x", "k4", now=101)  # the first answer left the window
    budget.close()
    again = ReplyBudget(tmp_path / "g.sqlite3", limit=2, window=100)
    assert not again.take("a@x", "k5", now=101)  # persisted: 1 and 101 still count
    assert again.take("a@x", "k4", now=101)
    again.close()


def test_loopguard_counts_messages_not_runs(
    tmp_path: Path, make_message: Callable[[bytes], Message]
) -> None:
    """A message re-run (a later step failed temporarily, a crash, a replay) is the
    same answer: it is counted once and passes every time; another one trips."""
    from mailpipe.plugins.loopguard import LoopGuardOptions, LoopGuardProcessor

    guard = LoopGuardProcessor(
        LoopGuardOptions(path="g.sqlite3", max_per_sender=1),
        ProcessorContext(base_dir=tmp_path),
    )
    human = b"From: c@customer.example\r\nSubject: help\r\n\r\nhi\r\n"
    for _ in range(4):
        message = make_message(human)
        assert guard.process(message) is None
        assert "loopguard" not in message.meta
    other = make_message(human)
    other.ref = replace(other.ref, uid="u2")
    assert guard.process(other) is Disposition.DONE
    assert other.meta["loopguard"] == "sender's answer budget used up"
    guard.close()


def test_reply_budget_reads_a_file_from_before_keys(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE replies (sender TEXT NOT NULL, at REAL NOT NULL);"
                      "INSERT INTO replies VALUES ('a@x', 0);")
    old.commit()
    old.close()
    budget = ReplyBudget(path, limit=2, window=100)
    assert budget.take("a@x", "k1", now=1)  # the old row still counts: 2 of 2
    assert not budget.take("a@x", "k2", now=2)
    assert budget.take("a@x", "k1", now=3)
    budget.close()


def test_loopguard_trips_on_auto_mail_and_budget(
    tmp_path: Path, make_message: Callable[[bytes], Message]
) -> None:
    from mailpipe.plugins.loopguard import LoopGuardOptions, LoopGuardProcessor

    guard = LoopGuardProcessor(
        LoopGuardOptions(path="g.sqlite3", max_per_sender=1),
        ProcessorContext(base_dir=tmp_path),
    )
    human = b"From: c@customer.example\r\nSubject: help\r\n\r\nhi\r\n"
    assert guard.process(make_message(human)) is None
    other = make_message(human)
    other.ref = replace(other.ref, uid="u2")  # another message of the same sender
    assert guard.process(other) is Disposition.DONE  # budget used
    auto = b"From: d@customer.example\r\nAuto-Submitted: auto-replied\r\n\r\naway\r\n"
    listmail = b"From: e@customer.example\r\nList-Id: <l.example>\r\n\r\nx\r\n"
    noreply = b"From: noreply@shop.example\r\n\r\nx\r\n"
    for raw in (auto, listmail, noreply):
        message = make_message(raw)
        assert guard.process(message) is Disposition.DONE
        assert message.meta["loopguard"]
    guard.close()
    assert (tmp_path / "g.sqlite3").is_file()
    tagger = LoopGuardProcessor(LoopGuardOptions(path="g.sqlite3", then="tag"),
                                ProcessorContext(base_dir=tmp_path))
    message = make_message(auto)
    assert tagger.process(message) is None
    assert "no-auto-reply" in message.tags
    tagger.close()


def test_loopguard_bad_option_names_key(processor: Callable[..., Any]) -> None:
    with pytest.raises(ValueError) as info:
        processor("loopguard", then="drop")
    assert "then" in str(info.value) and "'done' or 'tag'" in str(info.value)
    assert os.sep  # the path option is resolved, never opened, at build time
