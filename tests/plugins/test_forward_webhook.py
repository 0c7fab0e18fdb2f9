"""forward.webhook against a real HTTP(S) server on 127.0.0.1 (HttpSink)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.forward.webhook import (
    WebhookForwardOptions,
    WebhookForwardProcessor,
    sign,
)
from mailpipe.plugins.parse.parser import parse_message
from pydantic import ValidationError
from structlog.testing import capture_logs

from mailpipe import Message, PermanentFailure, ProcessorContext, TemporaryFailure
from mailpipe.document import encode, message_document
from mailpipe.testing.sinks import HttpSink, SinkResponse

pytestmark = pytest.mark.timeout(60)

HMAC_SECRET = "hmac-shared-s3cret-K7w"
TOKEN = "bearer-tok3n-Vx81"
RAW = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: tickets@example.org\r\n"
    b"Subject: printer on fire\r\n"
    b"Message-ID: <t-1@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"It is on fire.\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="log.bin"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    + base64.encodebytes(bytes(range(256))).replace(b"\n", b"\r\n")
    + b"--b1--\r\n"
)


def make(
    tmp_path: Path, url: str, *, dry_run: bool = False, **opts: Any
) -> WebhookForwardProcessor:
    table: dict[str, Any] = {"url": url, "timeout": "10s", "backoff": "1ms"}
    table.update(opts)
    options = WebhookForwardOptions.model_validate(
        table, context={"base_dir": tmp_path}
    )
    return WebhookForwardProcessor(
        options, ProcessorContext(base_dir=tmp_path, dry_run=dry_run)
    )


def message(raw: bytes = RAW, uid: str = "UID-7") -> Message:
    msg = Message.from_bytes(raw, mailbox="support", uid=uid)
    msg.tags.update({"ticket", "urgent"})
    return msg


def parsed(raw: bytes = RAW) -> Message:
    """A message with a real record and attachment payloads from the parse plugin."""
    msg = message(raw)
    record, payloads = parse_message(
        raw, key=msg.key, mailbox=msg.ref.mailbox, uid=msg.ref.uid
    )
    msg.record = record
    msg.meta["attachment_payloads"] = payloads
    return msg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def deliver(proc: WebhookForwardProcessor, msg: Message) -> None:
    await proc.open()
    try:
        await proc.process(msg)
    finally:
        await proc.close()


async def test_webhook_posts_json_with_idempotency_key(tmp_path: Path) -> None:
    msg = message()
    with HttpSink([201]) as sink:
        proc = make(tmp_path, sink.url + "tickets", headers={"X-Tenant": "acme"})
        await deliver(proc, msg)
        (req,) = sink.requests
    assert req.method == "POST" and req.path == "/tickets"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["idempotency-key"] == msg.key
    assert req.headers["x-tenant"] == "acme"
    assert (
        "authorization" not in req.headers and "x-mailpipe-signature" not in req.headers
    )
    # The mailpipe.message/1 document (docs/message-document.md) of the message.
    body = req.json()
    assert body == json.loads(encode(message_document(msg)))
    assert (body["key"], body["schema"], body["mailbox"], body["uid"]) == (
        msg.key, "mailpipe.message/1", "support", "UID-7",
    )
    assert (body["tags"], body["parsed"], body["raw"]) == (
        ["ticket", "urgent"], False, None,
    )


async def test_webhook_body_holds_the_records_fields(tmp_path: Path) -> None:
    msg = parsed()
    with HttpSink() as sink:
        await deliver(make(tmp_path, sink.url), msg)
        body = sink.requests[0].json()
    record = msg.record.model_dump(mode="json")
    envelope = {"key", "mailbox", "uid", "sha256", "size", "tags"}
    assert {k: body[k] for k in record if k not in envelope} == {
        k: v for k, v in record.items() if k not in envelope
    }
    assert body["parsed"] is True
    assert all("content_base64" not in a for a in body["attachments"])


async def test_webhook_retries_5xx_then_commits(tmp_path: Path) -> None:
    msg = message()
    with HttpSink([503, 503, 200]) as sink:
        with capture_logs() as logs:
            await deliver(make(tmp_path, sink.url, retries=3), msg)
        requests = sink.requests
    assert [r.status for r in requests] == [503, 503, 200]
    assert len({r.body for r in requests}) == 1  # the same bytes each time
    assert {r.headers["idempotency-key"] for r in requests} == {msg.key}
    assert [e["event"] for e in logs].count("forward_retrying") == 2
    assert logs[-1]["event"] == "forward_sent" and logs[-1]["attempts"] == 3


async def test_webhook_gives_up_with_temporary_failure(tmp_path: Path) -> None:
    with HttpSink(default=500) as sink:
        with pytest.raises(TemporaryFailure, match="500"):
            await deliver(make(tmp_path, sink.url, retries=2), message())
        assert len(sink.requests) == 3  # bounded: 1 + retries


@pytest.mark.parametrize(
    ("status", "expected", "attempts"),
    [
        (400, PermanentFailure, 1),
        (404, PermanentFailure, 1),
        (422, PermanentFailure, 1),
        (301, PermanentFailure, 1),
        (408, TemporaryFailure, 2),
        (429, TemporaryFailure, 2),
        (502, TemporaryFailure, 2),
    ],
)
async def test_webhook_status_classes(
    tmp_path: Path, status: int, expected: type[Exception], attempts: int
) -> None:
    with HttpSink(default=status) as sink:
        with pytest.raises(expected, match=str(status)):
            await deliver(make(tmp_path, sink.url, retries=1), message())
        assert len(sink.requests) == attempts


async def test_webhook_honours_retry_after_within_bounds(tmp_path: Path) -> None:
    busy = SinkResponse(status=429, headers={"Retry-After": "0"})
    with HttpSink([busy, 200]) as sink:
        await deliver(make(tmp_path, sink.url, retries=1), message())
        assert [r.status for r in sink.requests] == [429, 200]


async def test_webhook_connection_refused_is_temporary(tmp_path: Path) -> None:
    proc = make(tmp_path, f"http://127.0.0.1:{free_port()}/hook", retries=1)
    with capture_logs() as logs, pytest.raises(TemporaryFailure, match="ConnectError"):
        await deliver(proc, message())
    assert [e["event"] for e in logs] == ["forward_retrying", "forward_deferred"]


async def test_webhook_timeout_is_temporary(tmp_path: Path) -> None:
    with HttpSink(default=SinkResponse(status=200, delay=30)) as sink:
        proc = make(tmp_path, sink.url, timeout="200ms", retries=0)
        with pytest.raises(TemporaryFailure, match="timed out"):
            await deliver(proc, message())


async def test_webhook_hmac_signature_verifies(tmp_path: Path) -> None:
    with HttpSink() as sink:
        await deliver(make(tmp_path, sink.url, hmac_secret=HMAC_SECRET), message())
        (req,) = sink.requests
    expected = hmac.new(HMAC_SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    scheme, _, digest = req.headers["x-mailpipe-signature"].partition("=")
    assert scheme == "sha256" and hmac.compare_digest(digest, expected)
    assert sign(HMAC_SECRET, req.body) == digest
    assert sign("another", req.body) != digest


async def test_webhook_secrets_never_in_logs_or_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOK_TOKEN", TOKEN)
    with HttpSink([401]) as sink:
        proc = make(
            tmp_path,
            sink.url,
            hmac_secret=HMAC_SECRET,
            bearer_token={"env": "HOOK_TOKEN"},
        )
        with capture_logs() as logs, pytest.raises(PermanentFailure) as info:
            await deliver(proc, message())
        (req,) = sink.requests
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    text = "".join(traceback.format_exception(info.value)) + repr(info.value)
    for secret in (HMAC_SECRET, TOKEN):
        assert secret not in text
        assert secret not in repr(logs)
        assert secret not in repr(proc.options)


async def test_webhook_include_raw(tmp_path: Path) -> None:
    msg = message()
    with HttpSink() as sink:
        await deliver(make(tmp_path, sink.url, include_raw=True), msg)
        body = sink.requests[0].json()
    assert base64.b64decode(body["raw"]) == RAW


@pytest.mark.parametrize("mode", ["inline", "reference"])
async def test_webhook_attachments(tmp_path: Path, mode: str) -> None:
    msg = parsed()
    payloads = msg.meta["attachment_payloads"]
    assert bytes(range(256)) in payloads
    with HttpSink() as sink:
        await deliver(make(tmp_path, sink.url, attachments=mode), msg)
        body = sink.requests[0].json()
    items = body["attachments"]
    assert len(items) == len(payloads)
    item = next(i for i in items if i.get("filename") == "log.bin")
    assert item["sha256"] == hashlib.sha256(bytes(range(256))).hexdigest()
    assert item["size"] == 256
    if mode == "inline":
        assert base64.b64decode(item["content_base64"]) == bytes(range(256))
    else:
        assert all("content_base64" not in i for i in items)


async def test_webhook_tls_verification(tmp_path: Path) -> None:
    with HttpSink(tls=True) as sink:
        with pytest.raises(TemporaryFailure, match="certificate verification failed"):
            await deliver(make(tmp_path, sink.url, retries=0), message())
        assert sink.requests == []
        await deliver(make(tmp_path, sink.url, ca_file=str(sink.ca_file)), message())
        await deliver(make(tmp_path, sink.url, tls_verify=False), message())
        assert len(sink.requests) == 2


async def test_webhook_reuses_one_client_per_session(tmp_path: Path) -> None:
    with HttpSink() as sink:
        proc = make(tmp_path, sink.url, method="PUT")
        await proc.open()
        try:
            for uid in ("a", "b", "c"):
                await proc.process(message(uid=uid))
        finally:
            await proc.close()
        requests = sink.requests
    assert [r.method for r in requests] == ["PUT"] * 3
    assert len({r.headers["idempotency-key"] for r in requests}) == 3


async def test_webhook_dry_run_sends_nothing(tmp_path: Path) -> None:
    with HttpSink() as sink:
        with capture_logs() as logs:
            await deliver(make(tmp_path, sink.url, dry_run=True), message())
        assert sink.requests == []
    assert logs[0]["event"] == "forward_skipped"


def test_webhook_options_validation() -> None:
    ok = WebhookForwardOptions.model_validate({"url": "https://hooks.example/x"})
    assert ok.retries == 3 and ok.tls_verify is True and ok.attachments == "none"
    for bad in (
        {"url": "ftp://example/x"},
        {"url": "not a url"},
        {"url": "http://h/x", "headers": {"Idempotency-Key": "x"}},
        {"url": "http://h/x", "headers": {"X-A": "a\r\nX-B: b"}},
        {"url": "http://h/x", "attachments": "all"},
        {"url": "http://h/x", "retries": 1000},
        {"url": "http://h/x", "surprise": True},
    ):
        with pytest.raises(ValidationError):
            WebhookForwardOptions.model_validate(bad)
    schema = WebhookForwardOptions.model_json_schema()
    assert all("description" in p for p in schema["properties"].values())
