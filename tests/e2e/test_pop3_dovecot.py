"""The pop3 source against a real Dovecot (Debian dovecot-pop3d) on 127.0.0.1: every
mechanism Dovecot offers over plaintext, STLS and implicit TLS, refusals, the RFC 1939
commands, a pipelined 1,000-message retrieval and a 200 MB message with bounded memory."""

from __future__ import annotations

import hashlib
import random
import tempfile
import tracemalloc

import pytest
import structlog
from mailpipe.plugins.pop3.events import Dele, List, Noop, Rset, Stat, Uidl
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe.errors import AuthenticationError, SourcePermanentError
from mailpipe.testing.dovecot import Dovecot, dovecot_unavailable_reason

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]


def opts(dovecot: Dovecot, user, security: str, **kw: object) -> Pop3Options:
    port = dovecot.pop3s_port if security == "tls" else dovecot.pop3_port
    table: dict[str, object] = {
        "host": "localhost", "port": port, "security": security, "username": user.name,
        "password": user.password, "ca_file": str(dovecot.ca_file),
        "allow_plaintext_password": security == "none", "read_timeout": 60,
    }
    table.update(kw)
    return Pop3Options.model_validate(table)


def make_message(i: int, size: int = 600) -> bytes:
    rnd = random.Random(i)
    lines = [b"From: a@example.com", b"To: b@example.com", b"Subject: message %d" % i,
             b"Message-ID: <%d@mailpipe.test>", b""]
    lines[3] = lines[3] % i
    while sum(len(x) + 2 for x in lines) < size:
        n = rnd.randint(0, 120)
        line = bytes(rnd.choice(b"abc .xyz\t-=") for _ in range(n))
        lines.append(line)
    lines.append(b".")  # a lone dot as last line: must be stuffed and unstuffed
    return b"\r\n".join(lines) + b"\r\n"


@pytest.mark.parametrize("security", ["tls", "starttls", "none"])
@pytest.mark.parametrize(
    "auth", ["auto", "user", "plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256"]
)
async def test_login_each_mechanism(dovecot, dovecot_user, security, auth):
    dovecot.deliver(dovecot_user, make_message(1))
    src = Pop3Source(opts(dovecot, dovecot_user, security, auth=auth), mailbox="box")
    with structlog.testing.capture_logs() as logs:
        async with src.session() as s:
            assert s.client.tls_active is (security != "none")
            assert s.client.pipelining_active
            refs = await s.list()
            assert [r.mailbox for r in refs] == ["box"] and s.supports_uidl
    methods = [e["method"] for e in logs if e["event"] == "pop3_authenticated"]
    # C-42: with a password, auto prefers SCRAM-SHA-256 (Dovecot offers it).
    assert methods == ["scram-sha-256" if auth == "auto" else auth]


async def test_apop_with_dovecot():
    reason = dovecot_unavailable_reason()
    if reason:
        pytest.skip(reason)
    base = tempfile.mkdtemp(prefix="mailpipe-pop3-apop-")
    with Dovecot(base, auth_mechanisms=("plain", "apop")) as d:
        user = d.add_user()
        d.deliver(user, make_message(2))
        async with Pop3Source(opts(d, user, "tls", auth="apop")).session() as s:
            assert s.client.greeting is not None and s.client.greeting.apop_timestamp
            assert len(await s.list()) == 1
        with pytest.raises(AuthenticationError):
            async with Pop3Source(opts(d, user, "tls", auth="apop", password="wrong")).session():
                pass


async def test_wrong_password_is_authentication_error(dovecot, dovecot_user):
    for auth in ("user", "plain", "login", "scram-sha-1", "scram-sha-256"):
        with pytest.raises(AuthenticationError, match="localhost"):
            async with Pop3Source(
                opts(dovecot, dovecot_user, "tls", auth=auth, password="not-the-password")
            ).session():
                pass


async def test_oauth_not_offered_is_refused_without_password_fallback(dovecot, dovecot_user):
    src = Pop3Source(opts(dovecot, dovecot_user, "tls", password=None, oauth_token="tok-abcdef"))
    with pytest.raises(SourcePermanentError, match="never falls back"):
        async with src.session():
            pass


async def test_rfc1939_commands(dovecot, dovecot_user, tmp_path):
    msgs = [make_message(i) for i in range(5)]
    for m in msgs:
        dovecot.deliver(dovecot_user, m)
    async with Pop3Source(opts(dovecot, dovecot_user, "tls")).session() as s:
        refs = await s.list()
        assert [r.size for r in refs] == [len(m) for m in msgs]
        assert len({r.uid for r in refs}) == 5
        stat = await s.client.command(Stat())
        assert stat.text.split()[:2] == ["5", str(sum(map(len, msgs)))]
        uid2 = await s.client.command(Uidl(number=2))
        assert uid2.text.split()[1] == refs[1].uid
        assert (await s.client.command(List(number=3))).text.split() == ["3", str(len(msgs[2]))]
        assert await s.headers(refs[0]) == msgs[0].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        got = [m async for m in s.retrieve(refs, spool_dir=tmp_path, spool_threshold=1 << 20)]
        assert [m.raw for m in got] == msgs
        await s.client.command(Dele(number=1))
        await s.client.command(Rset())  # RSET clears the mark (C-55)
        await s.client.command(Noop())
        await s.mark_deleted(refs[:2])
        await s.commit()
    assert dovecot.messages(dovecot_user) == msgs[2:]
    # An aborted session deletes nothing (RFC 1939 §6).
    async with Pop3Source(opts(dovecot, dovecot_user, "tls")).session() as s:
        await s.mark_deleted(await s.list())
    assert dovecot.mailbox_count(dovecot_user) == 3


@pytest.mark.slow
async def test_pipelined_retrieval_of_1000_messages(dovecot, dovecot_user, tmp_path):
    msgs = [make_message(i, size=random.Random(i).randint(300, 6000)) for i in range(1000)]
    for m in msgs:
        dovecot.deliver(dovecot_user, m)
    async with Pop3Source(opts(dovecot, dovecot_user, "tls"), mailbox="bulk").session() as s:
        assert s.client.pipelining_active
        refs = await s.list()
        assert len(refs) == 1000
        got = [m async for m in s.retrieve(refs, spool_dir=tmp_path, spool_threshold=4096)]
        assert len(got) == 1000
        for message, original in zip(got, msgs, strict=True):
            assert message.raw == original
        await s.mark_deleted(refs)
        await s.commit()
    assert dovecot.mailbox_count(dovecot_user) == 0


@pytest.mark.slow
async def test_200mb_message_with_bounded_memory(dovecot, dovecot_user, tmp_path):
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 2 + b"\r\n"
    digest = hashlib.sha256()
    path = dovecot.deliver(dovecot_user, b"")
    with open(path, "wb") as f:
        head = b"Subject: big\r\n\r\n.leading dot\r\n"
        f.write(head)
        digest.update(head)
        block = line * 16384
        total = len(head)
        while total < 200 * 10**6:
            f.write(block)
            digest.update(block)
            total += len(block)
    async with Pop3Source(opts(dovecot, dovecot_user, "none")).session() as s:
        refs = await s.list()
        assert refs[0].size == total
        tracemalloc.start()
        try:
            got = [m async for m in s.retrieve(refs, spool_dir=tmp_path, spool_threshold=1 << 20)]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got[0].spool_path is not None
    assert got[0].size == total and got[0].sha256 == digest.hexdigest()
    assert peak < 16 * 2**20, f"peak traced memory {peak} for a {total}-octet message"
