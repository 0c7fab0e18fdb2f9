"""Cyrus IMAP 3.6.1 imapd (Debian ``cyrus-common`` + ``cyrus-imapd``, unpacked): the
second real IMAP implementation the ``imap`` source is proven against (issue 14).

The same private Cyrus as :class:`~.cyrus.Cyrus` (sasldb users, LMTP delivery, a
sandbox), with ``imapd`` in place of ``pop3d``: plaintext + STARTTLS on
:attr:`CyrusImap.imap_port`, implicit TLS on :attr:`CyrusImap.imaps_port`. The user's
INBOX is created at the first login (``autocreate_quota: 0``). The mailbox is read
and emptied over IMAP (:mod:`mailpipe.testing.imap_reference`), not POP3.
"""

from __future__ import annotations

from pathlib import Path

from mailpipe.testing.imap_reference import empty_mailbox, folder_messages, logged_in

from .base import LabServerError
from .cyrus import Cyrus
from .packages import CYRUS_LIBRARIES
from .refclient import ServerMessage

__all__ = ["CyrusImap"]


class CyrusImap(Cyrus):
    """Cyrus imapd on 127.0.0.1 (STARTTLS on ``imap_port``, TLS on ``imaps_port``)."""

    name = "cyrus-imap"
    title = "Cyrus IMAP 3.6.1 imapd"
    packages = ("cyrus-common", "cyrus-imapd")
    apt_packages = (*CYRUS_LIBRARIES, "util-linux")
    session_process = "imapd"
    #: mailpipe IMAP ``auth`` values the sasldb users accept.
    imap_auth_methods = ("login", "plain", "scram-sha-1", "scram-sha-256")

    @property
    def imap_port(self) -> int:
        """Plaintext IMAP with STARTTLS (the lab's first port)."""
        return self.pop3_port

    @property
    def imaps_port(self) -> int:
        """IMAP on implicit TLS (the lab's second port)."""
        return self.pop3s_port

    def _services(self, bindir: Path) -> str:
        return (
            f'  imap cmd="{bindir}/imapd -C {self.config}" '
            f'listen="{self.host}:{self.imap_port}" prefork=0 maxchild=20\n'
            f'  imaps cmd="{bindir}/imapd -s -C {self.config}" '
            f'listen="{self.host}:{self.imaps_port}" prefork=0 maxchild=20'
        )

    def deliver(self, data: bytes, folder: str = "INBOX") -> None:
        """Append one message to ``folder`` over IMAP, byte for byte (LMTP delivery,
        :meth:`load`, adds trace headers).

        Raises:
            LabServerError: the server refused the APPEND.
        """
        with logged_in(
            self.host, self.imaps_port, self.ca_file, self.user.name, self.user.password
        ) as client:
            status, reply = client.append(f'"{folder}"', "", None, data)
        if status != "OK":
            raise LabServerError(f"{self.title}: APPEND refused: {reply!r}")

    def imap_messages(self, folder: str = "INBOX") -> list[tuple[bytes, str]]:
        """(raw bytes, flags) of every message in ``folder``, read with PEEK."""
        with logged_in(
            self.host, self.imaps_port, self.ca_file, self.user.name, self.user.password
        ) as client:
            return folder_messages(client, folder)

    def clear(self) -> None:
        """Delete every folder but INBOX and every message of INBOX (over IMAP)."""
        with logged_in(
            self.host, self.imaps_port, self.ca_file, self.user.name, self.user.password
        ) as client:
            empty_mailbox(client)

    def messages(self) -> list[ServerMessage]:
        """INBOX as the server serves it (numbered from 1, by UID order)."""
        return [
            ServerMessage(number=i, uid=str(i), size=len(raw), raw=raw)
            for i, (raw, _) in enumerate(self.imap_messages(), 1)
        ]
