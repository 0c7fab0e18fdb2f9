"""The IMAP source passes the source contract suite (mailpipe.testing.contract)
against a real Dovecot imapd on 127.0.0.1 (delete, move, flag and keep)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mailpipe.plugins.imap.source import ImapOptions, ImapSource

from mailpipe.source import Ack, AckKind, SourceContext
from mailpipe.testing.contract import SourceContract
from mailpipe.testing.dovecot import Dovecot, DovecotUser

pytestmark = [pytest.mark.dovecot, pytest.mark.timeout(300)]


class ImapMailbox:
    """One Dovecot user's INBOX, seen from the server's side."""

    def __init__(self, d: Dovecot, user: DovecotUser, base: Path) -> None:
        self.d, self.user, self.base = d, user, base

    def source(self) -> ImapSource:
        options = ImapOptions.model_validate({
            "host": self.d.host, "port": self.d.imaps_port, "ca_file": self.d.ca_file,
            "username": self.user.name, "password": self.user.password,
        })
        ack = Ack(AckKind.FLAG, "$Processed")  # flagged mail is left out of listings
        return ImapSource(
            options, SourceContext(base_dir=self.base, mailbox="contract", ack=ack)
        )

    def deliver(self, data: bytes) -> None:
        self.d.deliver(self.user, data)

    def remaining(self) -> list[bytes]:
        return [
            raw for raw, flags in self.d.imap_messages(self.user, "INBOX")
            if "$Processed" not in flags
        ]

    def acknowledged(self, ack: Ack) -> list[bytes]:
        if ack.kind is AckKind.MOVE:
            return [raw for raw, _ in self.d.imap_messages(self.user, ack.target or "")]
        return [
            raw for raw, flags in self.d.imap_messages(self.user, "INBOX")
            if (ack.target or "") in flags.split()
        ]


class TestImapSourceContract(SourceContract):
    @pytest.fixture
    def contract_mailbox(self, dovecot_imap: Dovecot, tmp_path: Path) -> ImapMailbox:
        return ImapMailbox(dovecot_imap, dovecot_imap.add_user(), tmp_path)
