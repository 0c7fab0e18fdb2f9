"""forward.smtp against a real aiosmtpd relay on 127.0.0.1 (plain, STARTTLS, implicit TLS)."""

from __future__ import annotations

import email.utils
import os
import socket
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.forward.smtp import SmtpForwardOptions, SmtpForwardProcessor
from pydantic import ValidationError
from structlog.testing import capture_logs

from mailpipe import Message, PermanentFailure, ProcessorContext, TemporaryFailure
from mailpipe.plugin_manager import get_plugin_manager
from mailpipe.registry import collect
from mailpipe.testing.sinks import SmtpSink

pytestmark = pytest.mark.timeout(60)

PASSWORD = "smtp-relay-s3cret-Zq9"
RAW = (
    b"Return-Path: <alice@example.org>\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"Date: Mon, 3 Jun 2024 10:00:00 +0000\r\n"
    b"\r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b"last line\r\n"
)


OPENED: list[SmtpForwardProcessor] = []


@pytest.fixture(autouse=True)
async def close_processors() -> AsyncIterator[None]:
    """Close (QUIT) every processor a test made, as the engine does after a session."""
    yield
    while OPENED:
        await OPENED.pop().close()


def make(tmp_path: Path, port: int, *, dry_run: bool = False, **opts: Any) -> SmtpForwardProcessor:
    table: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "envelope_from": "mailpipe@forwarder.example",
        "to": ["archive@example.net"],
        "timeout": "10s",
    }
    table.update(opts)
    options = SmtpForwardOptions.model_validate(table, context={"base_dir": tmp_path})
    proc = SmtpForwardProcessor(options, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))
    OPENED.append(proc)
    return proc


def message(raw: bytes = RAW, uid: str = "UID-1") -> Message:
    return Message.from_bytes(raw, mailbox="inbox", uid=uid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def full_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


def test_forward_processors_are_registered() -> None:
    registry = collect(get_plugin_manager(entry_points=False))
    for name in ("forward.smtp", "forward.webhook", "forward.command"):
        cls = registry.processor(name)
        assert cls.commits is True


async def test_smtp_resends_original_with_resent_block(tmp_path: Path) -> None:
    msg = message()
    with SmtpSink() as sink:
        proc = make(tmp_path, sink.port, to=["archive@example.net", "audit@example.net"])
        assert await proc.process(msg) is None
        (mail,) = sink.messages
    assert mail.mail_from == "mailpipe@forwarder.example"
    assert mail.rcpt_tos == ["archive@example.net", "audit@example.net"]
    # The original bytes follow the prepended block untouched (dots unstuffed again).
    assert mail.data.endswith(RAW)
    head = mail.data[: -len(RAW)].decode("ascii")
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if line and line[0] != " "]
    # RFC 5322 §3.6.6: the Resent-* block sits as a group right above the original fields.
    assert names == [
        "X-Mailpipe-Key", "Resent-Date", "Resent-From", "Resent-To", "Resent-Message-ID"
    ]
    parsed = mail.email
    assert parsed["X-Mailpipe-Key"] == msg.key
    assert parsed["Resent-From"] == "mailpipe@forwarder.example"
    assert parsed["Resent-To"] == "archive@example.net, audit@example.net"
    assert email.utils.parsedate_to_datetime(parsed["Resent-Date"]) is not None
    assert parsed["Resent-Message-ID"].startswith(f"<{msg.key}.")
    assert parsed["Message-ID"] == "<orig-1@example.org>"
    assert mail.tls is False


async def test_smtp_resent_message_id_is_stable_across_resends(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        proc = make(tmp_path, sink.port)
        await proc.process(message())
        await make(tmp_path, sink.port).process(message())
        await proc.process(message(uid="UID-2"))
        ids = [m.email["Resent-Message-ID"] for m in sink.messages]
    assert ids[0] == ids[1]  # a re-send after a crash can be deduplicated downstream
    assert ids[2] != ids[0]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_smtp_starttls_with_auth(tmp_path: Path, mechanism: str) -> None:
    with SmtpSink(tls="starttls", auth={"relay": PASSWORD}, auth_mechanisms=[mechanism]) as sink:
        proc = make(
            tmp_path, sink.port, security="starttls", ca_file=str(sink.ca_file),
            username="relay", password=PASSWORD,
        )
        await proc.process(message())
        (mail,) = sink.messages
        assert sink.auth_attempts == [("relay", True)]
    assert mail.tls is True and mail.login == "relay"


async def test_smtp_implicit_tls_with_auth_from_env_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELAY_PASSWORD", PASSWORD)
    with SmtpSink(tls="implicit", auth={"relay": PASSWORD}) as sink:
        proc = make(
            tmp_path, sink.port, security="tls", ca_file=str(sink.ca_file),
            username="relay", password={"env": "RELAY_PASSWORD"},
        )
        assert PASSWORD not in repr(proc.options)
        await proc.process(message())
        assert sink.messages[0].tls is True


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_untrusted_certificate_is_refused(tmp_path: Path, security: str) -> None:
    mode = "starttls" if security == "starttls" else "implicit"
    with SmtpSink(tls=mode) as sink:  # type: ignore[arg-type]
        proc = make(tmp_path, sink.port, security=security)
        with pytest.raises(TemporaryFailure, match="certificate verification failed"):
            await proc.process(message())
        assert sink.messages == []
        # The explicit opt-out connects (for test relays); a trusted CA file does too.
        await make(tmp_path, sink.port, security=security, tls_verify=False).process(message())
        await make(
            tmp_path, sink.port, security=security, ca_file=str(sink.ca_file)
        ).process(message())
        assert len(sink.messages) == 2


async def test_smtp_starttls_required_is_never_downgraded(tmp_path: Path) -> None:
    with SmtpSink() as sink:  # no STARTTLS offered
        proc = make(tmp_path, sink.port, security="starttls")
        with pytest.raises(TemporaryFailure, match="STARTTLS"):
            await proc.process(message())
        assert sink.messages == []


@pytest.mark.parametrize(
    ("code", "stage", "expected"),
    [
        (451, "data", TemporaryFailure),
        (452, "rcpt", TemporaryFailure),
        (421, "mail", TemporaryFailure),
        (554, "data", PermanentFailure),
        (550, "rcpt", PermanentFailure),
        (553, "mail", PermanentFailure),
    ],
)
async def test_smtp_reply_classes(
    tmp_path: Path, code: int, stage: str, expected: type[Exception]
) -> None:
    with SmtpSink(reply_code=code, reply_at=stage) as sink:  # type: ignore[arg-type]
        proc = make(tmp_path, sink.port)
        with pytest.raises(expected, match=str(code)) as info:
            await proc.process(message())
        assert sink.messages == []
    assert not isinstance(info.value, TemporaryFailure if expected is PermanentFailure else PermanentFailure)


async def test_smtp_connection_refused_is_temporary(tmp_path: Path) -> None:
    proc = make(tmp_path, free_port())
    with pytest.raises(TemporaryFailure, match=r"127\.0\.0\.1"):
        await proc.process(message())


async def test_smtp_retries_then_defers(tmp_path: Path) -> None:
    with SmtpSink(reply_code=451) as sink:
        proc = make(tmp_path, sink.port, retries=2, backoff="1ms")
        with capture_logs() as logs, pytest.raises(TemporaryFailure):
            await proc.process(message())
    events = [e["event"] for e in logs]
    assert events.count("forward_retrying") == 2
    assert events[-1] == "forward_deferred"


async def test_smtp_partial_refusal(tmp_path: Path) -> None:
    to = ["ok@example.net", "gone@example.net"]
    with SmtpSink(refuse={"gone@example.net": 550}) as sink:
        with pytest.raises(PermanentFailure, match=r"gone@example\.net"):
            await make(tmp_path, sink.port, to=to).process(message())
        with capture_logs() as logs:
            await make(tmp_path, sink.port, to=to, on_partial="commit").process(message())
        assert [m.rcpt_tos for m in sink.messages] == [["ok@example.net"]] * 2
    assert any(e["event"] == "forward_recipients_refused" for e in logs)


async def test_smtp_secret_never_in_logs_or_errors(tmp_path: Path) -> None:
    with SmtpSink(tls="starttls", auth={"relay": "another-password"}) as sink:
        proc = make(
            tmp_path, sink.port, security="starttls", ca_file=str(sink.ca_file),
            username="relay", password=PASSWORD, retries=1, backoff="1ms",
        )
        with capture_logs() as logs, pytest.raises(PermanentFailure) as info:
            await proc.process(message())
    assert "535" in str(info.value)  # RFC 4954: authentication credentials invalid
    assert PASSWORD not in full_text(info.value)
    assert logs and PASSWORD not in repr(logs)
    assert PASSWORD not in repr(proc.options) and PASSWORD not in str(proc.options)


async def test_smtp_8bit_body_and_utf8_headers(tmp_path: Path) -> None:
    body_8bit = RAW.replace(b"last line", "Grüße".encode())
    utf8_head = body_8bit.replace(b"quarterly numbers", "Zahlen für Q2".encode())
    with SmtpSink() as sink:
        proc = make(tmp_path, sink.port)
        await proc.process(message(body_8bit))
        await proc.process(message(utf8_head, uid="UID-2"))
        await proc.process(message(uid="UID-3"))
        plain8, utf8, ascii_ = sink.messages
    assert "BODY=8BITMIME" in plain8.mail_options and "SMTPUTF8" not in plain8.mail_options
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(utf8.mail_options)
    assert "BODY=8BITMIME" not in ascii_.mail_options
    assert plain8.data.endswith(body_8bit) and utf8.data.endswith(utf8_head)


async def test_smtp_utf8_headers_without_smtputf8_still_sent_as_8bitmime(tmp_path: Path) -> None:
    raw = RAW.replace(b"quarterly numbers", "Zahlen für Q2".encode())
    with SmtpSink(smtputf8=False) as sink:
        await make(tmp_path, sink.port).process(message(raw))
        (mail,) = sink.messages
    assert "BODY=8BITMIME" in mail.mail_options and "SMTPUTF8" not in mail.mail_options
    assert mail.data.endswith(raw)


async def test_smtp_dry_run_sends_nothing(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        with capture_logs() as logs:
            await make(tmp_path, sink.port, dry_run=True).process(message())
        assert sink.messages == []
    assert logs[0]["event"] == "forward_skipped" and logs[0]["reason"] == "dry_run"


async def test_smtp_spooled_message(tmp_path: Path) -> None:
    spool = tmp_path / "spooled.eml"
    spool.write_bytes(RAW)
    ref = message().ref
    with SmtpSink() as sink:
        await make(tmp_path, sink.port).process(Message(ref=ref, spool_path=spool))
        assert sink.messages[0].data.endswith(RAW)


def test_smtp_options_validation(tmp_path: Path) -> None:
    base = {"host": "relay", "envelope_from": "a@example.org", "to": ["b@example.org"]}
    ok = SmtpForwardOptions.model_validate(base)
    assert ok.security == "starttls" and ok.tls_verify is True
    assert SmtpForwardProcessor(ok, ProcessorContext()).port == 587
    bad: dict[str, Any]
    for bad in (
        {"to": ["b@example.org\r\nRCPT TO:<evil@example.org>"]},
        {"to": []},
        {"envelope_from": "not an address"},
        {"username": "u"},
        {"password": "p-secret"},
        {"security": "ssl"},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            SmtpForwardOptions.model_validate({**base, **bad})
    for security, port in (("tls", 465), ("none", 25)):
        opts = SmtpForwardOptions.model_validate({**base, "security": security})
        assert SmtpForwardProcessor(opts, ProcessorContext()).port == port


def test_smtp_options_describe_every_field() -> None:
    schema = SmtpForwardOptions.model_json_schema()
    assert all("description" in p for p in schema["properties"].values())


async def test_smtp_through_local_postfix(tmp_path: Path) -> None:
    """Optional: a real Postfix on 127.0.0.1:25 (skipped wherever it is not set up)."""
    if not os.path.exists("/usr/sbin/postfix"):
        pytest.skip("Postfix is not installed (/usr/sbin/postfix); optional check")
    with socket.socket() as s:
        s.settimeout(2)
        if s.connect_ex(("127.0.0.1", 25)) != 0:
            pytest.skip("Postfix is installed but not listening on 127.0.0.1:25")
    proc = make(tmp_path, 25, to=["postmaster@localhost"], envelope_from="mailpipe@localhost")
    await proc.process(message())


async def test_smtp_utf8_recipient_needs_smtputf8(tmp_path: Path) -> None:
    to = ["jörg@exämple.de"]
    with SmtpSink() as sink:
        await make(tmp_path, sink.port, to=to).process(message())
        (mail,) = sink.messages
    assert mail.rcpt_tos == to and "SMTPUTF8" in mail.mail_options
    assert "Resent-To: jörg@exämple.de\r\n".encode() in mail.data  # RFC 6532, raw UTF-8
    with SmtpSink(smtputf8=False) as sink:
        with pytest.raises(PermanentFailure, match="SMTPUTF8"):
            await make(tmp_path, sink.port, to=to).process(message())
        assert sink.messages == []


async def test_smtp_reuses_one_connection_per_session(tmp_path: Path) -> None:
    with SmtpSink(tls="starttls", auth={"relay": PASSWORD}) as sink:
        opts: dict[str, Any] = {"security": "starttls", "ca_file": str(sink.ca_file),
                "username": "relay", "password": PASSWORD}
        reused = make(tmp_path, sink.port, **opts)
        for uid in ("a", "b", "c"):
            await reused.process(message(uid=uid))
        await reused.close()
        assert sink.connections == 1 and sink.auth_attempts == [("relay", True)]
        capped = make(tmp_path, sink.port, messages_per_connection=2, **opts)
        for uid in ("a", "b", "c"):
            await capped.process(message(uid=uid))
        await capped.close()
        assert sink.connections == 3
        single = make(tmp_path, sink.port, reuse_connection=False, **opts)
        for uid in ("a", "b"):
            await single.process(message(uid=uid))
        assert sink.connections == 5
        assert len(sink.messages) == 8


async def test_smtp_reconnects_after_the_relay_dropped_the_connection(tmp_path: Path) -> None:
    with SmtpSink() as sink:
        proc = make(tmp_path, sink.port)
        await proc.process(message(uid="a"))
        sink.disconnect_all()  # an idle timeout on the relay's side
        await proc.process(message(uid="b"))
        assert sink.connections == 2 and len(sink.messages) == 2


async def test_smtp_new_connection_after_a_failure(tmp_path: Path) -> None:
    with SmtpSink(reply_code=451) as sink:
        proc = make(tmp_path, sink.port)
        with pytest.raises(TemporaryFailure):
            await proc.process(message(uid="a"))
        sink.reply_code = None
        await proc.process(message(uid="b"))
        assert sink.connections == 2 and len(sink.messages) == 1
