"""IMAP retrieval benchmark: mailpipe's IMAP source (pipelined and lockstep) beside
stdlib imaplib and Debian's mbsync (isync), each retrieving N messages from a private
Dovecot imapd into a Maildir.

    python bench/imap_retrieval.py            # full: 2,000 small, 1,000 mixed, +20 ms RTT
    python bench/imap_retrieval.py --small    # CI size, same scenarios, no thresholds

mailpipe fetches with ``UID FETCH BODY.PEEK[]``, stores through ``store.maildir``
(fsynced) and then acknowledges by ``UID STORE \\Deleted`` + ``UID EXPUNGE``; imaplib
does the same one command at a time; mbsync only pulls (``Sync Pull``, nothing
removed on the server), so its figure does less work. Helpers (mailbox content,
verification, the delay proxy) come from ``pop3_retrieval.py``. Prints a table;
targets are read from it, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from pop3_retrieval import (  # noqa: E402
    make_mailbox,
    measure,
    populate,
    start_proxy,
    syncfs,
    verify,
)


def verify_bodies(out: Path, msgs: list[bytes]) -> str:
    """For mbsync, which adds a header field of its own (21 octets, measured): every
    message exactly once with its body (after the blank line) intact, LF-normalised."""
    wanted = {
        i: m.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1] for i, m in enumerate(msgs)
    }
    seen: set[int] = set()
    for path in [p for d in ("new", "cur") for p in (out / d).iterdir()]:
        data = path.read_bytes().replace(b"\r\n", b"\n")
        at = data.find(b"X-Bench-Id: ")
        i = int(data[at + 12 : data.index(b"\n", at)])
        if i in seen or data.split(b"\n\n", 1)[1] != wanted[i]:
            return f"FAIL message {i}"
        seen.add(i)
    return "OK (bodies)" if len(seen) == len(msgs) else f"FAIL {len(seen)}/{len(msgs)}"


def worker_mailpipe(a: argparse.Namespace) -> None:
    """mailpipe's IMAP source delivering through ``store.maildir``."""
    import asyncio

    from mailpipe.plugins.imap.source import ImapOptions, ImapSource
    from mailpipe.plugins.store.maildir import MaildirOptions, MaildirStore

    from mailpipe.logs import configure
    from mailpipe.processor import ProcessorContext

    configure("json", "warning")
    out = Path(a.out)
    opts = ImapOptions.model_validate({
        "host": a.host, "port": a.port, "security": "none", "username": a.user,
        "password": a.password, "allow_plaintext_password": True,
        "fetch_window": 1 if a.pipelining == "off" else 64, "read_timeout": 120,
    })
    store = MaildirStore(MaildirOptions(path=out), ProcessorContext(base_dir=out))
    store.open()

    async def run() -> None:
        async with ImapSource(opts, mailbox="bench").session() as s:
            refs = await s.list()
            async for m in s.retrieve(refs, spool_dir=out / "tmp", spool_threshold=1 << 20):
                store.process(m)
                if m.spool_path is not None:
                    m.spool_path.unlink()
            store.flush()  # every file durable before the acknowledgement
            await s.mark_deleted(refs)
            await s.commit()

    asyncio.run(run())
    store.close()


def worker_imaplib(a: argparse.Namespace) -> None:
    import imaplib

    out = Path(a.out)
    c = imaplib.IMAP4(a.host, a.port, timeout=120)
    c.login(a.user, a.password)
    c.select("INBOX")
    _, data = c.uid("SEARCH", "ALL")
    uids = data[0].split()
    stamp = int(time.time())
    for uid in uids:
        _, parts = c.uid("FETCH", uid, "(BODY.PEEK[])")
        body = next(p[1] for p in parts if isinstance(p, tuple))
        name = f"{stamp}.{uid.decode()}.imaplib"
        tmp = out / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(body)
        os.rename(tmp, out / "new" / name)
    syncfs(out)
    if uids:
        c.uid("STORE", b",".join(uids), "+FLAGS.SILENT", "(\\Deleted)")
        c.uid("EXPUNGE", b",".join(uids))
    c.logout()


def run_tool(tool: str, host: str, port: int, user, work: Path) -> tuple[float, float, float]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "state", ignore_errors=True)
    for d in ("tmp", "new", "cur"):
        (out / d).mkdir(parents=True)
    if tool == "mbsync":
        (work / "state").mkdir()
        conf = work / "mbsyncrc"
        conf.write_text(
            f"IMAPAccount bench\nHost {host}\nPort {port}\nUser {user.name}\n"
            f"Pass {user.password}\nSSLType None\nAuthMechs LOGIN\n\n"
            "IMAPStore remote\nAccount bench\n\n"
            f"MaildirStore local\nPath {work}/\nInbox {out}\n\n"
            "Channel bench\nFar :remote:\nNear :local:\nPatterns INBOX\nSync Pull\n"
            f"Create Near\nSyncState {work}/state/\n"
        )
        conf.chmod(0o600)
        argv = ["mbsync", "-q", "-c", str(conf), "bench"]
    else:
        kind, _, mode = tool.partition("-")
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                "--host", host, "--port", str(port), "--user", user.name,
                "--password", user.password, "--out", str(out),
                "--pipelining", "off" if mode == "lockstep" else "auto"]
    return measure(tool, argv, work)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--small", action="store_true", help="CI size")
    ap.add_argument("--rounds", type=int, default=1, help="runs per tool (median shown)")
    ap.add_argument("--tools", default="mailpipe-pipelined,mailpipe-lockstep,imaplib,mbsync")
    ap.add_argument("--scenarios", default="small,mixed,rtt20")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for opt in ("--host", "--user", "--password", "--out", "--pipelining"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "mailpipe":
        return worker_mailpipe(a)
    if a.worker == "imaplib":
        return worker_imaplib(a)

    from mailpipe.testing.dovecot import Dovecot

    scenarios = {
        "small": ("small", 200 if a.small else 2000, None),
        "mixed": ("mixed", 50 if a.small else 1000, None),
        "rtt20": ("small", 30 if a.small else 300, 10.0),
    }
    tools = [t for t in a.tools.split(",") if t != "mbsync" or shutil.which("mbsync")]
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-imap-"))
    base.chmod(0o755)
    rows = []
    with Dovecot(base / "dovecot", imap=True) as d:
        user = d.add_user("bench", "bench-password")
        for name in a.scenarios.split(","):
            profile, count, one_way = scenarios[name]
            msgs = make_mailbox(profile, count)
            total = sum(map(len, msgs))
            proxy = None
            port = d.imap_port
            if one_way:
                proxy, port = start_proxy(d.imap_port, one_way)
            try:
                got: dict[str, dict[str, list]] = {
                    t: {"walls": [], "rss": [], "cpus": [], "verdicts": []} for t in tools
                }
                for _ in range(a.rounds):
                    for tool in tools:
                        populate(d, user, msgs)
                        os.sync()
                        wall, peak, cpu = run_tool(tool, "127.0.0.1", port, user, base / "work")
                        check = verify_bodies if tool == "mbsync" else verify
                        verdict = check(base / "work" / "out", msgs)
                        left = d.mailbox_count(user)
                        if tool != "mbsync" and left:
                            verdict += f" ({left} left on the server)"
                        g = got[tool]
                        g["walls"].append(wall)
                        g["rss"].append(peak)
                        g["cpus"].append(cpu)
                        g["verdicts"].append(verdict)
                        print(f"  {name:<6} {tool:<19} {wall:7.2f}s", file=sys.stderr)
                for tool in tools:
                    g = got[tool]
                    walls = g["walls"]
                    wall = sorted(walls)[len(walls) // 2]
                    bad = [v for v in g["verdicts"] if not v.startswith("OK")]
                    rows.append({
                        "scenario": name, "tool": tool, "messages": len(msgs),
                        "bytes": total, "wall_s": wall, "msg_per_s": len(msgs) / wall,
                        "peak_rss_mb": max(g["rss"]),
                        "cpu_s": sorted(g["cpus"])[len(walls) // 2],
                        "verified": bad[0] if bad else g["verdicts"][0],
                        "walls": walls,
                    })
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait(10)
    shutil.rmtree(base, ignore_errors=True)
    print("| scenario | tool | messages | MB | wall s | msg/s | peak RSS MB | CPU s | msg/s vs mbsync | verified |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    ref = {r["scenario"]: r["msg_per_s"] for r in rows if r["tool"] == "mbsync"}
    for r in rows:
        ratio = f"{r['msg_per_s'] / ref[r['scenario']]:.2f}x" if r["scenario"] in ref else "-"
        print(f"| {r['scenario']} | {r['tool']} | {r['messages']} | {r['bytes'] / 1e6:.1f} | "
              f"{r['wall_s']:.2f} | {r['msg_per_s']:.0f} | {r['peak_rss_mb']:.1f} | "
              f"{r['cpu_s']:.2f} | {ratio} | {r['verified']} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
