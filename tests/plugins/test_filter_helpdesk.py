"""Filter rules on the helpdesk fields (reply, ticket, bounce, unwrap, extract)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from mailpipe.plugins.filter import Condition, Facts
from mailpipe.plugins.parse import parse_into

from mailpipe.message import Message

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
