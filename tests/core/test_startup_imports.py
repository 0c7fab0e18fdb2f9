"""What `mailpipe run` imports at start-up: only what its configuration uses.

Each check runs in a fresh interpreter (this test process has imported everything).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def probe_lines(code: str) -> list[str]:
    """Run ``code`` in a new interpreter; the lines it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return done.stdout.splitlines()


def modules_after(code: str, prefix: str) -> list[str]:
    """Run ``code`` in a new interpreter; the loaded modules starting with ``prefix``."""
    return probe_lines(
        f"{code}\nimport sys\n"
        f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefix!r}))))"
    )


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
    import neither the token broker (its cache, cryptography), the OAuth provider
    models (mailpipe.oauth.table validates a table with them) nor the parser (email,
    the record's dataclasses) nor the stdlib's email parser and header registry
    (mailpipe.message), nor difflib (a config mistake's suggestion); they come with
    the first OAuth mailbox, message or mistake."""
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
                         "mailpipe.plugins.parse.walk", "mailpipe.plugins.parse.cleaning",
                         "email.policy", "email.parser", "email.headerregistry",
                         "mailpipe.oauth.options", "difflib"))
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
    lines = probe_lines(probe)
    assert lines[-1] == "frozen True"
    assert "mailpipe" in lines[0]  # the command itself ran (--version)


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["python", "-m", "mailpipe", "run", "p.toml"], True),
        (["python", "-X", "importtime", "-u", "-m", "mailpipe"], True),
        (["/venv/bin/python", "/venv/bin/mailpipe", "run"], True),  # console script
        (["python", "-X", "mailpipe", "tool.py"], False),
        (["python", "tool.py", "-m", "mailpipe"], False),  # the script's own argument
        (["python", "-c", "import mailpipe", "-m", "mailpipe"], False),
        (["python", "-m", "pytest", "-m", "mailpipe"], False),
        (["python", "-m", "mailpipe.demo"], False),
        (["python"], False),
    ],
)
def test_the_command_is_recognised_from_the_interpreter_command_line(
    argv: list[str], command: bool
) -> None:
    from mailpipe._imports import started_as_the_command

    assert started_as_the_command(argv) is command


def test_the_command_imports_with_the_collector_paused_then_frozen() -> None:
    """Issue 18: started as the command, the imports run with the cyclic collector
    paused; main() freezes what they allocated and resumes it before the command."""
    probe = (
        "import gc, sys\n"
        "sys.orig_argv = [sys.executable, '-m', 'mailpipe', '--version']\n"
        "frozen_before = gc.get_freeze_count()\n"
        "import mailpipe.cli\n"
        "print('paused', not gc.isenabled())\n"
        "mailpipe.cli.cli.main = lambda **kw: print('collecting', gc.isenabled(),"
        " gc.get_freeze_count() > frozen_before)\n"
        "mailpipe.cli.main()\n"
    )
    assert probe_lines(probe) == ["paused True", "collecting True True"]


def test_a_program_importing_mailpipe_keeps_its_collector() -> None:
    assert probe_lines("import gc, mailpipe.cli; print(gc.isenabled())") == ["True"]


def test_a_script_named_mailpipe_calling_the_group_resumes_the_collector() -> None:
    """A wrapper script named ``mailpipe`` that runs the click group (``cli()``) rather
    than ``main()`` is recognised as the command, so its imports pause the collector;
    the group resumes it before any command runs, or a long ``mailpipe run`` would
    never collect a reference cycle."""
    probe = (
        "import gc, sys\n"
        "sys.orig_argv = [sys.executable, '/usr/local/bin/mailpipe', 'probe']\n"
        "import mailpipe.cli\n"
        "print('paused', not gc.isenabled())\n"
        "@mailpipe.cli.cli.command()\n"
        "def probe():\n"
        "    print('collecting', gc.isenabled())\n"
        "mailpipe.cli.cli(['--log-level', 'error', 'probe'], standalone_mode=False)\n"
    )
    assert probe_lines(probe) == ["paused True", "collecting True"]


#: Records, at pydantic's first look for its plugins, whether its cache was still
#: empty (``None``), i.e. whether pydantic itself searched the installed distributions.
#: Wrapping ``get_plugins`` (called by every model build) holds whatever way a
#: pydantic release searches: 2.14 asks ``entry_points(group=...)``, 2.13 walks
#: ``distributions()`` (a CI machine's Python had 2.13 and the count of
#: ``entry_points`` calls read ``[]`` there).
_RECORD_PYDANTIC_S_SEARCH = (
    "import os, sys\n"
    "os.environ.pop('PYDANTIC_DISABLE_PLUGINS', None)\n"
    "from pydantic.plugin import _loader\n"
    "searched = []\n"
    "real = _loader.get_plugins\n"
    "def recording():\n"
    "    if not searched:\n"
    "        searched.append(_loader._plugins is None)\n"
    "    return real()\n"
    "_loader.get_plugins = recording\n"
)


def _a_distribution_declares_pydantic_plugins() -> bool:
    from importlib.metadata import distributions

    return any("[pydantic]" in (d.read_text("entry_points.txt") or "")
               for d in distributions())


def test_the_command_skips_pydantic_s_plugin_search_when_no_plugin_is_installed() -> None:
    """Issue 18: pydantic parses every distribution's entry points for its plugins
    when the first model is built (~4 ms); started as the command, with no
    distribution declaring the group, mailpipe tells it there are none first."""
    if _a_distribution_declares_pydantic_plugins():
        pytest.skip("a pydantic plugin is installed here: pydantic must search")
    probe = (
        _RECORD_PYDANTIC_S_SEARCH
        + "sys.orig_argv = [sys.executable, '-m', 'mailpipe', 'run', 'p.toml']\n"
        "import mailpipe.cli, mailpipe.config\n"
        "print(searched, _loader._plugins)\n"
    )
    assert probe_lines(probe) == ["[False] {}"]


def test_a_program_importing_mailpipe_leaves_pydantic_s_plugin_search_alone() -> None:
    probe = (
        _RECORD_PYDANTIC_S_SEARCH
        + "import mailpipe.cli, mailpipe.config\n"
        "print(searched)\n"
    )
    assert probe_lines(probe) == ["[True]"]


@pytest.mark.parametrize(
    ("entry_points_txt", "skipped"),
    [
        ("[console_scripts]\nx = x:main\n", True),
        (None, True),
        ("[pydantic]\nmy_plugin = my_plugin:plugin\n", False),
        ("[console_scripts]\nx = x:main\n\n  [pydantic]  \np = p:plugin\n", False),
    ],
    ids=["other-groups", "no-file", "declared", "declared-indented"],
)
def test_pydantic_s_plugin_search_is_skipped_only_when_no_distribution_declares_it(
    monkeypatch: pytest.MonkeyPatch, entry_points_txt: str | None, skipped: bool
) -> None:
    import importlib.metadata

    from pydantic.plugin import _loader

    from mailpipe._imports import skip_the_empty_pydantic_plugin_search

    class Dist:
        def read_text(self, name: str) -> str | None:
            return entry_points_txt if name == "entry_points.txt" else None

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [Dist(), Dist()])
    monkeypatch.setattr(_loader, "_plugins", None)
    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    skip_the_empty_pydantic_plugin_search()
    assert _loader._plugins == ({} if skipped else None)
    monkeypatch.setattr(_loader, "_plugins", None)
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "some_plugin")
    skip_the_empty_pydantic_plugin_search()  # pydantic's own switch: left to it
    assert _loader._plugins is None
