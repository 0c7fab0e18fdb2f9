"""The command line, run as users run it (subprocess) and in-process (CliRunner)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailpipe.cli import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "pipeline.example.toml"
SAMPLES = ROOT / "mailpipe" / "samples"


def mailpipe(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailpipe", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_check_example_passes() -> None:
    done = mailpipe("check", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


def test_check_reports_four_problems_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        """
[[mailboxes]]
name = "support"
host = "pop.example.com"
port = 99999
username = "u"
passwrd = "x"
password = { env = "MAILPIPE_TEST_UNSET_SECRET" }
pipeline = "p"

[pipelines.p]
processors = [{ use = "parse" }, { use = "fliter" }]
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "MAILPIPE_TEST_UNSET_SECRET"}
    done = subprocess.run(
        [sys.executable, "-m", "mailpipe", "check", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2
    err = done.stderr
    assert f"{cfg}: 4 problems" in err
    assert (
        "mailboxes[0].port: Input should be less than or equal to 65535 (got 99999)"
        in err
    )
    assert "mailboxes[0].passwrd: unknown key; did you mean 'password'?" in err
    assert (
        "mailboxes[0].password: environment variable MAILPIPE_TEST_UNSET_SECRET is not set"
        in err
    )
    assert (
        "pipelines.p.processors[1].use: unknown processor 'fliter'; did you mean 'filter'?"
        in err
    )


def test_secret_never_printed_on_failing_run(tmp_path: Path) -> None:
    secret = "Zq9-very-secret-password-77"
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        f"""
[state]
path = "{tmp_path}/j.sqlite3"
[[mailboxes]]
name = "m"
host = "127.0.0.1"
port = 9
security = "none"
allow_plaintext_password = true
username = "user"
password = {{ env = "MP_SECRET_UNDER_TEST" }}
connect_timeout = "2s"
[pipelines.default]
processors = [{{ use = "parse" }}]
"""
    )
    done = mailpipe(
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "run",
        str(cfg),
        "--once",
        env={"MP_SECRET_UNDER_TEST": secret},
    )
    assert done.returncode == 1
    assert secret not in done.stdout + done.stderr
    assert "session_failed" in done.stderr or "mailbox" in done.stderr


def test_version_and_plugins() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and "mailpipe, version" in result.output
    done = mailpipe("plugins")
    assert done.returncode == 0
    for name in (
        "pop3",
        "parse",
        "filter",
        "store.sqlite",
        "forward.webhook",
        "builtin",
    ):
        assert name in done.stdout


def test_schema_is_json_with_plugin_options() -> None:
    done = mailpipe("schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    variants = schema["$defs"]["MailboxConfig"]["anyOf"]
    pop3 = next(v for v in variants if v["properties"]["source"]["const"] == "pop3")
    assert {"host", "username", "password", "poll_interval"} <= set(pop3["properties"])
    uses = {
        v["properties"]["use"]["const"]
        for v in schema["$defs"]["ProcessorRef"]["anyOf"]
    }
    assert {"parse", "filter", "store.sqlite"} <= uses


def test_process_dry_run_prints_decisions_and_writes_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.toml"
    shutil.copy(EXAMPLE, cfg)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "support.password", tmp_path / "examples")
    done = mailpipe("process", str(cfg), str(SAMPLES), "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in done.stdout.splitlines()]
    assert len(lines) == len(list(SAMPLES.glob("*.eml")))
    auto = next(x for x in lines if "Automatic reply" in (x["subject"] or ""))
    assert auto["decision"] == "done" and auto["rule"] == "auto-replies"
    news = next(x for x in lines if x["subject"] == "November product news")
    assert "newsletter" in news["tags"]
    assert not (tmp_path / "var").exists()


def test_process_writes_stores_idempotently(tmp_path: Path) -> None:
    import sqlite3

    cfg = tmp_path / "pipeline.toml"
    shutil.copy(EXAMPLE, cfg)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "support.password", tmp_path / "examples")
    for _ in range(2):
        done = mailpipe("process", str(cfg), str(SAMPLES))
        assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "var" / "tickets.sqlite3")
    (count,) = db.execute("select count(*) from messages").fetchone()
    db.close()
    assert count == len(list(SAMPLES.glob("*.eml"))) - 1  # the auto-reply is dropped
    jsonl = (tmp_path / "var" / "records.jsonl").read_text().splitlines()
    assert len(jsonl) == count


def test_unknown_subcommand_is_usage_error() -> None:
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2


def test_state_and_quarantine_commands_on_empty_state(tmp_path: Path) -> None:
    cfg = tmp_path / "pipeline.toml"
    shutil.copy(EXAMPLE, cfg)
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "support.password", tmp_path / "examples")
    done = mailpipe("state", "list", str(cfg))
    assert done.returncode == 0 and done.stdout == ""
    done = mailpipe("quarantine", "list", str(cfg))
    assert done.returncode == 0 and "0 quarantined" in done.stderr
    done = mailpipe("quarantine", "show", str(cfg), "nope")
    assert done.returncode == 2
    done = mailpipe("state", "list", str(cfg), "--status", "bogus")
    assert done.returncode == 2 and "accepted: pending" in done.stderr


@pytest.mark.parametrize("bad", ["[state\n", "x = \n"])
def test_check_toml_syntax_error_exit_2(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(bad)
    done = mailpipe("check", str(cfg))
    assert done.returncode == 2 and "line 1" in done.stderr


@pytest.mark.parametrize("sync", ["file", "auto"])
def test_process_reports_a_failed_group_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    """store.maildir writes behind: a write error surfaces at flush() and must turn the
    run into a failure, not an uncaught exception after every line said ok. With
    ``sync = "auto"`` the group's syncfs fails (or, where syncfs is not used, the
    per-file write)."""
    import errno

    import mailpipe.plugins.store.maildir as maildir_module

    def broken(*a: object, **k: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(maildir_module.MaildirStore, "_write", broken)
    monkeypatch.setattr(maildir_module._syncfs, "syncfs", broken)
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(
        '[state]\npath = "var/j.sqlite3"\n[pipelines.default]\n'
        f'processors = [{{ use = "store.maildir", path = "out", sync = "{sync}" }}]\n'
    )
    result = CliRunner().invoke(cli, ["process", str(cfg), str(SAMPLES / "01-ticket.eml")])
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert lines[-1]["flush"] == "failed" and "Input/output error" in lines[-1]["error"]
    assert result.exit_code == 1
    assert not list((tmp_path / "out" / "new").iterdir())


# --- issue 20 item 7: one clear line and the documented exit code, no traceback -------


def test_check_non_utf8_toml_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_bytes('[state]\npath = "var/j.sqlite3"\n# café\n'.encode("latin-1"))
    done = mailpipe("check", str(cfg))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "not UTF-8 text: byte 0xe9 on line 3" in done.stderr


def test_check_reads_toml_saved_with_a_byte_order_mark(tmp_path: Path) -> None:
    # Windows editors save UTF-8 with a BOM; tomllib alone reports "Invalid statement".
    cfg = tmp_path / "p.toml"
    text = '[state]\npath = "var/j.sqlite3"\n[pipelines.default]\nprocessors = []\n'
    cfg.write_bytes("\ufeff".encode() + text.encode())
    done = mailpipe("check", str(cfg))
    assert "TOML syntax error" not in done.stdout + done.stderr, done.stderr


@pytest.mark.parametrize("spool", ["spoolfile", "spoolfile/sub"])
def test_spool_dir_that_is_a_file_is_a_config_error(tmp_path: Path, spool: str) -> None:
    (tmp_path / "spoolfile").write_text("not a folder")
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        f'[state]\npath = "var/j.sqlite3"\n[scheduler]\nspool_dir = "{spool}"\n'
        '[pipelines.default]\nprocessors = [{ use = "parse" }]\n'
    )
    for command in ("check", "run"):
        done = mailpipe(command, str(cfg), *(["--once"] if command == "run" else []))
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert (
            f"scheduler.spool_dir: {tmp_path / 'spoolfile'} is a file, not a folder "
            f'(got "{spool}")'
        ) in done.stderr


def test_metrics_port_in_use_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "p.toml"
        cfg.write_text(
            f'[state]\npath = "var/j.sqlite3"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
            '[pipelines.default]\nprocessors = [{ use = "parse" }]\n'
        )
        done = mailpipe("--log-format", "json", "run", str(cfg), "--once")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"mailpipe: StartupError: metrics.listen: cannot listen on 127.0.0.1:{port}: "
        "address already in use"
    )
