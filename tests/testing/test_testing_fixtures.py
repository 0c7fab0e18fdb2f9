"""The pytest plugin's fixtures: default fake server, factories and the sinks."""

from __future__ import annotations

import poplib
import smtplib
import urllib.request
from collections.abc import Callable
from typing import Any

import mailpipe.testing
from mailpipe.testing import Pop3Server


def test_pop3_server_fixture_defaults(pop3_server: Pop3Server) -> None:
    p = poplib.POP3(pop3_server.host, pop3_server.port, timeout=5)
    p.user("user")
    p.pass_("pass")
    assert p.stat() == (0, 0)
    p.quit()
    pop3_server.add_message(b"Subject: x\r\n\r\ny\r\n")
    assert pop3_server.uids == ["mp00000001"]


def test_pop3_server_factory_makes_independent_servers(
    pop3_server_factory: Callable[..., Pop3Server],
) -> None:
    a = pop3_server_factory(messages=[b"Subject: a\r\n\r\n"])
    b = pop3_server_factory(users={"bob": "pw"})
    assert a.port != b.port
    assert len(a.messages) == 1 and b.messages == []


def test_smtp_sink_fixture_records_mail(smtp_sink: Any) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=10) as client:
        client.sendmail(
            "a@example.org", ["b@example.org"], b"Subject: s\r\n\r\nbody\r\n"
        )
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["b@example.org"]]


def test_http_sink_factory_replays_statuses(
    http_sink_factory: Callable[..., Any],
) -> None:
    sink = http_sink_factory([201])
    request = urllib.request.Request(sink.url, data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201
    assert [(r.method, r.body) for r in sink.requests] == [("POST", b"{}")]


def test_http_sink_fixture_defaults_to_200(http_sink: Any) -> None:
    with urllib.request.urlopen(http_sink.url, timeout=10) as response:
        assert response.status == 200


def test_public_api_exports() -> None:
    for name in mailpipe.testing.__all__:
        assert getattr(mailpipe.testing, name) is not None
