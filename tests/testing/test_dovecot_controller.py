"""The Dovecot controller and fixture: users, delivery, listeners, TLS, skip/fail rules."""

from __future__ import annotations

import hashlib
import hmac
import os
import poplib
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mailpipe.testing.dovecot import Dovecot, DovecotUser, dovecot_unavailable_reason

pytestmark = pytest.mark.dovecot


def _login(d: Dovecot, user: DovecotUser) -> poplib.POP3:
    p = poplib.POP3(d.host, d.pop3_port, timeout=10)
    p.user(user.name)
    p.pass_(user.password)
    return p


def test_deliver_then_retr_returns_messages_in_delivery_order(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    bodies = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(25)]
    for body in bodies:
        dovecot.deliver(dovecot_user, body)
    p = _login(dovecot, dovecot_user)
    try:
        count, size = p.stat()
        assert count == 25
        assert size == sum(len(b) for b in bodies)
        got = [b"\r\n".join(p.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
    finally:
        p.quit()
    assert got == bodies


def test_delivered_file_is_owned_by_mail_uid_with_private_mode(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    path = dovecot.deliver(dovecot_user, b"Subject: x\r\n\r\ny\r\n")
    st = path.stat()
    assert path.parent.name == "new"
    assert (st.st_uid, st.st_gid) == (dovecot.mail_uid, dovecot.mail_gid)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert list((dovecot_user.maildir / "tmp").iterdir()) == []


def test_dele_removes_only_after_quit(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    for i in range(3):
        dovecot.deliver(dovecot_user, b"Subject: %d\r\n\r\nx\r\n" % i)
    p = _login(dovecot, dovecot_user)
    p.dele(2)
    assert dovecot.mailbox_count(dovecot_user) == 3
    p.quit()
    assert dovecot.mailbox_count(dovecot_user) == 2
    assert [m.split(b"\r\n")[0] for m in dovecot.messages(dovecot_user)] == [
        b"Subject: 0",
        b"Subject: 2",
    ]


def test_dropped_connection_deletes_nothing(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    dovecot.deliver(dovecot_user, b"Subject: keep\r\n\r\nx\r\n")
    p = _login(dovecot, dovecot_user)
    p.dele(1)
    p.close()  # no QUIT: RFC 1939 §6, no UPDATE state
    p = _login(dovecot, dovecot_user)
    try:
        assert p.stat()[0] == 1
    finally:
        p.quit()
    assert dovecot.mailbox_count(dovecot_user) == 1


def test_implicit_tls_verifies_against_ca_file(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    dovecot.deliver(dovecot_user, b"Subject: tls\r\n\r\nx\r\n")
    p = poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=dovecot.ssl_context(), timeout=10
    )
    try:
        p.user(dovecot_user.name)
        p.pass_(dovecot_user.password)
        assert p.stat()[0] == 1
    finally:
        p.quit()


def test_stls_upgrades_plain_port(dovecot: Dovecot, dovecot_user: DovecotUser) -> None:
    p = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    assert "STLS" in p.capa()
    p.stls(dovecot.ssl_context())
    p.user(dovecot_user.name)
    p.pass_(dovecot_user.password)
    assert p.stat() == (0, 0)
    p.quit()


def test_capa_offers_pipelining_uidl_and_sasl_mechanisms(dovecot: Dovecot) -> None:
    p = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        capa = p.capa()
    finally:
        p.quit()
    assert {"PIPELINING", "UIDL", "TOP", "USER", "RESP-CODES"} <= set(capa)
    assert {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"} <= set(capa["SASL"])


def test_cram_md5_login(dovecot: Dovecot, dovecot_user: DovecotUser) -> None:
    import base64

    p = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        challenge = p._shortcmd("AUTH CRAM-MD5")[2:].strip()
        nonce = base64.b64decode(challenge)
        digest = hmac.new(
            dovecot_user.password.encode(), nonce, hashlib.md5
        ).hexdigest()
        answer = base64.b64encode(f"{dovecot_user.name} {digest}".encode())
        assert p._shortcmd(answer.decode()).startswith(b"+OK")
        assert p.stat() == (0, 0)
    finally:
        p.quit()


def test_wrong_password_is_rejected_with_auth_code(
    dovecot: Dovecot, dovecot_user: DovecotUser
) -> None:
    p = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    p.user(dovecot_user.name)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong")
    p.close()


def test_add_user_rejects_duplicates_and_separators(dovecot: Dovecot) -> None:
    user = dovecot.add_user()
    with pytest.raises(ValueError, match="already exists"):
        dovecot.add_user(user.name)
    for bad in ("a:b", "a/b", "a\nb", "", ".hidden"):
        with pytest.raises(ValueError):
            dovecot.add_user(bad)
    with pytest.raises(ValueError):
        dovecot.add_user(None, "pa:ss")


def test_user_added_while_running_can_log_in_at_once(dovecot: Dovecot) -> None:
    for _ in range(3):
        user = dovecot.add_user()
        p = _login(dovecot, user)
        assert p.stat() == (0, 0)
        p.quit()


def test_clear_empties_mailbox(dovecot: Dovecot, dovecot_user: DovecotUser) -> None:
    dovecot.deliver(dovecot_user, b"Subject: a\r\n\r\nx\r\n")
    dovecot.clear(dovecot_user)
    assert dovecot.mailbox_count(dovecot_user) == 0
    with pytest.raises(KeyError):
        dovecot.mailbox_count("no-such-user")


def test_standalone_instance_with_apop() -> None:
    reason = dovecot_unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    import shutil
    import tempfile

    base = tempfile.mkdtemp(prefix="mailpipe-dovecot-")
    try:
        with Dovecot(base, auth_mechanisms=("plain", "apop")) as d:
            assert d.running
            user = d.add_user("alice", "tanstaaf")
            d.deliver(user, b"Subject: a\r\n\r\nx\r\n")
            p = poplib.POP3(d.host, d.pop3_port, timeout=10)
            assert b"<" in p.getwelcome()  # APOP timestamp, RFC 1939 §7
            p.apop("alice", "tanstaaf")
            assert p.stat()[0] == 1
            p.quit()
            # Dovecot logs the logout after it has sent QUIT's reply: wait for the
            # line (bounded: 100 reads, 0.05 s apart), then assert it is there.
            for _ in range(100):
                if "Logged out" in d.log_text():
                    break
                time.sleep(0.05)
            assert "Logged out" in d.log_text()
        assert not d.running
        assert Path(base, "dovecot.conf").read_text().count("/etc/dovecot") == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("ci", ["", "1"])
def test_skip_or_fail_depends_on_ci(ci: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mailpipe.testing.pytest_plugin import skip_or_fail

    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="not installed"):
        skip_or_fail("Dovecot is not installed")


def test_fixture_fails_in_ci_without_dovecot(tmp_path: Path) -> None:
    test_file = tmp_path / "test_needs_dovecot.py"
    test_file.write_text(
        textwrap.dedent(
            """
            import mailpipe.testing.pytest_plugin as plugin
            plugin.dovecot_unavailable_reason = lambda **kw: "Dovecot is not installed (test)"

            def test_x(dovecot):
                pass
            """
        )
    )
    conftest = tmp_path / "conftest.py"
    conftest.write_text('pytest_plugins = ["mailpipe.testing.pytest_plugin"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        env={**os.environ, "CI": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "1 error" in result.stdout, result.stdout
    assert "Dovecot is not installed (test) (failing because CI is set)" in result.stdout


def test_base_dir_behind_private_directory_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root runs mail as another uid")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    from mailpipe.testing.dovecot import DovecotError

    with pytest.raises(DovecotError, match="not traversable"):
        Dovecot(private / "dc").start()
