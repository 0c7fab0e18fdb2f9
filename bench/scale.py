"""Scale benchmark: many mailboxes on one private Dovecot, one worker and four workers.

    python bench/scale.py            # full: 1,000 mailboxes x 5 messages
    python bench/scale.py --small    # CI size: 100 mailboxes x 2 messages, seconds
    python bench/scale.py --empty-only --rounds 3   # only the no-new-mail cycles
    python bench/scale.py --empty-only --rtt-ms 20 --empty-concurrency 4 32
    python bench/scale.py --peer main=/work/venv-main/bin/python   # interleaved

``--peer NAME=PYTHON`` (repeatable) runs every mailpipe run also with another
interpreter (another install of mailpipe), alternately with this one, each in a
directory of its own; the ``mailpipe`` column says which. ``--rtt-ms`` puts
``bench/proxy.py`` between mailpipe and Dovecot (half the round-trip time in each
direction; loopback has none, so without it the scheduler's concurrency shows nothing
of a real network's waits). Dovecot's login processes are its high-performance mode by
default (``--dovecot-login shared``; ``per-connection`` is Dovecot's own default, one
login process per connection): see ``SHARED_LOGIN``.

(0) no new mail (issue 18): one ``mailpipe run --once`` over every mailbox, each one
    empty, once over plain POP3 (``security = "none"``) and once over implicit TLS
    with the test CA (``security = "tls"``, verified); ``--rounds`` interleaves the
    two, after a first run of each that creates the journal (reported apart). Time
    of the cycle (process start to exit) and CPU from ``os.wait4``;
    ``verified`` says every mailbox has a successful poll record in the journal.
(0') no new mail, a running worker (``mailpipe run``, not ``--once``; issue 18): every
    mailbox due again one second after its poll, so the worker polls as fast as it
    can; after its first cycle, ``--worker-cycles`` cycles are timed, the ones a
    deployment's worker runs all day (no start-up; TLS sessions resumed from the cycle
    before, and SCRAM's salted passwords on a server that keeps each user's salt,
    which this Dovecot does not; journal and lock files open). A cycle ends when every
    mailbox's poll record is newer than its start; the records are written every
    0.5 s (the scheduler's POLL_RECORD_DELAY) plus the event loop's lag, so a cycle's
    time is within about 0.5 s of its polls'. CPU (mailpipe's and Dovecot's)
    from /proc over the cycle, peak RSS from /proc at its end; the worker then gets
    SIGTERM and must exit 0 with every poll record free of errors.
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
import functools
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

#: ``--dovecot-login shared`` (the default here): Dovecot's documented high-performance
#: login mode (one long-lived login process per core serving many connections) instead
#: of its default of one login process per connection. Only then can a TLS session be
#: resumed: each login process has its own ticket key. The benchmark's default because
#: Dovecot runs on the benchmark's own cores: with a login process (fork, exec, TLS
#: set-up) per connection it spends about twice the CPU per cycle (RESULTS.md §15.2),
#: which a deployment's mail server does not take from mailpipe's cores. Installations
#: that serve many connections use this mode (Dovecot's documentation recommends it for
#: them); ``per-connection`` measures the other case.
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
    mailpipe: str = "this"

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


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3 on), so that
    ``[11]`` is utime, ``[12]`` stime, ``[13]`` cutime, ``[14]`` cstime (ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def server_cpu(dovecot: Dovecot) -> float:
    """CPU seconds Dovecot used so far: its master (with the children it reaped) and
    its live children (login, auth, pop3 processes), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    master = dovecot.pid
    if master is None:
        return 0.0
    total = sum(int(x) for x in stat_fields(master)[11:15])  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            f = stat_fields(entry)
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
    ports: dict[int, int] | None = None,
    python: str = "this",
) -> Path:
    """A pipeline.toml with one [[mailboxes]] table per user (implicit TLS with the
    test CA, or with ``tls=False`` plaintext POP3). ``concurrency`` 0 leaves the
    scheduler's defaults; else it is also the per-server limit for a mailpipe that
    has one (every mailbox is on one server here). ``ports`` maps Dovecot's ports to
    the delay proxy's."""
    ports = ports or {}
    per_host = concurrency and has_host_limit(python)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Written by bench/scale.py",
        "[state]",
        f"path = {toml_value(journal)}",
        "[quarantine]",
        'dir = "var/quarantine"',
        "[scheduler]",
        *([f"concurrency = {concurrency}"] if concurrency else []),
        *([f"host_concurrency = {concurrency}"] if per_host else []),
        "lease_ttl = 30.0",
    ]
    for user in users:
        security: dict[str, Any] = (
            {
                "port": ports.get(dovecot.pop3s_port, dovecot.pop3s_port),
                "security": "tls",
                "ca_file": str(dovecot.ca_file),
            }
            if tls
            else {
                "port": ports.get(dovecot.pop3_port, dovecot.pop3_port),
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


#: Which mailpipe runs: ``--peer NAME=PYTHON`` adds interpreters.
PYTHONS: dict[str, str] = {"this": sys.executable}
#: Dovecot port -> delay proxy port (``--rtt-ms``); empty: straight to Dovecot.
PROXY_PORTS: dict[int, int] = {}


@functools.cache
def has_host_limit(python: str) -> bool:
    """Whether the mailpipe of ``python`` knows ``[scheduler] host_concurrency``."""
    done = subprocess.run(
        [PYTHONS[python], "-c", "from mailpipe.config import SchedulerConfig; "
         "print('host_concurrency' in SchedulerConfig.model_fields)"],
        capture_output=True, text=True, check=True,
        cwd="/",  # not a checkout's folder: its mailpipe/ would be imported instead
    )
    return done.stdout.strip() == "True"


def command(config: Path, *args: str, python: str = "this") -> list[str]:
    return [
        PYTHONS[python],
        "-m",
        "mailpipe",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        *args,
        str(config),
    ]


def spawn(
    config: Path, log: Path, *args: str, python: str = "this"
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command(config, *args, python=python),
            cwd=config.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float, float]:
    """Wait for ``proc`` (bounded); return (exit code, peak RSS MiB, CPU seconds).

    A process that Popen has collected already (``poll()``, or ``send_signal()``,
    which polls first, after it exited) gives its exit code with 0 RSS and CPU: its
    rusage is gone, and ``os.wait4`` would raise ChildProcessError. On timeout it is
    killed and collected, then TimeoutError is raised."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            return proc.returncode, 0.0, 0.0
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
            proc.wait()
            raise TimeoutError(
                f"mailpipe (pid {proc.pid}) did not finish in {timeout} s"
            )
        time.sleep(0.05)


def timed_once(
    dovecot: Dovecot, config: Path, log: Path, timeout: float, python: str = "this"
) -> tuple[int, float, float, float, float]:
    """One ``run --once``: (exit code, peak RSS MiB, CPU s, wall s, Dovecot CPU s)."""
    before = server_cpu(dovecot)
    started = time.monotonic()
    proc = spawn(config, log, "run", "--once", python=python)
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
    python: str = "this",
) -> Row:
    """One ``run --once`` over ``users`` (all empty). Round 0 starts from nothing (a
    new journal, lock and marker files: the first run); later rounds reuse them, as
    every later cycle of a deployment does (the steady state)."""
    kind = "TLS" if tls else "plain"
    directory = work / python / f"empty-{kind}-c{concurrency}"
    config = write_config(
        directory, dovecot, users, concurrency=concurrency, tls=tls, ports=PROXY_PORTS,
        python=python,
    )
    log = directory / "mailpipe.log"
    code, rss, cpu, seconds, server = timed_once(dovecot, config, log, 1800, python)
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
        python,
    )


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) ``pid`` used so far, from /proc."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """``pid``'s peak resident set (VmHWM) in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def polled_since(
    journal: Path,
    names: set[str],
    since: float,
    timeout: float,
    worker: subprocess.Popen[bytes] | None = None,
) -> float:
    """Wait (bounded) until every mailbox of ``names`` has a poll record written after
    ``since`` (a time.time() value); return the latest record's time. RuntimeError
    as soon as ``worker`` (the mailpipe writing the records) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if worker is not None and worker.poll() is not None:
            raise RuntimeError(
                f"mailpipe (pid {worker.pid}) exited {worker.returncode} while "
                f"{len(names)} mailboxes were awaited"
            )
        try:
            conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=30)
            try:
                rows = conn.execute(
                    "SELECT mailbox, polled_at FROM polls WHERE polled_at > ?", (since,)
                ).fetchall()
            finally:
                conn.close()
        except sqlite3.OperationalError:  # the worker has not made the journal yet
            rows = []
        polled = {str(mailbox): float(at) for mailbox, at in rows}
        if names <= polled.keys():
            return max(polled[name] for name in names)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(names - polled.keys())} of {len(names)} mailboxes not polled "
                f"within {timeout} s"
            )
        time.sleep(0.1)


def worker_cycles(
    work: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    concurrency: int,
    *,
    tls: bool,
    cycles: int,
    python: str = "this",
) -> list[Row]:
    """``cycles`` no-new-mail cycles of one running worker after its first (see (0')
    in the module's docstring): one row each."""
    kind = "TLS" if tls else "plain"
    directory = work / python / f"worker-{kind}-c{concurrency}"
    config = write_config(
        directory, dovecot, users, concurrency=concurrency, tls=tls,
        poll_interval=1.0, ports=PROXY_PORTS, python=python,
    )
    journal = directory / "var" / "journal.sqlite3"
    names = {u.name for u in users}
    timeout = 60.0 + 0.2 * len(users)
    proc = spawn(config, directory / "mailpipe.log", "run", python=python)
    measured: list[tuple[float, float, float, float]] = []
    try:
        mark = polled_since(journal, names, 0.0, timeout + 60.0, proc)  # 1st cycle
        for _ in range(cycles):
            cpu, server = process_cpu(proc.pid), server_cpu(dovecot)
            end = polled_since(journal, names, mark, timeout, proc)
            measured.append((
                end - mark,
                process_cpu(proc.pid) - cpu,
                server_cpu(dovecot) - server,
                peak_rss_mib(proc.pid),
            ))
            mark = end
    finally:
        proc.send_signal(signal.SIGTERM)
        code, _rss, _cpu = reap(proc, 120)
    verified = polled_ok(journal, users)
    if left_on_server(users):
        verified += " (mail left?)"
    if code != 0:
        verified += f" exit {code}"
    return [
        Row(
            f"no new mail, {kind}, running worker's cycle {n}",
            len(users), 0, 1, concurrency, seconds, None, rss, cpu, verified, server,
            python,
        )
        for n, (seconds, cpu, server, rss) in enumerate(measured, 2)
    ]


def one_worker(
    work: Path,
    dovecot: Dovecot,
    users: list[DovecotUser],
    per_user: int,
    concurrency: int,
    python: str = "this",
) -> Row:
    directory = work / python / f"once-c{concurrency}"
    expected = deliver(dovecot, users, per_user, f"{python}-c{concurrency}")
    config = write_config(
        directory, dovecot, users, concurrency=concurrency, ports=PROXY_PORTS,
        python=python,
    )
    log = directory / "mailpipe.log"
    check = spawn(config, log, "check", python=python)
    started = time.monotonic()
    reap(check, 300)
    startup = time.monotonic() - started
    code, rss, cpu, seconds, server = timed_once(dovecot, config, log, 3600, python)
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
        python,
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


def start_proxies(dovecot: Dovecot, rtt_ms: float) -> list[subprocess.Popen[str]]:
    """Start bench/proxy.py (``rtt_ms / 2`` each way) in front of each of Dovecot's
    POP3 ports, filling :data:`PROXY_PORTS`; returns once they listen."""
    proxies: list[subprocess.Popen[str]] = []
    for port in (dovecot.pop3_port, dovecot.pop3s_port):
        proxy = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("proxy.py")),
             "--target", f"{dovecot.host}:{port}", "--delay-ms", str(rtt_ms / 2)],
            stdout=subprocess.PIPE,
            text=True,
        )
        proxies.append(proxy)
        assert proxy.stdout is not None
        word, _, listening = proxy.stdout.readline().partition(" ")
        if word != "listening":
            for p in proxies:
                p.kill()
            raise RuntimeError("bench/proxy.py did not start")
        PROXY_PORTS[port] = int(listening)
    return proxies


def postgres_reason() -> str | None:
    try:
        import psycopg

        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except Exception as exc:  # ImportError or psycopg.Error
        return f"PostgreSQL unreachable at {PG_DSN}: {exc}"
    return None


def render(rows: list[Row]) -> str:
    head = (
        "mailpipe",
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
            r.mailpipe,
            r.scenario,
            str(r.mailboxes),
            str(r.messages),
            str(r.workers),
            str(r.concurrency) if r.concurrency else "default",
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
        nargs="+",
        default=[50],
        help="scheduler concurrency values of the no-new-mail cycles (0: the "
        "config's default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="no-new-mail cycles of each kind after the first run (0: none)",
    )
    parser.add_argument(
        "--worker-cycles",
        type=int,
        default=3,
        help="no-new-mail cycles timed in a running worker after its first, per "
        "kind (plain, TLS) and interpreter (0: none)",
    )
    parser.add_argument(
        "--empty-only", action="store_true", help="only the no-new-mail cycles"
    )
    parser.add_argument(
        "--dovecot-login",
        choices=("per-connection", "shared"),
        default="shared",
        help="Dovecot's login processes: its default (one per connection) or its "
        "high-performance mode (long-lived, where TLS sessions can be resumed)",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="round-trip time added between mailpipe and Dovecot (bench/proxy.py)",
    )
    parser.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="NAME=PYTHON",
        help="also run every mailpipe run with this interpreter, alternately",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--base-dir",
        default=None,
        help="where the work directory (Dovecot's mailboxes, the journals and stores) "
        "is made (default: the system's temporary directory). Give a journaled file "
        "system: on ext4 without a journal each file created pays a scan over inodes "
        "freed in the last minutes (bench/RESULTS.md §27)",
    )
    args = parser.parse_args(argv)
    for peer in args.peer:
        name, _, python = peer.partition("=")
        if not name or not python or name in PYTHONS:
            parser.error(f"--peer {peer!r}: expected a new NAME=PYTHON")
        PYTHONS[name] = python
    mailboxes = args.mailboxes or (100 if args.small else 1000)
    per_user = args.per_mailbox or (2 if args.small else 5)

    work = Path(tempfile.mkdtemp(prefix="mailpipe-scale-", dir=args.base_dir))
    work.chmod(0o755)  # Dovecot's mail uid must reach the homes below it
    extra = DOVECOT_LIMITS + (SHARED_LOGIN if args.dovecot_login == "shared" else "")
    dovecot = Dovecot(work / "dovecot", extra_config=extra)
    rows: list[Row] = []
    notes: list[str] = []
    proxies: list[subprocess.Popen[str]] = []
    try:
        dovecot.start()
        if args.rtt_ms:
            proxies = start_proxies(dovecot, args.rtt_ms)
        users = [dovecot.add_user(f"scale{i:04d}") for i in range(mailboxes)]
        # plain and TLS, every interpreter and concurrency interleaved; --rounds 0:
        # no no-new-mail cycles at all
        for round_no in range(args.rounds + 1 if args.rounds else 0):
            for concurrency in args.empty_concurrency:
                for tls in (False, True):
                    for python in PYTHONS:
                        rows.append(
                            empty_cycle(
                                work, dovecot, users, concurrency,
                                tls=tls, round_no=round_no, python=python,
                            )
                        )
                        print(render(rows[-1:]).splitlines()[-1], file=sys.stderr,
                              flush=True)
        for concurrency in args.empty_concurrency if args.worker_cycles else ():
            for tls in (False, True):
                for python in PYTHONS:
                    rows += worker_cycles(
                        work, dovecot, users, concurrency, tls=tls,
                        cycles=args.worker_cycles, python=python,
                    )
                    print(render(rows[-1:]).splitlines()[-1], file=sys.stderr,
                          flush=True)
        if args.empty_only:
            args.concurrency = []
        for concurrency in args.concurrency:
            for python in PYTHONS:
                rows.append(
                    one_worker(work, dovecot, users, per_user, concurrency, python)
                )
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
        for proxy in proxies:
            proxy.terminate()
            proxy.wait(30)
        dovecot.stop()
        if args.keep:
            notes.append(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"mailpipe scale benchmark: {mailboxes} mailboxes x {per_user} messages, "
        f"{os.cpu_count()} CPUs, Dovecot login processes: {args.dovecot_login}, "
        f"added RTT {args.rtt_ms:g} ms, work directory in {work.parent}, load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(render(rows))
    for note in notes:
        print(note)
    failed = [r for r in rows if not r.verified.startswith("ok")]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
