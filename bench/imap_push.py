"""IMAP push latency against a private Dovecot imapd on 127.0.0.1.

    python bench/imap_push.py            # 20 trials per row
    python bench/imap_push.py --small    # 3 trials per row (CI)
    python bench/imap_push.py --dovecot-config 'mailbox_idle_check_interval = 1 secs'

Rows (interleaved trial by trial, so the machine's load is shared alike):

- ``chain INBOX`` / ``chain Support``: from an APPEND by another client (stdlib
  imaplib, completion of its tagged OK) into that folder to the first processor of the
  chain running on the message. The scheduler runs in this process over one mailbox
  with ``folders = ["INBOX", "Support"]`` and ``poll_interval = 3600`` (so only push can
  wake it); the chain's only step is an async processor that takes the time on the
  event loop. Between trials the bench waits until every push connection is in IDLE.
- ``wait_for_new INBOX``: the session-level span alone, as before: one session IDLEs
  on INBOX (``ImapSession.wait_for_new``) and the time is taken when it returns True.

Prints median and maximum per row; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

FOLDERS = ("INBOX", "Support")


async def trial(source: Any, d: Any, user: Any) -> float:
    """APPEND → ``wait_for_new`` returning True on a session IDLE on INBOX."""
    woke: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def wait() -> None:
        async with source.session() as session:
            idling = asyncio.ensure_future(session.wait_for_new(60))
            for _ in range(500):  # bounded: until IDLE is outstanding and answered
                await asyncio.sleep(0.01)
                if _idling(session):
                    break
            ready.set()
            ok = await idling
            woke.set_result(time.perf_counter() if ok else float("nan"))

    ready = asyncio.Event()
    task = asyncio.ensure_future(wait())
    await ready.wait()
    await asyncio.sleep(0.05)
    appended = await asyncio.to_thread(_append, d, user, "INBOX", b"wait")
    await task
    return woke.result() - appended


def _idling(session: Any) -> bool:
    conn = session.client.conn
    return bool(conn.outstanding) and conn.state.name == "SELECTED" and any(
        c.name == "IDLE" for c in conn.outstanding.values()
    ) and not conn.buffered


def _append(d: Any, user: Any, folder: str, tag: bytes) -> float:
    ctx = ssl.create_default_context(cafile=str(d.ca_file))
    c = imaplib.IMAP4_SSL(d.host, d.imaps_port, ssl_context=ctx)
    c.login(user.name, user.password)
    if folder != "INBOX":
        c.create(folder)  # NO when it exists: ignored
    c.append(folder, "", None, b"Subject: push " + tag + b"\r\n\r\nhello\r\n")
    done = time.perf_counter()
    c.logout()
    return done


class _StampOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stamp:
    """The chain's first (only) step: notes when it ran, per Subject, on the loop."""

    name: ClassVar[str] = "stamp"
    Options: ClassVar[type[BaseModel]] = _StampOptions
    commits: ClassVar[bool] = False
    seen: ClassVar[dict[bytes, float]] = {}
    arrived: ClassVar[asyncio.Event | None] = None

    def __init__(self, options: Any, context: Any) -> None:
        pass

    async def process(self, message: Any) -> None:
        now = time.perf_counter()
        head = bytes(message.data or b"").split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"subject: push "):
                Stamp.seen[line[len(b"subject: push "):]] = now
        if Stamp.arrived is not None:
            Stamp.arrived.set()


async def chain_trials(d: Any, user: Any, n: int, base: Path) -> dict[str, list[float]]:
    """``n`` APPEND → chain-start trials per folder, alternating folders."""
    from mailpipe.plugins.imap.source import ImapSource

    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.plugin_manager import Hooks, get_plugin_manager
    from mailpipe.registry import Registry
    from mailpipe.scheduler import Scheduler
    from mailpipe.validation import validate_config

    sources: list[ImapSource] = []

    class BenchImap(ImapSource):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            sources.append(self)

    registry = Registry()
    registry.add("source", BenchImap, "bench")
    registry.add("processor", Stamp, "bench")
    config = validate_config({
        "mailboxes": [{
            "name": "push", "source": "imap", "host": d.host, "port": d.imaps_port,
            "ca_file": str(d.ca_file), "username": user.name, "password": user.password,
            "folders": list(FOLDERS), "poll_interval": 3600, "jitter": 0,
            "acknowledge": "delete",
        }],
        "pipelines": {"default": {"processors": [{"use": "stamp"}]}},
        "quarantine": {"dir": str(base / "quarantine")},
        "scheduler": {"spool_dir": str(base / "spool")},
    }, path=base / "pipeline.toml", registry=registry)
    journal = SqliteJournal(base / "journal.sqlite3")
    Stamp.arrived = asyncio.Event()
    scheduler = Scheduler(
        config, journal=journal, hooks=Hooks(get_plugin_manager(entry_points=False))
    )
    running = asyncio.ensure_future(scheduler.run())
    out: dict[str, list[float]] = {f"chain {f}": [] for f in FOLDERS}
    try:
        await _until(lambda: len(scheduler.summaries) >= 1 and _all_idle(sources))
        for i in range(n * len(FOLDERS)):
            folder = FOLDERS[i % len(FOLDERS)]
            tag = b"%d" % i
            await _until(lambda: _all_idle(sources))
            await asyncio.sleep(0.05)
            appended = await asyncio.to_thread(_append, d, user, folder, tag)
            await _until(lambda tag=tag: tag in Stamp.seen)
            out[f"chain {folder}"].append(Stamp.seen[tag] - appended)
    finally:
        scheduler.request_stop()
        await asyncio.wait_for(running, 120)
        journal.close()
    return out


def _all_idle(sources: list[Any]) -> bool:
    """Every push connection of the source is in IDLE (the wait is armed)."""
    if not sources:
        return False
    links = sources[0].push._idle_links
    return all(link.session is not None and _idling(link.session) for link in links)


async def _until(predicate: Any) -> None:
    for _ in range(12000):  # bounded: 120 s of 10 ms turns
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the bench's condition never held (see the log)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="3 trials per row (CI)")
    ap.add_argument("--dovecot-config", default="",
                    help="extra lines for the private Dovecot's configuration")
    a = ap.parse_args()
    from mailpipe.plugins.imap.source import ImapOptions, ImapSource

    from mailpipe.logs import configure
    from mailpipe.testing.dovecot import Dovecot

    configure("json", "warning")
    n = 3 if a.small else 20
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-push-"))
    base.chmod(0o755)
    with Dovecot(base / "dovecot", imap=True, extra_config=a.dovecot_config) as d:
        user = d.add_user("bench", "bench-password")
        _append(d, user, "Support", b"seed")  # both folders exist before the run
        rows = asyncio.run(chain_trials(d, user, n, base))
        wait_user = d.add_user("bench2", "bench-password")
        source = ImapSource(ImapOptions.model_validate({
            "host": d.host, "port": d.imaps_port, "ca_file": d.ca_file,
            "username": wait_user.name, "password": wait_user.password,
        }))
        rows["wait_for_new INBOX"] = [
            asyncio.run(trial(source, d, wait_user)) for _ in range(n)
        ]
    print("| span | trials | median ms | max ms |")
    print("|---|---:|---:|---:|")
    for name, samples in rows.items():
        ms = sorted(s * 1000 for s in samples)
        print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {ms[-1]:.1f} |")


if __name__ == "__main__":
    main()
