"""IMAP retrieval benchmark: mailpipe's IMAP source (pipelined and lockstep) beside
stdlib imaplib, an imapclient baseline, Debian's mbsync (isync), fetchmail and getmail6,
each retrieving N messages from a private Dovecot imapd into a Maildir (issue 14).

    python bench/imap_retrieval.py            # full: 2,000 small, 1,000 mixed, at 0 and +20 ms
    python bench/imap_retrieval.py --small    # CI size, same scenarios, no thresholds

mailpipe fetches with ``UID FETCH BODY.PEEK[]``, stores through ``store.maildir``
(fsynced) and then acknowledges by ``UID STORE \\Deleted`` + ``UID EXPUNGE``; imaplib
does the same one command at a time; the imapclient baseline fetches ``BODY.PEEK[]``
over UID sets of 100, fsyncs each file, then deletes and expunges. fetchmail (``nokeep``,
``expunge 0``: one EXPUNGE at the end) hands each message to ``safecat`` (Debian
``safecat``: the Maildir algorithm, fsync before the link into new/), one process per
message; getmail6 (``SimpleIMAPRetriever``, ``delete = true``, ``Maildir`` destination)
runs as an unprivileged user when started as root (it refuses to deliver as root);
use getmail6 from PyPI (6.20, ``pip install getmail6 imapclient``): Debian 12's 6.18
can miss its delivery child's SIGCHLD and stall 60 s a message (a known race, fixed
upstream by waiting with multiprocessing's join).
mbsync only pulls (``Sync Pull``, nothing removed on the server), so its figure does
less work. ``mailpipe-engine`` is the product's own path, ``mailpipe run --once`` (the
engine, the SQLite journal, ``store.maildir``, ``commit_window`` at its default 500);
``base-engine`` runs the same with the interpreter ``MAILPIPE_BENCH_BASE_PYTHON``
names (another checkout's venv), for a before/after comparison in one run. Helpers (mailbox content, verification, the delay proxy) come from
``pop3_retrieval.py``. A peer that is not installed is left out of the table. Prints a
table; targets are read from it, never asserted.
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
    """For the peers that rewrite the header: mbsync adds a field of its own (21
    octets, measured); getmail6 adds ``Return-Path:`` and re-folds long fields (it
    re-serialises the header with Python's email package). Every message exactly once
    with its body (after the blank line) intact, LF-normalised."""
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


def verify_long_lines(out: Path, msgs: list[bytes]) -> str:
    """For fetchmail, which alters lines longer than its 8 KiB buffer (measured: the
    mixed profile's 1,000-20,000-octet lines come out broken at 8,192 octets, with
    stray octets at the break): byte-exact (LF-normalised) like :func:`verify`, and
    when that fails, the altered messages counted and checked to be those with such
    a line, every other message exact and none missing or twice."""
    verdict = verify(out, msgs)
    if verdict == "OK":
        return verdict
    wanted = {i: m.replace(b"\r\n", b"\n") for i, m in enumerate(msgs)}
    seen: set[int] = set()
    altered = 0
    for path in [p for d in ("new", "cur") for p in (out / d).iterdir()]:
        data = path.read_bytes().replace(b"\r\n", b"\n")
        at = data.find(b"X-Bench-Id: ")
        i = int(data[at + 12 : data.index(b"\n", at)])
        if i in seen:
            return f"FAIL message {i} twice"
        seen.add(i)
        want = wanted[i][wanted[i].find(b"X-Bench-Id: ") :]
        if data.endswith(want):
            continue
        if max(map(len, want.split(b"\n"))) <= 8192:
            return f"FAIL message {i}"
        altered += 1
    if len(seen) != len(msgs):
        return f"FAIL {len(seen)}/{len(msgs)}"
    return f"FAIL: {altered} with a line > 8 KiB altered"


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


def worker_imapclient(a: argparse.Namespace) -> None:
    """The imapclient baseline: ``BODY.PEEK[]`` over UID sets of 100 (one command per
    set), each file fsynced before its rename into new/, then delete + expunge."""
    from imapclient import IMAPClient

    out = Path(a.out)
    c = IMAPClient(a.host, port=a.port, ssl=False, timeout=120)
    c.login(a.user, a.password)
    c.select_folder("INBOX")
    uids = c.search("ALL")
    stamp = int(time.time())
    for at in range(0, len(uids), 100):
        for uid, data in c.fetch(uids[at : at + 100], ["BODY.PEEK[]"]).items():
            name = f"{stamp}.{uid}.imapclient"
            tmp = out / "tmp" / name
            with open(tmp, "wb") as f:
                f.write(data[b"BODY[]"])
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, out / "new" / name)
    fd = os.open(out / "new", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    if uids:
        c.delete_messages(uids)
        c.uid_expunge(uids)
    c.logout()


#: Debian packages (or, for imapclient, the Python module) each peer needs.
PEERS = {"mbsync": "mbsync", "fetchmail": "fetchmail", "getmail6": "getmail"}


def available(tool: str) -> bool:
    """Whether ``tool`` can run here (mailpipe and imaplib always can)."""
    if tool in PEERS:
        return shutil.which(PEERS[tool]) is not None and (
            tool != "fetchmail" or shutil.which("safecat") is not None
        )
    if tool == "base-engine":
        base = os.environ.get("MAILPIPE_BENCH_BASE_PYTHON", "")
        return bool(base) and os.access(base, os.X_OK)
    if tool == "imapclient":
        import importlib.util

        return importlib.util.find_spec("imapclient") is not None
    return True


def fetchmail_argv(host: str, port: int, user, work: Path, out: Path) -> list[str]:
    conf = work / "fetchmailrc"
    conf.write_text(
        "set no syslog\nset invisible\n"  # invisible: no Received: header added
        f"poll {host} protocol IMAP port {port} auth password timeout 120\n"
        f'  user "{user.name}" there with password "{user.password}" is "root" here\n'
        "  folder INBOX fetchall nokeep expunge 0 sslproto ''\n"
        f'  mda "/usr/bin/safecat {out}/tmp {out}/new"\n'
    )
    conf.chmod(0o600)
    return ["fetchmail", "-s", "-f", str(conf), "-i", str(work / "fetchids"),
            "--pidfile", str(work / "fetchmail.pid")]


def getmail_argv(host: str, port: int, user, work: Path, out: Path) -> list[str]:
    state = work / "getmail"
    state.mkdir(exist_ok=True)
    conf = work / "getmailrc"
    conf.write_text(
        f"[retriever]\ntype = SimpleIMAPRetriever\nserver = {host}\nport = {port}\n"
        f"username = {user.name}\npassword = {user.password}\n"
        'mailboxes = ("INBOX",)\nrecord_mailbox = false\n\n'
        f"[destination]\ntype = Maildir\npath = {out}/\n\n"
        "[options]\ndelete = true\nread_all = true\ndelivered_to = false\n"
        "received = false\nverbose = 0\n"
    )
    conf.chmod(0o600)
    argv = ["getmail", "--getmaildir", str(state), "--rcfile", str(conf)]
    if os.geteuid() != 0:
        return argv
    # getmail6 refuses to deliver as root: run it as nobody, owning its files.
    for path in [state, conf, *(out / d for d in ("", "tmp", "new", "cur"))]:
        os.chown(path, 65534, 65534)
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]


def engine_config(host: str, port: int, user, work: Path, out: Path) -> Path:
    """A ``pipeline.toml`` for ``mailpipe run --once``: the journal, quarantine and
    spool under ``work`` (its ``state`` is removed before each run), store.maildir."""
    conf = work / "pipeline.toml"
    conf.write_text(
        '[state]\npath = "state/journal.sqlite3"\n\n[quarantine]\ndir = "state/q"\n\n'
        '[scheduler]\nspool_dir = "state/spool"\n\n[[mailboxes]]\nname = "bench"\n'
        f'source = "imap"\nhost = "{host}"\nport = {port}\nsecurity = "none"\n'
        f'allow_plaintext_password = true\nusername = "{user.name}"\n'
        f'password = "{user.password}"\ndelete = "after_processing"\n'
        'pipeline = "bench"\n\n[pipelines.bench]\n'
        f'processors = [{{ use = "store.maildir", path = "{out}" }}]\n'
    )
    conf.chmod(0o600)
    return conf


def run_tool(tool: str, host: str, port: int, user, work: Path) -> tuple[float, float, float]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    for old in ("state", "getmail", "fetchids"):
        path = work / old
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
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
    elif tool == "fetchmail":
        argv = fetchmail_argv(host, port, user, work, out)
    elif tool == "getmail6":
        argv = getmail_argv(host, port, user, work, out)
    elif tool in ("mailpipe-engine", "base-engine"):
        # -I: the checkout this runs from must not shadow the base's mailpipe.
        python = os.environ["MAILPIPE_BENCH_BASE_PYTHON"] if tool == "base-engine" else (
            sys.executable
        )
        argv = [python, "-I", "-m", "mailpipe", "--log-format", "json", "--log-level",
                "warning", "run", str(engine_config(host, port, user, work, out)),
                "--once"]
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
    ap.add_argument(
        "--tools",
        default="mailpipe-pipelined,mailpipe-lockstep,imaplib,imapclient,mbsync,fetchmail,getmail6",
    )
    ap.add_argument("--scenarios", default="small,mixed,small+20ms,mixed+20ms")
    ap.add_argument("--proxy-log", help="the +20 ms proxy logs every chunk here (turnarounds)")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument(
        "--base-dir", default=None,
        help="where the run's directory (Dovecot's mailbox, every client's output) is "
        "made (default: the system's temporary directory); give one on a journaled "
        "file system: on ext4 without a journal each file creation pays for inodes "
        "freed in the last minutes (RESULTS §27)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for opt in ("--host", "--user", "--password", "--out", "--pipelining"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "mailpipe":
        return worker_mailpipe(a)
    if a.worker == "imaplib":
        return worker_imaplib(a)
    if a.worker == "imapclient":
        return worker_imapclient(a)

    from mailpipe.testing.dovecot import Dovecot

    scenarios = {
        "small": ("small", 200 if a.small else 2000, None),
        "mixed": ("mixed", 50 if a.small else 1000, None),
        "small+20ms": ("small", 30 if a.small else 2000, 10.0),
        "mixed+20ms": ("mixed", 20 if a.small else 1000, 10.0),
        "rtt20": ("small", 30 if a.small else 300, 10.0),  # section 11's scenario
    }
    tools = [t for t in a.tools.split(",") if available(t)]
    missing = sorted(set(a.tools.split(",")) - set(tools))
    if missing:
        print(f"not installed, left out: {', '.join(missing)}", file=sys.stderr)
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-imap-", dir=a.base_dir))
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
                proxy, port = start_proxy(d.imap_port, one_way, a.proxy_log)
            try:
                got: dict[str, dict[str, list]] = {
                    t: {"walls": [], "rss": [], "cpus": [], "verdicts": []} for t in tools
                }
                for rnd in range(a.rounds):
                    for tool in tools:
                        populate(d, user, msgs)
                        os.sync()
                        # A new directory per run, none deleted before the end: see
                        # --base-dir (ext4 without a journal charges recent deletions
                        # to every later file creation).
                        work = base / "work" / f"{name}-{tool}-{rnd}"
                        work.mkdir(parents=True)
                        wall, peak, cpu = run_tool(tool, "127.0.0.1", port, user, work)
                        check = (
                            verify_bodies if tool in ("mbsync", "getmail6")
                            else verify_long_lines if tool == "fetchmail" else verify
                        )
                        verdict = check(work / "out", msgs)
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
