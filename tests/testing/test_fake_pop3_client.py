"""The fake POP3 server driven by mailpipe's own POP3 source: each fault, end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from mailpipe.plugins.pop3 import retrieval as retrieval_module
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe.errors import (
    AuthenticationError,
    CommitError,
    SourceBusyError,
    SourceConnectionError,
    SourceError,
    SourceTimeoutError,
)
from mailpipe.message import Message, MessageRef
from mailpipe.testing import Faults, Pop3Server, wire_form

Factory = Callable[..., Pop3Server]

MSGS = [
    b"From: a@example.org\r\nSubject: a\r\n\r\nhello\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.\r\r\n.leading\r\nend\r\n",
    b"Subject: lf\n\nstored with bare LF\n",
]


def options(srv: Pop3Server, tmp_path: Path, **overrides: Any) -> Pop3Options:
    table: dict[str, Any] = {
        "host": srv.host,
        "port": srv.port,
        "security": "none",
        "username": "user",
        "password": "pass",
        "allow_plaintext_password": True,
        "greeting_timeout": 5,
        "read_timeout": 5,
    }
    table.update(overrides)
    return Pop3Options.model_validate(table, context={"base_dir": tmp_path})


async def fetch(
    srv: Pop3Server,
    tmp_path: Path,
    *,
    delete: bool = True,
    spool_threshold: int = 1 << 20,
    **overrides: Any,
) -> tuple[list[MessageRef], list[Message]]:
    """One poll: list, retrieve all, DELE what arrived and QUIT (or abort)."""
    source = Pop3Source(options(srv, tmp_path, **overrides))
    async with source.session() as session:
        refs = await session.list()
        got = [
            m
            async for m in session.retrieve(
                refs, spool_dir=tmp_path, spool_threshold=spool_threshold
            )
            if isinstance(m, Message)  # Unretrievable ones stay on the server
        ]
        if delete:
            await session.mark_deleted([m.ref for m in got])
            await session.commit()
    return refs, got


async def test_full_cycle_retrieves_exact_bytes_and_deletes_at_quit(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS)
    refs, got = await fetch(srv, tmp_path)
    assert [m.raw for m in got] == [wire_form(m) for m in MSGS]
    assert [r.size for r in refs] == [len(wire_form(m)) for m in MSGS]
    assert [r.uid for r in refs] == ["mp00000001", "mp00000002", "mp00000003"]
    assert srv.messages == []
    keywords = srv.transcript.keywords(1)
    assert keywords[-1] == "QUIT" and keywords.count("DELE") == 3
    assert srv.sessions[0].outcome == "committed"
    assert "pass" not in srv.transcript.commands(1)[2]


async def test_abort_without_commit_deletes_nothing(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS)
    source = Pop3Source(options(srv, tmp_path))
    async with source.session() as session:
        refs = await session.list()
        await session.mark_deleted(refs)
    await srv.await_idle()
    assert srv.messages == MSGS
    assert "QUIT" not in srv.transcript.keywords(1)


async def test_pipelining_off_and_on_give_the_same_messages(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    plain = pop3_server_factory(messages=MSGS, pipelining=False)
    piped = pop3_server_factory(messages=MSGS)
    _, a = await fetch(plain, tmp_path)
    _, b = await fetch(piped, tmp_path)
    assert [m.raw for m in a] == [m.raw for m in b] == [wire_form(m) for m in MSGS]


async def test_long_lines_arrive_whole(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    long = (
        b"Subject: long\r\n\r\n"
        + b"A" * 300_000
        + b"\r\n.\r\n"
        + b"B" * 120_000
        + b"\r\n"
    )
    srv = pop3_server_factory(messages=[long])
    _, got = await fetch(srv, tmp_path)
    assert got[0].raw == long


# C-35: QUIT, its reply, then the TLS close (close_notify itself is not observed here).
async def test_implicit_tls_and_starttls(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    for mode, security in (("implicit", "tls"), ("starttls", "starttls")):
        srv = pop3_server_factory(messages=MSGS[:1], tls=mode)
        _, got = await fetch(srv, tmp_path, security=security, ca_file=str(srv.ca_file))
        assert got[0].raw == MSGS[0]
        assert srv.sessions[0].tls
    assert "STLS" in srv.transcript.keywords(1)


@pytest.mark.parametrize(
    "mechanism", ["plain", "login", "cram-md5", "scram-sha-1", "scram-sha-256"]
)
async def test_sasl_password_mechanisms(
    pop3_server_factory: Factory, tmp_path: Path, mechanism: str
) -> None:
    srv = pop3_server_factory(
        messages=MSGS[:1],
        mechanisms=["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"],
    )
    _, got = await fetch(srv, tmp_path, auth=mechanism)
    assert got[0].raw == MSGS[0]
    assert f"logged in as user via {mechanism.upper()}" in srv.transcript.events(1)


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_oauth_mechanisms_check_the_token(
    pop3_server_factory: Factory, tmp_path: Path, mechanism: str
) -> None:
    srv = pop3_server_factory(
        messages=MSGS[:1],
        tls="implicit",
        mechanisms=["XOAUTH2", "OAUTHBEARER"],
        oauth_tokens={"user": "tok-1"},
    )
    common = {"security": "tls", "ca_file": str(srv.ca_file), "auth": mechanism}
    _, got = await fetch(srv, tmp_path, oauth_token="tok-1", password=None, **common)
    assert got[0].raw == MSGS[0]
    with pytest.raises(AuthenticationError):
        await fetch(srv, tmp_path, oauth_token="wrong", password=None, **common)
    # The failed exchange answered the error challenge before the -ERR (RFC 7628 §3.2.3).
    assert srv.transcript.commands(2)[-1] == "****"
    assert srv.transcript.replies(2)[-1].startswith("-ERR [AUTH]")
    assert "tok-1" not in str(srv.transcript)


async def test_auto_prefers_scram_sha_256(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        messages=MSGS[:1], mechanisms=["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256"]
    )
    _, got = await fetch(srv, tmp_path)
    assert got[0].raw == MSGS[0]
    assert "logged in as user via SCRAM-SHA-256" in srv.transcript.events(1)
    # C-42: the password itself never crossed the wire (SCRAM sends a proof).
    with pytest.raises(AuthenticationError):
        await fetch(srv, tmp_path, password="wrong")


async def test_scram_bad_server_signature_is_refused(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        messages=MSGS[:1],
        mechanisms=["SCRAM-SHA-256"],
        faults=Faults(scram_bad_signature=True),
    )
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(AuthenticationError, match="signature does not match") as info,
    ):
        await fetch(srv, tmp_path)
    await srv.await_idle()
    # RFC 5802 §5.1: the exchange was cancelled (C-39) and nothing else was sent.
    assert srv.transcript.commands(1)[-1] == "*"
    assert srv.transcript.keywords(1) == ["CAPA", "AUTH", "****", "*"]
    assert not any("logged in" in e for e in srv.transcript.events(1))
    assert srv.messages == MSGS[:1]
    assert "pass" not in str(info.value) and "pass" not in repr(logs)


async def test_wrong_password_is_authentication_error(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS)
    with pytest.raises(AuthenticationError):
        await fetch(srv, tmp_path, password="wrong")
    assert srv.messages == MSGS


async def test_in_use_lock_is_busy(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS)
    holder = Pop3Source(options(srv, tmp_path))
    async with holder.session():
        with pytest.raises(SourceBusyError, match="IN-USE"):
            await fetch(srv, tmp_path)


async def test_fault_greeting_sys_temp_is_busy(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        faults=Faults(greeting_err="[SYS/TEMP] too many connections")
    )
    with pytest.raises(SourceBusyError):
        await fetch(srv, tmp_path)


async def test_fault_login_delay_on_pass_is_busy(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        login_delay=900,
        faults=Faults(
            err_on={"PASS": "[LOGIN-DELAY] wait", "AUTH": "[LOGIN-DELAY] wait"}
        ),
    )
    with pytest.raises(SourceBusyError, match="LOGIN-DELAY"):
        await fetch(srv, tmp_path)


# S-07 / P-10: a cut mid-RETR fails the transfer and every outstanding entry; no QUIT.
async def test_fault_drop_in_retr_aborts_and_deletes_nothing(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(drop_in_retr=2))
    with pytest.raises(SourceConnectionError):
        await fetch(srv, tmp_path)
    await srv.await_idle()
    assert srv.messages == MSGS
    assert srv.sessions[0].outcome == "dropped"


@pytest.mark.parametrize("limit", [1, 40, 120, 200, 260])
async def test_fault_drop_after_bytes_never_deletes(
    pop3_server_factory: Factory, tmp_path: Path, limit: int
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(drop_after_bytes=limit))
    with pytest.raises(SourceError):
        await fetch(srv, tmp_path)
    await srv.await_idle()
    assert srv.messages == MSGS


async def test_fault_stall_times_out(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(stall_on={"RETR"}))
    with pytest.raises(SourceTimeoutError):
        await fetch(srv, tmp_path, read_timeout=0.3)
    assert srv.messages == MSGS


async def test_fault_err_on_retr_skips_that_message(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        messages=MSGS, faults=Faults(err_on={"RETR 2": "[SYS/TEMP] try later"})
    )
    _, got = await fetch(srv, tmp_path)
    assert [m.ref.number for m in got] == [1, 3]
    assert srv.messages == [MSGS[1]]


async def test_fault_quit_err_is_commit_error(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        messages=MSGS, faults=Faults(quit_err="some deleted messages not removed")
    )
    with pytest.raises(CommitError):
        await fetch(srv, tmp_path)
    assert srv.messages == MSGS


async def test_fault_dele_ignored_goes_unnoticed_by_the_client(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(dele_ignored=True))
    await fetch(srv, tmp_path)
    # The server lied: the next poll sees every message again (the journal's job).
    refs, _ = await fetch(srv, tmp_path, delete=False)
    assert [r.uid for r in refs] == ["mp00000001", "mp00000002", "mp00000003"]


async def test_fault_list_size_mismatch_short_is_never_delivered(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(
        messages=MSGS, faults=Faults(list_size_delta={1: 100, 2: -5})
    )
    refs, got = await fetch(srv, tmp_path)
    # C-50: fewer octets listed than sent is a wrong hint; MP-01: 100 more listed than
    # sent is a message cut short, never delivered (and so never DELE'd).
    assert [m.raw for m in got] == [wire_form(m) for m in MSGS[1:]]
    assert refs[0].size == len(wire_form(MSGS[0])) + 100
    assert srv.messages == [MSGS[0]]


@pytest.mark.parametrize("spool_threshold", [0, 1 << 20])
async def test_fault_list_size_counting_stuffed_dots_is_whole_short_is_not(
    pop3_server_factory: Factory, tmp_path: Path, spool_threshold: int
) -> None:
    # MP-01 / issue 18: a body below its LIST size is read back (from its spool file
    # when spooled) and its lines counted: MSGS[1]'s four stuffed dots and two
    # octets of end slack cover 6 octets more than sent, 7 are a copy cut short.
    srv = pop3_server_factory(
        messages=MSGS, faults=Faults(list_size_delta={2: 6, 3: 7})
    )
    _, got = await fetch(srv, tmp_path, spool_threshold=spool_threshold)
    assert [m.raw for m in got] == [wire_form(m) for m in MSGS[:2]]
    assert [m.spool_path is not None for m in got] == [spool_threshold == 0] * 2
    assert srv.messages == [MSGS[2]]


async def test_verify_size_off_never_reads_a_short_body_back(
    pop3_server_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MP-01 with verify_size = "off": what arrives is committed, so a body below its
    # LIST size is not read back (from its spool file) to count its lines.
    def never(*args: object) -> int:
        raise AssertionError("read back")

    monkeypatch.setattr(retrieval_module, "shortfall", never)
    srv = pop3_server_factory(messages=MSGS, faults=Faults(list_size_delta={1: 100}))
    _, got = await fetch(srv, tmp_path, spool_threshold=0, verify_size="off")
    assert [m.raw for m in got] == [wire_form(m) for m in MSGS]


async def test_fault_uidl_variants(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS)
    srv.faults = Faults(uidl_duplicate=True)
    refs, _ = await fetch(srv, tmp_path, delete=False)
    # T-23: all still listed, each occurrence with its own uid
    assert [r.uid for r in refs] == ["mp00000001", "mp00000001 #2", "mp00000001 #3"]
    srv.faults = Faults(uidl_missing={2})
    refs, _ = await fetch(srv, tmp_path, delete=False)
    assert [r.uid for r in refs] == ["mp00000001", "", "mp00000003"]
    srv.faults = Faults(uidl_length=200)
    refs, _ = await fetch(srv, tmp_path, delete=False)
    assert {len(r.uid) for r in refs} == {200}  # T-24: accepted
    srv.faults = Faults(uidl_unsupported=True)
    refs, got = await fetch(srv, tmp_path)
    assert [r.uid for r in refs] == ["", "", ""]
    assert len(got) == 3 and srv.messages == []


async def test_fault_no_dot_stuffing_fails_the_session(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(no_dot_stuffing=True))
    with pytest.raises(SourceError):
        await fetch(srv, tmp_path)
    assert srv.messages == MSGS


async def test_fault_drop_after_capa_reconnects_without_capa(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=[Faults(drop_on={"CAPA"})])
    _, got = await fetch(srv, tmp_path)
    assert len(got) == 3
    assert "CAPA" not in srv.transcript.keywords(2)


async def test_fault_bare_lf_session(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS[:2], faults=Faults(bare_lf=True))
    with structlog.testing.capture_logs() as logs:
        refs, got = await fetch(srv, tmp_path)
    assert [r.uid for r in refs] == ["mp00000001", "mp00000002"]
    # T-08: LF-mode for the session; each LF-terminated line arrives as a line.
    assert [m.raw for m in got] == [m.replace(b"\r\n", b"\n") for m in MSGS[:2]]
    assert srv.messages == [] and srv.sessions[0].outcome == "committed"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert any("bare LF" in e.get("detail", "") for e in warnings)


async def test_fault_long_status_line_fails_the_session(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(status_padding=100_000))
    with pytest.raises(SourceError):  # C-04: status lines are capped (max_line)
        await fetch(srv, tmp_path)
    assert srv.messages == MSGS


async def test_fault_stalled_greeting_times_out(
    pop3_server_factory: Factory, tmp_path: Path
) -> None:
    srv = pop3_server_factory(messages=MSGS, faults=Faults(stall_on={"GREETING"}))
    with pytest.raises(SourceTimeoutError, match="greeting"):
        await fetch(srv, tmp_path, greeting_timeout=0.3)


async def test_a_body_that_cannot_be_read_back_leaves_no_spool_file(
    pop3_server_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MP-01: reading a short body back (too many open files, say) fails: the error
    # goes on, nothing is delivered or deleted, and its spool file is removed, not
    # left behind in the spool directory with the raw mail in it.
    import errno

    real = retrieval_module.shortfall

    def unreadable(octets: int, listed: int, body: Callable[[], Any]) -> int:
        def fail() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        return real(octets, listed, fail)

    monkeypatch.setattr(retrieval_module, "shortfall", unreadable)
    spool = tmp_path / "spool"
    srv = pop3_server_factory(messages=MSGS, faults=Faults(list_size_delta={1: 100}))
    source = Pop3Source(options(srv, tmp_path))
    with pytest.raises(OSError, match="Too many open files"):
        async with source.session() as session:
            refs = await session.list()
            async for _ in session.retrieve(refs, spool_dir=spool, spool_threshold=0):
                pass
    assert spool.is_dir()  # the body was spooled before the check
    assert list(spool.iterdir()) == []
    assert srv.messages == MSGS


@pytest.mark.parametrize("spool_threshold", [0, 1 << 20])
async def test_a_spooled_body_is_read_back_off_the_event_loop(
    pop3_server_factory: Factory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spool_threshold: int,
) -> None:
    # MP-01: a spooled body below its LIST size is read back from its file (about
    # 0.2 s a 100 MB, in one piece) on a worker thread, so the event loop and every
    # other session on it go on meanwhile; one in memory is counted where it is.
    import threading

    real = retrieval_module.shortfall
    threads: list[bool] = []

    def recording(octets: int, listed: int, body: Callable[[], Any]) -> int:
        def opening() -> Any:
            threads.append(threading.current_thread() is threading.main_thread())
            return body()

        return real(octets, listed, opening)

    monkeypatch.setattr(retrieval_module, "shortfall", recording)
    srv = pop3_server_factory(
        messages=MSGS, faults=Faults(list_size_delta={2: 6, 3: 7})
    )
    _, got = await fetch(srv, tmp_path, spool_threshold=spool_threshold)
    assert [m.raw for m in got] == [wire_form(m) for m in MSGS[:2]]
    assert threads == [spool_threshold != 0] * 2  # on the loop's thread: in memory
    assert srv.messages == [MSGS[2]]


async def test_a_retrieval_cancelled_during_the_read_back_leaves_no_spool_file(
    pop3_server_factory: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MP-01: cancelled while its spool file is read back on a worker thread, the
    # retrieval delivers nothing, deletes nothing and leaves no raw mail behind.
    import asyncio
    import threading

    real = retrieval_module.shortfall
    reading, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def held(octets: int, listed: int, body: Callable[[], Any]) -> int:
        loop.call_soon_threadsafe(reading.set)
        release.wait(30)
        return real(octets, listed, body)

    monkeypatch.setattr(retrieval_module, "shortfall", held)
    spool = tmp_path / "spool"
    srv = pop3_server_factory(messages=MSGS, faults=Faults(list_size_delta={1: 100}))
    got: list[Any] = []

    async def retrieve() -> None:
        async with Pop3Source(options(srv, tmp_path)).session() as session:
            refs = await session.list()
            async for item in session.retrieve(refs, spool_dir=spool, spool_threshold=0):
                got.append(item)

    task = asyncio.create_task(retrieve())
    await reading.wait()
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == [] and srv.messages == MSGS
    assert list(spool.iterdir()) == []
