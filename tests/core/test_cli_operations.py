"""Operations commands against the testing kit's POP3 server: state, quarantine, locks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mailpipe.journal.sqlite import SqliteJournal
from mailpipe.testing.e2e import run_cli as mp
from mailpipe.testing.server import Pop3Server


def msg(n: int, subject: str | None = None) -> bytes:
    return (
        f"From: a{n}@example.com\r\nTo: b@example.com\r\nMessage-ID: <m{n}@example.com>\r\n"
        f"Subject: {subject or f'message {n}'}\r\n\r\nbody {n}\r\n"
    ).encode()


def write_config(
    tmp_path: Path,
    port: int,
    ca: Path,
    *,
    extra: str = "",
    command: list[str] | None = None,
) -> Path:
    cfg = tmp_path / "pipeline.toml"
    steps = '{ use = "parse" }, { use = "store.jsonl", path = "var/out.jsonl" }'
    if command is not None:
        steps += ', { use = "forward.command", command = ' + json.dumps(command) + " }"
    cfg.write_text(
        f"""
[state]
path = "var/journal.sqlite3"
[quarantine]
dir = "var/quarantine"
[[mailboxes]]
name = "box"
host = "127.0.0.1"
port = {port}
security = "tls"
ca_file = "{ca}"
username = "user"
password = "pass"
max_attempts = 1
{extra}
[pipelines.default]
processors = [{steps}]
"""
    )
    return cfg


def jsonl_keys(tmp_path: Path) -> list[str]:
    path = tmp_path / "var" / "out.jsonl"
    if not path.exists():
        return []
    return [json.loads(x)["key"] for x in path.read_text().splitlines()]


def test_mark_seen_adopts_existing_mail(tmp_path: Path) -> None:
    with Pop3Server([msg(1), msg(2)], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file, extra='delete = "never"')
        done = mp("state", "mark-seen", str(cfg), "box", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "marked 2 new of 2" in done.stdout
        srv.add_message(msg(3))
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert len(jsonl_keys(tmp_path)) == 1  # only the new message
        assert len(srv.messages) == 3  # keep mode: nothing deleted
        listed = mp("state", "list", str(cfg), "--mailbox", "box", cwd=tmp_path)
        assert (
            listed.stdout.count("kept") == 2 and listed.stdout.count("committed") == 1
        )
        forgot = mp("state", "forget", str(cfg), "box", cwd=tmp_path)
        assert "forgot 3 entries" in forgot.stdout
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        # forgotten: all three are processed (the store dedupes the one it already has)
        assert sorted(set(jsonl_keys(tmp_path))) == sorted(jsonl_keys(tmp_path))
        assert len(jsonl_keys(tmp_path)) == 3


def test_uidl_reset_stops_the_poll_until_mark_seen_adopts_the_mail(
    tmp_path: Path,
) -> None:
    # C-60: the operator's path, as the error message describes it.
    with Pop3Server([msg(n) for n in range(12)], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file, extra='delete = "never"')
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert len(jsonl_keys(tmp_path)) == 12
        srv.rename_uids(lambda uid: "v2-" + uid)
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 1
        assert '"event": "uidl_reset_suspected"' in done.stderr
        assert "mailpipe state mark-seen CONFIG box" in done.stderr
        assert len(jsonl_keys(tmp_path)) == 12  # nothing processed again
        done = mp("state", "mark-seen", str(cfg), "box", cwd=tmp_path)
        assert "marked 12 new of 12" in done.stdout, done.stderr
        srv.add_message(msg(12))
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert len(jsonl_keys(tmp_path)) == 13  # only the new message
        assert len(srv.messages) == 13


def test_quarantine_show_replay_drop(tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    script = tmp_path / "fwd.py"
    script.write_text(
        "import sys, pathlib\n"
        "data = sys.stdin.buffer.read()\n"
        f"if b'poison' in data and not pathlib.Path({str(fixed)!r}).exists():\n"
        "    sys.exit(3)\n"
    )
    with Pop3Server([msg(1), msg(2, "poison pill")], tls="implicit") as srv:
        cfg = write_config(
            tmp_path, srv.port, srv.ca_file, command=[sys.executable, str(script)]
        )
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert srv.messages == []  # the good one delivered, the poison one quarantined
        listed = mp("quarantine", "list", str(cfg), cwd=tmp_path)
        assert "1 quarantined" in listed.stderr
        key = listed.stdout.split()[0]
        shown = mp("quarantine", "show", str(cfg), key[:8], cwd=tmp_path)
        assert shown.returncode == 0 and "Subject: poison pill" in shown.stdout
        assert '"attempts": 1' in shown.stdout
        failed = mp("quarantine", "replay", str(cfg), key, cwd=tmp_path)
        assert failed.returncode == 1 and "failed" in failed.stdout
        fixed.write_text("ok")
        replayed = mp("quarantine", "replay", str(cfg), "--all", cwd=tmp_path)
        assert replayed.returncode == 0 and "replayed" in replayed.stdout
        assert (
            "0 quarantined" in mp("quarantine", "list", str(cfg), cwd=tmp_path).stderr
        )
        assert len(jsonl_keys(tmp_path)) == 2


def test_quarantine_drop(tmp_path: Path) -> None:
    with Pop3Server([msg(1, "poison")], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file, command=["false"])
        mp("run", str(cfg), "--once", cwd=tmp_path)
        listed = mp("quarantine", "list", str(cfg), cwd=tmp_path)
        key = listed.stdout.split()[0]
        dropped = mp("quarantine", "drop", str(cfg), key, cwd=tmp_path)
        assert dropped.returncode == 0 and key in dropped.stdout
        assert not list((tmp_path / "var" / "quarantine").rglob("*.eml"))


def test_locked_mailbox_is_not_polled_twice(tmp_path: Path) -> None:
    with Pop3Server([msg(1)], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file)
        (tmp_path / "var").mkdir()
        journal = SqliteJournal(tmp_path / "var" / "journal.sqlite3")
        try:
            assert journal.lock_mailbox("box", owner="other-process", ttl=60)
            done = mp("run", str(cfg), "--once", cwd=tmp_path)
            assert done.returncode == 0
            assert "mailbox_locked_elsewhere" in done.stderr
            assert len(srv.messages) == 1 and srv.sessions == []
        finally:
            journal.close()
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 0 and srv.messages == []


def test_run_once_exits_1_when_a_mailbox_fails(tmp_path: Path) -> None:
    with Pop3Server([msg(1)], tls="implicit", users={"user": "other"}) as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file)
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 1
        assert "AuthenticationError" in done.stderr
        assert "pass" not in [w.strip('",') for w in done.stderr.split()]


@pytest.mark.parametrize("verify", [True])
def test_untrusted_certificate_is_refused(tmp_path: Path, verify: bool) -> None:
    with Pop3Server([msg(1)], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file)
        text = cfg.read_text().replace(f'ca_file = "{srv.ca_file}"\n', "")
        cfg.write_text(text)
        done = mp("run", str(cfg), "--once", cwd=tmp_path)
        assert done.returncode == 1
        assert "certificate" in done.stderr.lower()
        assert len(srv.messages) == 1


def test_run_once_exits_1_when_the_group_commit_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 9: store.maildir on a full disk (group commit) lost nothing, but
    the run said processed 3, failed 0, status ok and exited 0."""
    import errno

    import mailpipe.plugins.store._fs as fs
    import mailpipe.plugins.store._maildir_group as group
    import mailpipe.plugins.store.maildir as maildir
    from click.testing import CliRunner

    from mailpipe.cli import cli

    def full(fd: int, chunks: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fs, "write_all", full)
    monkeypatch.setattr(maildir, "write_all", full)
    monkeypatch.setattr(group, "write_all", full)  # (staged writes)
    monkeypatch.chdir(tmp_path)
    with Pop3Server([msg(1), msg(2), msg(3)], tls="implicit") as srv:
        cfg = write_config(tmp_path, srv.port, srv.ca_file)
        text = cfg.read_text().replace(
            'store.jsonl", path = "var/out.jsonl"', 'store.maildir", path = "var/md"'
        )
        cfg.write_text(text)
        result = CliRunner().invoke(cli, ["--log-format", "json", "run", str(cfg), "--once"])
        assert len(srv.messages) == 3  # nothing lost
    assert result.exit_code == 1, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("box "))
    # listed retrieved processed dropped kept failed quarantined deleted
    assert row.split()[1:9] == ["3", "3", "0", "0", "0", "3", "0", "0"], row
    assert "FAILED: group commit failed for 3 message(s)" in row
    assert "No space left on device" in row
