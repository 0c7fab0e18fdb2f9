"""End-to-end kit: pipeline.toml for a Dovecot user, `mailpipe run` subprocesses, counters.

The delivery proofs (``tests/e2e/test_delivery_*.py``) drive the real CLI in a
subprocess against a real Dovecot, kill or cut it at random instants, and then count
what the stores hold. This module holds what they share:

- :func:`delivery_message` builds deterministic test messages with unique subjects
  (``Subject: delivery NNNN``), some with lines starting with ``.``, some multi-KB;
  :func:`subject_number` reads the number back.
- :func:`write_pipeline` writes a ``pipeline.toml`` for one Dovecot user;
  :func:`mailpipe_command`, :func:`run_mailpipe` and :func:`start_mailpipe` run the CLI.
- :func:`maildir_keys`, :func:`maildir_numbers`, :func:`sqlite_keys`,
  :func:`sqlite_numbers`, :func:`line_counts` and :func:`journal_entries` count results.
- :class:`CuttingProxy` (from :mod:`.cutting_proxy`, re-exported here) is a TCP proxy
  that cuts chosen connections after a given number of octets, to inject connection
  drops in front of the real server.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from mailpipe.journal.base import Entry
from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.plugins.store.maildir import key_of

from .cutting_proxy import ConnectionRecord, Cut, CuttingProxy
from .dovecot import Dovecot, DovecotUser

__all__ = [
    "ConnectionRecord",
    "Cut",
    "CuttingProxy",
    "Pop3Endpoint",
    "Pop3Login",
    "delivery_message",
    "journal_entries",
    "key_log_step",
    "line_counts",
    "log_events",
    "maildir_key_numbers",
    "maildir_keys",
    "maildir_numbers",
    "mailpipe_command",
    "run_cli",
    "run_mailpipe",
    "server_numbers",
    "sqlite_keys",
    "sqlite_numbers",
    "start_mailpipe",
    "store_steps",
    "subject_number",
    "toml_value",
    "wait_for_log",
    "wait_until",
    "write_pipeline",
]

class Pop3Endpoint(Protocol):
    """What :func:`write_pipeline` reads of a server: a :class:`Dovecot` or a lab server."""

    host: str
    pop3_port: int
    pop3s_port: int

    @property
    def ca_file(self) -> Path: ...


class Pop3Login(Protocol):
    """What :func:`write_pipeline` reads of a user: a :class:`DovecotUser` or a lab user."""

    @property
    def name(self) -> str: ...

    @property
    def password(self) -> str: ...


SUBJECT_PREFIX = "delivery"
_SUBJECT_RE = re.compile(
    rb"^Subject: " + SUBJECT_PREFIX.encode() + rb" (\d+)\r?$", re.M
)


# --- messages -------------------------------------------------------------------


def delivery_message(number: int, *, big_every: int = 40, dots_every: int = 7) -> bytes:
    """A deterministic CRLF message whose subject is ``delivery <number>``.

    Every ``dots_every``-th message has body lines starting with ``.`` (and a lone
    ``.`` line), which POP3 dot-stuffs on the wire (RFC 1939 §3); every
    ``big_every``-th is about 6 KB.
    """
    lines = [
        b"From: Sender %d <sender%d@example.com>" % (number % 13, number % 13),
        b"To: pipeline@example.org",
        b"Subject: %s %04d" % (SUBJECT_PREFIX.encode(), number),
        b"Message-ID: <delivery-%d@mailpipe.test>" % number,
        b"Date: Mon, 2 Jan 2023 10:%02d:%02d +0000" % (number // 60 % 60, number % 60),
        b"",
        b"Message number %d of the delivery proof." % number,
    ]
    if dots_every and number % dots_every == 0:
        lines += [b".", b"..two dots", b".leading dot", b"end of dots"]
    if big_every and number % big_every == 0:
        lines += [b"line %05d %s" % (i, b"x" * 60) for i in range(85)]
    return b"\r\n".join(lines) + b"\r\n"


def subject_number(raw: bytes) -> int | None:
    """The number in ``Subject: delivery N`` of a raw message, or None."""
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    m = _SUBJECT_RE.search(head)
    return int(m.group(1)) if m else None


# --- config and subprocesses ----------------------------------------------------


def toml_value(value: Any) -> str:
    """Render ``value`` (str, bool, int, float, Path, list, dict) as an inline TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes, "\uXXXX").
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def write_pipeline(
    directory: Path,
    *,
    dovecot: Pop3Endpoint,
    user: Pop3Login,
    processors: Sequence[Mapping[str, Any]],
    mailbox: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    pipeline: Mapping[str, Any] | None = None,
    security: Literal["none", "starttls", "tls"] = "none",
    host: str | None = None,
    port: int | None = None,
    name: str = "box",
) -> Path:
    """Write ``directory/pipeline.toml`` polling ``user`` on ``dovecot``; return its path.

    ``host``/``port`` default to Dovecot's (plaintext port unless ``security='tls'``);
    pass a proxy's to go through it. ``mailbox`` adds keys to the mailbox table
    (``commit_window``, ``delete``, ...), ``scheduler`` to ``[scheduler]``, ``pipeline``
    to ``[pipelines.default]`` (``on_complete``). The journal
    is ``var/journal.sqlite3`` and the quarantine ``var/quarantine`` under
    ``directory``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if port is None:
        port = dovecot.pop3s_port if security == "tls" else dovecot.pop3_port
    table: dict[str, Any] = {
        "name": name,
        "source": "pop3",
        "host": host or dovecot.host,
        "port": port,
        "security": security,
        "username": user.name,
        "password": user.password,
        "pipeline": "default",
        "poll_interval": 0.2,
        "jitter": 0.0,
        "read_timeout": 30.0,
    }
    if security == "none":
        table["allow_plaintext_password"] = True
    else:
        table["ca_file"] = str(dovecot.ca_file)
    table.update(mailbox or {})
    lines = [
        "# Written by mailpipe.testing.e2e for an end-to-end delivery test.",
        *_config_lines(
            {"scheduler": scheduler or {}}, table, pipeline or {}, processors
        ),
    ]
    path = directory / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config_lines(
    sections: Mapping[str, Mapping[str, Any]],
    mailbox: Mapping[str, Any],
    pipeline: Mapping[str, Any],
    processors: Sequence[Mapping[str, Any]],
) -> list[str]:
    """The TOML lines of a one-mailbox config: journal ``var/journal.sqlite3``,
    quarantine ``var/quarantine``, ``sections`` (name -> keys), the mailbox table
    and ``[pipelines.default]`` with ``processors``."""
    lines = ["[state]", 'path = "var/journal.sqlite3"', "[quarantine]"]
    lines.append('dir = "var/quarantine"')
    for name, keys in sections.items():
        lines += [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in keys.items())]
    return [
        *lines,
        "[[mailboxes]]",
        *(f"{k} = {toml_value(v)}" for k, v in mailbox.items()),
        "[pipelines.default]",
        *(f"{k} = {toml_value(v)}" for k, v in pipeline.items()),
        "processors = [",
        *(f"  {toml_value(dict(p))}," for p in processors),
        "]",
    ]


def failing_forward(directory: Path, *, unless: Path | None = None) -> dict[str, Any]:
    """A ``forward.command`` step that fails (exit 3) on a message containing
    ``poison``, and succeeds on any other; with ``unless``, only while that file
    exists (delete it to "fix" the forwarder, then a replay succeeds)."""
    script = directory / "fwd.py"
    broken = "True" if unless is None else f"os.path.exists({str(unless)!r})"
    script.write_text(
        "import os, sys\n"
        f"broken = {broken}\n"
        "sys.exit(3 if broken and b'poison' in sys.stdin.buffer.read() else 0)\n"
    )
    return {"use": "forward.command", "command": [sys.executable, str(script)]}


def write_kit_config(
    directory: Path,
    *,
    host: str,
    port: int,
    ca_file: Path,
    processors: Sequence[Mapping[str, Any]],
    mailbox: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``directory/pipeline.toml``: one mailbox ``support`` (user ``user``,
    password ``pass``, implicit TLS trusting ``ca_file``) on the testing kit's POP3
    server at ``host:port``, journal ``var/journal.sqlite3``, quarantine
    ``var/quarantine``, ``[metrics]`` when given (a value may be a TOML table such as
    ``{"env": NAME}``); return its path."""
    table = {
        "name": "support",
        "host": host,
        "port": port,
        "security": "tls",
        "ca_file": str(ca_file),
        "username": "user",
        "password": "pass",
        **(mailbox or {}),
    }
    sections = {} if metrics is None else {"metrics": metrics}
    path = directory / "pipeline.toml"
    path.write_text("\n".join(_config_lines(sections, table, {}, processors)) + "\n")
    return path


def write_workers_config(
    directory: Path,
    *,
    dovecot: Pop3Endpoint,
    users: Sequence[Pop3Login],
    journal: str,
    processors: Sequence[Mapping[str, Any]],
    scheduler: Mapping[str, Any],
    mailbox: Mapping[str, Any],
) -> Path:
    """Write ``directory/pipeline.toml`` for several workers: one plaintext
    ``[[mailboxes]]`` table per user on ``dovecot`` (plus the keys in ``mailbox``), the
    shared journal ``journal`` (a URL), ``[scheduler]`` keys and the default pipeline."""
    lines = [
        "# Written by mailpipe.testing.e2e for a many-workers proof.",
        "[state]",
        f"path = {toml_value(journal)}",
        "[quarantine]",
        'dir = "var/quarantine"',
        "[scheduler]",
        *(f"{k} = {toml_value(v)}" for k, v in scheduler.items()),
    ]
    for user in users:
        table = {
            "name": user.name, "host": dovecot.host, "port": dovecot.pop3_port,
            "security": "none", "allow_plaintext_password": True,
            "username": user.name, "password": user.password, **mailbox,
        }
        lines += ["[[mailboxes]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    lines += ["[pipelines.default]", "processors = [",
              *(f"  {toml_value(dict(p))}," for p in processors), "]"]
    path = directory / "pipeline.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def e2e_seed() -> int:
    """The seed of a randomised proof: ``MAILPIPE_E2E_SEED`` when set (a replay), else a
    new one per run; printed either way, so a failing run can be replayed."""
    seed = int(
        os.environ.get("MAILPIPE_E2E_SEED") or random.SystemRandom().getrandbits(32)
    )
    print(f"\nseed={seed} (MAILPIPE_E2E_SEED to replay)")
    return seed


def mailpipe_command(config: Path, *args: str) -> list[str]:
    """``python -m mailpipe --log-format json <args> `` with ``config`` appended where
    ``{config}`` appears in ``args`` (or after them when it does not)."""
    rendered = [str(config) if a == "{config}" else a for a in args]
    if "{config}" not in args:
        rendered.append(str(config))
    return [sys.executable, "-m", "mailpipe", "--log-format", "json", *rendered]


def run_cli(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mailpipe --log-format json ARGS`` in ``cwd`` to its end, with a
    wide terminal (``COLUMNS=200``) so that tables are not folded; stdout and stderr
    are captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mailpipe", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def run_mailpipe(
    config: Path, *args: str, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """Run the CLI (e.g. ``run_mailpipe(cfg, "run", "{config}", "--once")``) to its end.

    The working directory is the config's; stdout and stderr are captured as text.
    """
    return subprocess.run(
        mailpipe_command(config, *args),
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_mailpipe(config: Path, *args: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start the CLI in the background; its JSON log lines (stderr) go to ``log``."""
    return subprocess.Popen(
        mailpipe_command(config, *args),
        cwd=config.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log records in ``text`` (other lines are ignored)."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02
) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Workers:
    """``mailpipe run`` worker processes on one config: start, SIGKILL, pause
    (SIGSTOP … SIGCONT), SIGTERM; remembers every pid killed or paused."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()
        self.paused: set[int] = set()
        self._files: list[IO[bytes]] = []
        self._log_paths: dict[int, Path] = {}

    def start(self) -> subprocess.Popen[bytes]:
        path = self.logs / f"worker-{len(self._files)}.log"
        log = path.open("wb")
        self._files.append(log)
        proc = start_mailpipe(self.config, "run", "{config}", log=log)
        self.procs.append(proc)
        self._log_paths[proc.pid] = path
        return proc

    def running(self) -> bool:
        """Whether every live worker has logged an event (so it is past start-up and
        handles SIGTERM: a worker still importing would die of it)."""
        return all(
            log_events(self._log_paths[p.pid].read_text(errors="replace"))
            for p in self.alive()
        )

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.killed.add(proc.pid)

    def pause(self, proc: subprocess.Popen[bytes], seconds: float) -> None:
        """Freeze ``proc`` (SIGSTOP) for ``seconds``, then let it go on (SIGCONT)."""
        proc.send_signal(signal.SIGSTOP)
        self.paused.add(proc.pid)
        try:
            time.sleep(seconds)
        finally:
            proc.send_signal(signal.SIGCONT)

    def terminate_all(self) -> dict[int, int]:
        """SIGTERM every live worker; return pid -> exit code."""
        live = self.alive()
        for p in live:
            p.send_signal(signal.SIGTERM)
        return {p.pid: p.wait(timeout=60) for p in live}

    def close(self) -> None:
        for p in self.alive():
            p.kill()
            p.wait(timeout=30)
        for f in self._files:
            f.close()

    def log_text(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log"))
        )

    def log_of(self, pid: int) -> str:
        """The log of the worker with ``pid`` (its stdout and stderr)."""
        return self._log_paths[pid].read_text(errors="replace")


# --- pipeline steps -------------------------------------------------------------


def store_steps(directory: Path) -> list[dict[str, Any]]:
    """``store.maildir`` (``directory/maildir``) then ``store.sqlite``
    (``directory/store.sqlite3``): both keep one copy per message key."""
    return [
        {"use": "store.maildir", "path": str(directory / "maildir")},
        {"use": "store.sqlite", "path": str(directory / "store.sqlite3")},
    ]


def key_log_step(log: Path, *, pid: bool = False) -> dict[str, Any]:
    """A ``forward.command`` step that appends the message key to ``log`` once per
    invocation (``sh``, so cheap), to count how often each message was processed; with
    ``pid``, ``<key> <worker pid>`` (the shell's parent), to attribute each run."""
    script = (
        'cat >/dev/null && printf "%s %s\\n" "$MAILPIPE_KEY" "$PPID" >> "$1"'
        if pid
        else 'cat >/dev/null && printf "%s\\n" "$MAILPIPE_KEY" >> "$1"'
    )
    return {
        "use": "forward.command",
        "command": ["sh", "-c", script, "key-log", str(log)],
    }


def wait_for_log(
    proc: subprocess.Popen[bytes], log: Path, marker: bytes, *, timeout: float
) -> bool:
    """Wait until ``marker`` appears in ``log`` (True) or ``proc`` ended or ``timeout``
    passed (False)."""

    def seen() -> bool:
        return proc.poll() is not None or (log.exists() and marker in log.read_bytes())

    return wait_until(seen, timeout=timeout) and marker in log.read_bytes()


# --- counting results -----------------------------------------------------------


def _maildir_files(path: Path) -> list[Path]:
    return [
        p
        for sub in ("new", "cur")
        if (path / sub).is_dir()
        for p in (path / sub).iterdir()
        if p.is_file()
    ]


def maildir_keys(path: Path) -> Counter[str]:
    """How many files ``store.maildir`` holds per message key under ``path``."""
    return Counter(k for p in _maildir_files(path) if (k := key_of(p.name)) is not None)


def maildir_key_numbers(path: Path) -> dict[str, int]:
    """Message key -> ``delivery N`` number of every file ``store.maildir`` holds."""
    out: dict[str, int] = {}
    for p in _maildir_files(path):
        key, n = key_of(p.name), subject_number(p.read_bytes())
        if key is not None and n is not None:
            out[key] = n
    return out


def maildir_numbers(path: Path) -> Counter[int]:
    """How many stored files hold each ``delivery N`` subject (content, not names)."""
    out: Counter[int] = Counter()
    for p in _maildir_files(path):
        n = subject_number(p.read_bytes())
        if n is not None:
            out[n] += 1
    return out


def _sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


def sqlite_keys(path: Path) -> Counter[str]:
    """Rows per key in the ``messages`` table of a ``store.sqlite`` database."""
    return Counter(str(k) for (k,) in _sqlite_rows(path, "SELECT key FROM messages"))


def sqlite_numbers(path: Path) -> Counter[int]:
    """Rows per ``delivery N`` subject (read from the stored raw bytes)."""
    out: Counter[int] = Counter()
    for (raw,) in _sqlite_rows(path, "SELECT raw FROM message_raw"):
        n = subject_number(bytes(raw)) if raw is not None else None
        if n is not None:
            out[n] += 1
    return out


def line_counts(path: Path, field_index: int = 0) -> Counter[str]:
    """Occurrences of the ``field_index``-th whitespace field of each line of ``path``."""
    if not path.exists():
        return Counter()
    out: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) > field_index:
            out[parts[field_index]] += 1
    return out


def server_numbers(dovecot: Dovecot, user: DovecotUser) -> Counter[int]:
    """Messages per ``delivery N`` subject still in ``user``'s mailbox on the server."""
    out: Counter[int] = Counter()
    for raw in dovecot.messages(user):
        n = subject_number(raw)
        if n is not None:
            out[n] += 1
    return out


def journal_entries(path: Path, mailbox: str = "box") -> list[Entry]:
    """Every journal entry of ``mailbox`` in the SQLite journal at ``path``."""
    journal = SqliteJournal(path)
    try:
        return journal.list(mailbox, None, 1_000_000)
    finally:
        journal.close()
