"""Filter rules on the helpdesk fields (reply, ticket, bounce, unwrap, extract)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.filter import Condition, Facts
from mailpipe.plugins.parse import PAYLOADS_KEY, MessageRecord, parse_into

from mailpipe.message import Message, MessageRef

REPLY = (b"From: c@customer.example\r\nSubject: AW: [#77] Drucker\r\nIn-Reply-To: "
         b"<t77@desk.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
         b"Geht wieder, danke!\r\n\r\nAm 1.1.2024 um 10:00 schrieb Desk "
         b"<desk@desk.example>:\r\n> Bitte neu starten.\r\n")
BOUNCE = (b"From: MAILER-DAEMON@mx.example\r\nSubject: failure\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n"
          b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n--b\r\nContent-Type: "
          b"message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
          b"Final-Recipient: rfc822; x@y.example\r\nAction: failed\r\nStatus: 5.1.1\r\n"
          b"--b--\r\n")


@pytest.fixture
def facts(make_message: Callable[[bytes], Message],
          processor: Callable[..., Any]) -> Callable[[bytes], Facts]:
    def run(raw: bytes) -> Facts:
        message = make_message(raw)
        for step in ("reply", "ticket", "bounce", "unwrap", "extract"):
            processor(step).process(message)
        return Facts(record=parse_into(message))

    return run


@pytest.mark.parametrize(
    ("when", "reply", "bounce"),
    [
        ({"reply": "danke"}, True, False),
        ({"reply": "neu starten"}, False, False),  # only in the quoted history
        ({"ticket": "77"}, True, False),
        ({"ticket": {"regex": "^7"}}, True, False),
        ({"is_reply": True}, True, False),
        ({"is_reply": False}, False, True),
        ({"bounce": True}, False, True),
        ({"bounce_status": "5.*"}, False, True),
        ({"bounce_status": "4.*"}, False, False),
        ({"envelope": "smime-*"}, False, False),
        ({"attachment_text": "x"}, False, False),
    ],
)
def test_helpdesk_keys(
    facts: Callable[[bytes], Facts], when: dict[str, Any], reply: bool, bounce: bool
) -> None:
    condition = Condition.model_validate(when)
    assert condition.needs_body()
    assert condition.matches(facts(REPLY)) is reply
    assert condition.matches(facts(BOUNCE)) is bounce


def test_without_the_steps_the_keys_do_not_match(
    make_message: Callable[[bytes], Message]
) -> None:
    record = parse_into(make_message(REPLY))
    for when in ({"reply": "danke"}, {"ticket": "77"}, {"is_reply": True},
                 {"bounce": True}):
        assert not Condition.model_validate(when).matches(Facts(record=record))
    assert Condition.model_validate({"bounce": False}).matches(Facts(record=record))


def test_bad_helpdesk_key_value_is_named() -> None:
    with pytest.raises(ValueError) as info:
        Condition.model_validate({"bounce": "yes"})
    assert "bounce" in str(info.value)


STEPS = ("unwrap", "reply", "ticket", "bounce", "extract")


@pytest.mark.timeout(600)
def test_helpdesk_chain_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    """The five steps in the example's order on every corpus file: nothing raises,
    payloads stay aligned with the attachments, every filter key can be evaluated."""
    steps = [processor(name) for name in STEPS]
    every_key = Condition.model_validate({"any": [
        {"reply": "x"}, {"ticket": "1"}, {"is_reply": True}, {"bounce": True},
        {"bounce_status": "5.*"}, {"envelope": "*"}, {"attachment_text": "x"}]})
    for path in corpus_files:
        message = make_message(path.read_bytes())
        for step in steps:
            assert step.process(message) is None, (path.name, step.name)
        record = parse_into(message)
        assert len(message.meta[PAYLOADS_KEY]) == len(record.attachments), path.name
        every_key.matches(Facts(record=record))
        assert MessageRecord.model_validate_json(record.model_dump_json()) == record


def test_spooled_message_with_large_attachments(
    tmp_path: Path, processor: Callable[..., Any]
) -> None:
    """A spooled message whose attachments are SpooledPayloads (over 256 KiB): the
    steps read them within their limits, without an exception."""
    pdf = b"%PDF-1.4\n" + b"0" * (400 * 1024)
    p7m = b"\x30\x80" + b"\x00" * (400 * 1024)
    raw = (b"From: MAILER-DAEMON@mx.example\r\nSubject: Undeliverable\r\nMIME-Version: "
           b"1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           b"Content-Type: text/plain\r\n\r\nnot delivered\r\n" + b"".join(
               b"--b\r\nContent-Type: " + ctype + b"\r\nContent-Disposition: attachment;"
               b" filename=" + name + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               + base64.encodebytes(data)
               for ctype, name, data in ((b"application/pdf", b"big.pdf", pdf),
                                         (b"application/pkcs7-mime", b"smime.p7m", p7m)))
           + b"--b--\r\n")
    spool = tmp_path / "spool" / "m.eml"
    spool.parent.mkdir()
    spool.write_bytes(raw)
    message = Message(ref=MessageRef(mailbox="mb", number=1, uid="u", size=len(raw)),
                      spool_path=spool)
    processor("parse").process(message)
    payloads = message.meta[PAYLOADS_KEY]
    assert [type(p).__name__ for p in payloads] == ["SpooledPayload"] * 2
    for name in STEPS:
        assert processor(name).process(message) is None, name
    record = parse_into(message)
    assert record.bounce is not None and record.bounce.kind == "non-standard"
    kinds = {d.kind for d in record.defects}
    assert "ExtractFailed" in kinds  # not a readable PDF: a note, not an exception
    assert "UnwrapFailed" not in kinds  # not CMS at all: nothing to open, nothing noted
    assert record.envelopes == []
