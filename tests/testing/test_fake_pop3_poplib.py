"""The fake POP3 server proven with stdlib poplib and raw sockets: protocol, then every fault."""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailpipe.testing import Faults, Pop3Server, wire_form

Factory = Callable[..., Pop3Server]

MSG_A = b"From: a@example.org\r\nSubject: a\r\n\r\nhello\r\n"
# Body lines that must survive dot-stuffing: ".", "..", ".\r" and a leading-dot line.
MSG_DOTS = b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\r\n.leading\r\nend\r\n"
MSG_LF = b"Subject: lf\n\nbare lf body\n"


class Raw:
    """A byte-level POP3 client: send lines, read exact replies."""

    def __init__(self, srv: Pop3Server, *, tls: bool = False) -> None:
        sock = socket.create_connection((srv.host, srv.port), timeout=5)
        if tls:
            sock = srv.ssl_context().wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def until_dot(self) -> bytes:
        """Raw multi-line payload up to and including the terminating ``.`` line."""
        out = b""
        while True:
            line = self.line()
            out += line
            if line in (b".\r\n", b".\n"):
                return out

    def cmd(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def read_all(self) -> bytes:
        out = self.buf
        while chunk := self.sock.recv(65536):
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[..., Raw]]:
    opened: list[Raw] = []

    def connect(srv: Pop3Server, **kw: bool) -> Raw:
        r = Raw(srv, **kw)
        opened.append(r)
        return r

    yield connect
    for r in opened:
        r.close()


def login(srv: Pop3Server, user: str = "user", password: str = "pass") -> poplib.POP3:
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    p.user(user)
    p.pass_(password)
    return p


def retr_bytes(p: poplib.POP3, n: int) -> bytes:
    return b"".join(line + b"\r\n" for line in p.retr(n)[1])


# -- RFC 1939 basics -----------------------------------------------------------


def test_stat_list_sizes_equal_retr_octets(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS, MSG_LF])
    p = login(srv)
    sizes = [int(x.split()[1]) for x in p.list()[1]]
    bodies = [retr_bytes(p, i) for i in (1, 2, 3)]
    assert sizes == [len(b) for b in bodies]
    assert p.stat() == (3, sum(sizes))
    assert bodies == [MSG_A, MSG_DOTS, wire_form(MSG_LF)]
    assert bodies[2] == b"Subject: lf\r\n\r\nbare lf body\r\n"
    assert p.list(2)[0:] == f"+OK 2 {sizes[1]}".encode()
    p.quit()


def test_dot_stuffing_on_the_wire(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(messages=[MSG_DOTS])
    r = raw(srv)
    r.line()
    r.cmd("USER user")
    r.cmd("PASS pass")
    assert r.cmd("RETR 1").startswith(b"+OK")
    # RFC 1939 §3: every line starting with "." gets one more; the body ends ".\r\n".
    assert r.until_dot() == (
        b"Subject: dots\r\n\r\n..\r\n...\r\n..\r\r\n..leading\r\nend\r\n.\r\n"
    )


def test_uidl_and_top(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS])
    srv.add_message(b"Subject: c\r\n\r\nl1\r\nl2\r\nl3\r\n", uid="custom-uid")
    p = login(srv)
    assert p.uidl()[1] == [b"1 mp00000001", b"2 mp00000002", b"3 custom-uid"]
    assert p.uidl(3) == b"+OK 3 custom-uid"
    assert p.top(3, 2)[1] == [b"Subject: c", b"", b"l1", b"l2"]
    assert p.top(2, 1)[1] == [b"Subject: dots", b"", b"."]  # unstuffed by poplib
    assert p.top(1, 0)[1] == [b"From: a@example.org", b"Subject: a", b""]
    p.quit()


def test_dele_marks_and_quit_deletes(pop3_server_factory: Factory) -> None:
    # T-26 / C-54 (server side): after DELE 2, RETR 2 and DELE 2 fail, STAT drops it,
    # LIST omits it and message 3 keeps its number.
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS, MSG_LF])
    p = login(srv)
    p.dele(2)
    with pytest.raises(poplib.error_proto, match="already deleted"):
        p.retr(2)
    with pytest.raises(poplib.error_proto, match="already deleted"):
        p.dele(2)
    assert p.stat()[0] == 2
    assert [x.split()[0] for x in p.list()[1]] == [b"1", b"3"]
    assert srv.messages == [MSG_A, MSG_DOTS, MSG_LF]  # RFC 1939 §6: not before QUIT
    p.quit()
    assert srv.messages == [MSG_A, MSG_LF]
    assert srv.sessions[0].outcome == "committed"
    assert srv.sessions[0].deleted_uids == ["mp00000002"]


def test_rset_unmarks(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A])
    p = login(srv)
    p.dele(1)
    assert p.rset().startswith(b"+OK maildrop has 1 messages")
    p.quit()
    assert srv.messages == [MSG_A]


def test_dropped_connection_deletes_nothing(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS])
    p = login(srv)
    p.dele(1)
    p.dele(2)
    p.close()  # no QUIT
    srv.wait_idle()
    assert srv.messages == [MSG_A, MSG_DOTS]
    assert srv.sessions[0].outcome == "client_closed"
    assert srv.sessions[0].marked == {1, 2}


def test_bad_numbers_and_wrong_state(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(messages=[MSG_A])
    r = raw(srv)
    r.line()
    assert r.cmd("STAT").startswith(b"-ERR")  # TRANSACTION command in AUTHORIZATION
    assert r.cmd("PASS pass").startswith(b"-ERR")  # PASS needs USER first
    r.cmd("USER user")
    assert r.cmd("PASS pass").startswith(b"+OK")
    for bad in ("RETR 0", "RETR 2", "RETR x", "DELE 9", "LIST 5", "TOP 1", "USER x"):
        assert r.cmd(bad).startswith(b"-ERR"), bad
    assert r.cmd("noop") == b"+OK\r\n"  # keywords are case-insensitive
    assert r.cmd("QUIT").startswith(b"+OK")
    assert r.read_all() == b""


def test_quit_in_authorization_deletes_nothing(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A])
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    assert p.quit().startswith(b"+OK")
    assert srv.sessions[0].outcome == "quit"
    assert srv.messages == [MSG_A]


def test_wrong_password_and_unknown_user(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(users={"alice": "a b c"})
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        login(srv, "alice", "wrong")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        login(srv, "bob", "a b c")
    p = login(srv, "alice", "a b c")  # RFC 1939 §7: spaces belong to the password
    p.quit()


def test_exclusive_lock_gives_in_use(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A])
    first = login(srv)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(srv)
    first.quit()
    second = login(srv)
    second.quit()


def test_without_lock_sessions_run_concurrently(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A], lock=False)
    a, b = login(srv), login(srv)
    assert a.stat() == b.stat() == (1, len(MSG_A))
    a.quit()
    b.quit()


def test_add_message_while_running_is_seen_by_next_session(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(messages=[MSG_A], lock=False)
    p = login(srv)
    uid = srv.add_message(MSG_DOTS)
    assert p.stat()[0] == 1  # numbering is fixed for the session (RFC 1939 §5)
    p.quit()
    q = login(srv)
    assert q.stat()[0] == 2
    assert q.uidl(2) == f"+OK 2 {uid}".encode()
    q.quit()


def test_rename_uids_changes_every_uid_for_later_listings(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS])
    srv.rename_uids(lambda uid: "v2-" + uid)  # C-60: a UIDVALIDITY change
    assert srv.uids == ["v2-mp00000001", "v2-mp00000002"]
    p = login(srv)
    assert p.uidl()[1] == [b"1 v2-mp00000001", b"2 v2-mp00000002"]
    assert p.stat() == (2, len(wire_form(MSG_A)) + len(wire_form(MSG_DOTS)))
    p.quit()


def test_maildir_messages_are_served_and_unlinked_on_commit(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "new" / "1000.A.host").write_bytes(MSG_A)
    (tmp_path / "cur" / "1001.B.host:2,S").write_bytes(MSG_DOTS)
    srv = pop3_server_factory(maildir=tmp_path)
    p = login(srv)
    assert p.uidl()[1] == [b"1 1000.A.host", b"2 1001.B.host"]
    assert retr_bytes(p, 2) == MSG_DOTS
    p.dele(1)
    (tmp_path / "new" / "1002.C.host").write_bytes(MSG_LF)
    p.quit()
    assert not (tmp_path / "new" / "1000.A.host").exists()
    q = login(srv)
    assert q.stat()[0] == 2  # the file delivered meanwhile is picked up
    q.quit()


# -- CAPA, TLS and authentication ----------------------------------------------


def test_capa_reflects_configuration(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        tls="starttls",
        pipelining=False,
        login_delay=900,
        expire="NEVER",
        mechanisms=["PLAIN", "XOAUTH2", "OAUTHBEARER"],
    )
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    capa = p.capa()
    assert "PIPELINING" not in capa
    assert capa["LOGIN-DELAY"] == ["900"]
    assert capa["EXPIRE"] == ["NEVER"]
    assert capa["SASL"] == ["PLAIN", "XOAUTH2", "OAUTHBEARER"]
    assert {"STLS", "USER", "UIDL", "TOP", "RESP-CODES"} <= set(capa)
    p.stls(srv.ssl_context())
    assert "STLS" not in p.capa()  # RFC 2595 §4: not offered again
    p.user("user")
    p.pass_("pass")
    after = p.capa()
    assert "SASL" not in after and "USER" not in after
    p.quit()


def test_pipelining_advertised_and_pipelined_commands_answered_in_order(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS])
    r = raw(srv)
    r.line()
    r.sock.sendall(b"CAPA\r\nUSER user\r\nPASS pass\r\nRETR 1\r\nRETR 2\r\nQUIT\r\n")
    assert b"PIPELINING\r\n" in r.until_dot()
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK")
    assert r.line().startswith(b"+OK")
    assert r.until_dot() == MSG_A + b".\r\n"
    assert r.line().startswith(b"+OK")
    assert r.until_dot().startswith(b"Subject: dots")
    assert r.line().startswith(b"+OK")


def test_capa_disabled_answers_err(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(capa=False)
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    with pytest.raises(poplib.error_proto):
        p.capa()
    p.quit()


def test_implicit_tls_verifies_with_ca_file(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A], tls="implicit")
    ctx = ssl.create_default_context(cafile=str(srv.ca_file))
    p = poplib.POP3_SSL(srv.host, srv.port, context=ctx, timeout=5)
    p.user("user")
    p.pass_("pass")
    assert retr_bytes(p, 1) == MSG_A
    p.quit()
    assert srv.sessions[0].tls


def test_implicit_tls_rejected_without_the_test_ca(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(tls="implicit")
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(
            srv.host, srv.port, context=ssl.create_default_context(), timeout=5
        )


def test_apop(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(apop=True, users={"mrose": "tanstaaf"})
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    assert b"@mailpipe.test>" in p.getwelcome()
    p.apop("mrose", "tanstaaf")
    p.quit()
    bad = poplib.POP3(srv.host, srv.port, timeout=5)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        bad.apop("mrose", "wrong")
    bad.quit()
    assert "APOP mrose ****" in srv.transcript.commands()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _auth_server(factory: Factory) -> Pop3Server:
    return factory(
        users={"alice": "s3cret"},
        mechanisms=["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER"],
        oauth_tokens={"alice": "tok-123"},
    )


def test_sasl_plain_initial_response_and_two_step(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = _auth_server(pop3_server_factory)
    r = raw(srv)
    r.line()
    assert r.cmd("AUTH PLAIN " + _b64(b"\0alice\0s3cret")).startswith(b"+OK")
    r2 = raw(srv)
    r2.line()
    assert r2.cmd("AUTH PLAIN") == b"+ \r\n"
    assert r2.cmd(_b64(b"\0alice\0wrong")).startswith(b"-ERR [AUTH]")


def test_sasl_login_and_cram_md5(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = _auth_server(pop3_server_factory)
    r = raw(srv)
    r.line()
    assert r.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert r.cmd(_b64(b"alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert r.cmd(_b64(b"s3cret")).startswith(b"+OK")
    r.cmd("QUIT")
    c = raw(srv)
    c.line()
    challenge = base64.b64decode(c.cmd("AUTH CRAM-MD5")[2:].strip())
    digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest()
    assert c.cmd(_b64(f"alice {digest}".encode())).startswith(b"+OK")


def test_sasl_xoauth2_good_token_and_error_exchange(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = _auth_server(pop3_server_factory)
    good = _b64(b"user=alice\x01auth=Bearer tok-123\x01\x01")
    r = raw(srv)
    r.line()
    assert r.cmd("AUTH XOAUTH2") == b"+ \r\n"  # the two-line form
    assert r.cmd(good).startswith(b"+OK")
    r.cmd("QUIT")
    bad = raw(srv)
    bad.line()
    reply = bad.cmd("AUTH XOAUTH2 " + _b64(b"user=alice\x01auth=Bearer nope\x01\x01"))
    assert reply.startswith(b"+ ")
    assert b'"status": "401"' in base64.b64decode(reply[2:].strip())
    assert bad.cmd("").startswith(b"-ERR [AUTH]")  # client answers the challenge empty
    assert "tok-123" not in str(srv.transcript)
    assert "AUTH XOAUTH2 ****" in srv.transcript.commands()


def test_sasl_oauthbearer_and_cancel(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = _auth_server(pop3_server_factory)
    r = raw(srv)
    r.line()
    payload = b"n,a=alice,\x01host=127.0.0.1\x01port=110\x01auth=Bearer tok-123\x01\x01"
    assert r.cmd("AUTH OAUTHBEARER " + _b64(payload)).startswith(b"+OK")
    r.cmd("QUIT")
    bad = raw(srv)
    bad.line()
    reply = bad.cmd("AUTH OAUTHBEARER " + _b64(payload.replace(b"tok-123", b"x")))
    assert b"invalid_token" in base64.b64decode(reply[2:].strip())
    assert bad.cmd(_b64(b"\x01")).startswith(b"-ERR [AUTH]")
    assert bad.cmd("AUTH PLAIN") == b"+ \r\n"
    assert bad.cmd("*").startswith(b"-ERR")  # RFC 5034 §4: cancelled
    assert bad.cmd("AUTH DIGEST-MD5").startswith(b"-ERR")


def test_transcript_masks_every_secret(pop3_server_factory: Factory) -> None:
    srv = _auth_server(pop3_server_factory)
    p = login(srv, "alice", "s3cret")
    p.quit()
    text = str(srv.transcript)
    assert "s3cret" not in text
    assert srv.transcript.commands(1) == ["USER alice", "PASS ****", "QUIT"]
    assert srv.transcript.keywords() == ["USER", "PASS", "QUIT"]
    assert srv.transcript.replies(1)[0].startswith("+OK")
    assert "logged in as alice via PASS" in srv.transcript.events(1)
    assert srv.transcript.sessions == 1


# -- faults --------------------------------------------------------------------


def test_fault_drop_after_bytes(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(messages=[MSG_A], faults=Faults(drop_after_bytes=10))
    r = raw(srv)
    assert r.read_all() == b"+OK mailpi"
    srv.wait_idle()
    assert srv.sessions[0].outcome == "dropped"
    assert "dropped after 10 octets" in srv.transcript.events(1)


def test_fault_drop_after_bytes_mid_retr_with_poplib(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(messages=[MSG_A], faults=Faults(drop_after_bytes=120))
    p = login(srv)
    p.dele(1)
    with pytest.raises((poplib.error_proto, OSError)):
        p.retr(1)
    srv.wait_idle()
    assert srv.messages == [MSG_A]


def test_fault_drop_in_retr_k(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 5000 + b"\r\n"
    srv = pop3_server_factory(messages=[MSG_A, big], faults=Faults(drop_in_retr=2))
    p = login(srv)
    assert retr_bytes(p, 1) == MSG_A
    p.dele(1)
    with pytest.raises((poplib.error_proto, OSError)):
        p.retr(2)
    srv.wait_idle()
    assert srv.messages == [MSG_A, big]
    assert "dropped in RETR 2" in srv.transcript.events(1)
    # A raw client sees a status line and part of the body, never the terminator.
    srv.faults = Faults(drop_in_retr=2, drop_in_retr_fraction=0.5)
    r = raw(srv)
    r.line()
    r.cmd("USER user")
    r.cmd("PASS pass")
    assert r.cmd("RETR 2").startswith(b"+OK")
    rest = r.read_all()
    assert 0 < len(rest) < len(big) and not rest.endswith(b".\r\n")


def test_fault_stall_times_out_poplib_then_server_stops_cleanly(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(messages=[MSG_A], faults=Faults(stall_on={"RETR"}))
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    p.user("user")
    p.pass_("pass")
    p.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        p.retr(1)
    p.close()
    srv.stop()  # cancels the stalled session
    assert srv.sessions[0].outcome in {"stopped", "client_closed"}
    assert srv.messages == [MSG_A]


def test_fault_stall_greeting_then_reply(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        faults=Faults(stall_on={"GREETING", "NOOP"}, stall_seconds=0.05)
    )
    p = login(srv)
    assert p.getwelcome().startswith(b"+OK")
    assert p.noop() == b"+OK"
    p.quit()
    assert srv.transcript.events(1).count("stalling 0.05s") == 2


def test_fault_err_on_with_response_code(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        messages=[MSG_A, MSG_DOTS],
        faults=Faults(
            err_on={"RETR 2": "[SYS/TEMP] try later", "uidl": "[SYS/PERM] no"}
        ),
    )
    p = login(srv)
    assert retr_bytes(p, 1) == MSG_A
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] try later"):
        p.retr(2)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]"):
        p.uidl()
    p.quit()


def test_fault_err_on_pass_login_delay(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(faults=Faults(err_on={"PASS": "[LOGIN-DELAY] wait 300s"}))
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        login(srv)


def test_fault_greeting_err(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        faults=Faults(greeting_err="[SYS/TEMP] too many connections")
    )
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        poplib.POP3(srv.host, srv.port, timeout=5)
    srv.wait_idle()
    assert srv.sessions[0].outcome == "greeting_err"


def test_fault_bare_lf(pop3_server_factory: Factory, raw: Callable[..., Raw]) -> None:
    srv = pop3_server_factory(messages=[MSG_DOTS], faults=Faults(bare_lf=True))
    r = raw(srv)
    assert r.line().endswith(b"ready\n")
    r.cmd("USER user")
    r.cmd("PASS pass")
    assert r.cmd("RETR 1") == f"+OK {len(MSG_DOTS)} octets\n".encode()
    assert r.until_dot() == b"Subject: dots\n\n..\n...\n..\r\n..leading\nend\n.\n"
    r.cmd("QUIT")
    srv.wait_idle()
    p = login(srv)  # poplib tolerates LF-only lines
    # ... though the ".\r" line, now ending "\r\n" on the wire, loses its CR.
    assert p.retr(1)[1] == [
        b"Subject: dots",
        b"",
        b".",
        b"..",
        b".",
        b".leading",
        b"end",
    ]


def test_long_lines_break_poplib_but_arrive_whole(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    long = b"Subject: long\r\n\r\n" + b"A" * 150_000 + b"\r\n"
    srv = pop3_server_factory(messages=[long])
    p = login(srv)
    with pytest.raises(poplib.error_proto, match="line too long"):  # _MAXLINE = 2048
        p.retr(1)
    p.close()
    srv.wait_idle()
    r = raw(srv)
    r.line()
    r.cmd("USER user")
    r.cmd("PASS pass")
    assert r.cmd("LIST 1") == f"+OK 1 {len(long)}\r\n".encode()
    r.cmd("RETR 1")
    assert r.until_dot() == long + b".\r\n"


def test_fault_status_padding_makes_long_status_lines(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(faults=Faults(status_padding=100_000))
    with pytest.raises(poplib.error_proto, match="line too long"):
        poplib.POP3(srv.host, srv.port, timeout=5)
    r = raw(srv)
    assert len(r.line()) > 100_000


def test_fault_no_dot_stuffing_truncates_poplib(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_DOTS], faults=Faults(no_dot_stuffing=True))
    p = login(srv)
    assert p.retr(1)[1] == [b"Subject: dots", b""]  # the "." body line ended it early


def test_fault_uidl_duplicate_missing_long_unsupported(
    pop3_server_factory: Factory,
) -> None:
    srv = pop3_server_factory(messages=[MSG_A, MSG_DOTS, MSG_LF], lock=False)
    srv.faults = Faults(uidl_duplicate=True)
    p = login(srv)
    assert [x.split()[1] for x in p.uidl()[1]] == [b"mp00000001"] * 3
    p.quit()
    srv.faults = Faults(uidl_missing={2})
    p = login(srv)
    assert [x.split()[0] for x in p.uidl()[1]] == [b"1", b"3"]
    with pytest.raises(poplib.error_proto):
        p.uidl(2)
    p.quit()
    srv.faults = Faults(uidl_length=75)
    p = login(srv)
    assert {len(x.split()[1]) for x in p.uidl()[1]} == {75}
    p.quit()
    srv.faults = Faults(uidl_unsupported=True)
    p = login(srv)
    assert "UIDL" not in p.capa()
    with pytest.raises(poplib.error_proto):
        p.uidl()
    p.quit()


def test_fault_list_size_differs_from_retr(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        messages=[MSG_A, MSG_DOTS], faults=Faults(list_size_delta={2: 7})
    )
    p = login(srv)
    listed = [int(x.split()[1]) for x in p.list()[1]]
    assert listed[0] == len(retr_bytes(p, 1))
    assert listed[1] == len(retr_bytes(p, 2)) + 7
    assert p.stat()[1] == sum(listed)
    p.quit()


def test_fault_quit_err_deletes_nothing(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(
        messages=[MSG_A], faults=Faults(quit_err="some deleted messages not removed")
    )
    p = login(srv)
    p.dele(1)
    with pytest.raises(poplib.error_proto, match="not removed"):
        p.quit()
    assert srv.messages == [MSG_A]
    assert srv.sessions[0].outcome == "quit_err"


def test_fault_dele_ignored(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A], faults=Faults(dele_ignored=True))
    p = login(srv)
    assert p.dele(1).startswith(b"+OK")
    assert p.quit().startswith(b"+OK")
    assert srv.messages == [MSG_A]


def test_fault_drop_on_command(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(faults=Faults(drop_on={"CAPA"}))
    p = poplib.POP3(srv.host, srv.port, timeout=5)
    with pytest.raises((poplib.error_proto, OSError)):
        p.capa()
    srv.wait_idle()
    assert srv.sessions[0].outcome == "dropped"


def test_faults_per_session_list(pop3_server_factory: Factory) -> None:
    srv = pop3_server_factory(messages=[MSG_A], faults=[Faults(drop_in_retr=1)])
    p = login(srv)
    with pytest.raises((poplib.error_proto, OSError)):
        p.retr(1)
    srv.wait_idle()
    p = login(srv)  # session 2 behaves
    assert retr_bytes(p, 1) == MSG_A
    p.dele(1)
    p.quit()
    assert srv.messages == []
    assert [s.outcome for s in srv.sessions] == ["dropped", "committed"]


def test_faults_validate_arguments() -> None:
    with pytest.raises(ValueError):
        Faults(drop_in_retr_fraction=1.0)
    with pytest.raises(ValueError):
        Pop3Server(tls="ssl")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Pop3Server(mechanisms=["GSSAPI"])
    with pytest.raises(TypeError):
        Pop3Server(messages=["text"])  # type: ignore[list-item]


async def test_async_context_manager_on_running_loop() -> None:
    import asyncio

    async with Pop3Server(messages=[MSG_A]) as srv:
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"+OK")
            writer.write(b"USER user\r\nPASS pass\r\nRETR 1\r\n")
            await reader.readline()
            await reader.readline()
            assert (await reader.readline()).startswith(b"+OK")
            body = await reader.readuntil(b"\r\n.\r\n")
        assert body == MSG_A + b".\r\n"
        writer.close()
        await srv.await_idle()
    assert srv.sessions[0].outcome == "client_closed"


def test_plaintext_pipelined_after_stls_is_discarded(
    pop3_server_factory: Factory, raw: Callable[..., Raw]
) -> None:
    srv = pop3_server_factory(tls="starttls")
    r = raw(srv)
    r.line()
    r.sock.sendall(b"STLS\r\nUSER injected\r\n")
    assert r.line().startswith(b"+OK")
    r.sock = srv.ssl_context().wrap_socket(r.sock, server_hostname="localhost")
    assert r.cmd("USER user").startswith(b"+OK")
    assert r.cmd("PASS pass").startswith(b"+OK")
    assert "USER injected" not in srv.transcript.commands(1)  # never executed
    assert "discarded 15 octets sent before TLS" in srv.transcript.events(1)
    assert srv.transcript.replies(1).count("+OK send PASS") == 1
