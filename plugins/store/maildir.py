"""store.maildir: deliver each message into a Maildir (tmp → fsync → new), once per key.

File names are deterministic: ``<key>.mailpipe,S=<size>`` (``S=`` is the Maildir++ size
hint Dovecot reads). A MUA that moves the file to ``cur/`` appends ``:2,<flags>``; the
key stays the first 32 characters, so a re-run still recognises it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.units import Duration

from ._fs import classify_os_error, make_dirs, publish, write_fsync

log = structlog.get_logger()

_OURS = re.compile(r"^([0-9a-f]{32})\.mailpipe")
_TMP_OURS = re.compile(r"^\.[0-9a-f]{32}\.mailpipe")


def file_name(key: str, size: int) -> str:
    """The name a message with ``key`` and ``size`` octets gets in ``new/``."""
    return f"{key}.mailpipe,S={size}"


class MaildirOptions(BaseModel):
    """Options of ``store.maildir``."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="The Maildir root (holds cur/, new/ and tmp/).")
    folder: str | None = Field(
        default=None,
        description="A Maildir++ subfolder name (stored in <path>/.<folder>); "
        "dots separate levels, e.g. 'Archive.2024'.",
    )
    tmp_max_age: Duration = Field(
        default=36 * 3600.0,
        description="Remove mailpipe's own files left in tmp/ by a crash once they "
        "are this old (the Maildir convention is 36 hours).",
    )

    @field_validator("folder")
    @classmethod
    def _plain_folder(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if (
            not value or "/" in value or "\\" in value or "\0" in value
            or value.startswith(".") or value.endswith(".") or ".." in value
        ):
            raise ValueError("a folder name must be non-empty, without slashes or "
                             "leading, trailing or double dots")
        return value


def _chunks(message: Message) -> Iterator[bytes]:
    with message.open() as f:
        yield from iter(lambda: f.read(1 << 20), b"")


class MaildirStore:
    """Write each message to ``new/`` of a Maildir, durably and once per key.

    Delivery: the bytes go to ``tmp/``, are fsynced, then hard-linked into ``new/``
    (link never overwrites) and ``new/`` is fsynced; ``process`` returns after that.
    Idempotent by ``message.key``: a key present in ``new/`` or ``cur/`` (listed on
    open, then tracked) or already at its ``new/`` name is not written again. A file
    left in ``tmp/`` by a crash is never linked; it is removed once ``tmp_max_age`` old.
    """

    name: ClassVar[str] = "store.maildir"
    Options: ClassVar[type[BaseModel]] = MaildirOptions
    commits: ClassVar[bool] = True

    def __init__(self, options: MaildirOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        root = context.resolve(options.path)
        self.root = root
        self.path = root / f".{options.folder}" if options.folder else root
        self._keys: set[str] | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the Maildir if needed, list stored keys and clean stale tmp files."""
        if self.context.dry_run:
            return
        with self._lock:
            try:
                self._prepare()
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    def close(self) -> None:
        """Forget the key index (the next open lists the Maildir again)."""
        with self._lock:
            self._keys = None

    def _prepare(self) -> set[str]:
        if self._keys is not None:
            return self._keys
        for sub in ("cur", "new", "tmp"):
            make_dirs(self.path / sub)
        if self.options.folder:
            marker = self.path / "maildirfolder"
            if not marker.exists():
                marker.touch()
        keys: set[str] = set()
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                m = _OURS.match(entry.name)
                if m:
                    keys.add(m.group(1))
        self._clean_tmp()
        self._keys = keys
        return keys

    def _clean_tmp(self) -> None:
        cutoff = time.time() - self.options.tmp_max_age
        removed = 0
        for entry in os.scandir(self.path / "tmp"):
            if not _TMP_OURS.match(entry.name):
                continue  # other delivery agents own their tmp files
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("maildir_tmp_cleaned", path=str(self.path), files=removed)

    def process(self, message: Message) -> None:
        """Deliver the message into ``new/`` unless its key is already stored."""
        key = message.key
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=key)
            return
        with self._lock:
            try:
                self._deliver(message, key)
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.path}") from exc

    def _deliver(self, message: Message, key: str) -> None:
        keys = self._prepare()
        final = self.path / "new" / file_name(key, message.size)
        if key in keys or final.exists():
            keys.add(key)
            log.info("store_already_committed", store=self.name, key=key)
            return
        tmp = self.path / "tmp" / f".{final.name}.{os.getpid()}.{time.time_ns()}"
        size = write_fsync(tmp, _chunks(message))
        # Maildir: the file appears in new/ only once complete and fsynced.
        created = publish(tmp, final)
        keys.add(key)
        if created:
            log.info("message_stored", store=self.name, key=key, octets=size)
        else:
            log.info("store_already_committed", store=self.name, key=key)


PROCESSORS = [MaildirStore]
