"""IMAP push latency: from an APPEND by another client to the IMAP session's
``wait_for_new`` returning True (what the source's ``wait_for_mail`` runs after its
login; the scheduler starts its poll then), against a private Dovecot imapd on
127.0.0.1.

    python bench/imap_push.py            # 20 trials
    python bench/imap_push.py --small    # 5 trials (CI)

Each trial opens a session and starts ``wait_for_new`` (IDLE on INBOX), waits until
the server has answered IDLE, then APPENDs one message with stdlib imaplib and takes
the time from the APPEND's completion to the wake-up. Prints median and maximum;
nothing is asserted. Not covered: the poll and chain that follow the wake-up.
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


async def trial(source: object, d: object, user: object) -> float:
    from mailpipe.plugins.imap.source import ImapSource

    assert isinstance(source, ImapSource)
    woke: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def wait() -> None:
        async with source.session() as session:
            idling = asyncio.ensure_future(session.wait_for_new(60))
            for _ in range(500):  # bounded: until IDLE is outstanding and answered
                await asyncio.sleep(0.01)
                conn = session.client.conn
                if conn.outstanding and conn.state.name == "SELECTED" and _idle(conn):
                    break
            ready.set()
            ok = await idling
            woke.set_result(time.perf_counter() if ok else float("nan"))

    ready = asyncio.Event()
    task = asyncio.ensure_future(wait())
    await ready.wait()
    await asyncio.sleep(0.05)
    appended = await asyncio.to_thread(_append, d, user)
    await task
    return woke.result() - appended


def _idle(conn: object) -> bool:
    return any(c.name == "IDLE" for c in conn.outstanding.values())  # type: ignore[attr-defined]


def _append(d: object, user: object) -> float:
    ctx = ssl.create_default_context(cafile=str(d.ca_file))  # type: ignore[attr-defined]
    c = imaplib.IMAP4_SSL(d.host, d.imaps_port, ssl_context=ctx)  # type: ignore[attr-defined]
    c.login(user.name, user.password)  # type: ignore[attr-defined]
    c.append("INBOX", "", None, b"Subject: push\r\n\r\nhello\r\n")
    done = time.perf_counter()
    c.logout()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="5 trials (CI)")
    a = ap.parse_args()
    from mailpipe.plugins.imap.source import ImapOptions, ImapSource

    from mailpipe.logs import configure
    from mailpipe.testing.dovecot import Dovecot

    configure("json", "warning")
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-push-"))
    base.chmod(0o755)
    with Dovecot(base / "dovecot", imap=True) as d:
        user = d.add_user("bench", "bench-password")
        source = ImapSource(ImapOptions.model_validate({
            "host": d.host, "port": d.imaps_port, "ca_file": d.ca_file,
            "username": user.name, "password": user.password,
        }))
        samples = [asyncio.run(trial(source, d, user)) for _ in range(5 if a.small else 20)]
    ms = sorted(s * 1000 for s in samples)
    print("| trials | median ms | max ms |")
    print("|---:|---:|---:|")
    print(f"| {len(ms)} | {statistics.median(ms):.1f} | {ms[-1]:.1f} |")


if __name__ == "__main__":
    main()
