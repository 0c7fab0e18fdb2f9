"""The IMAP source against a second real server, Cyrus IMAP 3.6.1 imapd (Debian,
unpacked, run by the interop lab on 127.0.0.1): the source contract suite (delete,
move, flag, keep) and the corpus through ``mailpipe run --once`` byte for byte, then a
second run that fetches nothing. In CI (env CI set) a missing Cyrus fails the tests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from mailpipe.plugins.imap.source import ImapOptions, ImapSource

from mailpipe.source import Ack, AckKind, SourceContext
from mailpipe.testing.contract import SourceContract
from mailpipe.testing.e2e import write_pipeline
from mailpipe.testing.servers.base import LabServer
from mailpipe.testing.servers.cyrus_imap import CyrusImap
from mailpipe.testing.servers.interop import mailpipe_once, stored_messages

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]

LabServers = Callable[[str], LabServer]


@pytest.fixture
def cyrus(lab_servers: LabServers) -> CyrusImap:
    lab = lab_servers("cyrus-imap")
    assert isinstance(lab, CyrusImap)
    lab.clear()  # one mailbox, shared: each test starts from an empty one
    return lab


class CyrusMailbox:
    """The lab user's INBOX on Cyrus, seen from the server's side."""

    def __init__(self, lab: CyrusImap, base: Path) -> None:
        self.lab, self.base = lab, base

    def source(self) -> ImapSource:
        options = ImapOptions.model_validate({
            "host": self.lab.host, "port": self.lab.imaps_port,
            "ca_file": str(self.lab.ca_file), "username": self.lab.user.name,
            "password": self.lab.user.password,
        })
        ack = Ack(AckKind.FLAG, "$Processed")  # flagged mail is left out of listings
        return ImapSource(
            options, SourceContext(base_dir=self.base, mailbox="contract", ack=ack)
        )

    def deliver(self, data: bytes) -> None:
        self.lab.deliver(data)

    def remaining(self) -> list[bytes]:
        return [
            raw for raw, flags in self.lab.imap_messages("INBOX")
            if "$Processed" not in flags.split()
        ]

    def acknowledged(self, ack: Ack) -> list[bytes]:
        if ack.kind is AckKind.MOVE:
            return [raw for raw, _ in self.lab.imap_messages(ack.target or "")]
        return [
            raw for raw, flags in self.lab.imap_messages("INBOX")
            if (ack.target or "") in flags.split()
        ]


class TestCyrusImapSourceContract(SourceContract):
    @pytest.fixture
    def contract_mailbox(self, cyrus: CyrusImap, tmp_path: Path) -> CyrusMailbox:
        return CyrusMailbox(cyrus, tmp_path)


def test_corpus_byte_exact_then_nothing(
    cyrus: CyrusImap, corpus: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    refused = cyrus.load([raw for _, raw in corpus])
    served = [raw for raw, _ in cyrus.imap_messages("INBOX")]
    assert len(served) == len(corpus) - len(refused) > 0
    config = write_pipeline(
        tmp_path, dovecot=cyrus, user=cyrus.user, security="tls",
        processors=[{"use": "store.maildir", "path": str(tmp_path / "Maildir")}],
        mailbox={"source": "imap", "port": cyrus.imaps_port},
    )
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    stored = stored_messages(tmp_path / "Maildir")
    assert Counter(stored) == Counter(served)  # byte for byte, every message
    assert summary["retrieved"] == len(served) == summary["deleted"]
    assert cyrus.imap_messages("INBOX") == []  # \Deleted + UID EXPUNGE (UIDPLUS)
    run, summary = mailpipe_once(config)
    assert run.returncode == 0, run.stderr[-3000:]
    assert summary["listed"] == 0 and summary["retrieved"] == 0
    assert len(stored_messages(tmp_path / "Maildir")) == len(stored)
