"""The `ticket` processor: subject tags, multilingual prefixes, thread chains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.ticket import SubjectRules, ticket_keys

from mailpipe.message import Message

RULES = SubjectRules.build()


@pytest.mark.parametrize(
    ("subject", "tickets", "rest", "reply", "forward"),
    [
        ("Re: [#1234] Printer broken", ["1234"], "Printer broken", True, False),
        ("AW: [Ticket#2024010110000011] Rechnung", ["2024010110000011"], "Rechnung",
         True, False),
        ("SV: Re[2]: [PROJ-42] Crash", ["PROJ-42"], "Crash", True, False),
        ("RE : Réf : demande", [], "demande", True, False),
        ("Fwd: WG: TR: RV: offer", [], "offer", False, True),
        ("返信: 転送: [#7] 請求書について", ["7"], "請求書について", True, True),
        ("回复\uff1a[#8] 发票", ["8"], "发票", True, False),
        ("Odp: VS: Antw: hello", [], "hello", True, False),
        ("Rechnung [#5] und [#6]", ["5", "6"], "Rechnung und", False, False),
        ("[proj-42] lower case is no key", [], "[proj-42] lower case is no key",
         False, False),
        ("Reply needed", [], "Reply needed", False, False),
        (None, [], "", False, False),
    ],
)
def test_subject_keys(
    subject: str | None, tickets: list[str], rest: str, reply: bool, forward: bool
) -> None:
    keys = ticket_keys(subject, [], [], RULES)
    assert keys.tickets == tickets
    assert keys.subject == rest
    assert (keys.is_reply, keys.is_forward) == (reply, forward)


def test_thread_ids_are_references_then_in_reply_to_deduplicated() -> None:
    keys = ticket_keys("x", ["c@h"], ["a@h", "b@h", "c@h"], RULES)
    assert keys.thread_ids == ["a@h", "b@h", "c@h"]
    assert keys.root_id == "a@h"
    assert keys.is_reply  # In-Reply-To makes a reply whatever the subject


def test_custom_pattern_and_prefix(processor: Callable[..., Any],
                                   make_message: Callable[[bytes], Message]) -> None:
    step = processor("ticket", patterns=[r"\(Case (\d{5})\)"], reply_prefixes=["Vast"])
    message = make_message(b"Subject: Vast: (Case 00042) help\r\n\r\nbody\r\n")
    assert step.process(message) is None
    assert message.record is not None and message.record.ticket is not None
    assert message.record.ticket.tickets == ["00042"]
    assert message.record.ticket.subject == "help"
    assert message.record.ticket.is_reply


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"patterns": [r"\[#\d+\]"]}, "has 0 groups; exactly one group"),
        ({"patterns": [r"\[(#)(\d+)\]"]}, "has 2 groups"),
        ({"patterns": ["(unclosed"]}, "invalid regex '(unclosed'"),
        ({"reply_prefixes": ["Re:"]}, "prefix 'Re:'"),
        ({"pattern": ["x"]}, "pattern"),
    ],
)
def test_bad_options_name_the_value(
    processor: Callable[..., Any], options: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ValueError) as info:
        processor("ticket", **options)
    assert needle in str(info.value)
    assert next(iter(options)) in str(info.value)


@pytest.mark.timeout(300)
def test_ticket_on_every_corpus_file(
    corpus_files: list[Path], make_message: Callable[[bytes], Message],
    processor: Callable[..., Any],
) -> None:
    step = processor("ticket")
    for path in corpus_files:
        message = make_message(path.read_bytes())
        assert step.process(message) is None, path.name
        assert parse_into(message).ticket is not None, path.name
