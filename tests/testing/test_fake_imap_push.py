"""Push over IMAP against the in-process fake server (IC-43, IC-44): every configured
folder is watched (an IDLE connection each, STATUS polling for the rest or when the
server has no IDLE), IDLE is renewed on the same connection, a dropped connection
wakes the wait without a reconnect loop, and no task or connection outlives a wait
that is cancelled or a source that is closed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mailpipe.plugins.imap.push import MAX_IDLE_CONNECTIONS
from mailpipe.plugins.imap.source import ImapOptions, ImapSource
from pydantic import ValidationError
from structlog.testing import capture_logs

from mailpipe.testing.imap_server import ImapFaults, ImapServer

WITH_IDLE = ("UIDPLUS", "MOVE", "IDLE")
RAW = b"From: a@example.org\r\nSubject: push\r\n\r\nbody\r\n"


def source(srv: ImapServer, **options: Any) -> ImapSource:
    return ImapSource(ImapOptions.model_validate({
        "host": srv.host, "port": srv.port, "security": "none",
        "allow_plaintext_password": True, "username": "user", "password": "pass",
        "read_timeout": 10, "greeting_timeout": 10, **options,
    }))


def sent(srv: ImapServer, word: str) -> int:
    """How many client lines were ``word`` (``IDLE``) or ``<tag> word ...``."""
    return sum(
        1 for line in list(srv.transcript)
        if line.upper() == word or line.upper().split(" ")[1:2] == [word]
    )


async def until(predicate: Any) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded: 3000 turns of 10 ms)."""
    for _ in range(3000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def other_tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def listed(src: ImapSource) -> None:
    """A poll's listing: it sets the UIDNEXT the push compares with."""
    async with src.session() as session:
        await session.list()


@pytest.mark.parametrize("folder", ["Second", "Third"])
async def test_ic43_mail_in_another_folder_wakes_the_wait(folder: str) -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        for name in ("INBOX", "Second", "Third"):
            srv.add_message(RAW, name)
        src = source(srv, folders=["INBOX", "Second", "Third"])
        await listed(src)
        before = other_tasks()
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "IDLE") == 3)  # one IDLE connection per folder
        srv.add_message(RAW, folder)
        assert await waiter is True
        assert other_tasks() == before  # no watcher outlives the wait
        assert sent(srv, "DONE") == 3  # every IDLE ended cleanly
        assert sent(srv, "EXAMINE") == 3 and sent(srv, "SELECT") == 3  # listing only
        logins = sent(srv, "LOGIN")
        # The pooled connections serve the next wait: no new login. UIDNEXT of the
        # folder grew past the listing, so it wakes at once.
        assert await src.wait_for_mail(60) is True
        assert sent(srv, "LOGIN") == logins
        await listed(src)
        assert await src.wait_for_mail(0.3) is False
        assert sent(srv, "LOGIN") == logins + 1  # only the listing's session
        await src.close()
        assert sent(srv, "LOGOUT") == 3  # the pool's three (a listing without commit aborts)
        assert other_tasks() == before


async def test_ic43_idle_renewed_with_done_on_the_same_connection() -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        src = source(srv, idle_renew=0.2)
        await listed(src)
        start = len(srv.transcript)
        assert await src.wait_for_mail(3) is False
        idles, dones = sent(srv, "IDLE"), sent(srv, "DONE")
        assert idles >= 2 and dones == idles  # DONE, then IDLE again
        assert sent(srv, "LOGIN") == 2  # the listing and the one push connection
        push = [line.split(" ", 1)[-1].upper() for line in srv.transcript[start:]]
        assert push[push.index("IDLE"):] == ["IDLE", "DONE"] * idles
        await src.close()


async def test_ic44_more_folders_than_idle_connections_are_polled_with_status() -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        for name in ("INBOX", "Second", "Third"):
            srv.add_message(RAW, name)
        src = source(srv, folders=["INBOX", "Second", "Third"], idle_connections=1,
                     status_interval=0.05)
        await listed(src)
        before = other_tasks()
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "STATUS") >= 4 and sent(srv, "IDLE") == 1)
        srv.add_message(RAW, "Third")
        assert await waiter is True
        assert sent(srv, "IDLE") == 1 and sent(srv, "DONE") == 1
        statuses = [line for line in srv.transcript if " STATUS " in line]
        assert {line.split(" ")[2] for line in statuses} == {'"Second"', '"Third"'}
        assert other_tasks() == before
        await src.close()


async def test_ic44_server_without_idle_is_polled_with_status() -> None:
    with ImapServer() as srv:  # no IDLE in CAPABILITY
        srv.add_message(RAW)
        srv.add_message(RAW, "Second")
        src = source(srv, folders=["INBOX", "Second"], status_interval=0.05)
        async with src.session() as session:
            assert session.facts.can_push  # IC-44: push by STATUS polling
            await session.list()
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "STATUS") >= 4)
        assert not waiter.done()  # nothing new: polling goes on
        srv.add_message(RAW, "Second")
        assert await waiter is True
        assert sent(srv, "IDLE") == 0
        assert sent(srv, "LOGIN") == 2  # the listing and one shared connection
        await src.close()


async def test_ic43_drop_during_idle_wakes_and_backs_off() -> None:
    with ImapServer(ImapFaults(drop_on_idle=True), extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        src = source(srv)
        await listed(src)
        before = other_tasks()
        with capture_logs() as logs:
            assert await src.wait_for_mail(60) is True  # the next poll reports it
            for _ in range(5):
                await src.wait_for_mail(0.05)
        # 1 s back-off after the drop, doubling: no reconnect loop.
        assert sent(srv, "LOGIN") <= 3
        failed = [e for e in logs if e["event"] == "imap_push_connection_failed"]
        assert failed and failed[0]["retry_in"] == 1.0
        assert other_tasks() == before
        await src.close()


async def test_ic43_connection_gone_between_waits_is_reopened_without_waking() -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        src = source(srv)
        await listed(src)
        assert await src.wait_for_mail(0.2) is False
        logins = sent(srv, "LOGIN")
        srv.drop_connections()  # e.g. the server's autologout between two waits
        with capture_logs() as logs:
            assert await src.wait_for_mail(0.3) is False  # no mail: no wake-up
        assert sent(srv, "LOGIN") == logins + 1  # reopened at once, once
        assert [e["event"] for e in logs if "imap_push" in e["event"]] == [
            "imap_push_reconnect"
        ]
        await src.close()


async def test_ic43_refused_idle_is_not_retried_in_a_loop() -> None:
    with ImapServer(ImapFaults(refuse_idle=True), extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        src = source(srv, status_interval=0.1)
        await listed(src)
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "IDLE") >= 2)  # refused, then tried again later
        srv.add_message(RAW)
        assert await waiter is True  # the EXAMINE between two IDLEs sees UIDNEXT grow
        # One IDLE per status_interval: tens at most, where a loop would send thousands.
        assert sent(srv, "IDLE") < 50
        await src.close()


async def test_ic43_cancelled_wait_leaves_no_task_nor_connection() -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        srv.add_message(RAW, "Second")
        src = source(srv, folders=["INBOX", "Second"])
        await listed(src)
        before = other_tasks()
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "IDLE") == 2)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert other_tasks() == before
        # Stopped cleanly (DONE) within the grace; both connections stay usable.
        assert sent(srv, "DONE") == 2
        logins = sent(srv, "LOGIN")
        assert await src.wait_for_mail(0.2) is False
        assert sent(srv, "LOGIN") == logins
        await src.close()
        assert other_tasks() == before
        assert all(link.session is None for link in src.push._idle_links)


async def test_ic43_closing_the_source_ends_a_running_wait() -> None:
    with ImapServer(extensions=WITH_IDLE) as srv:
        srv.add_message(RAW)
        src = source(srv)
        await listed(src)
        before = other_tasks()
        waiter = asyncio.create_task(src.wait_for_mail(60))
        await until(lambda: sent(srv, "IDLE") == 1)
        await src.close()
        assert await waiter is False  # ended cleanly: DONE, then LOGOUT
        assert other_tasks() == before
        assert sent(srv, "DONE") == 1 and sent(srv, "LOGOUT") == 1


def test_ic43_ic44_options_are_validated() -> None:
    base = {"host": "h", "username": "u", "password": "p"}
    assert ImapOptions.model_validate(base).idle_renew == 25 * 60
    with pytest.raises(ValidationError, match="more than the 2 folder"):
        ImapOptions.model_validate({**base, "folders": ["A", "B"], "idle_connections": 3})
    with pytest.raises(ValidationError, match="less than or equal to 8"):
        ImapOptions.model_validate({
            **base, "folders": [f"F{i}" for i in range(12)], "idle_connections": 9,
        })
    with pytest.raises(ValidationError, match="idle_renew"):
        ImapOptions.model_validate({**base, "idle_renew": "30m"})
    with pytest.raises(ValidationError, match="status_interval"):
        ImapOptions.model_validate({**base, "status_interval": 0})
    many = ImapSource(ImapOptions.model_validate({
        **base, "folders": [f"F{i}" for i in range(12)],
    }))
    assert many.push.idle_connections == MAX_IDLE_CONNECTIONS == 8


def test_ic43_idle_renew_must_be_under_29_minutes() -> None:
    # RFC 2177 §3: renew *before* the server's 29-minute timer, so 29 min itself is refused.
    base = {"host": "h", "username": "u", "password": "p"}
    assert ImapOptions.model_validate({**base, "idle_renew": 29 * 60 - 1}).idle_renew == 1739
    with pytest.raises(ValidationError, match="idle_renew"):
        ImapOptions.model_validate({**base, "idle_renew": 29 * 60})


async def test_ic44_a_folder_refused_by_status_does_not_blind_the_others() -> None:
    with ImapServer() as srv:  # no IDLE: every folder polled with STATUS
        srv.add_message(RAW)
        srv.add_message(RAW, "Second")
        # "Gone" does not exist (deleted after configuration): STATUS answers NO.
        src = source(srv, folders=["INBOX", "Gone", "Second"], status_interval=0.05)
        with capture_logs() as logs:
            waiter = asyncio.create_task(src.wait_for_mail(60))
            await until(lambda: sent(srv, "STATUS") >= 9)  # three rounds of three
            srv.add_message(RAW, "Second")
            assert await waiter is True
        events = [e["event"] for e in logs if "imap_push" in e["event"]]
        assert events.count("imap_push_status_refused") == 1  # once, not every round
        assert "imap_push_connection_failed" not in events  # the connection stays
        assert sent(srv, "LOGIN") == 1
        await src.close()


async def _fake_lines(
    srv: ImapServer, lines: list[str]
) -> list[str]:
    """Send ``lines`` (tagged ``a1``, ``a2``…) after LOGIN; every line read back."""
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    got: list[str] = [(await reader.readline()).decode()]
    for n, line in enumerate(['LOGIN "user" "pass"', *lines]):
        tag = f"a{n}"
        writer.write(f"{tag} {line}\r\n".encode())
        for _ in range(100):  # bounded: the fake answers a few lines per command
            answer = (await asyncio.wait_for(reader.readline(), 10)).decode()
            got.append(answer.rstrip("\r\n"))
            if not answer or answer.startswith(f"{tag} "):
                break
    writer.close()
    return got


async def test_fake_answers_bad_to_an_unknown_search_key_and_goes_on() -> None:
    with ImapServer() as srv:
        srv.add_message(RAW)
        got = await _fake_lines(srv, ["SELECT INBOX", "UID SEARCH KEYWORD $x", "NOOP"])
        assert any(line.startswith("a2 BAD ") for line in got)
        assert "a3 OK done" in got  # the connection is still there


async def test_fake_answers_examine_read_only_and_select_read_write() -> None:
    with ImapServer() as srv:
        srv.add_message(RAW)
        got = await _fake_lines(srv, ["EXAMINE INBOX", "SELECT INBOX"])
        assert "a1 OK [READ-ONLY] done" in got
        assert "a2 OK [READ-WRITE] done" in got
