"""store.attachments: content-addressed attachment files with a manifest per message.

Layout under ``dir``::

    <sha256[:2]>/<sha256>              the decoded bytes, read-only, stored once
    manifests/<key>.json               what the message had (written last, atomically)
    by-message/<key>/<safe name>       optional (extract_names), hard links to the blobs

A manifest lists, per stored attachment, ``index``, ``filename`` (as sent, or null),
``name`` (sanitised by :func:`safe_filename`, unique within the message),
``content_type``, ``disposition``, ``inline``, ``content_id``, ``part``, ``size``,
``sha256`` and ``path`` (the blob, relative to ``dir``); and under ``skipped`` the
attachments the filters left out, with a ``reason``. At most ``MAX_PARTS`` (the
parser's cap on parts of every kind, 5,000) attachments are stored per message; past
it ``over_limit`` counts those left out. Messages without attachments get no
manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import mimetypes
import os
import re
import threading
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import structlog
from mailpipe.plugins.parse.parser import MAX_PARTS
from pydantic import BaseModel, ConfigDict, Field

from mailpipe.message import Message
from mailpipe.processor import ProcessorContext
from mailpipe.units import ByteSize

from ._fs import (
    atomic_write,
    classify_os_error,
    fsync_dir,
    make_dirs,
    publish,
    tmp_name,
    write_fsync,
)

log = structlog.get_logger()

#: Longest file name most file systems accept, in UTF-8 octets.
MAX_NAME_BYTES: Final = 255
_MAX_EXT_BYTES: Final = 32
#: Windows reserves these names, with any extension, in every folder.
_DEVICE_NAMES: Final = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
    | {f"{p}{n}" for p in ("COM", "LPT") for n in [*"0123456789", "¹", "²", "³"]}
)
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
_INVISIBLE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _utf8_cut(text: str, limit: int) -> str:
    """Return the longest prefix of ``text`` that fits in ``limit`` UTF-8 octets."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def safe_filename(name: str | None, *, fallback: str, suffix: str = "") -> str:
    """Return a file name that is safe to create in any folder on any common OS.

    The name is NFC-normalised; only its last path component is kept (``/`` and
    ``\\``), so ``../`` and absolute paths cannot escape; control, format and other
    invisible characters are dropped; Windows-forbidden characters become ``_``;
    leading dots and spaces and trailing dots and spaces are stripped; Windows device
    names (``CON``, ``NUL``, ``COM1``… with any extension) get a ``_`` prefix; and the
    result, ``suffix`` included before the extension, is at most 255 UTF-8 octets with
    the extension kept. An empty result becomes ``fallback``.
    """
    text = unicodedata.normalize("NFC", name or "")
    text = re.split(r"[/\\]", text)[-1]
    text = "".join(
        " " if ch in "\t\n\r" else ch
        for ch in text
        if ch in "\t\n\r" or unicodedata.category(ch) not in _INVISIBLE_CATEGORIES
    )
    text = _WINDOWS_FORBIDDEN.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip(" .")
    if not text:
        text = unicodedata.normalize("NFC", fallback)
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext.encode("utf-8")) > _MAX_EXT_BYTES:
        stem, ext = text, ""
    if stem.split(".")[0].rstrip(" ").upper() in _DEVICE_NAMES:
        stem = "_" + stem
    ext = f".{ext}" if ext else ""
    room = MAX_NAME_BYTES - len(ext.encode("utf-8")) - len(suffix.encode("utf-8"))
    stem = _utf8_cut(stem, room).rstrip(" .") or "_"
    return f"{stem}{suffix}{ext}"


class _UniqueNames:
    """The names given within one message: each new one sanitised and made unique.

    A clash gets `` (2)``, `` (3)``… (ignoring case). The next number to try is kept
    per sanitised name, so n equal names cost O(n) in all, not O(n²): each number
    is tried at most once per name, and a try fails only on a name already given.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()
        self._next: dict[str, int] = {}

    def add(self, name: str | None, fallback: str) -> str:
        """Return the unique sanitised form of ``name`` (``fallback`` when empty)."""
        candidate = safe_filename(name, fallback=fallback)
        base = candidate.casefold()
        n = self._next.get(base, 2)
        while candidate.casefold() in self._taken:
            candidate = safe_filename(name, fallback=fallback, suffix=f" ({n})")
            n += 1
        self._next[base] = n
        self._taken.add(candidate.casefold())
        return candidate


@dataclass(slots=True)
class Part:
    """One attachment with its bytes, from the record or from the stdlib parser.

    ``payload`` is bytes, or a parse ``SpooledPayload`` (``len()``, ``.sha256``,
    ``.chunks()``) that is copied to its blob in pieces, never loaded whole.
    """

    meta: dict[str, Any]
    payload: Any


def _digest(payload: Any) -> str:
    known = getattr(payload, "sha256", None)
    return known if isinstance(known, str) else hashlib.sha256(payload).hexdigest()


def _chunks(payload: Any) -> Any:
    return payload.chunks() if hasattr(payload, "chunks") else [payload]


def _from_record(message: Message) -> list[Part] | None:
    record = message.record
    payloads = message.meta.get("attachment_payloads")
    if record is None or payloads is None:
        return None
    items = list(getattr(record, "attachments", None) or ())
    if len(items) != len(payloads):
        log.warning(
            "attachments_payloads_misaligned", key=message.key,
            attachments=len(items), payloads=len(payloads),
        )
        return None
    parts = []
    for item, payload in zip(items, payloads, strict=True):
        meta = item.model_dump(mode="json")
        parts.append(Part(meta, payload))
    return parts


def _parsed(message: Message) -> list[Part]:
    """Parse the message with the built-in ``parse`` plugin (no ``parse`` step ran):
    a spooled message from its file, never loaded whole (see ``parse_file``)."""
    from mailpipe.plugins.parse.processor import parse_raw

    record, payloads = parse_raw(message)
    return [
        Part(item.model_dump(mode="json"), payload)
        for item, payload in zip(record.attachments, payloads, strict=True)
    ]


class AttachmentsOptions(BaseModel):
    """Options of ``store.attachments``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    dir: Path = Field(description="Folder of the blobs, manifests and named copies.")
    extract_names: bool = Field(
        strict=True,
        default=False,
        description="Also link each attachment under by-message/<key>/ with its "
        "sanitised original name.",
    )
    types: list[str] | None = Field(
        default=None,
        description="Keep only these MIME types (globs like 'image/*'); all if unset.",
    )
    max_size: ByteSize | None = Field(
        default=None, description="Skip attachments bigger than this."
    )
    include_inline: bool = Field(
        strict=True,
        default=False, description="Also store inline parts (e.g. cid: images)."
    )


class AttachmentsStore:
    """Store each message's attachments once by content, plus a manifest per message.

    Attachments come from ``message.record`` and ``meta["attachment_payloads"]`` (the
    ``parse`` step); without them the message is parsed here with the same parser.

    Idempotent by ``message.key`` and by content: blobs are named by their sha256,
    ``by-message`` names are derived deterministically from the attachment order, and
    the manifest is replaced atomically only when its content changes. ``process``
    returns after the blobs, links and manifest are fsynced, with their folders.
    """

    name: ClassVar[str] = "store.attachments"
    Options: ClassVar[type[BaseModel]] = AttachmentsOptions
    commits: ClassVar[bool] = True
    idempotent: ClassVar[bool] = True  # writes are keyed by message.key

    def __init__(self, options: AttachmentsOptions, context: ProcessorContext) -> None:
        self.options = options
        self.context = context
        self.dir = context.resolve(options.dir)
        self._lock = threading.Lock()

    def _skip_reason(self, meta: dict[str, Any]) -> str | None:
        if meta.get("inline") and not self.options.include_inline:
            return "inline"
        ctype = str(meta.get("content_type") or "application/octet-stream").lower()
        types = self.options.types
        if types is not None and not any(
            fnmatch.fnmatchcase(ctype, t.lower()) for t in types
        ):
            return "type"
        limit = self.options.max_size
        if limit is not None and int(meta.get("size") or 0) > limit:
            return "size"
        return None

    def process(self, message: Message) -> None:
        """Store the message's selected attachments and write its manifest."""
        key = message.key
        if self.context.dry_run:
            log.info("store_skipped_dry_run", store=self.name, key=key)
            return
        parts = _from_record(message)
        if parts is None:
            parts = _parsed(message)
        if not parts:
            return
        with self._lock:
            try:
                stored = self._store(message, parts)
            except OSError as exc:
                raise classify_os_error(exc, f"{self.name} {self.dir}") from exc
        log.debug("message_stored", store=self.name, key=key, attachments=stored,
                 skipped=len(parts) - stored)

    def _store(self, message: Message, parts: list[Part]) -> int:
        key = message.key
        entries: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        names = _UniqueNames()
        over_limit = max(0, len(parts) - MAX_PARTS)
        if over_limit:
            log.warning("attachments_over_limit", store=self.name, key=key,
                        limit=MAX_PARTS, left_out=over_limit)
        for part in parts[:MAX_PARTS]:
            meta = dict(part.meta)
            meta["size"] = len(part.payload)
            reason = self._skip_reason(meta)
            if reason is not None:
                skipped.append({
                    "index": meta.get("index"), "filename": meta.get("filename"),
                    "content_type": meta.get("content_type"), "size": meta["size"],
                    "reason": reason,
                })
                continue
            digest = _digest(part.payload)
            blob = self._write_blob(digest, part.payload)
            ctype = str(meta.get("content_type") or "")
            ext = mimetypes.guess_extension(ctype) or ".bin"
            name = names.add(meta.get("filename"), f"attachment-{meta.get('index')}{ext}")
            entries.append({
                "index": meta.get("index"), "filename": meta.get("filename"),
                "name": name, "content_type": meta.get("content_type"),
                "disposition": meta.get("disposition"),
                "inline": bool(meta.get("inline")),
                "content_id": meta.get("content_id"), "part": meta.get("part"),
                "size": meta["size"], "sha256": digest,
                "path": blob.relative_to(self.dir).as_posix(),
            })
        if self.options.extract_names and entries:
            self._link_names(key, ((self.dir / e["path"], e["name"]) for e in entries))
        manifest = {
            "key": key, "mailbox": message.ref.mailbox, "uid": message.ref.uid,
            "message_sha256": message.sha256,
            "attachments": entries,
            "skipped": skipped,
        }
        if over_limit:
            manifest["over_limit"] = over_limit
        data = json.dumps(manifest, ensure_ascii=False, indent=2).encode() + b"\n"
        target = self.dir / "manifests" / f"{key}.json"
        make_dirs(target.parent)
        try:
            unchanged = target.read_bytes() == data
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            atomic_write(target, data)  # the manifest is the message's commit record
        return len(entries)

    def _write_blob(self, digest: str, payload: Any) -> Path:
        folder = self.dir / digest[:2]
        blob = folder / digest
        try:
            if blob.stat().st_size == len(payload):
                return blob  # content-addressed: already stored
        except FileNotFoundError:
            pass
        make_dirs(folder)
        tmp = folder / tmp_name(digest)
        write_fsync(tmp, _chunks(payload), mode=0o444)
        if not publish(tmp, blob):
            # a damaged blob: replace it
            atomic_write(blob, _chunks(payload), mode=0o444)
        return blob

    def _link_names(self, key: str, items: Iterable[tuple[Path, str]]) -> None:
        folder = self.dir / "by-message" / key
        make_dirs(folder)
        for blob, name in items:
            target = folder / name
            try:
                if os.path.samefile(blob, target):
                    continue
            except FileNotFoundError:
                pass
            tmp = folder / tmp_name(name[:64])
            try:
                os.link(blob, tmp)
            except OSError:
                write_fsync(tmp, [blob.read_bytes()], mode=0o444)  # no hard links here
            os.replace(tmp, target)
        fsync_dir(folder)


PROCESSORS = [AttachmentsStore]
