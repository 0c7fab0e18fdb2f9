"""Scale benchmark: many mailboxes on one private Dovecot, one worker and four workers.

    python bench/scale.py            # full: 1,000 mailboxes x 5 messages
    python bench/scale.py --small    # CI size: 100 mailboxes x 2 messages, seconds
    python bench/scale.py --empty-only --rounds 3   # only the no-new-mail cycles

(0) no new mail (issue 18): one ``mailpipe run --once`` over every mailbox, each one
    empty, once over plain POP3 (``security = "none"``) and once over implicit TLS
    with the test CA (``security = "tls"``, verified); ``--rounds`` interleaves the
    two, after a first run of each that creates the journal (reported apart). Time
    of the cycle (process start to exit) and CPU from ``os.wait4``;
    ``verified`` says every mailbox has a successful poll record in the journal.
(a) one ``mailpipe run --once`` (SQLite journal) with scheduler concurrency 50 and 200:
    the time of a full cycle (process start to exit), messages/s, peak RSS and CPU
    from ``os.wait4``. A ``mailpipe check`` of the same config gives the start-up cost
    included in that time.
(b) four ``mailpipe run`` workers (concurrency 50 each) sharing one config and a
    PostgreSQL journal (leases): time from spawn until every mailbox is empty,
    messages/s; the workers then get SIGTERM and their peak RSS is read.

The pipeline is ``parse`` then ``store.sqlite`` (one database file, shared by the
workers). Dovecot's process and client limits are raised for 1,000+ users. After each
run every delivered Message-ID must be stored exactly once and every mailbox must be
empty; the table says so in ``verified``. Prints a table; nothing is asserted on time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailpipe.testing.dovecot import Dovecot, DovecotUser
from mailpipe.testing.e2e import toml_value

PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)

#: Dovecot 2.3 defaults (process_limit 100, client_limit 1000) are for a few hundred
#: concurrent users; a login process per connection needs a higher process limit.
DOVECOT_LIMITS = """
default_process_limit = 2000
default_client_limit = 10000
service pop3-login {
  process_limit = 2000
}
service pop3 {
  process_limit = 2000
}
"""

#: ``--dovecot-login shared``: Dovecot's documented high-performance login mode (one
#: long-lived login process per core serving many connections) instead of its default
#: of one login process per connection. Only then can a TLS session be resumed: each
#: login process has its own ticket key.
SHARED_LOGIN = """
service pop3-login {
  service_count = 0
  process_min_avail = 2
  vsz_limit = 1G
}
"""


@dataclass(slots=True)
class Row:
    """One line of the result table."""

    scenario: str
    mailboxes: int
    messages: int
    workers: int
    concurrency: int
    seconds: float
    startup: float | None
    rss_mib: float
    cpu: float
    verified: str
    server_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


# --- mail -------------------------------------------------------------------------


def message(tag: str, n: int) -> bytes:
    """A ~2.5 KB plain-text message with a unique Message-ID ``<tag-n@bench>``."""
    head = (
        f"From: Sender {n % 97} <sender{n % 97}@example.net>\r\n"
        "To: support@example.com\r\n"
        f"Subject: scale benchmark {tag} {n}\r\n"
        "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{tag}-{n}@bench>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    body = "".join(
        f"line {i:03d} of message {n}: the quick brown fox jumps over the lazy dog\r\n"
        for i in range(30)
    )
    return (head + body).encode()


def deliver(
    dovecot: Dovecot, users: list[DovecotUser], per_user: int, tag: str
) -> set[str]:
    """Deliver ``per_user`` messages to each user; return the Message-IDs (no <>)."""
    ids: set[str] = set()
    n = 0
    for user in users:
        for _ in range(per_user):
            n += 1
            dovecot.deliver(user, message(tag, n))
            ids.add(f"{tag}-{n}@bench")
    return ids


def server_cpu(dovecot: Dovecot) -> float:
    """CPU seconds Dovecot used so far: its master (with the children it reaped) and
    its live children (login, auth, pop3 processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(pid: int | str) -> list[str]:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    master = dovecot.pid
    if master is None:
        return 0.0
    total = sum(int(x) for x in fields(master)[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = fields(entry)
        except OSError:
            continue
        if int(f[1]) == master:
            total += int(f[11]) + int(f[12])
    return total / tick


def left_on_server(users: list[DovecotUser]) -> int:
    """Messages still in the users' Maildirs (new/ and cur/)."""
    return sum(
        len(os.listdir(u.maildir / sub)) for u in users for sub in ("new", "cur")
    )


# --- config and processes -----------------------------------------------------------


def write_config(
    directory: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    *,
    journal: str = "var/journal.sqlite3",
    concurrency: int,
    poll_interval: float = 60.0,
    tls: bool = True,
) -> Path:
    """A pipeline.toml with one [[mailboxes]] table per user (implicit TLS with the
    test CA, or with ``tls=False`` plaintext POP3)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by bench/scale.py",
        "[state]",
        f"path = {toml_value(journal)}",
        "[quarantine]",
        'dir = "var/quarantine"',
        "[scheduler]",
        f"concurrency = {concurrency}",
        "lease_ttl = 30.0",
    ]
    for user in users:
        security: dict[str, Any] = (
            {"port": dovecot.pop3s_port, "security": "tls", "ca_file": str(dovecot.ca_file)}
            if tls
            else {
                "port": dovecot.pop3_port,
                "security": "none",
                "allow_plaintext_password": True,
            }
        )
        table: dict[str, Any] = {
            "name": user.name,
            "host": dovecot.host,
            **security,
            "username": user.name,
            "password": user.password,
            "poll_interval": poll_interval,
            "read_timeout": 60.0,
        }
        lines += [
            "[[mailboxes]]",
            *(f"{k} = {toml_value(v)}" for k, v in table.items()),
        ]
    steps = [
        {"use": "parse"},
        {
            "use": "store.sqlite",
            "path": str(directory / "store.sqlite3"),
            "raw": "none",
        },
    ]
    lines += [
        "[pipelines.default]",
        "processors = [",
        *(f"  {toml_value(s)}," for s in steps),
        "]",
    ]
    path = directory / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def command(config: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mailpipe",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        *args,
        str(config),
    ]


def spawn(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command(config, *args),
            cwd=config.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float, float]:
    """Wait for ``proc`` (bounded); return (exit code, peak RSS MiB, CPU seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return (
                proc.returncode,
                usage.ru_maxrss / 1024,
                usage.ru_utime + usage.ru_stime,
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(
                f"mailpipe (pid {proc.pid}) did not finish in {timeout} s"
            )
        time.sleep(0.05)


def timed_once(
    dovecot: Dovecot, config: Path, log: Path, timeout: float
) -> tuple[int, float, float, float, float]:
    """One ``run --once``: (exit code, peak RSS MiB, CPU s, wall s, Dovecot CPU s)."""
    before = server_cpu(dovecot)
    started = time.monotonic()
    proc = spawn(config, log, "run", "--once")
    code, rss, cpu = reap(proc, timeout)
    seconds = time.monotonic() - started
    time.sleep(1.0)  # Dovecot's last children exit and are reaped
    return code, rss, cpu, seconds, server_cpu(dovecot) - before


def verify(store: Path, expected: set[str], users: list[DovecotUser]) -> str:
    """``ok N/N`` when each expected Message-ID is stored once and nothing is left."""
    rows: list[tuple[Any, ...]] = []
    if store.exists():
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT message_id FROM messages").fetchall()
        finally:
            conn.close()
    counts = Counter(str(r[0]) for r in rows)
    once = sum(1 for mid in expected if counts.get(mid) == 1)
    extra = sum(n for mid, n in counts.items() if mid not in expected)
    twice = sum(1 for mid in expected if counts.get(mid, 0) > 1)
    left = left_on_server(users)
    ok = once == len(expected) and not extra and not twice and left == 0
    text = f"{'ok' if ok else 'FAILED'} {once}/{len(expected)}"
    if not ok:
        text += f" (dup {twice}, extra {extra}, left {left})"
    return text


def polled_ok(journal: Path, users: list[DovecotUser]) -> str:
    """``ok N/N`` when every user's mailbox has a successful, error-free poll record."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT mailbox FROM polls WHERE last_success IS NOT NULL "
            "AND last_error_at IS NULL"
        ).fetchall()
    finally:
        conn.close()
    good = {str(r[0]) for r in rows} & {u.name for u in users}
    ok = len(good) == len(users)
    return f"{'ok' if ok else 'FAILED'} {len(good)}/{len(users)}"


# --- scenarios ----------------------------------------------------------------------


def empty_cycle(
    work: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    concurrency: int,
    *,
    tls: bool,
    round_no: int,
) -> Row:
    """One ``run --once`` over ``users`` (all empty). Round 0 starts from nothing (a
    new journal, lock and marker files: the first run); later rounds reuse them, as
    every later cycle of a deployment does (the steady state)."""
    kind = "TLS" if tls else "plain"
    directory = work / f"empty-{kind}-c{concurrency}"
    config = write_config(directory, dovecot, users, concurrency=concurrency, tls=tls)
    log = directory / "mailpipe.log"
    code, rss, cpu, seconds, server = timed_once(dovecot, config, log, 1800)
    verified = polled_ok(directory / "var" / "journal.sqlite3", users)
    if left_on_server(users):
        verified += " (mail left?)"
    if code != 0:
        verified += f" exit {code}"
    return Row(
        f"no new mail, {kind}{', first run' if round_no == 0 else ''}",
        len(users),
        0,
        1,
        concurrency,
        seconds,
        None,
        rss,
        cpu,
        verified,
        server,
    )



def one_worker(
    work: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    per_user: int,
    concurrency: int,
) -> Row:
    directory = work / f"once-c{concurrency}"
    expected = deliver(dovecot, users, per_user, f"c{concurrency}")
    config = write_config(directory, dovecot, users, concurrency=concurrency)
    log = directory / "mailpipe.log"
    check = spawn(config, log, "check")
    started = time.monotonic()
    reap(check, 300)
    startup = time.monotonic() - started
    code, rss, cpu, seconds, server = timed_once(dovecot, config, log, 3600)
    verified = verify(directory / "store.sqlite3", expected, users)
    if code != 0:
        verified += f" exit {code}"
    return Row(
        "one worker, --once",
        len(users),
        len(expected),
        1,
        concurrency,
        seconds,
        startup,
        rss,
        cpu,
        verified,
        server,
    )


def four_workers(
    work: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    per_user: int,
    concurrency: int,
    workers: int = 4,
) -> Row:
    import psycopg

    directory = work / "workers"
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    expected = deliver(dovecot, users, per_user, "w")
    config = write_config(
        directory,
        dovecot,
        users,
        journal=f"{PG_DSN}?schema={schema}",
        concurrency=concurrency,
        poll_interval=60.0,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        for i in range(workers):
            procs.append(spawn(config, directory / f"worker-{i}.log", "run"))
        deadline = started + 3600
        while left_on_server(users) and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
        for p in procs:
            p.send_signal(signal.SIGTERM)
        results = [reap(p, 120) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.wait(30)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    verified = verify(directory / "store.sqlite3", expected, users)
    codes = [code for code, _, _ in results]
    if any(codes):
        verified += f" exits {codes}"
    return Row(
        "4 workers, PostgreSQL journal",
        len(users),
        len(expected),
        workers,
        concurrency,
        seconds,
        None,
        max(r for _, r, _ in results),
        sum(c for _, _, c in results),
        verified,
    )


def postgres_reason() -> str | None:
    try:
        import psycopg

        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except Exception as exc:  # ImportError or psycopg.Error
        return f"PostgreSQL unreachable at {PG_DSN}: {exc}"
    return None


def render(rows: list[Row]) -> str:
    head = (
        "scenario",
        "mailboxes",
        "messages",
        "workers",
        "concurrency",
        "cycle s",
        "startup s",
        "msg/s",
        "peak RSS MiB",
        "CPU s",
        "Dovecot CPU s",
        "verified",
    )
    table = [head] + [
        (
            r.scenario,
            str(r.mailboxes),
            str(r.messages),
            str(r.workers),
            str(r.concurrency),
            f"{r.seconds:.1f}",
            "-" if r.startup is None else f"{r.startup:.1f}",
            f"{r.rate:.0f}",
            f"{r.rss_mib:.0f}",
            f"{r.cpu:.2f}",
            "-" if r.server_cpu is None else f"{r.server_cpu:.1f}",
            r.verified,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in table
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--small", action="store_true", help="100 mailboxes x 2 (CI)")
    parser.add_argument("--mailboxes", type=int, help="override the mailbox count")
    parser.add_argument("--per-mailbox", type=int, help="override messages per mailbox")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[50, 200],
        help="scheduler concurrency values for the one-worker runs",
    )
    parser.add_argument(
        "--empty-concurrency",
        type=int,
        default=50,
        help="scheduler concurrency of the no-new-mail cycles",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="no-new-mail cycles of each kind after the first run (0: none)",
    )
    parser.add_argument(
        "--empty-only", action="store_true", help="only the no-new-mail cycles"
    )
    parser.add_argument(
        "--dovecot-login",
        choices=("per-connection", "shared"),
        default="per-connection",
        help="Dovecot's login processes: its default (one per connection) or its "
        "high-performance mode (long-lived, where TLS sessions can be resumed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    mailboxes = args.mailboxes or (100 if args.small else 1000)
    per_user = args.per_mailbox or (2 if args.small else 5)

    work = Path(tempfile.mkdtemp(prefix="mailpipe-scale-"))
    work.chmod(0o755)  # Dovecot's mail uid must reach the homes below it
    extra = DOVECOT_LIMITS + (SHARED_LOGIN if args.dovecot_login == "shared" else "")
    dovecot = Dovecot(work / "dovecot", extra_config=extra)
    rows: list[Row] = []
    notes: list[str] = []
    try:
        dovecot.start()
        users = [dovecot.add_user(f"scale{i:04d}") for i in range(mailboxes)]
        # plain and TLS interleaved; --rounds 0: no no-new-mail cycles at all
        for round_no in range(args.rounds + 1 if args.rounds else 0):
            for tls in (False, True):
                rows.append(
                    empty_cycle(
                        work, dovecot, users, args.empty_concurrency,
                        tls=tls, round_no=round_no,
                    )
                )
                print(render(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.empty_only:
            args.concurrency = []
        for concurrency in args.concurrency:
            rows.append(one_worker(work, dovecot, users, per_user, concurrency))
            print(render(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        reason = postgres_reason()
        if args.empty_only:
            pass
        elif reason is None:
            rows.append(four_workers(work, dovecot, users, per_user, 50))
        else:
            notes.append(f"4 workers skipped: {reason}")
        log = dovecot.log_text()
        limits = sum(
            1 for line in log.splitlines() if "_limit" in line and "reached" in line
        )
        notes.append(f"Dovecot limit warnings: {limits}")
    finally:
        dovecot.stop()
        if args.keep:
            notes.append(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"mailpipe scale benchmark: {mailboxes} mailboxes x {per_user} messages, "
        f"{os.cpu_count()} CPUs, Dovecot login processes: {args.dovecot_login}"
    )
    print(render(rows))
    for note in notes:
        print(note)
    failed = [r for r in rows if not r.verified.startswith("ok")]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
