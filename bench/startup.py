"""Start-up cost of ``mailpipe run --once`` on one empty mailbox (issue 18).

    python bench/startup.py                # 15 repetitions, plain and TLS interleaved
    python bench/startup.py --rounds 3     # CI size
    python bench/startup.py --importtime   # also the 15 costliest imports (-X importtime)
    python bench/startup.py --peer before=/path/to/other/venv/bin/python
                                           # another checkout's mailpipe, interleaved

One private Dovecot, one empty mailbox, the chain of ``bench/scale.py`` (``parse`` then
``store.sqlite``), a SQLite journal, scheduler concurrency 4 (the default). Each repetition is a fresh process; its CPU
(user + system) comes from ``os.wait4``, which other processes on a shared machine do
not inflate the way they inflate wall time. Prints the median, minimum and maximum;
nothing is asserted on time. A run that does not exit 0 or leaves no successful poll
record fails the benchmark.

The runs write and use cached bytecode (``__pycache__``) like any installed program:
``PYTHONDONTWRITEBYTECODE`` is removed from their environment (set, it makes every run
compile mailpipe's sources again, about 0.1 s of CPU that no deployment pays); the
warm-up run of each configuration writes the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scale
from scale import polled_ok, write_config  # bench/scale.py, beside this file

from mailpipe.testing.dovecot import Dovecot, DovecotUser

#: The environment of the measured runs: bytecode is cached, as in a deployment.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def command(config: Path, *extra: str, python: str = sys.executable) -> list[str]:
    return [python, *extra, "-m", "mailpipe", "--log-format", "json",
            "--log-level", "warning", "run", "--once", str(config)]


def one_run(
    config: Path, user: DovecotUser, python: str = sys.executable
) -> tuple[float, float]:
    """(CPU seconds from wait4, wall seconds) of one ``run --once``."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command(config, python=python), cwd=config.parent, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"run --once exited {proc.returncode}: {err.decode()[-2000:]}")
    if not polled_ok(config.parent / "var" / "journal.sqlite3", [user]).startswith("ok"):
        raise SystemExit(f"no successful poll recorded: {err.decode()[-2000:]}")
    return usage.ru_utime + usage.ru_stime, wall


def importtime(config: Path, top: int) -> list[tuple[int, str]]:
    """The ``top`` largest cumulative import times (µs, module) of one run."""
    done = subprocess.run(
        command(config, "-X", "importtime"), cwd=config.parent, capture_output=True,
        text=True, check=False, timeout=120, env=ENV,
    )
    found: list[tuple[int, str]] = []
    for line in done.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # the top two levels of the import tree
            found.append((int(m.group(2)), m.group(4)))
    return sorted(found, reverse=True)[:top]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument(
        "--peer", action="append", default=[], metavar="NAME=PYTHON",
        help="also run the mailpipe of another interpreter (venv), interleaved",
    )
    args = parser.parse_args(argv)
    pythons = {"this": sys.executable}
    for peer in args.peer:
        name, _, python = peer.partition("=")
        pythons[name] = python
    work = Path(tempfile.mkdtemp(prefix="mailpipe-startup-"))
    work.chmod(0o755)
    dovecot = Dovecot(work / "dovecot")
    cpu: dict[tuple[str, str], list[float]] = {}
    wall: dict[tuple[str, str], list[float]] = {}
    try:
        dovecot.start()
        user = dovecot.add_user("startup")
        # One config per interpreter: each names only the keys its mailpipe knows
        # (scale.write_config asks it, e.g. for [scheduler] host_concurrency).
        scale.PYTHONS.update(pythons)
        configs = {
            (name, kind): write_config(
                work / name / kind, dovecot, [user], concurrency=4,
                tls=kind == "TLS", python=name,
            )
            for name in pythons
            for kind in ("plain", "TLS")
        }
        for (name, _kind), config in configs.items():
            one_run(config, user, pythons[name])  # warm-up: journal, bytecode, cache
        for _ in range(args.rounds):
            for (name, kind), config in configs.items():
                c, w = one_run(config, user, pythons[name])
                cpu.setdefault((name, kind), []).append(c)
                wall.setdefault((name, kind), []).append(w)
        imports = importtime(configs["this", "TLS"], 15) if args.importtime else []
    finally:
        dovecot.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"mailpipe start-up: run --once on one empty mailbox, {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print("| mailpipe | security | CPU s median | CPU s min | CPU s max | wall s median |")
    print("|---|---|---|---|---|---|")
    for (name, kind), values in cpu.items():
        print(
            f"| {name} | {kind} | {statistics.median(values):.3f} | {min(values):.3f} | "
            f"{max(values):.3f} | {statistics.median(wall[name, kind]):.3f} |"
        )
    if imports:
        print()
        print("| import (top two levels) | cumulative ms |")
        print("|---|---|")
        for us, name in imports:
            print(f"| {name} | {us / 1000:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
