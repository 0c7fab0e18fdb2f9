"""The IMAP source end to end against a real Dovecot imapd on 127.0.0.1.

``mailpipe run --once`` reads a user's folders over IMAP into ``store.maildir``; the
stored files are compared byte for byte with what an independent client (stdlib
``imaplib``) reads with ``BODY.PEEK[]``, and the server's end state is checked for each
acknowledgement mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import imaplib
import json
import re
import ssl
import subprocess
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.imap.source import ImapOptions, ImapSource
from pydantic import ValidationError
from structlog.testing import capture_logs

from mailpipe import Message
from mailpipe.errors import AuthenticationError, OversizeError, SourceConnectionError
from mailpipe.testing.dovecot import Dovecot, DovecotUser
from mailpipe.testing.e2e import (
    start_mailpipe,
    wait_for_log,
    wait_until,
    write_pipeline,
)
from mailpipe.testing.servers.interop import mailpipe_once, stored_messages

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(600)]


def reference(d: Dovecot, user: DovecotUser) -> imaplib.IMAP4_SSL:
    """An independent IMAP client (stdlib) logged in over verified TLS."""
    ctx = ssl.create_default_context(cafile=str(d.ca_file))
    client = imaplib.IMAP4_SSL(d.host, d.imaps_port, ssl_context=ctx, timeout=30)
    client.login(user.name, user.password)
    return client


def folder_state(d: Dovecot, user: DovecotUser, folder: str) -> list[tuple[bytes, str]]:
    """(raw bytes, flags) of every message in ``folder`` (wire name), read with PEEK."""
    return d.imap_messages(user, folder)


def append(d: Dovecot, user: DovecotUser, folder: str, raws: list[bytes]) -> None:
    client = reference(d, user)
    try:
        client.create(f'"{folder}"')
        for raw in raws:
            typ, _ = client.append(f'"{folder}"', "", None, raw)
            assert typ == "OK"
    finally:
        client.logout()


def pipeline(tmp_path: Path, d: Dovecot, user: DovecotUser, **mailbox: Any) -> Path:
    return write_pipeline(
        tmp_path,
        dovecot=d,
        user=user,
        security="tls",
        processors=[{"use": "store.maildir", "path": str(tmp_path / "Maildir")}],
        mailbox={"source": "imap", "port": d.imaps_port, **mailbox},
    )


def crafted(n: int) -> list[bytes]:
    return [
        b"From: a@example.com\r\nSubject: message %d\r\nMessage-ID: <%d@example.com>\r\n"
        b"\r\nbody %d\r\n.\r\nA1 OK not a reply\r\n* BYE nor this {3}\r\n" % (i, i, i)
        for i in range(n)
    ]


def test_corpus_byte_exact_then_nothing(
    dovecot_imap: Dovecot, corpus: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    for _, raw in corpus:
        d.deliver(user, raw)
    served = [raw for raw, _ in folder_state(d, user, "INBOX")]
    assert len(served) == len(corpus)
    config = pipeline(tmp_path, d, user)
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    stored = stored_messages(tmp_path / "Maildir")
    assert Counter(stored) == Counter(served)  # byte for byte, every message
    assert summary["retrieved"] == len(served) and summary["deleted"] == len(served)
    assert folder_state(d, user, "INBOX") == []  # UID STORE \Deleted + UID EXPUNGE
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["listed"] == 0 and summary["retrieved"] == 0
    assert len(stored_messages(tmp_path / "Maildir")) == len(stored)


def user_with(d: Dovecot, raws: list[bytes]) -> DovecotUser:
    """A new user whose INBOX holds ``raws``, delivered in order."""
    user = d.add_user()
    for raw in raws:
        d.deliver(user, raw)
    return user


def test_mp06_every_commit_window_of_a_poll_runs_on_one_login(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = user_with(d, crafted(5))
    served = [raw for raw, _ in folder_state(d, user, "INBOX")]
    login = f"imap-login: Info: Login: user=<{user.name}>"
    before = d.log_text().count(login)  # the reference client's
    run, summary = mailpipe_once(pipeline(tmp_path, d, user, commit_window=2))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (summary["sessions"], summary["windows"], summary["deleted"]) == (1, 3, 5)
    assert d.log_text().count(login) - before == 1  # Dovecot saw one login
    checkpoints = [
        line for line in run.stderr.splitlines() if '"imap_checkpoint"' in line
    ]
    assert len(checkpoints) == 2, run.stderr[-3000:]  # windows 1 and 2; 3 logs out
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(served)
    assert folder_state(d, user, "INBOX") == []  # each window's UID EXPUNGE


@pytest.mark.parametrize(
    ("mode", "keys"),
    [
        ("delete", {}),
        ("move", {"acknowledge": {"move": "Processed/Done"}}),
        ("flag-seen", {"acknowledge": {"flag": "\\Seen"}}),
        ("flag-keyword", {"acknowledge": {"flag": "$Processed"}}),
        ("keep", {"delete": "never"}),
    ],
)
def test_acknowledgement_modes(
    dovecot_imap: Dovecot, tmp_path: Path, mode: str, keys: dict[str, Any]
) -> None:
    d = dovecot_imap
    user = d.add_user()
    raws = crafted(5)
    for raw in raws:
        d.deliver(user, raw)
    served = [raw for raw, _ in folder_state(d, user, "INBOX")]
    config = pipeline(tmp_path, d, user, **keys)
    for poll in range(2):  # the second run fetches nothing again
        run, summary = mailpipe_once(config)
        assert run.returncode == 0, run.stderr[-3000:]
        assert summary["retrieved"] == (5 if poll == 0 else 0), summary
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(served)
    inbox = folder_state(d, user, "INBOX")
    if mode in ("delete", "move"):
        assert inbox == []
    else:
        assert [raw for raw, _ in inbox] == served
    if mode == "move":
        moved = folder_state(d, user, "Processed/Done")
        assert sorted(raw for raw, _ in moved) == sorted(served)
    if mode == "flag-seen":
        assert all("\\Seen" in flags for _, flags in inbox)
    if mode == "flag-keyword":
        assert all("$Processed" in flags and "\\Seen" not in flags for _, flags in inbox)
    if mode == "keep":
        # IC-30: BODY.PEEK everywhere: reading never set \Seen.
        assert all("\\Seen" not in flags for _, flags in inbox)


def test_several_folders_with_a_non_ascii_name(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    raws = crafted(6)
    d.deliver(user, raws[0])
    append(d, user, "Entw&APw-rfe", raws[1:4])  # IC-23: "Entwürfe" in modified UTF-7
    append(d, user, "Support/Escalations", raws[4:])
    config = pipeline(
        tmp_path, d, user, folders=["INBOX", "Entwürfe", "Support/Escalations"]
    )
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["retrieved"] == 6
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)
    for folder in ("INBOX", "Entw&APw-rfe", "Support/Escalations"):
        assert folder_state(d, user, folder) == []


def session_options(d: Dovecot, user: DovecotUser, **kw: Any) -> ImapOptions:
    security = kw.pop("security", "tls")
    values: dict[str, Any] = {
        "host": d.host,
        "port": d.imaps_port if security == "tls" else d.imap_port,
        "security": security,
        "ca_file": d.ca_file,
        "username": user.name,
        "password": user.password,
    }
    values.update(kw)
    return ImapOptions.model_validate(values)


@pytest.mark.parametrize("security", ["tls", "starttls"])
@pytest.mark.parametrize(
    "auth", ["auto", "login", "plain", "scram-sha-1", "scram-sha-256"]
)
async def test_ic16_ic17_ic18_ic19_login_each_way(
    dovecot_imap: Dovecot, security: str, auth: str
) -> None:
    d = dovecot_imap
    user = d.add_user()
    d.deliver(user, crafted(1)[0])
    source = ImapSource(session_options(d, user, security=security, auth=auth))
    with capture_logs() as logs:
        async with source.session() as session:
            assert session.client.tls_active
            assert "UIDPLUS" in session.client.capabilities  # IC-12: post-login list
            refs = await session.list()
    assert len(refs) == 1 and refs[0].uid.startswith("INBOX;UIDVALIDITY=")
    method = next(e["method"] for e in logs if e["event"] == "imap_authenticated")
    assert method == ("scram-sha-256" if auth == "auto" else auth)
    text = repr(logs)
    assert user.password not in text  # IS-12


async def test_ic14_is15_id_carries_only_a_name_and_only_over_tls(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    sent = re.compile(r"imap\((?P<user>[^)]+)\).*ID sent: (?P<fields>.*)")

    def ids_of(name: str) -> list[str]:
        return [
            m["fields"] for m in sent.finditer(d.log_text()) if m["user"] == name
        ]

    over_tls, plaintext = d.add_user(), d.add_user()
    async with ImapSource(session_options(d, over_tls)).session() as session:
        await session.list()
    opts = session_options(d, plaintext, security="none", allow_plaintext_password=True)
    async with ImapSource(opts).session() as session:
        await session.list()
    for _ in range(50):  # the log is written by another process; bounded wait
        if ids_of(over_tls.name):
            break
        await asyncio.sleep(0.1)
    assert ids_of(over_tls.name) == ["name=mailpipe"]  # IS-15: nothing else
    assert ids_of(plaintext.name) == []  # IC-14: never in the clear


async def test_ic22_wrong_password_is_an_authentication_error(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    user = d.add_user()
    source = ImapSource(session_options(d, user, password="wrong-password"))
    with pytest.raises(AuthenticationError, match="AUTHENTICATIONFAILED") as info:
        async with source.session():
            pass
    assert "wrong-password" not in str(info.value)


async def test_is01_no_password_over_plaintext_without_consent(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    user = d.add_user()
    with pytest.raises(ValidationError, match="allow_plaintext_password"):
        session_options(d, user, security="none")
    opts = session_options(d, user, security="none", allow_plaintext_password=True)
    async with ImapSource(opts).session() as session:
        assert not session.client.tls_active  # consented: plaintext LOGIN works


async def test_is02_untrusted_certificate_refused_before_credentials(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    import trustme

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    user = dovecot_imap.add_user()
    opts = session_options(dovecot_imap, user, ca_file=other)
    with pytest.raises(SourceConnectionError, match="not trusted"):
        async with ImapSource(opts).session():
            pass


async def test_it16_message_expunged_by_another_client_is_unretrievable(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    raws = crafted(3)
    user = user_with(d, raws)
    async with ImapSource(session_options(d, user)).session() as session:
        refs = await session.list()
        other = reference(d, user)  # another client expunges the middle message
        other.select("INBOX")
        other.uid("STORE", refs[1].uid.rsplit("=", 1)[1], "+FLAGS", "(\\Deleted)")
        other.expunge()
        other.logout()
        got = [
            item
            async for item in session.retrieve(
                refs, spool_dir=tmp_path, spool_threshold=1 << 20
            )
        ]
    assert [type(g).__name__ for g in got] == ["Message", "Unretrievable", "Message"]
    assert [g.raw for g in got if isinstance(g, Message)] == [raws[0], raws[2]]
    assert got[1].ref == refs[1]


async def test_ic31_large_message_streamed_with_bounded_memory(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    line = b"0123456789abcdef" * 4 + b"\r\n"
    raw = b"Subject: big\r\n\r\n" + line * (32 * 2**20 // len(line))  # 32 MiB
    d.deliver(user, raw)
    async with ImapSource(session_options(d, user)).session() as session:
        refs = await session.list()
        assert refs[0].size == len(raw)  # RFC822.SIZE
        tracemalloc.start()
        try:
            got = [
                item
                async for item in session.retrieve(
                    refs, spool_dir=tmp_path / "spool", spool_threshold=1 << 20
                )
            ]
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    (message,) = got
    assert isinstance(message, Message) and message.spool_path is not None
    assert hashlib.sha256(Path(message.spool_path).read_bytes()).digest() == (
        hashlib.sha256(raw).digest()
    )
    assert peak < 4 * 2**20, peak  # chunks of 256 KiB, never the message


async def test_header_prefetch_and_oversize(dovecot_imap: Dovecot, tmp_path: Path) -> None:
    d = dovecot_imap
    user = d.add_user()
    raw = crafted(1)[0]
    d.deliver(user, raw)
    async with ImapSource(session_options(d, user)).session() as session:
        (ref,) = await session.list()
        header = await session.headers(ref)
        assert header == raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        with pytest.raises(OversizeError) as info:
            async for _ in session.retrieve(
                [ref], spool_dir=tmp_path, spool_threshold=1 << 20, max_size=10
            ):
                pass
        assert info.value.ref == ref
    assert folder_state(d, user, "INBOX")[0][0] == raw  # nothing acknowledged


def test_ic25_folder_recreated_with_new_uidvalidity_is_reconciled(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    raws = crafted(4)
    append(d, user, "Support", raws[:3])
    config = pipeline(tmp_path, d, user, folders=["Support"], delete="never")
    run, summary = mailpipe_once(config)
    assert run.returncode == 0 and summary["processed"] == 3, run.stderr[-3000:]
    other = reference(d, user)
    assert other.delete('"Support"')[0] == "OK"  # and recreated: a new UIDVALIDITY
    other.logout()
    append(d, user, "Support", raws)
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    # The three processed before are adopted by content hash, the new one processed.
    assert summary["processed"] == 1
    assert summary["reconciled"] == 3
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)
    assert "epoch_reconciled" in run.stdout + run.stderr
    assert len(folder_state(d, user, "Support")) == 4  # delete = "never": all kept
    run, summary = mailpipe_once(config)  # the next poll: nothing runs again
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["processed"] == 0 and summary["retrieved"] == 0
    assert summary["reconciled"] == 0


def test_ic25_adopted_mail_gets_the_mailbox_acknowledgement(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    """acknowledge = move: the copies restored into a recreated folder are moved
    again without running their chain; the one new message runs and is moved."""
    d = dovecot_imap
    user = d.add_user()
    raws = crafted(4)
    append(d, user, "Support", raws[:3])
    config = pipeline(tmp_path, d, user, folders=["Support"],
                      acknowledge={"move": "Done"})
    run, summary = mailpipe_once(config)
    assert run.returncode == 0 and summary["processed"] == 3, run.stderr[-3000:]
    assert [r for r, _ in folder_state(d, user, "Done")] == raws[:3]
    other = reference(d, user)
    assert other.delete('"Support"')[0] == "OK"
    other.logout()
    append(d, user, "Support", raws)  # restored from a backup, plus one new
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["processed"] == 1 and summary["reconciled"] == 3
    assert summary["deleted"] == 4  # every copy acknowledged (moved)
    assert folder_state(d, user, "Support") == []
    assert Counter(r for r, _ in folder_state(d, user, "Done")) == Counter(
        raws[:3] + raws
    )
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)


async def test_ic43_idle_wakes_on_new_mail_and_ends_with_done(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    user = d.add_user()
    d.deliver(user, crafted(1)[0])
    async with ImapSource(session_options(d, user)).session() as session:
        assert await session.wait_for_new(0.2) is False  # nothing new: DONE, OK
        waiter = asyncio.create_task(session.wait_for_new(120))
        for _ in range(2000):  # bounded: until the server said "+ idling"
            await asyncio.sleep(0.01)
            if session.client.conn.outstanding and not session.client.conn.buffered:
                break
        await asyncio.sleep(0.1)
        d.deliver(user, crafted(2)[1])
        assert await waiter is True
        refs = await session.list()  # the session goes on after DONE
    assert len(refs) == 2


@contextlib.contextmanager
def running(config: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``mailpipe run`` of ``config`` (its first poll retrieved one message) until the
    block ends; yields the process and its log file."""
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = start_mailpipe(config, "run", "{config}", log=log)
        try:
            first = wait_for_log(proc, log_path, b'"retrieved": 1', timeout=120)
            assert first, log_path.read_text()[-3000:]
            yield proc, log_path
        finally:
            proc.terminate()
            proc.wait(60)


def stored_soon(tmp_path: Path, log_path: Path, count: int) -> None:
    assert wait_until(
        lambda: len(stored_messages(tmp_path / "Maildir")) == count, timeout=120
    ), log_path.read_text()[-3000:]


def test_ic43_push_wakes_the_scheduler_long_before_the_poll_interval(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    d.deliver(user, crafted(1)[0])
    config = pipeline(tmp_path, d, user, poll_interval=3600)  # only push can wake it
    with running(config, tmp_path) as (proc, log_path):
        append(d, user, "INBOX", crafted(2)[1:])  # another client APPENDs
        woken = wait_for_log(proc, log_path, b"mailbox_woken", timeout=120)
        assert woken, log_path.read_text()[-3000:]
        stored_soon(tmp_path, log_path, 2)
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(crafted(2))


async def test_ic43_mail_between_listing_and_idle_wakes_at_once(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    user = d.add_user()
    source = ImapSource(session_options(d, user))
    async with source.session() as session:
        await session.list()
    try:
        assert await source.wait_for_mail(0.2) is False  # nothing new: the timeout
        d.deliver(user, crafted(1)[0])  # after the listing, before the next IDLE
        assert await source.wait_for_mail(0.2) is True
    finally:
        await source.close()


def test_ic43_append_into_a_second_folder_wakes_the_scheduler(
    dovecot_imap: Dovecot, tmp_path: Path
) -> None:
    d = dovecot_imap
    user = d.add_user()
    raws = crafted(3)
    append(d, user, "Support", raws[:1])
    config = pipeline(
        tmp_path, d, user, poll_interval=3600, folders=["INBOX", "Support"]
    )  # only push can wake it
    with running(config, tmp_path) as (_, log_path):
        append(d, user, "Support", raws[1:2])  # not the first folder
        assert wait_until(
            lambda: log_path.read_text().count("session_finished") == 2, timeout=120
        ), log_path.read_text()[-3000:]
        assert len(stored_messages(tmp_path / "Maildir")) == 2
        append(d, user, "INBOX", raws[2:])
        stored_soon(tmp_path, log_path, 3)
    text = log_path.read_text()
    assert text.count("mailbox_woken") >= 2, text[-3000:]
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    polls = sum(e["sessions"] for e in events if e["event"] == "session_finished")
    opened = sum(1 for e in events if e["event"] == "imap_session_opened")
    assert opened == polls + 2, text[-3000:]  # one IDLE connection per folder, kept
    assert Counter(stored_messages(tmp_path / "Maildir")) == Counter(raws)


async def test_ic44_folder_beyond_idle_connections_is_polled_with_status(
    dovecot_imap: Dovecot,
) -> None:
    d = dovecot_imap
    user = d.add_user()
    append(d, user, "Support/Escalations", crafted(1))  # Dovecot answers STATUS for it
    source = ImapSource(session_options(
        d, user, folders=["INBOX", "Support/Escalations"], idle_connections=1,
        status_interval=0.1,
    ))
    async with source.session() as session:
        await session.list()
    try:
        assert await source.wait_for_mail(0.3) is False  # STATUS saw nothing new
        assert source.push._status_link.session is not None
        waiter = asyncio.create_task(source.wait_for_mail(120))
        await asyncio.sleep(0.2)
        append(d, user, "Support/Escalations", crafted(2)[1:])
        assert await waiter is True
    finally:
        await source.close()
