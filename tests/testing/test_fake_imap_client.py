"""The IMAP source against the fault-injecting in-process server: a connection cut
inside a literal, a wrong literal size (IT-02) and a BYE (IC-45) never deliver a wrong
message and never acknowledge anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from mailpipe.plugins.imap.source import ImapOptions, ImapSource, parse_message_uid

from mailpipe import Message
from mailpipe.errors import SourceConnectionError, SourceError
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
