"""Interop: every way in that each of six real servers offers.

Each SASL mechanism, APOP and USER/PASS a server accepts (``LabServer.auth_methods``)
over implicit TLS, ``auto`` over plaintext, STLS and implicit TLS; a wrong password
is an AuthenticationError everywhere; STLS against a server without it is refused
before any credential is sent; CAPA is read again after login (GNU pop3d lists
IMPLEMENTATION only then).
"""

from __future__ import annotations

import pytest
import structlog
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe.errors import AuthenticationError, SourcePermanentError
from mailpipe.testing.servers import LabServer, server_class

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

SERVERS = ["dovecot", "courier", "cyrus", "gnu", "solid", "popa3d"]
MESSAGE = b"Subject: interop auth\r\n\r\nbody\r\n"

#: What ``auth = "auto"`` picks on each server (SCRAM-SHA-256, PLAIN, USER, LOGIN).
AUTO_PICKS = {
    "dovecot": "scram-sha-256",
    "courier": "plain",
    "cyrus": "scram-sha-256",
    "gnu": "user",
    "solid": "user",
    "popa3d": "user",
}


def options(lab: LabServer, security: str, **kw: object) -> Pop3Options:
    table: dict[str, object] = {
        "host": "localhost",
        "port": lab.port_for(security),  # type: ignore[arg-type]
        "security": security,
        "username": lab.user.name,
        "password": lab.user.password,
        "ca_file": str(lab.ca_file),
        "allow_plaintext_password": security == "none",
        "read_timeout": 30,
    }
    table.update(kw)
    return Pop3Options.model_validate(table)


async def login(lab: LabServer, security: str, **kw: object) -> tuple[str, Pop3Source]:
    """Open a session, list, return the method logged as authenticated."""
    src = Pop3Source(options(lab, security, **kw), mailbox="interop")
    with structlog.testing.capture_logs() as logs:
        async with src.session() as s:
            assert s.client.tls_active is (security != "none")
            refs = await s.list()
            assert [r.size > 0 for r in refs] == [True]
    methods = [e["method"] for e in logs if e["event"] == "pop3_authenticated"]
    assert len(methods) == 1
    return methods[0], src


def auth_cases() -> list[tuple[str, str]]:
    return [
        (server, auth)
        for server in SERVERS
        for auth in server_class(server).auth_methods
    ]


@pytest.mark.parametrize(("server", "auth"), auth_cases())
async def test_each_offered_mechanism(lab_servers, server, auth) -> None:
    lab = lab_servers(server)
    lab.load([MESSAGE])
    password = lab.user.apop_secret if auth == "apop" else lab.user.password
    method, _ = await login(lab, "tls", auth=auth, password=password)
    assert method == auth


@pytest.mark.parametrize("server", SERVERS)
async def test_auto_over_each_transport(lab_servers, server) -> None:
    lab = lab_servers(server)
    lab.load([MESSAGE])
    securities = ["none", "tls"] + (["starttls"] if lab.starttls else [])
    for security in securities:
        method, _ = await login(lab, security)
        assert method == AUTO_PICKS[server], security


@pytest.mark.parametrize("server", SERVERS)
async def test_wrong_password_is_authentication_error(lab_servers, server) -> None:
    lab = lab_servers(server)
    lab.load([MESSAGE])
    with pytest.raises(AuthenticationError):
        async with Pop3Source(options(lab, "tls", password="not-it")).session():
            pass
    assert len(lab.messages()) == 1


@pytest.mark.parametrize("server", [s for s in SERVERS if not server_class(s).starttls])
async def test_starttls_refused_where_not_offered(lab_servers, server) -> None:
    """solid-pop3d and popa3d have no STLS (and no CAPA): security = "starttls" must
    stop before USER, never fall back to plaintext."""
    lab = lab_servers(server)
    with pytest.raises(SourcePermanentError, match=r"(?i)stls|starttls|tls"):
        async with Pop3Source(options(lab, "starttls")).session():
            pass


async def test_capa_again_after_login_shows_gnu_implementation(lab_servers) -> None:
    lab = lab_servers("gnu")
    lab.load([MESSAGE])
    async with Pop3Source(options(lab, "tls")).session() as s:
        caps = s.capabilities
        assert caps.args.get("IMPLEMENTATION") == ("GNU", "Mailutils", "3.15")
