"""Text every journal stores as given: the one cleaning of reasons and error texts.

A reason or an error text can carry what a message or a server put in it (a header
with a NUL, a surrogate left by a broken encoding). SQLite stores such text;
PostgreSQL refuses a NUL in ``text`` (psycopg: "PostgreSQL text fields cannot
contain NUL (0x00) bytes") and psycopg cannot encode a lone surrogate, so the
journal write of the message's outcome failed, and with it the group commit of the
messages alongside (issue 18 review). The ledger therefore passes every reason and error
text it writes through :func:`storable`, the same for every journal, so a journal
never has to clean what it is given.
"""

from __future__ import annotations

import re

#: C0 controls but tab and line feed, DEL, and the surrogates (never valid alone).
_UNSTORABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def storable(text: object) -> str:
    """``text`` with each C0 control character except tab and line feed, DEL and
    each lone surrogate replaced by its visible escape (``"\\x00"``, ``"\\udcff"``);
    any other text is returned as it is (the same object). A processor's reason that
    is not a string (None, read from an absent header) is ``""``, or its ``str()``:
    a journal's ``reason`` is text, never NULL (review of h-lows)."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if _UNSTORABLE.search(text) is None:
        return text
    return _UNSTORABLE.sub(_escape, text)
