"""Messages per second of the durable stores: store.sqlite (per message and grouped
commits) and store.maildir, each on N small messages (default 2,000).

Run: ``python bench/store_throughput.py [--count 2000] [--group 100] [--dir DIR]``.
Every commit is real (fsync / SQLite synchronous=FULL), so the figures depend on the
disk: run on the file system you will use. ``--small`` runs 200 messages (for CI).
Prints one table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import email.policy
import shutil
import tempfile
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import structlog
from mailpipe.plugins.parse import parse_into
from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore
from mailpipe.plugins.store.maildir import MaildirOptions, MaildirStore
from mailpipe.plugins.store.sqlite import SqliteOptions, SqliteStore

from mailpipe import Message, ProcessorContext


def small_messages(count: int) -> list[Message]:
    out = []
    for i in range(count):
        msg = EmailMessage()
        msg["From"] = f"Sender {i} <sender{i}@example.com>"
        msg["To"] = "support@example.org"
        msg["Subject"] = f"Ticket {i}: printer on floor {i % 7} is jammed"
        msg["Message-ID"] = f"<bench-{i}@example.com>"
        msg["Date"] = "Fri, 28 Nov 2025 10:00:00 +0000"
        msg.set_content(f"Hello,\n\nthe printer is jammed again (case {i}).\n\nThanks\n")
        raw = msg.as_bytes(policy=email.policy.SMTP)
        m = Message.from_bytes(raw, mailbox="bench", uid=str(i))
        parse_into(m)
        out.append(m)
    return out


def run(
    label: str, make: Callable[[Path], object], messages: list[Message], base: Path,
    group: int,
) -> tuple[str, int, float]:
    folder = base / label.replace(" ", "-")
    folder.mkdir()
    store = make(folder)
    store.open()  # type: ignore[attr-defined]
    flush = getattr(store, "flush", None)
    started = time.perf_counter()
    for i, m in enumerate(messages, 1):
        store.process(m)  # type: ignore[attr-defined]
        if flush is not None and i % group == 0:
            flush()
    if flush is not None:
        flush()
    elapsed = time.perf_counter() - started
    store.close()  # type: ignore[attr-defined]
    return label, len(messages), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--group", type=int, default=100,
                        help="messages per group commit (flush)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write (default: a temporary folder)")
    parser.add_argument("--small", action="store_true", help="200 messages")
    args = parser.parse_args()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only
    )
    count = 200 if args.small else args.count
    messages = small_messages(count)
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-", dir=args.dir))
    ctx = ProcessorContext(base_dir=base)
    cases: list[tuple[str, Callable[[Path], object]]] = [
        ("store.sqlite per message",
         lambda d: SqliteStore(SqliteOptions(path=d / "m.sqlite3"), ctx)),
        (f"store.sqlite group of {args.group}",
         lambda d: SqliteStore(SqliteOptions(path=d / "m.sqlite3", group_commit=True), ctx)),
        ("store.maildir",
         lambda d: MaildirStore(MaildirOptions(path=d / "Maildir"), ctx)),
        ("store.jsonl",
         lambda d: JsonlStore(JsonlOptions(path=d / "m.jsonl"), ctx)),
    ]
    try:
        results = [run(label, make, messages, base, args.group) for label, make in cases]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    size = sum(m.size for m in messages) / len(messages)
    print(f"{count} messages, {size:.0f} octets each on average, durable commits")
    print(f"{'store':<30} {'messages':>9} {'seconds':>9} {'msg/s':>9}")
    for label, n, elapsed in results:
        print(f"{label:<30} {n:>9} {elapsed:>9.2f} {n / elapsed:>9.0f}")


if __name__ == "__main__":
    main()
