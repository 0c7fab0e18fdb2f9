"""The IMAP source against the fault-injecting in-process server: a connection cut
inside a literal, a wrong literal size (IT-02) and a BYE (IC-45) never deliver a wrong
message and never acknowledge anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
from mailpipe.plugins.imap.source import ImapOptions, ImapSource, parse_message_uid
from structlog.testing import capture_logs

from mailpipe import Message
from mailpipe.config import SchedulerConfig
from mailpipe.errors import (
    AuthenticationError,
    SourceBusyError,
    SourceConnectionError,
    SourceError,
    SourcePermanentError,
    SourceTimeoutError,
)
from mailpipe.scheduler import next_delay
from mailpipe.source import Ack, AckKind
from mailpipe.testing.imap_server import ImapFaults, ImapServer

RAWS = [
    b"From: a@example.org\r\nSubject: %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)
]


def source(srv: ImapServer) -> ImapSource:
    return ImapSource(ImapOptions.model_validate({
        "host": srv.host, "port": srv.port, "security": "none",
        "allow_plaintext_password": True, "username": "user", "password": "pass",
        "read_timeout": 10, "greeting_timeout": 10,
    }))


async def fetch_all(srv: ImapServer, tmp_path: Path, commit: bool) -> list[object]:
    got: list[object] = []
    async with source(srv).session() as session:
        refs = await session.list()
        async for item in session.retrieve(refs, spool_dir=tmp_path, spool_threshold=1 << 20):
            got.append(item)
            await session.acknowledge([item.ref], Ack(AckKind.DELETE))  # type: ignore[attr-defined]
        if commit:
            await session.commit()
    return got


async def test_fake_server_round_trip_deletes_after_commit(tmp_path: Path) -> None:
    with ImapServer() as srv:
        for raw in RAWS:
            srv.add_message(raw)
        got = await fetch_all(srv, tmp_path, commit=True)
        assert [m.raw for m in got if isinstance(m, Message)] == RAWS
        assert srv.messages == []
        wire = "\n".join(srv.transcript)
        assert "UID STORE 1:3 +FLAGS.SILENT (\\Deleted)" in wire
        assert "UID EXPUNGE 1:3" in wire
        assert "BODY.PEEK[]" in wire and "CLOSE" not in wire  # IC-30, IC-39
        assert "pass" not in wire  # IS-12: the transcript masks LOGIN


@pytest.mark.parametrize(
    ("faults", "error"),
    [
        (ImapFaults(drop_in_literal=10), SourceConnectionError),
        (ImapFaults(literal_size_delta=-5), SourceError),
        (ImapFaults(literal_size_delta=+5), SourceError),
        (ImapFaults(bye_on="UID FETCH"), SourceConnectionError),
    ],
    ids=["drop-mid-literal", "literal-too-short", "literal-too-long", "bye"],
)
async def test_fault_never_delivers_a_wrong_message_nor_acknowledges(
    faults: ImapFaults, error: type[Exception], tmp_path: Path
) -> None:
    with ImapServer(faults) as srv:
        for raw in RAWS:
            srv.add_message(raw)
        delivered: list[object] = []
        with pytest.raises(error):
            async with source(srv).session() as session:
                refs = await session.list()
                async for item in session.retrieve(
                    refs, spool_dir=tmp_path, spool_threshold=1 << 20
                ):
                    delivered.append(item)
                await session.acknowledge(refs, Ack(AckKind.DELETE))
                await session.commit()
        # Whatever arrived before the fault is exactly a message of the server's...
        assert all(isinstance(m, Message) and m.raw in RAWS for m in delivered)
        # ...and nothing was acknowledged: no STORE, no EXPUNGE, everything still there.
        assert not any("STORE" in line or "EXPUNGE" in line for line in srv.transcript)
        assert srv.messages == RAWS


async def test_ic25_session_reports_an_epoch_change_and_what_it_superseded() -> None:
    with ImapServer() as srv:
        srv.add_message(RAWS[0])
        src = source(srv)
        async with src.session() as session:
            refs = await session.list()
            assert session.facts.ids_have_epoch
            assert session.epoch_changed  # the first listing of a process: unknown
        async with src.session() as session:
            await session.list()
            assert not session.epoch_changed  # the same UIDVALIDITY again
        srv.uidvalidity += 1  # the folder was recreated
        with structlog.testing.capture_logs() as logs:
            async with src.session() as session:
                new = await session.list()
                assert session.epoch_changed
                old = [refs[0].uid, "Other;UIDVALIDITY=1234;UID=1", "sha256:ab", new[0].uid]
                assert session.superseded(old) == [refs[0].uid]
        changed = [e for e in logs if e["event"] == "imap_uidvalidity_changed"]
        assert [(e["was"], e["now"]) for e in changed] == [(1234, 1235)]
    assert refs[0].uid == "INBOX;UIDVALIDITY=1234;UID=1"
    assert parse_message_uid(new[0].uid) == (b"INBOX", 1235, 1)
    assert parse_message_uid("sha256:ab") is None


def gmail_source(srv: ImapServer, folders: list[str]) -> ImapSource:
    return ImapSource(ImapOptions.model_validate({
        "host": srv.host, "port": srv.port, "security": "none",
        "allow_plaintext_password": True, "username": "user", "password": "pass",
        "read_timeout": 10, "greeting_timeout": 10, "folders": folders,
    }))


@pytest.mark.parametrize("gmail", [True, False], ids=["x-gm-ext-1", "plain-imap"])
async def test_ic46_gmail_message_with_two_labels_is_listed_once(
    gmail: bool, tmp_path: Path
) -> None:
    with ImapServer(gmail=gmail) as srv:
        srv.add_message(RAWS[0], "INBOX", gm_msgid=1278455344230334865)
        srv.add_message(RAWS[0], "Support", gm_msgid=1278455344230334865)  # 2nd label
        srv.add_message(RAWS[1], "Support", gm_msgid=1278455344230334866)
        async with gmail_source(srv, ["INBOX", "Support"]).session() as session:
            refs = await session.list()
            got = [
                m async for m in session.retrieve(
                    refs, spool_dir=tmp_path, spool_threshold=1 << 20
                )
            ]
        wire = "\n".join(srv.transcript)
    if gmail:
        assert [r.uid for r in refs] == [
            "X-GM-MSGID=1278455344230334865", "X-GM-MSGID=1278455344230334866"
        ]
        assert "X-GM-MSGID" in wire
    else:  # without X-GM-EXT-1 each folder's copy is its own message
        assert [r.uid for r in refs] == [
            "INBOX;UIDVALIDITY=1234;UID=1", "Support;UIDVALIDITY=1234;UID=1",
            "Support;UIDVALIDITY=1234;UID=2",
        ]
        assert "X-GM-MSGID" not in wire
    assert [m.raw for m in got if isinstance(m, Message)] == (
        [RAWS[0], RAWS[1]] if gmail else [RAWS[0], RAWS[0], RAWS[1]]
    )


SCHED = SchedulerConfig.model_validate({})


@pytest.mark.parametrize(
    ("faults", "error", "long_backoff"),
    [
        (ImapFaults(login_refusal="[ALERT] Please log in via your web browser"),
         AuthenticationError, True),
        (ImapFaults(login_refusal="[AUTHENTICATIONFAILED] Invalid credentials"),
         AuthenticationError, True),
        (ImapFaults(login_refusal="[UNAVAILABLE] Temporary System Problem"),
         SourceBusyError, False),
        (ImapFaults(login_refusal="[THROTTLED] Too many logins"), SourceBusyError, False),
        (ImapFaults(refuse=("UID FETCH", "[THROTTLED] Bandwidth exceeded")),
         SourceBusyError, False),
        (ImapFaults(refuse=("UID FETCH", "[THROTTLED] Bandwidth exceeded"),
                    refuse_skip=1), SourceBusyError, False),
        (ImapFaults(refuse=("UID FETCH", "[UNAVAILABLE] Try later"), refuse_skip=2),
         SourceBusyError, False),
    ],
    ids=["login-alert", "login-authenticationfailed", "login-unavailable",
         "login-throttled", "listing-throttled", "body-throttled", "body-unavailable"],
)
async def test_ic46_response_codes_map_to_backoff_classes(
    faults: ImapFaults, error: type[Exception], long_backoff: bool, tmp_path: Path
) -> None:
    with ImapServer(faults) as srv:
        for raw in RAWS:
            srv.add_message(raw)
        delivered: list[object] = []
        with capture_logs() as logs, pytest.raises(error) as caught:
            async with source(srv).session() as session:
                refs = await session.list()
                async for item in session.retrieve(
                    refs, spool_dir=tmp_path, spool_threshold=1 << 20
                ):
                    delivered.append(item)
                    await session.acknowledge([item.ref], Ack(AckKind.DELETE))  # type: ignore[union-attr]
                await session.commit()
        # A refused body fetch is a back-off of the whole session, never a message
        # charged with an attempt (no Unretrievable), and nothing is acknowledged.
        assert all(isinstance(m, Message) for m in delivered)
        assert not any("STORE" in line or "EXPUNGE" in line for line in srv.transcript)
        assert srv.messages == RAWS
    delay = next_delay(SCHED, interval=60, jitter=0, failures=1, error=caught.value)
    assert (delay == SCHED.backoff_auth) is long_backoff
    alerts = [e["text"] for e in logs if e["event"] == "imap_alert"]
    assert alerts == (["Please log in via your web browser"] if "ALERT" in str(
        faults.login_refusal) else [])


async def test_ic46_untagged_alert_is_logged_and_the_session_goes_on() -> None:
    with ImapServer(ImapFaults(alert="Your account is over quota")) as srv:
        srv.add_message(RAWS[0])
        with capture_logs() as logs:
            async with source(srv).session() as session:
                assert len(await session.list()) == 1
    assert [e["text"] for e in logs if e["event"] == "imap_alert"] == [
        "Your account is over quota"
    ]


async def acknowledge_all(
    srv: ImapServer, tmp_path: Path, ack: Ack
) -> tuple[list[object], list[str]]:
    """Retrieve every INBOX message, acknowledge each with ``ack``, commit; returns
    what was retrieved and the client lines sent from the first acknowledgement on."""
    got: list[object] = []
    async with source(srv).session() as session:
        refs = await session.list()
        async for item in session.retrieve(refs, spool_dir=tmp_path, spool_threshold=1 << 20):
            got.append(item)
            if isinstance(item, Message):
                await session.acknowledge([item.ref], ack)
        start = len(srv.transcript)
        await session.commit()
    return got, [line.split(" ", 1)[1] for line in srv.transcript[start:]]


async def test_ic38_without_uidplus_no_expunge_of_any_kind(
    imap_server_factory: Any, tmp_path: Path
) -> None:
    srv = imap_server_factory(extensions=())
    for raw in RAWS:
        srv.add_message(raw)
    with capture_logs() as logs:
        got, sent = await acknowledge_all(srv, tmp_path, Ack(AckKind.DELETE))
    assert len(got) == 3
    assert sent == ["UID STORE 1:3 +FLAGS.SILENT (\\Deleted)", "LOGOUT"]
    assert not any("EXPUNGE" in line for line in srv.transcript)
    assert srv.messages == RAWS  # still there, flagged \Deleted for an expunging client
    assert any(e["event"] == "imap_expunge_deferred" for e in logs)


async def test_ic40_move_with_the_extension(imap_server: ImapServer, tmp_path: Path) -> None:
    imap_server.add_message(RAWS[0])
    imap_server.add_message(RAWS[1], folder="Processed")
    _, sent = await acknowledge_all(imap_server, tmp_path, Ack(AckKind.MOVE, "Processed"))
    assert sent == ['UID MOVE 1 "Processed"', "LOGOUT"]
    assert imap_server.messages == []
    assert imap_server.folder("Processed") == [RAWS[1], RAWS[0]]


async def test_ic41_without_move_copy_then_delete_creating_the_folder(
    imap_server_factory: Any, tmp_path: Path
) -> None:
    srv = imap_server_factory(extensions=("UIDPLUS",))
    for raw in RAWS:
        srv.add_message(raw)
    _, sent = await acknowledge_all(srv, tmp_path, Ack(AckKind.MOVE, "Done"))
    assert sent == [
        'UID COPY 1:3 "Done"',  # refused: [TRYCREATE]
        'CREATE "Done"',
        'UID COPY 1:3 "Done"',
        "UID STORE 1:3 +FLAGS.SILENT (\\Deleted)",
        "UID EXPUNGE 1:3",
        "LOGOUT",
    ]
    assert srv.messages == []
    assert srv.folder("Done") == RAWS


async def test_it16_expunged_by_another_client_is_unretrievable_and_the_rest_acknowledged(
    imap_server_factory: Any, tmp_path: Path
) -> None:
    srv = imap_server_factory(ImapFaults(expunged_by_other=frozenset({2})))
    for raw in RAWS:
        srv.add_message(raw)
    got, sent = await acknowledge_all(srv, tmp_path, Ack(AckKind.DELETE))
    assert [type(g).__name__ for g in got] == ["Message", "Unretrievable", "Message"]
    assert [g.raw for g in got if isinstance(g, Message)] == [RAWS[0], RAWS[2]]
    assert sent == [
        "UID STORE 1,3 +FLAGS.SILENT (\\Deleted)", "UID EXPUNGE 1,3", "LOGOUT"
    ]
    assert srv.messages == []


def options_for(srv: ImapServer, **extra: Any) -> ImapSource:
    return ImapSource(ImapOptions.model_validate({
        "host": srv.host, "port": srv.port, "security": "none",
        "allow_plaintext_password": True, "username": "user", "password": "pass",
        "read_timeout": 10, "greeting_timeout": 10, **extra,
    }))


async def test_it05_a_repeated_body_is_dropped(
    imap_server_factory: Any, tmp_path: Path
) -> None:
    srv = imap_server_factory(ImapFaults(repeat_body=True))
    for raw in RAWS:
        srv.add_message(raw)
    async with source(srv).session() as session:
        refs = await session.list()
        got = [
            item async for item in session.retrieve(
                refs, spool_dir=tmp_path, spool_threshold=1  # every body spooled
            )
        ]
    assert [g.raw for g in got if isinstance(g, Message)] == RAWS
    assert len(got) == 3
    # One spool file per delivered message: the repeats' files were removed.
    assert sorted(tmp_path.iterdir()) == sorted(
        Path(g.spool_path) for g in got if isinstance(g, Message) and g.spool_path
    )
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize(
    ("auth", "offered", "wire"),
    [("login", ("AUTH=PLAIN",), "LOGIN"), ("auto", ("AUTH=PLAIN",), "AUTHENTICATE"),
     ("plain", ("AUTH=PLAIN", "SASL-IR"), "AUTHENTICATE")],
    ids=["login-while-plain-offered", "auto-plain", "plain-sasl-ir"],
)
async def test_is14_a_refused_login_is_never_retried_another_way(
    imap_server_factory: Any, auth: str, offered: tuple[str, ...], wire: str
) -> None:
    srv = imap_server_factory(
        ImapFaults(login_refusal="[AUTHENTICATIONFAILED] Invalid credentials"),
        extensions=("UIDPLUS", *offered),
    )
    with pytest.raises(AuthenticationError, match="AUTHENTICATIONFAILED"):
        async with options_for(srv, auth=auth).session():
            pass
    attempts = [
        line.split(" ")[1] for line in srv.transcript
        if line.split(" ")[1] in ("LOGIN", "AUTHENTICATE")
    ]
    assert attempts == [wire]  # IS-14: one attempt, no other mechanism after it


async def test_plain_login_succeeds_on_the_fake_server(imap_server_factory: Any) -> None:
    srv = imap_server_factory(extensions=("UIDPLUS", "AUTH=PLAIN"))
    srv.add_message(RAWS[0])
    async with options_for(srv, auth="plain").session() as session:
        assert len(await session.list()) == 1
    assert "pass" not in "\n".join(srv.transcript)


async def test_is13_a_referral_is_permanent_and_never_followed(
    imap_server_factory: Any,
) -> None:
    srv = imap_server_factory(
        ImapFaults(login_refusal="[REFERRAL imap://user@elsewhere.invalid/] go there")
    )
    with pytest.raises(SourcePermanentError, match="REFERRAL"):
        async with options_for(srv).session():
            pass
    assert [line.split(" ")[1] for line in srv.transcript] == ["CAPABILITY", "LOGIN"] or [
        line.split(" ")[1] for line in srv.transcript
    ] == ["LOGIN"]  # nothing after the refusal: no other login, no command


async def test_ic17_logindisabled_refuses_login_before_sending_it(
    imap_server_factory: Any,
) -> None:
    srv = imap_server_factory(extensions=("UIDPLUS", "LOGINDISABLED"))
    with pytest.raises(SourcePermanentError, match="LOGINDISABLED"):
        async with options_for(srv, auth="login").session():
            pass
    assert not any(" LOGIN " in f" {line} " for line in srv.transcript)


@pytest.mark.parametrize(
    ("faults", "phase"),
    [(ImapFaults(greeting_delay=5), "greeting"),
     (ImapFaults(stall_on="UID FETCH"), "uid fetch")],
    ids=["greeting", "read"],
)
async def test_is11_timeouts_per_phase(
    imap_server_factory: Any, faults: ImapFaults, phase: str
) -> None:
    srv = imap_server_factory(faults)
    srv.add_message(RAWS[0])
    with pytest.raises(SourceTimeoutError) as caught:
        async with options_for(srv, greeting_timeout=0.3, read_timeout=0.3).session() as s:
            await s.list()
    assert str(caught.value).lower().startswith(f"{phase} timed out after 0.3s")
