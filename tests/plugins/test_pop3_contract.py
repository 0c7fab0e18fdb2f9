"""The built-in POP3 source passes the source contract suite (mailpipe.testing.contract)
against the fake POP3 server, correct to RFC 1939/2449 by default."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source

from mailpipe.source import Ack, SourceContext
from mailpipe.testing import Pop3Server
from mailpipe.testing.contract import SourceContract


class Pop3Mailbox:
    """The fake server's one maildrop, seen from the server's side."""

    def __init__(self, srv: Pop3Server, base: Path) -> None:
        self.srv = srv
        self.base = base

    def source(self) -> Pop3Source:
        options = Pop3Options.model_validate(
            {
                "host": self.srv.host,
                "port": self.srv.port,
                "security": "none",
                "allow_plaintext_password": True,
                "username": "user",
                "password": "pass",
                "read_timeout": 10,
                "greeting_timeout": 10,
            },
            context={"base_dir": self.base},
        )
        return Pop3Source(options, SourceContext(base_dir=self.base, mailbox="contract"))

    def deliver(self, data: bytes) -> None:
        self.srv.add_message(data)

    def remaining(self) -> list[bytes]:
        return self.srv.messages

    def acknowledged(self, ack: Ack) -> list[bytes]:
        return []  # POP3 acknowledges only by deleting


class TestPop3SourceContract(SourceContract):
    @pytest.fixture
    def contract_mailbox(self, tmp_path: Path) -> Iterator[Pop3Mailbox]:
        with Pop3Server() as srv:
            yield Pop3Mailbox(srv, tmp_path)
