"""`mailpipe run --once` on a real pseudo-terminal: log lines above the progress bars,
never inside them; per-session chatter quiet at info; the summary table at the end.
The terminal's output is rendered as a screen by pyte. Piped, stderr stays JSON lines."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pyte
import pytest

from mailpipe.testing.e2e import failing_forward, write_kit_config
from mailpipe.testing.server import Pop3Server

pytestmark = pytest.mark.timeout(300)

COLS, ROWS = 160, 120
BAR = re.compile(r"^support +[━╺╸ ]+ +\d+/\d+$")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z \[")


def messages() -> list[bytes]:
    out = []
    for n in range(1, 13):
        body = "poison" if n % 3 == 0 else "fine"
        out.append(
            (
                f"From: c{n}@example.com\r\nTo: s@example.com\r\n"
                f"Message-ID: <t{n}@example.com>\r\nSubject: ticket {n}\r\n\r\n"
                f"{body} {n}\r\n"
            ).encode()
        )
    return out


def write_config(root: Path, srv: Pop3Server) -> Path:
    return write_kit_config(
        root,
        host=srv.host,
        port=srv.port,
        ca_file=srv.ca_file,
        processors=[
            {"use": "parse"},
            {"use": "store.sqlite", "path": "var/store.sqlite3"},
            failing_forward(root),
        ],
    )


def run_on_pty(argv: list[str], cwd: Path) -> tuple[int, bytes]:
    """Run ``argv`` with stdin, stdout and stderr on a new pseudo-terminal of
    COLS x ROWS; return its exit status and everything it wrote."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "CI")}
    env.update(TERM="xterm-256color", NO_COLOR="", FORCE_COLOR="")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        os.chdir(cwd)
        os.execve(argv[0], argv, {k: v for k, v in env.items() if v})
    chunks = []
    for _ in range(1_000_000):  # bounded: ends at EOF (EIO once the child is gone)
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def screen_of(output: bytes) -> list[str]:
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    stream.feed(output)
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def test_logs_render_above_the_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    with Pop3Server(messages(), tls="implicit") as srv:
        cfg = write_config(tmp_path, srv)
        code, output = run_on_pty(
            [sys.executable, "-m", "mailpipe", "run", str(cfg), "--once"], tmp_path
        )
    lines = screen_of(output)
    text = "\n".join(lines)
    assert code == 0, text
    # a bar line starts with its mailbox; anything else with bar glyphs is the table
    bars = [
        n
        for n, line in enumerate(lines)
        if not line.startswith(("┏", "┡", "└")) and re.search("[━╺╸]", line)
    ]
    # one bar, drawn last as "support ━━━ 12/12", with nothing glued to it
    assert len(bars) == 1 and BAR.match(lines[bars[0]]), text
    assert lines[bars[0]].endswith(" 12/12")
    # the failures were logged while the bar was live: each on its own line(s) above
    failed = [n for n, line in enumerate(lines) if "message_failed" in line]
    assert len(failed) == 4, text
    assert all(STAMP.match(lines[n]) and n < bars[0] for n in failed), text
    # per-session chatter is quiet at info; the summary table comes after the bar
    for chatter in ("pop3_committed", "pop3_authenticated", "session_finished"):
        assert chatter not in text
    title = next(n for n, line in enumerate(lines) if "mailpipe run summary" in line)
    assert title > bars[0]
    row = next(line for line in lines[title:] if "support" in line)
    assert row.split("│")[1:4] == [" support ", " 12     ", " 12        "], row


def test_debug_shows_the_chatter_on_a_terminal(tmp_path: Path) -> None:
    with Pop3Server(messages()[:2], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv)
        code, output = run_on_pty(
            [
                sys.executable,
                "-m",
                "mailpipe",
                "--log-level",
                "debug",
                "run",
                str(cfg),
                "--once",
            ],
            tmp_path,
        )
    text = "\n".join(screen_of(output))
    assert code == 0, text
    assert "pop3_committed" in text and "session_finished" in text


def test_piped_output_stays_json_lines(tmp_path: Path) -> None:
    with Pop3Server(messages()[:3], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv)
        done = subprocess.run(
            [sys.executable, "-m", "mailpipe", "run", str(cfg), "--once"],
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stderr.decode().splitlines()]
    names = {e["event"] for e in events}
    assert {"pop3_committed", "session_finished", "message_failed"} <= names
    assert all({"event", "level", "timestamp"} <= set(e) for e in events)
    assert b"\x1b[" not in done.stderr + done.stdout  # no bars, no colours
    assert done.stdout.decode().startswith("mailpipe run summary\n")
