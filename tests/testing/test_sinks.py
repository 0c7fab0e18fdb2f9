"""SmtpSink and HttpSink: real servers on 127.0.0.1 that record what they receive."""

from __future__ import annotations

import smtplib
import socket
import ssl

import aiosmtplib
import httpx
import pytest

from mailpipe.testing.sinks import HttpSink, SinkResponse, SmtpSink

pytestmark = pytest.mark.timeout(30)

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


def test_smtp_sink_records_envelope_and_exact_data() -> None:
    with SmtpSink() as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.org", "c@example.org"], MESSAGE)
        (mail,) = sink.messages
    assert mail.mail_from == "a@example.org"
    assert mail.rcpt_tos == ["b@example.org", "c@example.org"]
    assert mail.data == MESSAGE  # dot-unstuffed again by the server
    assert mail.email["Subject"] == "hi"
    assert mail.tls is False and mail.login is None


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_smtp_sink_tls_with_auth_from_async_test(tls: str) -> None:
    with SmtpSink(tls=tls, auth={"bob": "pw-123456"}) as sink:  # type: ignore[arg-type]
        assert sink.ca_file is not None and sink.ca_file.exists()
        ctx = ssl.create_default_context(cafile=str(sink.ca_file))
        client = aiosmtplib.SMTP(
            hostname=sink.host, port=sink.port, use_tls=tls == "implicit",
            start_tls=tls == "starttls", tls_context=ctx, timeout=10,
            username="bob", password="pw-123456",
        )
        async with client:
            await client.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        ca_file = sink.ca_file
        (mail,) = sink.messages
        assert mail.tls is True and mail.login == "bob"
        assert sink.auth_attempts == [("bob", True)]
    assert not ca_file.exists()  # cleaned up on exit


def test_smtp_sink_refuses_mail_without_auth_and_wrong_password() -> None:
    with SmtpSink(auth={"bob": "pw-123456"}) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.sendmail("a@example.org", ["b@example.org"], MESSAGE)
            assert info.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login("bob", "wrong")
        assert sink.messages == []
        # smtplib tries each offered mechanism (PLAIN, LOGIN); every one failed.
        assert sink.auth_attempts and set(sink.auth_attempts) == {("bob", False)}


@pytest.mark.parametrize(("stage", "code"), [("data", 451), ("rcpt", 550), ("mail", 421)])
def test_smtp_sink_reply_code_at_each_stage(stage: str, code: int) -> None:
    with SmtpSink(reply_code=code, reply_at=stage) as sink:  # type: ignore[arg-type]
        with (
            smtplib.SMTP(sink.host, sink.port, timeout=10) as client,
            pytest.raises(smtplib.SMTPException) as info,
        ):
            client.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        err = info.value
        codes = (
            [c for c, _ in err.recipients.values()]
            if isinstance(err, smtplib.SMTPRecipientsRefused)
            else [err.smtp_code]  # type: ignore[attr-defined]
        )
        assert codes == [code]
        assert sink.messages == []
        sink.reply_code = None  # changeable while running
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        assert len(sink.messages) == 1


def test_smtp_sink_refuses_listed_recipients_only() -> None:
    with SmtpSink(refuse={"bad@example.org": 550}) as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            refused = client.sendmail(
                "a@example.org", ["bad@example.org", "ok@example.org"], MESSAGE
            )
        assert refused == {"bad@example.org": (550, b"5.1.1 recipient refused")}
        assert sink.messages[0].rcpt_tos == ["ok@example.org"]


def test_http_sink_replays_responses_then_default() -> None:
    extra = SinkResponse(status=201, body=b'{"id": 7}', headers={"X-Test": "yes"})
    with HttpSink([503, extra]) as sink, httpx.Client(timeout=10) as client:
        statuses = [client.post(sink.url + "hook", content=b"{}").status_code for _ in range(2)]
        last = client.put(sink.url, content=b"x", headers={"X-Mine": "1"})
        assert statuses == [503, 201]
        assert last.status_code == 200
        requests = sink.requests
    assert [r.status for r in requests] == [503, 201, 200]
    assert requests[0].method == "POST" and requests[0].path == "/hook"
    assert requests[0].json() == {}
    assert requests[2].headers["x-mine"] == "1" and requests[2].body == b"x"


async def test_http_sink_tls_needs_the_ca() -> None:
    with HttpSink(tls=True) as sink:
        assert sink.url.startswith("https://127.0.0.1:")
        assert sink.ca_file is not None
        async with httpx.AsyncClient(timeout=10) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(sink.url)
        ctx = ssl.create_default_context(cafile=str(sink.ca_file))
        async with httpx.AsyncClient(verify=ctx, timeout=10) as trusting:
            assert (await trusting.get(sink.url)).status_code == 200
        assert len(sink.requests) == 1


def test_http_sink_delayed_response_is_cut_short_by_stop() -> None:
    sink = HttpSink([SinkResponse(status=200, delay=60)])
    with sink, httpx.Client(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.post(sink.url, content=b"{}")
    # stop() returned without waiting the 60 s delay out; the request was recorded.
    assert [r.status for r in sink.requests] == [200]


def test_http_sink_does_not_record_a_request_cut_short_in_its_body() -> None:
    """A client killed while it sends its body (the exactly-once test kills workers at
    random) leaves half a request: an endpoint never acts on it, so the sink records
    and answers nothing, and the next request gets the next response."""
    with HttpSink([201]) as sink:
        with socket.create_connection((sink.host, sink.port), timeout=10) as raw:
            raw.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
            raw.shutdown(socket.SHUT_WR)
            assert raw.recv(100) == b""  # closed, no answer
        with httpx.Client(timeout=10) as client:
            assert client.post(sink.url + "hook", content=b"{}").status_code == 201
        requests = sink.requests
    assert [(r.status, r.body) for r in requests] == [(201, b"{}")]
