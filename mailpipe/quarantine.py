"""The quarantine: raw .eml files with JSON sidecars, for messages that must not be lost."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mailpipe.message import Message

_SAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


@dataclass(slots=True, kw_only=True)
class QuarantineItem:
    """The sidecar of one quarantined message."""

    key: str
    mailbox: str
    uid: str
    reason: str
    attempts: int = 0
    error: str = ""
    size: int = 0
    sha256: str = ""
    quarantined_at: str = ""
    eml: str = ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a stale (or planted) temp file, link or not
    # O_EXCL|O_NOFOLLOW: never write through a symlink someone placed here.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, 0o600), "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Quarantine:
    """A directory of quarantined messages: ``<dir>/<mailbox>/<key>.eml`` + ``.json``.

    Contract: :meth:`put` returns only after both files are fsynced and renamed into
    place, so the engine may then delete the server copy.
    """

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _folder(self, mailbox: str) -> Path:
        name = _SAFE.sub("_", mailbox)
        # "" / "." / ".." would put the files in, or above, the quarantine directory.
        return self.dir / (name if name.strip(".") else name.replace(".", "_") or "_")

    def put(
        self, message: Message, *, reason: str, attempts: int = 0, error: str = ""
    ) -> Path:
        """Write the raw message and its sidecar durably; return the .eml path."""
        folder = self._folder(message.ref.mailbox)
        folder.mkdir(parents=True, exist_ok=True)
        eml = folder / f"{message.key}.eml"
        with message.open() as src:
            _atomic_write(eml, iter(lambda: src.read(1 << 20), b""))
        item = QuarantineItem(
            key=message.key,
            mailbox=message.ref.mailbox,
            uid=message.ref.uid,
            reason=reason,
            attempts=attempts,
            error=error,
            size=message.size,
            sha256=message.sha256,
            quarantined_at=datetime.now(UTC).isoformat(timespec="seconds"),
            eml=str(eml),
        )
        _atomic_write(
            folder / f"{message.key}.json",
            [json.dumps(asdict(item), indent=2, ensure_ascii=False).encode()],
        )
        _fsync_dir(folder)
        return eml

    def list(self, mailbox: str | None = None) -> list[QuarantineItem]:
        """Return every quarantined item (optionally of one mailbox), oldest first."""
        if not self.dir.is_dir():
            return []
        folders = [self._folder(mailbox)] if mailbox else sorted(self.dir.iterdir())
        items = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for side in sorted(folder.glob("*.json")):
                try:
                    data = json.loads(side.read_text())
                    items.append(QuarantineItem(**data))
                except (OSError, ValueError, TypeError):
                    continue
        items.sort(key=lambda i: i.quarantined_at)
        return items

    def get(self, key: str) -> QuarantineItem | None:
        """Return the item whose key is ``key`` or starts with it (unique prefix)."""
        matches = [i for i in self.list() if i.key.startswith(key)]
        return matches[0] if len(matches) == 1 else None

    def load(self, item: QuarantineItem) -> Message:
        """Rebuild the message of ``item`` from its .eml file."""
        from mailpipe.message import MessageRef

        data = Path(item.eml).read_bytes()
        ref = MessageRef(mailbox=item.mailbox, number=0, uid=item.uid, size=len(data))
        return Message(ref=ref, data=data)

    def drop(self, item: QuarantineItem) -> None:
        """Delete the item's files."""
        eml = Path(item.eml)
        eml.unlink(missing_ok=True)
        eml.with_suffix(".json").unlink(missing_ok=True)
