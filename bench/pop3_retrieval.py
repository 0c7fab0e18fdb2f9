"""POP3 retrieval benchmark: mailpipe's client (pipelined and lockstep) beside stdlib poplib
and Debian's mpop, retrieving N messages with deletion from a private Dovecot into files.

    python bench/pop3_retrieval.py            # full: 2,000 small, 1,000 mixed, 20 ms RTT, 200 MB
    python bench/pop3_retrieval.py --small    # CI size, same scenarios, no thresholds

Each tool runs as its own process (wall time and peak RSS from ``os.wait4``) against the
same freshly populated mailbox, then its output is verified against what was delivered.
The 20 ms scenario goes through ``bench/proxy.py`` (10 ms each way). Prints a
table; targets are read from it, never asserted.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# --- mailbox content ----------------------------------------------------------------


def small_message(rnd: random.Random, i: int) -> bytes:
    head = (
        f"Received: from mx{i % 7}.example.net (mx.example.net [192.0.2.{i % 250}])\r\n"
        f"\tby pop.example.com with ESMTPS id {rnd.getrandbits(64):016x}\r\n"
        f"\tfor <user@example.com>; Sat, 28 Nov 2026 10:{i % 60:02d}:00 +0000\r\n"
        f"DKIM-Signature: v=1; a=rsa-sha256; d=example.net; s=sel; b={base64.b64encode(rnd.randbytes(180)).decode()}\r\n"
        f"From: Sender {i} <sender{i}@example.net>\r\nTo: user@example.com\r\n"
        f"Subject: benchmark message {i}\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{i}.{rnd.getrandbits(32)}@example.net>\r\nX-Bench-Id: {i}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    words = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"pipeline", b"mailbox", b"."]
    lines = []
    size = len(head)
    while size < 4000:
        line = b" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
        if i % 10 == 0 and rnd.random() < 0.1:
            line = b"." + line
        lines.append(line)
        size += len(line) + 2
    return head + b"\r\n".join(lines) + b"\r\n"


def mixed_message(rnd: random.Random, i: int) -> bytes:
    kind = rnd.random()
    if kind < 0.25:
        size = rnd.randint(1000, 5000)
    elif kind < 0.75:
        size = int(5000 * 10 ** rnd.random())  # 5-50 KB, log-uniform
    elif kind < 0.92:
        size = rnd.randint(50_000, 200_000)
    else:
        size = rnd.randint(200_000, 2_000_000)
    head = (
        f"From: s{i}@example.net\r\nTo: user@example.com\r\nSubject: mixed {i}\r\n"
        f"X-Bench-Id: {i}\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    raw = base64.encodebytes(rnd.randbytes(size * 3 // 4)).replace(b"\n", b"\r\n")
    if kind > 0.9:  # a long unfolded line and dot-lines, as real mail has
        raw = b"." + b"z" * rnd.randint(1000, 20000) + b"\r\n..\r\n" + raw
    return head + raw


def make_mailbox(profile: str, count: int, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)
    if profile == "small":
        return [small_message(rnd, i) for i in range(count)]
    if profile == "mixed":
        return [mixed_message(rnd, i) for i in range(count)]
    if profile == "large":
        line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0123456789abcdefghijklmnopqrstuvwxyz+/AB\r\n"
        head = b"From: a@example.net\r\nSubject: large\r\nX-Bench-Id: 0\r\n\r\n"
        return [head + line * (count // len(line))]
    raise ValueError(profile)


_ROUND = itertools.count()


def populate(dovecot, user, msgs: list[bytes]) -> None:
    dovecot.clear(user)
    new = user.maildir / "new"
    now = int(time.time())
    # A round number in every name: two rounds within one second must never reuse a
    # file name the server's index still knows as expunged (it then skips the file).
    round_ = next(_ROUND)
    for i, data in enumerate(msgs):
        name = f"{now}.M{i:07d}R{round_}P{os.getpid()}.bench"
        path = user.maildir / "tmp" / name
        path.write_bytes(data)
        if os.geteuid() == 0:
            os.chown(path, dovecot.mail_uid, dovecot.mail_gid)
        os.rename(path, new / name)


def verify(out: Path, msgs: list[bytes]) -> str:
    """Every message exactly once, bytes intact (CRLF→LF normalised; headers a client
    prepends, like mpop's Received:, are allowed)."""
    wanted = {i: m.replace(b"\r\n", b"\n") for i, m in enumerate(msgs)}
    seen: set[int] = set()
    files = [p for d in ("new", "cur") for p in (out / d).iterdir()]
    for path in files:
        data = path.read_bytes().replace(b"\r\n", b"\n")
        at = data.find(b"X-Bench-Id: ")
        i = int(data[at + 12 : data.index(b"\n", at)])
        if i in seen or not data.endswith(wanted[i][wanted[i].find(b"X-Bench-Id: ") :]):
            return f"FAIL message {i}"
        seen.add(i)
    return "OK" if len(seen) == len(msgs) else f"FAIL {len(seen)}/{len(msgs)}"


# --- workers (run in their own process) ---------------------------------------------


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


def worker_mailpipe(a: argparse.Namespace) -> None:
    """mailpipe's POP3 client delivering through mailpipe's own ``store.maildir`` (each
    file fsynced before its rename into new/, as mpop does; new/ fsynced before DELE)."""
    import asyncio

    # mailpipe before structlog, as in `mailpipe run` (mailpipe/_imports.py).
    from mailpipe.plugins.pop3.source import Pop3Options, Pop3Source
    from mailpipe.plugins.store.maildir import MaildirOptions, MaildirStore

    from mailpipe.logs import configure
    from mailpipe.processor import ProcessorContext

    configure("json", "warning")

    out = Path(a.out)
    opts = Pop3Options.model_validate({
        "host": a.host, "port": a.port, "security": "none", "username": a.user,
        "password": a.password, "allow_plaintext_password": True,
        "pipelining": a.pipelining, "read_timeout": 120,
    })
    store = MaildirStore(MaildirOptions(path=out), ProcessorContext(base_dir=out))
    store.open()

    async def run() -> None:
        async with Pop3Source(opts, mailbox="bench").session() as s:
            refs = await s.list()
            async for m in s.retrieve(refs, spool_dir=out / "tmp", spool_threshold=1 << 20):
                store.process(m)
                if m.spool_path is not None:
                    m.spool_path.unlink()
            store.flush()  # every file durable before DELE/QUIT commit the deletions
            await s.mark_deleted(refs)
            await s.commit()

    asyncio.run(run())
    store.close()


def worker_poplib(a: argparse.Namespace) -> None:
    import poplib

    poplib._MAXLINE = 1 << 24  # the stdlib's 2048 fails on real mail (§6.1)
    out = Path(a.out)
    p = poplib.POP3(a.host, a.port, timeout=120)
    p.user(a.user)
    p.pass_(a.password)
    count, _ = p.stat()
    stamp = int(time.time())
    for n in range(1, count + 1):
        _, lines, _ = p.retr(n)
        name = f"{stamp}.{n}.poplib"
        tmp = out / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(b"\r\n".join(lines) + b"\r\n")
        os.rename(tmp, out / "new" / name)
    syncfs(out)
    for n in range(1, count + 1):
        p.dele(n)
    p.quit()


# --- running tools ------------------------------------------------------------------


def run_tool(tool: str, host: str, port: int, user, work: Path) -> tuple[float, float, float]:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    for d in ("tmp", "new", "cur"):
        (out / d).mkdir(parents=True)
    if tool == "mpop":
        conf = work / "mpoprc"
        conf.write_text(
            f"account default\nhost {host}\nport {port}\ntls off\nauth user\n"
            f"user {user.name}\npassword {user.password}\ndelivery maildir {out}\n"
            f"keep off\nonly_new off\nuidls_file {work}/uidls\n"
        )
        conf.chmod(0o600)
        argv = ["mpop", "-q", "-C", str(conf)]
    else:
        kind, _, mode = tool.partition("-")
        argv = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                "--host", host, "--port", str(port), "--user", user.name,
                "--password", user.password, "--out", str(out),
                "--pipelining", "off" if mode == "lockstep" else "auto"]
    return measure(tool, argv, work)


def measure(tool: str, argv: list[str], work: Path) -> tuple[float, float, float]:
    """Run ``argv``; return (wall s, peak RSS MB, CPU s) or raise when it failed."""
    # GNU time forks the tool from a small process, so ru_maxrss is the tool's own
    # (os.wait4 from here would report this process's RSS inherited through fork).
    stats = work / "time.txt"
    argv = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *argv]
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RuntimeError(f"{tool} exited {done.returncode}: {err[-2000:]}")
    rss_kb, user_s, sys_s = stats.read_text().split()[-3:]
    return wall, int(rss_kb) / 1024, float(user_s) + float(sys_s)


def start_proxy(
    port: int, one_way_ms: float, log: str | None = None
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "proxy.py"), "--target", f"127.0.0.1:{port}",
         "--delay-ms", str(one_way_ms), *(["--log", log] if log else [])],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "listening <port>"
    return proc, int(line.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CI size")
    ap.add_argument("--rounds", type=int, default=1, help="runs per tool (median shown)")
    ap.add_argument("--tools", default="mailpipe-pipelined,mailpipe-lockstep,poplib,mpop")
    ap.add_argument("--scenarios", default="small,mixed,rtt20,large")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    for opt in ("--host", "--user", "--password", "--out", "--pipelining"):
        ap.add_argument(opt, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "mailpipe":
        return worker_mailpipe(a)
    if a.worker == "poplib":
        return worker_poplib(a)

    from mailpipe.testing.dovecot import Dovecot

    small = a.small
    scenarios = {
        "small": ("small", 200 if small else 2000, None),
        "mixed": ("mixed", 50 if small else 1000, None),
        "rtt20": ("small", 30 if small else 300, 10.0),
        "large": ("large", 20 * 10**6 if small else 200 * 10**6, None),
    }
    tools = a.tools.split(",")
    base = Path(tempfile.mkdtemp(prefix="mailpipe-bench-pop3-"))
    base.chmod(0o755)  # Dovecot's mail uid must traverse it
    rows = []
    with Dovecot(base / "dovecot") as d:
        user = d.add_user("bench", "bench-password")
        for name in a.scenarios.split(","):
            profile, count, one_way = scenarios[name]
            msgs = make_mailbox(profile, count)
            total = sum(map(len, msgs))
            proxy = None
            port = d.pop3_port
            if one_way:
                proxy, port = start_proxy(d.pop3_port, one_way)
            try:
                # Rounds interleave the tools, so a slow spell of the machine (or of
                # the file system) hits every tool alike.
                runnable = [t for t in tools
                            if not (name == "large" and t == "mailpipe-lockstep")]
                got: dict[str, dict[str, list]] = {
                    t: {"walls": [], "rss": [], "cpus": [], "verdicts": []} for t in runnable}
                for _ in range(a.rounds):
                    for tool in runnable:
                        populate(d, user, msgs)
                        os.sync()
                        wall, peak, cpu = run_tool(tool, "127.0.0.1", port, user, base / "work")
                        verdict = verify(base / "work" / "out", msgs)
                        if d.mailbox_count(user) != 0:
                            verdict += " (mailbox not emptied)"
                        g = got[tool]
                        g["walls"].append(wall)
                        g["rss"].append(peak)
                        g["cpus"].append(cpu)
                        g["verdicts"].append(verdict)
                        print(f"  {name:<6} {tool:<19} {wall:7.2f}s", file=sys.stderr)
                for tool in runnable:
                    g = got[tool]
                    walls = g["walls"]
                    wall = sorted(walls)[len(walls) // 2]
                    bad = [v for v in g["verdicts"] if v != "OK"]
                    rows.append({
                        "scenario": name, "tool": tool, "messages": len(msgs), "bytes": total,
                        "wall_s": wall, "msg_per_s": len(msgs) / wall,
                        "mb_per_s": total / 1e6 / wall, "peak_rss_mb": max(g["rss"]),
                        "cpu_s": sorted(g["cpus"])[len(walls) // 2],
                        "verified": bad[0] if bad else "OK", "walls": walls,
                    })
            finally:
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait(10)
    shutil.rmtree(base, ignore_errors=True)
    print_table(rows)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict]) -> None:
    print("| scenario | tool | messages | MB | wall s | msg/s | MB/s | peak RSS MB | CPU s | vs mpop wall | verified |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    mpop = {r["scenario"]: r["wall_s"] for r in rows if r["tool"] == "mpop"}
    for r in rows:
        ratio = f"{r['wall_s'] / mpop[r['scenario']]:.2f}x" if r["scenario"] in mpop else "-"
        print(f"| {r['scenario']} | {r['tool']} | {r['messages']} | {r['bytes'] / 1e6:.1f} | "
              f"{r['wall_s']:.2f} | {r['msg_per_s']:.0f} | {r['mb_per_s']:.1f} | "
              f"{r['peak_rss_mb']:.1f} | {r['cpu_s']:.2f} | {ratio} | {r['verified']} |")


if __name__ == "__main__":
    main()
