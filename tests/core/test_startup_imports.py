"""What `mailpipe run` imports at start-up: only what its configuration uses.

Each check runs in a fresh interpreter (this test process has imported everything).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def modules_after(code: str, prefix: str) -> list[str]:
    """Run ``code`` in a new interpreter; the loaded modules starting with ``prefix``."""
    probe = (
        f"{code}\nimport sys\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefix!r}))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_run_start_up_does_not_import_rich() -> None:
    """rich costs ~40-100 ms; a piped `mailpipe run` must not pay for it (structlog
    would import it for tracebacks mailpipe never renders: mailpipe/_imports.py)."""
    code = (
        "import mailpipe.cli, mailpipe.app, mailpipe.scheduler, mailpipe.progress\n"
        "import mailpipe.logs; mailpipe.logs.configure('json')\n"
        "import structlog; structlog.get_logger().info('x')"
    )
    assert [m for m in modules_after(code, "rich") if m.split(".")[0] == "rich"] == []


def test_loading_the_plugins_imports_no_processor_module() -> None:
    """A configuration that uses store.maildir must not pay for parse, filter, the
    forwarders (aiosmtplib, httpx, broker clients) or the other stores."""
    loaded = modules_after(
        "from mailpipe.plugin_manager import load; load()", "mailpipe.plugins."
    )
    processors = [
        m for m in loaded if m.count(".") == 3 and not m.startswith("mailpipe.plugins.pop3")
    ]
    assert processors == []


def test_run_start_up_does_not_import_oauth_or_the_parser(tmp_path: Path) -> None:
    """Issue 18: the CLI and a validated configuration that uses `parse` but no OAuth
    import neither the token broker (its cache, cryptography) nor the parser (email,
    the record's dataclasses) nor the stdlib's email parser and header registry
    (mailpipe.message); they come with the first OAuth mailbox or message."""
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[[mailboxes]]\nname = "a"\nhost = "mail.example"\nusername = "u"\n'
        'password = "p"\n[pipelines.default]\nprocessors = [{ use = "parse" }]\n'
    )
    code = (
        "import mailpipe.cli, mailpipe.service\n"
        f"from mailpipe.app import open_app\nopen_app({str(config)!r})\n"
    )
    loaded = modules_after(code, "")
    unwanted = [
        m for m in loaded
        if m.startswith(("mailpipe.oauth.broker", "mailpipe.oauth.cache", "cryptography",
                         "mailpipe.plugins.parse.parser", "mailpipe.oauth.cli",
                         "email.policy", "email.parser", "email.headerregistry"))
    ]
    assert unwanted == []
    assert "mailpipe.plugins.parse.processor" in loaded  # the config was validated


def test_mailpipe_auth_is_still_a_command() -> None:
    from click.testing import CliRunner

    from mailpipe.cli import cli

    done = CliRunner().invoke(cli, ["--help"])
    assert done.exit_code == 0 and "auth" in done.output
    done = CliRunner().invoke(cli, ["auth", "--help"])
    assert done.exit_code == 0 and "OAuth" in done.output


def test_the_parse_defaults_agree() -> None:
    from mailpipe.plugins.parse import parser, processor

    assert processor.MAX_BODY == parser.MAX_BODY


def test_the_entry_point_freezes_the_heap_before_the_interpreter_exits() -> None:
    """Issue 18: the interpreter's final collections walked every start-up object
    (~35 ms of CPU per `run --once`); `mailpipe.cli.main` freezes them on the way out,
    whatever the command (atexit handlers, which run after it, see them frozen)."""
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['mailpipe', '--version']\n"
        "from mailpipe.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines()[-1] == "frozen True"
    assert "mailpipe" in done.stdout  # the command itself ran (--version)
