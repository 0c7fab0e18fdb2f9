"""T-44 with the real pop3 source over the fake POP3 server: only a server that may
list a page of its maildrop per session (Gmail: greeting ``Gpop``, an ``X-GOOGLE-``
CAPA tag) gets a follow-up session after a session that ran new mail; any other
server listed everything, so each poll logs in once per commit window."""

from __future__ import annotations

from typing import Any

import pytest
from mailpipe.plugins.pop3.events import Capabilities
from mailpipe.plugins.pop3.source import pages_listing

from mailpipe.testing import Pop3Server

Factory = Any


def mail(n: int) -> bytes:
    return b"From: a@example.org\r\nSubject: %d\r\n\r\nbody %d\r\n" % (n, n)


@pytest.mark.parametrize(
    ("greeting", "caps", "pages"),
    [
        ("Gpop ready for requests from 192.0.2.1 q5pf21484907pbh.7", (), True),
        ("POP3 server ready", ("X-GOOGLE-RICO",), True),
        ("Dovecot ready.", ("UIDL", "TOP"), False),
        ("POP3 ready, Gpop is not at the start", ("X-GOOGLEISH",), False),
    ],
)
def test_pages_listing_recognises_gmail_only(
    greeting: str, caps: tuple[str, ...], pages: bool
) -> None:
    assert pages_listing(greeting, Capabilities(names=frozenset(caps))) is pages


async def test_a_server_that_lists_everything_gets_one_login_per_poll(
    pop3_server_factory: Factory, rig: Any
) -> None:
    srv: Pop3Server = pop3_server_factory(messages=[mail(n) for n in range(3)])
    r = rig(srv)
    summary = await r.poll()
    assert (summary.error, summary.processed, srv.messages) == (None, 3, [])
    assert len(srv.sessions) == 1 and summary.sessions == 1  # no T-44 follow-up


@pytest.mark.parametrize(
    "signature",
    [
        {"greeting": "Gpop ready for requests from 127.0.0.1 x1"},
        {"extra_capabilities": ["X-GOOGLE-VERHOEVEN", "X-GOOGLE-RICO"]},
    ],
)
async def test_gmails_signature_gets_the_follow_up_session(
    pop3_server_factory: Factory, rig: Any, signature: dict[str, Any]
) -> None:
    srv: Pop3Server = pop3_server_factory(
        messages=[mail(n) for n in range(3)], **signature
    )
    r = rig(srv)
    summary = await r.poll()
    assert (summary.error, summary.processed, srv.messages) == (None, 3, [])
    assert len(srv.sessions) == 2 and summary.sessions == 2  # one that found nothing
