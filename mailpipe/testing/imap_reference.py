"""An independent IMAP client for tests (stdlib ``imaplib`` over verified TLS): what a
real server holds, read without changing it, and a mailbox emptied between tests."""

from __future__ import annotations

import imaplib
import re
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["empty_mailbox", "folder_messages", "logged_in"]


@contextmanager
def logged_in(
    host: str, port: int, ca_file: Path, user: str, password: str
) -> Iterator[imaplib.IMAP4_SSL]:
    """An ``imaplib`` client on implicit TLS (certificate verified against
    ``ca_file``), logged in; logged out on exit."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    client = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=30)
    try:
        client.login(user, password)
        yield client
    finally:
        client.logout()


def folder_messages(client: imaplib.IMAP4_SSL, folder: str) -> list[tuple[bytes, str]]:
    """(raw bytes, flags) of every message in ``folder`` (its wire name), read with
    ``BODY.PEEK[]`` in an EXAMINE; ``[]`` when the folder does not exist."""
    if client.select(f'"{folder}"', readonly=True)[0] != "OK":
        return []
    _, data = client.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[])")
    out = []
    for item in data:
        if isinstance(item, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
            out.append((item[1], (flags[1] if flags else b"").decode()))
    return out


def empty_mailbox(client: imaplib.IMAP4_SSL) -> None:
    """Delete every folder but INBOX and expunge every message of INBOX."""
    _, listed = client.list()
    names = []
    for line in listed:
        if isinstance(line, bytes):
            match = re.search(rb'"([^"]*)"$|(\S+)$', line)
            if match:
                names.append((match[1] or match[2]).decode())
    for name in sorted(names, key=len, reverse=True):  # children first
        if name.upper() != "INBOX":
            client.delete(f'"{name}"')
    if client.select("INBOX")[0] == "OK":
        client.uid("STORE", "1:*", "+FLAGS.SILENT", "(\\Deleted)")
        client.expunge()
