"""CI runs exactly the README's test command, and .ci/run's helpers behave."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"
CI_LIB = ROOT / ".ci" / "lib.sh"


def readme_test_command() -> str:
    readme = ROOT / "README.md"
    assert readme.is_file(), (
        "README.md is missing: it must show the test command in its first fenced code "
        "block (the line .ci/run executes)"
    )
    text = readme.read_text()
    # The README opens with two commands, each in its own fenced block: the demo, then
    # the tests. They must come before the first section heading.
    head = text.split("\n## ", 1)[0]
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", head, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2, (
        "README.md must open with two fenced commands (demo, tests)"
    )
    assert "mailpipe demo" in blocks[0], "the first command runs the demo"
    lines = [ln.strip().removeprefix("$ ") for ln in blocks[1].splitlines()]
    commands = [ln for ln in lines if re.search(r"\bpytest\b", ln)]
    assert len(commands) == 1, (
        f"the second fenced block of README.md should have exactly one pytest line, "
        f"found {commands}"
    )
    return commands[0]


def ci_test_command() -> str:
    done = subprocess.run(
        ["bash", str(CI_RUN), "--print-test-command"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def lib(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with .ci/lib.sh sourced, from the repository root."""
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source .ci/lib.sh; {script}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_ci_runs_the_readme_test_command() -> None:
    assert ci_test_command() == "pip install -e '.[test]' && pytest"
    assert readme_test_command() == ci_test_command()


def test_ci_scripts_are_strict_bash_and_parse() -> None:
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert 'run_tests "$TEST_COMMAND"' in text
    for script in (CI_RUN, CI_LIB):
        done = subprocess.run(
            ["bash", "-n", str(script)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_ci_installs_the_debian_packages_the_tests_need() -> None:
    text = CI_RUN.read_text()
    for package in ("dovecot-core", "dovecot-pop3d", "mpop"):
        assert re.search(rf"ensure_apt_packages .*\b{package}\b", text), package
    # systemd-analyze (tests/test_deploy.py), installed only when missing.
    assert re.search(
        r"if ! command -v systemd-analyze .*\n\s+ensure_apt_packages systemd\b", text
    )


@pytest.mark.parametrize(
    ("name", "port"),
    [
        ("postgresql", 5432),
        ("redis", 6379),
        ("rabbitmq", 5672),
        ("nats", 4222),
        ("mosquitto", 1883),
    ],
)
def test_ci_starts_each_service_on_its_port(name: str, port: int) -> None:
    assert re.search(rf"ensure_service {name} {port} \d+ ", CI_RUN.read_text())


def test_run_tests_maps_pytest_exit_5_to_success_loudly() -> None:
    done = lib('run_tests "exit 5"; echo "rc=$?"; ci_summary')
    assert done.returncode == 0, done.stderr
    assert "rc=0" in done.stdout
    assert "pytest collected NO TESTS (exit 5)" in done.stdout
    assert (
        "NO TESTS COLLECTED (pytest exit 5"
        in done.stdout.split("==== .ci/run setup ====")[1]
    )


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4])
def test_run_tests_returns_other_exit_codes_unchanged(code: int) -> None:
    done = lib(f'rc=0; run_tests "exit {code}" || rc=$?; echo "rc=$rc"; ci_summary')
    assert done.returncode == 0, done.stderr
    assert f"rc={code}" in done.stdout
    assert "NO TESTS" not in done.stdout
    assert (
        "tests: passed" if code == 0 else f"tests: FAILED (exit {code})"
    ) in done.stdout


def test_run_tests_runs_a_compound_command_like_the_readme_one(tmp_path: Path) -> None:
    marker = tmp_path / "m"
    done = lib(f'run_tests "echo one > {marker} && echo two >> {marker}"')
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "one\ntwo\n"


def test_tcp_up_and_wait_for_port_see_a_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        done = lib(f"tcp_up {port} && wait_for_port {port} 3 && echo up")
        assert done.stdout.strip() == "up", done.stderr


def test_wait_for_port_gives_up_on_a_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        done = lib(
            f"if wait_for_port {port} 2; then echo up; else echo down; fi", timeout=30
        )
    assert done.stdout.strip() == "down", done.stderr


def test_ensure_service_reports_a_running_service_without_starting_it() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        done = lib(f"ensure_service fake {port} 5 false; ci_summary")
    assert done.returncode == 0, done.stderr
    assert f"service fake: up on 127.0.0.1:{port}" in done.stdout


def test_ensure_service_notes_a_service_that_cannot_start() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        done = lib(
            f"ensure_service ghost {port} 1 mailpipe-no-such-daemon; ci_summary",
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert (
        "service ghost: DOWN (no mailpipe-no-such-daemon on this machine)"
        in done.stdout
    )


def test_ensure_apt_packages_skips_installed_packages() -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian machine (no dpkg-query)")
    # dpkg itself is always installed on Debian; nothing is fetched.
    done = lib("ensure_apt_packages dpkg; ci_summary")
    assert done.returncode == 0, done.stderr
    assert "apt: already installed: dpkg" in done.stdout


def test_ensure_service_starts_a_down_service_and_waits_for_its_port(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pidfile = tmp_path / "pid"
    # A daemonising start command, like `redis-server --daemonize yes`.
    start = (
        f"bash -c '{sys.executable} -m http.server {port} --bind 127.0.0.1 "
        f">/dev/null 2>&1 & echo $! > {pidfile}'"
    )
    try:
        done = lib(f"ensure_service web {port} 20 {start}; ci_summary", timeout=60)
        assert done.returncode == 0, done.stderr
        assert f"service web: started, up on 127.0.0.1:{port}" in done.stdout
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
