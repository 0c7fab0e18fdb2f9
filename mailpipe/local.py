"""Run a pipeline over local files (``mailpipe process``): ``.eml`` files, folders of
them, Maildirs and mbox files, without a mailbox server or the journal.

Each message's mailbox is ``local`` and its uid ``sha256:<hex>`` of its bytes, so a
re-run over the same files gives the same keys and idempotent stores write nothing
twice. Each message is reported as one line (a dict); failures are counted, not raised.
"""

from __future__ import annotations

import mailbox as stdlib_mailbox
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailpipe.app import App
from mailpipe.chain import Chain
from mailpipe.message import Message
from mailpipe.secrets import redact


@dataclass(slots=True)
class Tally:
    """How a run over local files went: messages seen, messages that failed."""

    count: int = 0
    failed: int = 0


async def process_files(
    app: App,
    paths: list[Path],
    pipeline: str,
    *,
    dry_run: bool,
    emit: Callable[[dict[str, Any]], None],
) -> Tally:
    """Run ``pipeline`` over every message in ``paths``; ``emit`` one line for each.

    A line has the message's key, from, subject, size, attachment count and tags, and
    either its ``decision`` and ``rule`` or ``decision: "failed"`` with the ``step``
    and the (redacted) ``error``. With ``dry_run`` nothing is written. When the group
    commit at the end fails, a ``flush: failed`` line is emitted and every message
    counts as failed (none of their writes is known to be durable).
    """
    chain = Chain.from_config(app.config, dry_run=dry_run)
    tally = Tally()
    await chain.open()
    try:
        for message in iter_local_messages(paths):
            tally.count += 1
            result = await chain.run(pipeline, message)
            line = _summary_line(message)
            if result.ok and result.decision is not None:
                line["decision"] = str(result.decision.disposition)
                line["rule"] = result.decision.reason
            else:
                tally.failed += 1
                line["decision"] = "failed"
                line["step"] = result.failed_step
                line["error"] = redact(f"{type(result.error).__name__}: {result.error}")
            emit(line)
        if not dry_run:
            try:
                await chain.flush()
            except Exception as exc:  # a group commit (write-behind) failed
                tally.failed = tally.count
                emit({"flush": "failed", "error": redact(f"{type(exc).__name__}: {exc}")})
    finally:
        await chain.close()
    return tally


def _summary_line(message: Message) -> dict[str, Any]:
    record = message.record
    subject = getattr(record, "subject", None) if record is not None else None
    sender = None
    if record is not None and getattr(record, "from_addresses", None):
        first = record.from_addresses[0]
        sender = getattr(first, "address", None)
    return {
        "key": message.key,
        "from": sender or message.header("from"),
        "subject": subject if subject is not None else message.header("subject"),
        "size": message.size,
        "attachments": len(getattr(record, "attachments", []) or []),
        "tags": sorted(message.tags),
    }


def iter_local_messages(paths: list[Path]) -> Iterator[Message]:
    """Yield messages from ``.eml`` files, directories of them, Maildirs and mbox files.

    Each message's mailbox is ``local`` and its uid is ``sha256:<hex>`` of its bytes,
    so re-running over the same files yields the same keys.
    """
    for path in paths:
        yield from _iter_path(path)


def _is_maildir(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("cur", "new", "tmp"))


def _is_mbox(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(5) == b"From "
    except OSError:
        return False


def _iter_path(path: Path) -> Iterator[Message]:
    if path.is_dir():
        if _is_maildir(path):
            for sub in ("new", "cur"):
                for item in sorted((path / sub).iterdir()):
                    if item.is_file():
                        yield Message.from_bytes(item.read_bytes())
            return
        for item in sorted(path.rglob("*")):
            if item.is_file() and (item.suffix.lower() == ".eml" or _is_mbox(item)):
                yield from _iter_path(item)
        return
    if _is_mbox(path):
        box = stdlib_mailbox.mbox(path, create=False)
        try:
            for key in box.iterkeys():
                yield Message.from_bytes(box.get_bytes(key))
        finally:
            box.close()
        return
    yield Message.from_bytes(path.read_bytes())
