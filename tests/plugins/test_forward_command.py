"""forward.command: real child processes fed the raw message on stdin (MDA style)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.forward.command import (
    STDERR_LIMIT,
    CommandForwardOptions,
    CommandForwardProcessor,
)
from pydantic import ValidationError
from structlog.testing import capture_logs

from mailpipe import Message, PermanentFailure, ProcessorContext, TemporaryFailure

pytestmark = pytest.mark.timeout(60)

RAW = b"From: a@example.org\r\nSubject: pipe me\r\n\r\n.dot line\r\n\x00binary\xff\r\n"

# A tiny MDA: stores stdin under $MAILPIPE_KEY (idempotent) with its environment.
DELIVER = """
import json, os, sys
out = sys.argv[1]
data = sys.stdin.buffer.read()
key = os.environ["MAILPIPE_KEY"]
with open(os.path.join(out, key + ".eml"), "wb") as f:
    f.write(data)
env = {k: v for k, v in os.environ.items() if k.startswith(("MAILPIPE_", "EXTRA"))}
with open(os.path.join(out, key + ".json"), "w") as f:
    json.dump({"env": env, "cwd": os.getcwd()}, f)
"""


def make(tmp_path: Path, command: list[str], *, dry_run: bool = False, **opts: Any) -> CommandForwardProcessor:
    table: dict[str, Any] = {"command": command, "timeout": "20s", **opts}
    options = CommandForwardOptions.model_validate(table, context={"base_dir": tmp_path})
    return CommandForwardProcessor(options, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def message(raw: bytes = RAW) -> Message:
    return Message.from_bytes(raw, mailbox="orders", uid="UID-42")


async def test_command_exit_zero_commits_with_env(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "work").mkdir()
    msg = message()
    proc = make(tmp_path, py(DELIVER, str(out)), env={"EXTRA_FLAG": "1"}, cwd="work")
    with capture_logs() as logs:
        assert await proc.process(msg) is None
    assert (out / f"{msg.key}.eml").read_bytes() == RAW
    seen = json.loads((out / f"{msg.key}.json").read_text())
    assert seen["env"] == {
        "MAILPIPE_KEY": msg.key, "MAILPIPE_UID": "UID-42",
        "MAILPIPE_MAILBOX": "orders", "EXTRA_FLAG": "1",
    }
    assert Path(seen["cwd"]) == tmp_path / "work"
    assert logs[-1]["event"] == "forward_sent"


async def test_command_streams_spooled_message(tmp_path: Path) -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    big = big * (3 * 2**20 // len(big))  # ~3 MiB, more than a pipe buffer
    spool = tmp_path / "spool.eml"
    spool.write_bytes(big)
    out = tmp_path / "out"
    out.mkdir()
    msg = Message(ref=message().ref, spool_path=spool)
    await make(tmp_path, py(DELIVER, str(out))).process(msg)
    assert (out / f"{msg.key}.eml").read_bytes() == big


async def test_command_exit_75_is_temporary(tmp_path: Path) -> None:
    code = "import sys; sys.stdin.buffer.read(); sys.stderr.write('mailbox locked'); sys.exit(75)"
    with pytest.raises(TemporaryFailure, match="exited 75: mailbox locked"):
        await make(tmp_path, py(code)).process(message())


async def test_command_other_exit_is_permanent_with_bounded_stderr(tmp_path: Path) -> None:
    code = (
        "import sys; sys.stdin.buffer.read(); sys.stderr.write('quota exceeded ' + "
        "'E' * 200000); sys.exit(3)"
    )
    with capture_logs() as logs, pytest.raises(PermanentFailure) as info:
        await make(tmp_path, py(code)).process(message())
    text = str(info.value)
    assert "exited 3: quota exceeded EEE" in text
    assert len(text) < STDERR_LIMIT + 200
    assert logs[-1]["event"] == "forward_failed"


async def test_command_killed_by_signal_is_permanent(tmp_path: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    with pytest.raises(PermanentFailure, match="SIGTERM"):
        await make(tmp_path, py(code)).process(message())


async def test_command_that_ignores_stdin_still_commits(tmp_path: Path) -> None:
    big = message(b"Subject: x\r\n\r\n" + b"y" * (4 * 2**20))
    await make(tmp_path, py("import sys; sys.exit(0)")).process(big)


async def test_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The program starts a grandchild; both must die when the timeout fires.
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    proc = make(tmp_path, py(code), timeout="1s")
    with pytest.raises(TemporaryFailure, match="did not finish within 1s"):
        await proc.process(message())
    for pid in map(int, pids.read_text().split()):
        for _ in range(100):  # bounded: the kernel reaps the orphan quickly
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_command_missing_program_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentFailure, match="cannot run"):
        await make(tmp_path, [str(tmp_path / "no-such-mda")]).process(message())


async def test_command_custom_tempfail_codes(tmp_path: Path) -> None:
    proc = make(tmp_path, py("import sys; sys.exit(111)"), tempfail_codes=[75, 111])
    with pytest.raises(TemporaryFailure, match="111"):
        await proc.process(message())


async def test_command_without_inherited_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKY_VAR", "should-not-pass")
    out = tmp_path / "env.json"
    code = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    await make(tmp_path, py(code), inherit_env=False).process(message())
    env = json.loads(out.read_text())
    assert "LEAKY_VAR" not in env and env["MAILPIPE_UID"] == "UID-42"
    assert env["PATH"] == os.defpath


async def test_command_dry_run_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('yes')"
    with capture_logs() as logs:
        await make(tmp_path, py(code), dry_run=True).process(message())
    assert not marker.exists()
    assert logs[0]["event"] == "forward_skipped"


def test_command_options_validation() -> None:
    ok = CommandForwardOptions.model_validate({"command": ["/usr/bin/true"]})
    assert ok.timeout == 60.0 and ok.tempfail_codes == [75]
    bad: dict[str, Any]
    for bad in ({"command": []}, {"command": [""]}, {"command": "prog"},
                {"command": ["a\0b"]}, {"command": ["x"], "shell": True}):
        with pytest.raises(ValidationError):
            CommandForwardOptions.model_validate(bad)
    schema = CommandForwardOptions.model_json_schema()
    assert all("description" in p for p in schema["properties"].values())
