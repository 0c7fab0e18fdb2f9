"""Write test messages into a server's mail store the way a local MDA would.

Both writers store lines with LF endings (an MDA converts CRLF), which the POP3
servers turn back into CRLF on the wire; compare with :func:`normalise`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["normalise", "write_maildir", "write_mbox"]

_FROM = re.compile(rb"(?m)^(>*From )")


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def normalise(data: bytes) -> bytes:
    """``data`` with CRLF as LF: how a message compares across LF stores and the wire."""
    return _lf(data)


def write_maildir(
    maildir: Path, messages: Sequence[bytes], *, uid: int, gid: int
) -> list[Path]:
    """Create ``maildir`` (tmp/new/cur) if needed and add each message to ``new/``.

    File names sort in the order given (servers number messages by name or mtime);
    files and directories are owned by ``uid:gid``. Returns the new files.
    """
    for sub in ("", "tmp", "new", "cur"):
        d = maildir / sub
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, uid, gid)
        d.chmod(0o700)
    base = int(time.time())
    paths = []
    for i, raw in enumerate(messages):
        data = _lf(raw)
        path = maildir / "new" / f"{base}.M{i:06d}P{os.getpid()}.lab,S={len(data)}"
        path.write_bytes(data)
        os.chown(path, uid, gid)
        path.chmod(0o600)
        mtime = base - len(messages) + i  # strictly increasing mtimes
        os.utime(path, (mtime, mtime))
        paths.append(path)
    return paths


def write_mbox(path: Path, messages: Sequence[bytes], *, uid: int, gid: int) -> None:
    """Replace ``path`` with an mboxrd file of ``messages`` owned by ``uid:gid``.

    Each message gets a ``From `` separator, ``>*From `` lines are quoted once more,
    a missing final newline is added and an empty line separates messages.
    """
    with open(path, "wb") as out:
        for raw in messages:
            data = _lf(raw)
            if not data.endswith(b"\n"):
                data += b"\n"
            out.write(b"From mailpipe-lab@localhost Thu Jan  1 00:00:00 2015\n")
            out.write(_FROM.sub(rb">\1", data))
            out.write(b"\n")
    os.chown(path, uid, gid)
    path.chmod(0o600)
