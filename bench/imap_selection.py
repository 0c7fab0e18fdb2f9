"""IMAP selection benchmark (issue 14 point 4, MP-05/IC-26): one poll of a kept folder
whose N messages are all processed already, with the journal's UID watermark
(``UID FETCH W+1:*``) and without it (``UID FETCH 1:*``, then the journal filters),
beside mbsync (isync) re-running ``Sync Pull`` on a folder it has synced.

    python bench/imap_selection.py             # 10,000 messages, 3 rounds
    python bench/imap_selection.py --small     # CI size (500, 1 round), no thresholds

A private Dovecot imapd on 127.0.0.1 (plaintext port). Setup, not measured: the folder
is filled, mailpipe's journal adopts every message as KEPT (``state mark-seen``'s
ledger call) and one poll stores the watermark; mbsync syncs the folder once. Then each
round runs, in turn, in a process of its own: ``mailpipe-watermark`` (``delete =
"never"``: lists from the watermark), ``mailpipe-full`` (``delete = "after_days:36500"``,
which lists without cursors: the behaviour before the watermark) and ``mbsync``. The
poll column is the engine's own time for the poll (``Summary.seconds``); wall and CPU
include the process start. Prints a table; targets are read from it, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pop3_retrieval import make_mailbox, populate  # noqa: E402

MODES = {"watermark": "never", "full": "after_days:36500"}


def runner(a: argparse.Namespace, delete: str) -> Any:
    """A MailboxRunner for mailbox ``bench`` with the given delete policy."""
    from mailpipe.chain import Chain
    from mailpipe.engine import MailboxRunner
    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.plugin_manager import Hooks, load
    from mailpipe.quarantine import Quarantine
    from mailpipe.validation import validate_config

    work = Path(a.work)
    pm, registry = load(entry_points=False)
    config = validate_config(
        {
            "mailboxes": [{
                "name": "bench", "source": "imap", "host": a.host, "port": a.port,
                "security": "none", "allow_plaintext_password": True,
                "username": a.user, "password": a.password, "delete": delete,
                "read_timeout": 120,
            }],
            "pipelines": {"default": {"processors": [
                {"use": "store.maildir", "path": str(work / "Maildir")}]}},
        },
        path=work / "pipeline.toml",
        registry=registry,
    )
    return MailboxRunner(
        config.mailboxes[0], config=config,
        chain=Chain(config.pipelines, base_dir=work),
        journal=SqliteJournal(work / "journal.sqlite3"),
        quarantine=Quarantine(work / "q"), hooks=Hooks(pm),
    )


def worker(a: argparse.Namespace) -> None:
    """One poll (or, with ``--setup``, the journal adoption and the first poll);
    prints the poll's summary as JSON."""
    import asyncio

    from mailpipe.ledger import adopt_seen
    from mailpipe.logs import configure

    configure("json", "warning")
    run = runner(a, MODES[a.mode])

    async def go() -> dict[str, Any]:
        await run.chain.open()
        try:
            if a.setup:
                async with run.source.session() as session:
                    refs = await session.list()
                    await adopt_seen(run.journal, "bench", session, refs)
            summary = await run.poll()
        finally:
            await run.chain.close()
        return {"seconds": summary.seconds, "listed": summary.listed,
                "retrieved": summary.retrieved, "error": summary.error,
                "cursors": run.journal.cursors("bench")}

    print(json.dumps(asyncio.run(go())))


def timed(argv: list[str]) -> tuple[float, float, str]:
    """Run ``argv`` under GNU time: (wall s, CPU s, stdout)."""
    with tempfile.NamedTemporaryFile("r") as stats:
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%U %S", "-o", stats.name, *argv],
            capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")
        user_s, sys_s = stats.read().split()[-2:]
    return wall, float(user_s) + float(sys_s), done.stdout


def mbsync_config(work: Path, port: int, user: Any) -> list[str]:
    conf = work / "mbsyncrc"
    (work / "mbsync-state").mkdir(parents=True, exist_ok=True)
    out = work / "mbsync-out"
    conf.write_text(
        f"IMAPAccount bench\nHost 127.0.0.1\nPort {port}\nUser {user.name}\n"
        f"Pass {user.password}\nSSLType None\nAuthMechs LOGIN\n\n"
        "IMAPStore remote\nAccount bench\n\n"
        f"MaildirStore local\nPath {work}/\nInbox {out}\n\n"
        "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nSync Pull\n"
        f"Create Near\nSyncState {work}/mbsync-state/\n"
    )
    conf.chmod(0o600)
    return ["mbsync", "-q", "-c", str(conf), "bench"]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", action="store_true", help="CI size")
    ap.add_argument("--count", type=int, help="messages in the folder")
    ap.add_argument("--rounds", type=int, help="rounds (median shown)")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--setup", action="store_true", help=argparse.SUPPRESS)
    for opt in ("--host", "--user", "--password", "--work", "--mode"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    from mailpipe.testing.dovecot import Dovecot

    count = a.count or (500 if a.small else 10_000)
    rounds = a.rounds or (1 if a.small else 3)
    tools = ["mailpipe-watermark", "mailpipe-full"]
    if shutil.which("mbsync"):
        tools.append("mbsync")
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-imapsel-"))
    base.chmod(0o755)
    work = base / "work"
    work.mkdir()
    got: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    with Dovecot(base / "dovecot", imap=True) as d:
        user = d.add_user("bench", "bench-password")
        populate(d, user, make_mailbox("small", count))
        os.sync()

        def mailpipe(mode: str, *extra: str) -> tuple[float, float, str]:
            return timed([
                sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode,
                "--host", "127.0.0.1", "--port", str(d.imap_port), "--user", user.name,
                "--password", user.password, "--work", str(work), *extra,
            ])

        _, _, out = mailpipe("watermark", "--setup")
        setup = json.loads(out)
        assert setup["retrieved"] == 0 and setup["cursors"], setup
        print(f"  setup: watermark {setup['cursors']}", file=sys.stderr)
        mbsync = mbsync_config(work, d.imap_port, user) if "mbsync" in tools else []
        if mbsync:
            timed(mbsync)  # the first sync (not measured), checked complete
            synced = sum(1 for sub in ("new", "cur")
                         for _ in (work / "mbsync-out" / sub).iterdir())
            if synced != count:
                raise RuntimeError(f"mbsync's first sync holds {synced} of {count}")
        for _ in range(rounds):
            for tool in tools:
                if tool == "mbsync":
                    wall, cpu, _ = timed(mbsync)
                    got[tool].append({"wall": wall, "cpu": cpu, "poll": None,
                                      "listed": None, "retrieved": 0})
                else:
                    wall, cpu, out = mailpipe(tool.split("-", 1)[1])
                    s = json.loads(out)
                    assert s["error"] is None, s
                    got[tool].append({"wall": wall, "cpu": cpu, "poll": s["seconds"],
                                      "listed": s["listed"], "retrieved": s["retrieved"]})
                print(f"  {tool:<19} {got[tool][-1]}", file=sys.stderr)
    shutil.rmtree(base, ignore_errors=True)

    def median(tool: str, key: str) -> float:
        values = sorted(r[key] for r in got[tool])
        return float(values[len(values) // 2])

    ref = median("mailpipe-full", "poll")
    print(f"{count} messages kept on the server, all processed; {rounds} round(s), medians")
    print("| tool | listed | retrieved | poll s | wall s | CPU s | poll vs full listing |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for tool in tools:
        rows = got[tool]
        poll = "-" if rows[0]["poll"] is None else f"{median(tool, 'poll'):.3f}"
        ratio = "-" if rows[0]["poll"] is None else f"{median(tool, 'poll') / ref:.3f}x"
        listed = "-" if rows[0]["listed"] is None else str(rows[-1]["listed"])
        print(f"| {tool} | {listed} | {max(r['retrieved'] for r in rows)} | {poll} | "
              f"{median(tool, 'wall'):.2f} | {median(tool, 'cpu'):.2f} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
