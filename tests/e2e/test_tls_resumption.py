"""TLS session resumption across the mailboxes of one server (issue 18), against a real
Dovecot on 127.0.0.1 whose login processes serve many connections (Dovecot's
high-performance login mode, where its TLS tickets outlive one connection).

Resumption must never weaken verification (S-02, IS-02): a session is offered only to
the server and trust settings it was made with, and the pin is checked on a resumed
connection as on a full handshake.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from mailpipe.plugins.imap.source import ImapOptions, ImapSource
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe import tls
from mailpipe.errors import SourceConnectionError
from mailpipe.testing.dovecot import Dovecot, DovecotUser
from mailpipe.testing.pytest_plugin import dovecot_server

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(300)]

#: Dovecot's documented high-performance login mode: long-lived login processes that
#: serve many connections (the default forks one per connection, and each new
#: process has a new ticket key, so no session could ever be resumed).
SHARED_LOGIN = """
service pop3-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
}
service imap-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
}
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Dovecot]:
    yield from dovecot_server(imap=True, extra_config=SHARED_LOGIN)


def pop3(d: Dovecot, user: DovecotUser, **kw: Any) -> Pop3Source:
    table: dict[str, Any] = {
        "host": d.host, "port": d.pop3s_port, "security": "tls",
        "ca_file": str(d.ca_file), "username": user.name, "password": user.password,
    }
    table.update(kw)
    return Pop3Source(Pop3Options.model_validate(table), mailbox=user.name)


def imap(d: Dovecot, user: DovecotUser) -> ImapSource:
    return ImapSource(ImapOptions.model_validate({
        "host": d.host, "port": d.imaps_port, "security": "tls",
        "ca_file": str(d.ca_file), "username": user.name, "password": user.password,
    }))


async def pop3_session(source: Pop3Source) -> ssl.SSLObject:
    """One POP3 session (LIST, then QUIT); the TLS object it used."""
    async with source.session() as s:
        writer = s.client._writer
        assert writer is not None
        sslobj: ssl.SSLObject = writer.get_extra_info("ssl_object")
        await s.list()
        await s.commit()
    return sslobj


async def test_pop3_mailboxes_of_one_server_resume_tls(server: Dovecot) -> None:
    users = [server.add_user() for _ in range(3)]
    tls._CONTEXTS.clear()
    used = [await pop3_session(pop3(server, u)) for u in users]
    assert [o.session_reused for o in used] == [False, True, True]
    ctx = used[0].context
    assert isinstance(ctx, tls.ResumingContext)
    assert all(o.context is ctx for o in used)  # one context for the server
    # Verified TLS stays the default: certificate and host name are checked.
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


async def test_imap_mailboxes_of_one_server_resume_tls(server: Dovecot) -> None:
    users = [server.add_user() for _ in range(3)]
    tls._CONTEXTS.clear()
    reused = []
    for user in users:
        async with imap(server, user).session() as s:
            writer = s.client._writer
            assert writer is not None
            reused.append(writer.get_extra_info("ssl_object").session_reused)
            await s.list()
            await s.commit()  # LOGOUT: the session is kept after the last reply
    assert reused == [False, True, True]


async def test_a_session_is_not_offered_under_other_trust_settings(
    server: Dovecot,
) -> None:
    """After a verified session with the test CA, a mailbox of the same server that
    trusts only the system store still gets a full handshake, and is refused."""
    user = server.add_user()
    tls._CONTEXTS.clear()
    await pop3_session(pop3(server, user))
    with pytest.raises(SourceConnectionError, match="not trusted"):
        await pop3_session(pop3(server, user, ca_file=None))


async def test_the_pin_is_checked_on_a_resumed_session(server: Dovecot) -> None:
    user = server.add_user()
    tls._CONTEXTS.clear()
    first = await pop3_session(pop3(server, user))
    wrong = "00" * 32
    with pytest.raises(SourceConnectionError, match="pinned SHA-256"):
        await pop3_session(pop3(server, user, cert_sha256=wrong))
    der = first.getpeercert(binary_form=True)
    assert der is not None
    right = hashlib.sha256(der).hexdigest()
    again = await pop3_session(pop3(server, user, cert_sha256=right))
    assert again.session_reused  # the pin did not stop resumption, only checked it


def test_one_context_per_server_and_trust_settings() -> None:
    tls._CONTEXTS.clear()
    a = tls.server_context("mail.example", 995, None, True)
    assert tls.server_context("MAIL.example", 995, None, True) is a
    assert tls.server_context("mail.example", 993, None, True) is not a
    assert tls.server_context("other.example", 995, None, True) is not a
    unverified = tls.server_context("mail.example", 995, None, False)
    assert unverified is not a and unverified.verify_mode == ssl.CERT_NONE
    assert a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname
    assert a.minimum_version >= ssl.TLSVersion.TLSv1_2
