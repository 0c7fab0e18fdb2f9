"""How the ``imap`` source names messages and listing cursors (IC-25, IC-46, MP-05).

A message is ``"<folder>;UIDVALIDITY=<v>;UID=<u>"`` with the folder in its wire form
(modified UTF-7), so the journal keys by mailbox, folder, epoch and UID; a Gmail
message is ``X-GM-MSGID=<n>``, the same under every label. A cursor's scope is the
folder under one UIDVALIDITY and selection.
"""

import re


def cursor_scope(folder: bytes, uidvalidity: int, selection: str = "") -> str:
    """The listing cursor's scope of a folder under one UIDVALIDITY and selection
    (MP-05): ``INBOX;UIDVALIDITY=3857529045``, ``INBOX;UIDVALIDITY=3857529045;unseen``
    (:meth:`ImapOptions.selection`); a new UIDVALIDITY or selection starts from no
    cursor."""
    scope = f"{folder.decode('ascii', 'replace')};UIDVALIDITY={uidvalidity}"
    return f"{scope};{selection}" if selection else scope


def message_uid(folder: bytes, uidvalidity: int, uid: int) -> str:
    """The uid the journal keys by: ``INBOX;UIDVALIDITY=3857529045;UID=42``."""
    return f"{folder.decode('ascii', 'replace')};UIDVALIDITY={uidvalidity};UID={uid}"


def gmail_uid(msgid: int) -> str:
    """IC-46: the uid of a Gmail message, by its ``X-GM-MSGID`` (the same under every
    label and every UIDVALIDITY): ``X-GM-MSGID=1278455344230334865``."""
    return f"X-GM-MSGID={msgid}"


_MESSAGE_UID = re.compile(r"(.+);UIDVALIDITY=([0-9]{1,10});UID=([0-9]{1,10})")


def parse_message_uid(uid: str) -> tuple[bytes, int, int] | None:
    """The folder (wire form), UIDVALIDITY and UID of a :func:`message_uid`; None for
    any other id (a Gmail ``X-GM-MSGID`` id, another source's)."""
    match = _MESSAGE_UID.fullmatch(uid)
    if match is None or not match[1].isascii():
        return None
    return match[1].encode("ascii"), int(match[2]), int(match[3])


__all__ = ["cursor_scope", "gmail_uid", "message_uid", "parse_message_uid"]
