"""The filter processor: rule validation, matching, actions and header-only prefetch."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.filter import FilterOptions, FilterProcessor
from mailpipe.plugins.parse import ParseProcessor
from pydantic import ValidationError

from mailpipe.message import Message, MessageRef
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.processor import Decision, Disposition, ProcessorContext
from mailpipe.registry import collect

DATA = Path(__file__).resolve().parents[1] / "data" / "parse"


def make(rules: list[dict[str, Any]] | str) -> FilterProcessor:
    table = tomllib.loads(rules) if isinstance(rules, str) else {"rules": rules}
    options = FilterOptions.model_validate(table, context={"base_dir": Path.cwd()})
    return FilterProcessor(options, ProcessorContext())


def msg(name: str) -> Message:
    return Message.from_bytes((DATA / name).read_bytes(), mailbox="mb")


def raw_msg(headers: str, body: str = "body\r\n") -> Message:
    return Message.from_bytes((headers.replace("\n", "\r\n") + "\r\n" + body).encode())


def test_registered_through_the_plugin_manager() -> None:
    registry = collect(get_plugin_manager(entry_points=False))
    assert registry.processor("filter") is FilterProcessor
    assert registry.processor("parse") is ParseProcessor
    assert FilterProcessor.commits is False


def test_architecture_example_toml() -> None:
    proc = make(
        """
        rules = [
          { when = { header.auto-submitted = "auto-replied" }, then = "drop" },
          { when = { from_domain = ["noreply.example"] }, then = "keep" },
        ]
        """
    )
    assert proc.header_only is True
    decision = proc.process(msg("bounce_dsn.eml"))
    assert decision == Decision(disposition=Disposition.DONE, reason="rules[0]")
    noreply = raw_msg("From: x@mail.noreply.example\nSubject: hi\n")
    assert proc.process(noreply) == Decision(
        disposition=Disposition.KEEP, reason="rules[1]"
    )
    assert proc.process(msg("html_only.eml")) is None


def test_actions_map_to_decisions_and_tags() -> None:
    proc = make(
        [
            {
                "name": "vip",
                "when": {"from": "alice@example.com"},
                "then": {"tag": ["vip", "a"]},
            },
            {"name": "also", "when": {"subject": "fwd"}, "then": {"tag": "fwd"}},
            {
                "name": "to-archive",
                "when": {"tag": "vip"},
                "then": {"route": "archive"},
            },
            {"name": "never", "when": {"subject": "Fwd"}, "then": "quarantine"},
        ]
    )
    message = msg("forward_uuencode.eml")
    decision = proc.process(message)
    assert decision == Decision(route="archive", reason="to-archive")
    assert message.tags == {"vip", "a", "fwd"}
    q = make(
        [{"name": "q", "when": {"attachment_name": "*.BIN"}, "then": "quarantine"}]
    )
    assert q.process(msg("forward_uuencode.eml")) == Decision(
        disposition=Disposition.QUARANTINE, reason="q"
    )


def test_continue_stops_rule_evaluation() -> None:
    proc = make(
        [
            {"when": {"from_domain": "example.com"}, "then": "continue"},
            {"when": {"subject": "Fwd"}, "then": "drop"},
        ]
    )
    assert proc.process(msg("forward_uuencode.eml")) is None


def test_header_conditions() -> None:
    m = msg("html_only.eml")
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"header": {"name": "List-Id", "exists": True}}, True),
        ({"header": {"name": "X-Missing"}}, False),
        ({"header": {"name": "X-Missing", "exists": False}}, True),
        ({"header": {"name": "precedence", "equals": "BULK"}}, True),
        (
            {"header": {"name": "list-id", "regex": r"<news\.lists\.example\.org>$"}},
            True,
        ),
        ({"header": {"name": "list-id", "contains": "nope"}}, False),
        (
            {"header": [{"name": "precedence", "equals": "bulk"}, {"name": "x-no"}]},
            False,
        ),
        ({"header": {"Precedence": ["junk", "bulk"]}}, True),
    ]
    for when, expected in cases:
        proc = make([{"when": when, "then": "keep"}])
        assert (proc.process(m) is not None) is expected, when


def test_address_domain_subject_body_conditions() -> None:
    m = msg("rfc2231_filenames.eml")
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"from": "JANE@example.org"}, True),
        ({"from": {"regex": r"@example\.org$"}}, True),
        ({"to": ["nobody@x", "joerg@example.de"]}, True),
        ({"cc": {"contains": "@"}}, False),
        ({"recipient": {"glob": "*@example.de"}}, True),
        ({"from_domain": ["EXAMPLE.org"]}, True),
        ({"from_domain": ["ample.org"]}, False),  # whole labels only
        ({"to_domain": "@example.de"}, True),
        ({"recipient_domain": ["example.org"]}, False),
        ({"subject": "für märz"}, True),  # string: contains, ignoring case
        ({"subject": {"equals": "Rechnung für März"}}, True),
        ({"subject": {"regex": "(?-i:rechnung)"}}, False),
        ({"body": "anhang"}, True),
        ({"body": {"regex": r"^Siehe\b"}}, True),
    ]
    for when, expected in cases:
        proc = make([{"when": when, "then": "keep"}])
        assert (proc.process(m) is not None) is expected, when


def test_idn_domains_match_in_either_form() -> None:
    m = msg("japanese_iso2022jp.eml")  # From taro@xn--wgv71a119e.jp
    assert make([{"when": {"from_domain": "日本語.jp"}, "then": "keep"}]).process(m)
    assert make(
        [{"when": {"from_domain": "xn--wgv71a119e.jp"}, "then": "keep"}]
    ).process(m)


def test_size_age_attachment_autoreply_list_conditions() -> None:
    now = datetime.now(UTC)
    old = raw_msg(
        f"From: a@b.example\nDate: {format_datetime(now - timedelta(days=40))}\n"
    )
    new = raw_msg(
        f"From: a@b.example\nDate: {format_datetime(now - timedelta(hours=1))}\n"
    )
    undated = raw_msg("From: a@b.example\n")
    older = make([{"when": {"age": {"gt": "30d"}}, "then": "drop"}])
    assert older.process(old) is not None
    assert older.process(new) is None
    assert older.process(undated) is None  # unknown age never matches
    m = msg("rfc2231_filenames.eml")
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"size": {"gt": "500B"}}, True),
        ({"size": {"gt": "1MB"}}, False),
        ({"size": {"ge": 100, "lt": "10KiB"}}, True),
        ({"attachment_count": 3}, True),
        ({"attachment_count": {"lt": 3}}, False),
        ({"attachment_name": ["*.exe", "*.pdf"]}, True),
        ({"attachment_name": {"regex": r"übersicht"}}, True),
        ({"attachment_type": "image/*"}, True),
        ({"attachment_type": "video/*"}, False),
        ({"auto_reply": False}, True),
        ({"mailing_list": True}, False),
    ]
    for when, expected in cases:
        proc = make([{"when": when, "then": "keep"}])
        assert (proc.process(m) is not None) is expected, when
    news = msg("html_only.eml")
    assert make([{"when": {"mailing_list": True}, "then": "keep"}]).process(news)
    assert make(
        [{"when": {"list_id": "news.lists.example.org"}, "then": "keep"}]
    ).process(news)
    assert make([{"when": {"auto_reply": True}, "then": "keep"}]).process(news)


def test_all_any_not() -> None:
    m = msg("bounce_dsn.eml")
    cases: list[tuple[dict[str, Any], bool]] = [
        ({"all": [{"auto_reply": True}, {"subject": "undelivered"}]}, True),
        ({"all": [{"auto_reply": True}, {"subject": "nope"}]}, False),
        ({"any": [{"subject": "nope"}, {"from_domain": "example.net"}]}, True),
        ({"not": {"auto_reply": True}}, False),
        ({"not": {"any": [{"subject": "x-none"}]}, "auto_reply": True}, True),
        ({"auto_reply": True, "subject": "nope"}, False),  # keys combine as all
    ]
    for when, expected in cases:
        proc = make([{"when": when, "then": "keep"}])
        assert (proc.process(m) is not None) is expected, when


def _errors(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as info:
        FilterOptions.model_validate({"rules": rules})
    return [dict(e) for e in info.value.errors()]


def test_bad_regex_is_a_config_error_naming_the_rule() -> None:
    (err,) = _errors(
        [{"name": "spam", "when": {"subject": {"regex": "(unclosed"}}, "then": "drop"}]
    )
    assert err["loc"] == ("rules", 0, "when", "subject", "regex")
    assert err["msg"].startswith("rule 'spam': invalid regex '(unclosed'")
    (err,) = _errors(
        [
            {"when": "x", "then": "drop"},
            {"when": {"header": {"name": "a", "regex": "["}}, "then": "keep"},
        ]
    )[1:]
    assert err["loc"][:2] == ("rules", 1)
    assert err["msg"].startswith("rule 'rules[1]': invalid regex")


def test_unknown_fields_are_config_errors_naming_the_rule() -> None:
    (err,) = _errors(
        [{"name": "r", "when": {"any": [{"subjekt": "x"}]}, "then": "drop"}]
    )
    assert err["loc"] == ("rules", 0, "when", "any", 0, "subjekt")
    assert err["msg"].startswith(
        "rule 'r': unknown condition 'subjekt'; known: all, any"
    )
    (err,) = _errors([{"when": {"subject": "x"}, "then": "dorp"}])
    assert err["loc"] == ("rules", 0, "then")
    assert "unknown action 'dorp'" in err["msg"] and "rules[0]" in err["msg"]
    (err,) = _errors([{"when": {"size": {"bigger": 3}}, "then": "drop"}])
    assert "unknown bound 'bigger'" in err["msg"]
    (err,) = _errors(
        [{"when": {"header": {"name": "x", "equal": "y"}}, "then": "drop"}]
    )
    assert "unknown header test key 'equal'" in err["msg"]
    (err,) = _errors([{"when": {}, "then": "drop"}])
    assert "empty condition" in err["msg"]
    (err,) = _errors([{"when": {"subject": "x"}, "then": "drop", "unless": 1}])
    assert err["loc"] == ("rules", 0, "unless")


def test_header_only_and_prefetch() -> None:
    full = (DATA / "bounce_dsn.eml").read_bytes()
    head = full[: full.index(b"\n\n") + 2]

    def top() -> Message:
        ref = MessageRef(mailbox="mb", number=1, uid="u", size=len(full))
        return Message(ref=ref, data=head, headers_only=True)

    drop = make([{"name": "auto", "when": {"auto_reply": True}, "then": "drop"}])
    assert drop.header_only is True
    assert drop.prefetch(top()) == Decision(disposition=Disposition.DONE, reason="auto")
    big = make([{"when": {"size": {"gt": 600}}, "then": "keep"}])
    assert big.prefetch(top()) == Decision(
        disposition=Disposition.KEEP, reason="rules[0]"
    )
    body_first = make(
        [
            {"when": {"body": "x"}, "then": "drop"},
            {"when": {"auto_reply": True}, "then": "drop"},
        ]
    )
    assert body_first.header_only is False
    assert body_first.prefetch(top()) is None  # cannot decide before download
    assert body_first.process(Message.from_bytes(full)) is not None
    undecidable = make(
        [
            {"when": {"auto_reply": True}, "then": {"tag": "auto"}},
            {"when": {"auto_reply": True}, "then": "quarantine"},
        ]
    )
    assert undecidable.header_only is True
    assert undecidable.prefetch(top()) is None  # quarantine needs the full bytes
    assert drop.prefetch(raw_msg("Subject: human\n")) is None


def test_works_after_parse_and_without_it() -> None:
    proc = make([{"when": {"attachment_count": {"ge": 2}}, "then": "keep"}])
    alone = msg("bounce_dsn.eml")
    assert proc.process(alone) is not None
    parsed = msg("bounce_dsn.eml")
    ParseProcessor(ParseProcessor.Options(), ProcessorContext()).process(parsed)
    record = parsed.record
    assert proc.process(parsed) is not None
    assert parsed.record is record  # reused, not parsed again
