"""bench/scale.py's process handling around a running worker (no servers needed)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

SCALE = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale_under_test", SCALE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _exited(proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``proc`` has exited, leaving it for its parent to collect."""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)


def _dead_worker(
    scale: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    *, exited: bool = False,
) -> tuple[list[subprocess.Popen[bytes]], list[Any]]:
    """worker_cycles' collaborators, with a 'mailpipe run' that exits 3 at once
    (``exited``: it has exited, uncollected, when spawn returns)."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        config: Path, log: Path, *args: str, python: str = "this"
    ) -> subprocess.Popen[bytes]:
        procs.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
        if exited:
            _exited(procs[-1])
        return procs[-1]

    monkeypatch.setattr(scale, "write_config", lambda d, *a, **k: d / "pipeline.toml")
    monkeypatch.setattr(scale, "spawn", spawn)
    monkeypatch.setattr(scale, "server_cpu", lambda dovecot: 0.0)
    users = [scale.DovecotUser(f"u{i}", "pw", tmp_path / f"u{i}") for i in range(3)]
    return procs, users


def test_a_worker_that_exited_is_reported_at_once_and_collected(
    scale: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The worker dies at start-up: the wait for its first cycle ends there (it waited
    # its whole bound, 120 s and more, for records nobody would write), and the
    # worker is collected on the way out.
    procs, users = _dead_worker(scale, monkeypatch, tmp_path, exited=True)
    sleeps: list[float] = []
    monkeypatch.setattr(
        scale, "time",
        SimpleNamespace(monotonic=time.monotonic, time=time.time, sleep=sleeps.append),
    )
    with pytest.raises(RuntimeError, match="exited 3"):
        scale.worker_cycles(tmp_path, None, users, 50, tls=False, cycles=1)
    assert sleeps == []  # the first look found it gone: no wait for its records
    assert procs[0].returncode == 3
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, procs[0].pid, os.WEXITED | os.WNOHANG)


def test_an_error_while_waiting_is_not_masked_by_the_stop(
    scale: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # polled_since gives up (TimeoutError) when the worker has exited meanwhile: the
    # stop's SIGTERM (Popen.send_signal polls first, and so collects it) must not
    # turn that into reap's ChildProcessError.
    procs, users = _dead_worker(scale, monkeypatch, tmp_path)

    def gives_up(*args: object, **kwargs: object) -> float:
        _exited(procs[0])
        raise TimeoutError("3 of 3 mailboxes not polled")

    monkeypatch.setattr(scale, "polled_since", gives_up)
    with pytest.raises(TimeoutError, match="not polled"):
        scale.worker_cycles(tmp_path, None, users, 50, tls=False, cycles=1)
    assert procs[0].returncode == 3


def test_reap_of_a_process_popen_collected_gives_its_exit_code(
    scale: ModuleType,
) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"])
    _exited(proc)
    assert proc.poll() == 5
    assert scale.reap(proc, 5) == (5, 0.0, 0.0)


def test_reap_past_its_bound_kills_and_collects(scale: ModuleType) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # SIGTERM is ignored from here on
    proc.stdout.close()
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(TimeoutError, match="did not finish"):
        scale.reap(proc, 0.3)
    assert proc.returncode == -signal.SIGKILL  # collected: no zombie left behind
