"""The one JSON document of a message: documented field by field, used by every producer."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from mailpipe.plugins.forward.webhook import (
    WebhookForwardOptions,
    WebhookForwardProcessor,
)
from mailpipe.plugins.parse import MessageRecord, parse_into
from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore

from mailpipe.document import (
    ENVELOPE,
    RAW,
    SCHEMA,
    STORED_AT,
    encode,
    message_document,
    minimal_record,
)
from mailpipe.message import Message
from mailpipe.processor import ProcessorContext

DOC = Path(__file__).resolve().parents[1] / "docs" / "message-document.md"
ROW = re.compile(r"^\| `(\w+)` \| ", re.MULTILINE)

RAW_MAIL = (
    b"From: Alice <alice@example.org>\r\nTo: help@example.org\r\n"
    b"Subject: printer on fire\r\nMessage-ID: <t-1@example.org>\r\n\r\n"
    b"printer on fire\r\n"
)


def documented(section: str) -> list[str]:
    """The field names of the table under ``## <section>`` in message-document.md."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    return ROW.findall(text[start : end if end > 0 else None])


def message(*, parsed: bool) -> Message:
    msg = Message.from_bytes(RAW_MAIL, mailbox="support", uid="UID-7")
    if parsed:
        parse_into(msg)
    msg.tags.add("ticket")
    return msg


def test_doc_names_the_schema_version_the_code_writes() -> None:
    assert SCHEMA == "mailpipe.message/1"
    assert f"`{SCHEMA}`" in DOC.read_text()


def test_doc_envelope_is_the_codes_envelope_in_order() -> None:
    envelope = list(ENVELOPE)
    envelope.insert(envelope.index("size") + 1, STORED_AT)
    assert documented("Envelope") == envelope
    assert documented("Last") == [RAW]


def test_doc_record_fields_are_the_parse_records_fields() -> None:
    fields = [f for f in MessageRecord.model_fields if f not in ENVELOPE]
    assert documented("Record fields") == fields


def test_doc_header_fields_are_what_minimal_record_returns() -> None:
    assert documented("Header fields") == list(minimal_record(message(parsed=False)))


def test_a_parsed_document_has_exactly_the_documented_fields_in_order() -> None:
    msg = message(parsed=True)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    doc = message_document(msg, stored_at=when)
    envelope = documented("Envelope")
    assert list(doc) == envelope + documented("Record fields") + [RAW]
    assert doc["stored_at"] == "2026-01-02T03:04:05+00:00"
    assert (doc["schema"], doc["parsed"], doc["tags"], doc["raw"]) == (
        SCHEMA, True, ["ticket"], None,
    )
    assert (doc["key"], doc["sha256"], doc["size"]) == (msg.key, msg.sha256, msg.size)
    assert doc["subject"] == "printer on fire"


def test_an_unparsed_document_has_the_header_fields_and_no_stored_at() -> None:
    doc = message_document(message(parsed=False), include_raw=True)
    envelope = [f for f in documented("Envelope") if f != STORED_AT]
    assert list(doc) == envelope + documented("Header fields") + [RAW]
    assert doc["parsed"] is False and doc["subject"] == "printer on fire"
    assert base64.b64decode(doc["raw"]) == RAW_MAIL


def test_exclude_drops_record_fields_only() -> None:
    doc = message_document(message(parsed=True), exclude={"headers", "key", "html"})
    assert "headers" not in doc and "html" not in doc
    assert doc["key"]  # envelope fields are never excluded


def test_jsonl_and_webhook_write_the_same_document(tmp_path: Path) -> None:
    # One shape: a store's line is the forwarders' document plus stored_at.
    msg = message(parsed=True)
    ctx = ProcessorContext(base_dir=tmp_path)
    JsonlStore(JsonlOptions(path=Path("out.jsonl")), ctx).process(msg)
    line = json.loads((tmp_path / "out.jsonl").read_bytes())
    webhook = WebhookForwardProcessor(
        WebhookForwardOptions(url="http://127.0.0.1:9/x"), ctx
    )
    body = json.loads(webhook.body(msg))
    stored_at = line.pop(STORED_AT)
    datetime.fromisoformat(stored_at)
    assert line == body == json.loads(encode(message_document(msg)))


def test_encode_survives_a_lone_surrogate() -> None:
    doc = {"key": "k", "subject": "bad \udcff byte"}
    assert json.loads(encode(doc)) == doc


def test_doc_example_is_what_the_code_writes() -> None:
    text = DOC.read_text()
    example = text[text.index("```json\n") + 8 :]
    example = example[: example.index("```")]
    msg = message(parsed=False)  # RAW_MAIL in mailbox "support", uid "UID-7", "ticket"
    assert example.strip().encode() == encode(message_document(msg))
