"""bench/scale.py --small runs end to end: its table is printed and every row verified."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mailpipe.testing.dovecot import dovecot_unavailable_reason

pytestmark = [
    pytest.mark.dovecot,
    pytest.mark.services,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"
PG_DSN = os.environ.get(
    "MAILPIPE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def _require_servers() -> None:
    import psycopg

    reasons = [dovecot_unavailable_reason()]
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except psycopg.Error as exc:
        reasons.append(f"PostgreSQL unreachable at {PG_DSN}: {exc}")
    reason = "; ".join(r for r in reasons if r)
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (failing because CI is set)")
        pytest.skip(reason)


def test_small_scale_benchmark_prints_a_verified_table() -> None:
    _require_servers()
    # --base-dir: the work directory is made there (RESULTS §27); Dovecot's mail uid
    # must reach it, so not below pytest's private tmp_path
    base = Path(tempfile.mkdtemp(prefix="mailpipe-scale-base-"))
    base.chmod(0o755)
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH), "--small", "--base-dir", str(base)],
            capture_output=True,
            text=True,
            timeout=540,
            check=False,
            env={**os.environ, "MAILPIPE_TEST_POSTGRES": PG_DSN},
        )
        left = list(base.iterdir())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    out = done.stdout
    assert f"work directory in {base}," in out
    assert left == []  # removed at the end
    assert "mailpipe scale benchmark: 100 mailboxes x 2 messages" in out
    assert re.search(
        r"^\| mailpipe +\| scenario +\| mailboxes +\| messages .*\| verified", out,
        re.M,
    )
    rows = [_cells(line) for line in out.splitlines()
            if re.match(r"^\| this +\| (one|4) ", line)]
    scenarios = [cells[:5] for cells in rows]
    assert scenarios == [
        ["one worker, --once", "100", "200", "1", "50"],
        ["one worker, --once", "100", "200", "1", "200"],
        ["4 workers, PostgreSQL journal", "100", "200", "4", "50"],
    ], out
    for cells in rows:
        assert cells[-1] == "ok 200/200", cells
        assert float(cells[5]) > 0 and float(cells[8]) > 0  # time and RSS measured
    # Issue 18: the no-new-mail cycles, plain and TLS, first run and steady state of
    # `run --once`, then three cycles of a running worker each; every mailbox has a
    # successful poll record.
    empty = [_cells(line) for line in out.splitlines()
             if line.startswith("| this ") and "| no new mail" in line]
    names = [cells[0] for cells in empty]
    assert names == [
        "no new mail, plain, first run",
        "no new mail, TLS, first run",
        "no new mail, plain",
        "no new mail, TLS",
        *(f"no new mail, {kind}, running worker's cycle {n}"
          for kind in ("plain", "TLS") for n in (2, 3, 4)),
    ], out
    for cells in empty:
        assert cells[1:3] == ["100", "0"] and cells[-1] == "ok 100/100", cells
        assert float(cells[5]) > 0 and float(cells[9]) > 0  # time and CPU measured
    assert "Dovecot limit warnings: 0" in out


def _cells(row: str) -> list[str]:
    """The cells of a table row after the ``mailpipe`` column."""
    return re.split(r" +\| +", row.strip("| "))[1:]


def test_peers_run_alternately_behind_the_delay_proxy() -> None:
    """``--peer`` runs each cycle with the other interpreter too, in turn, and
    ``--rtt-ms`` puts bench/proxy.py in the way: every row is still verified,
    and the added round trips show in the cycle time (an empty POP3 poll is several
    round trips: one mailbox at a time, 5 mailboxes take at least 20 of them)."""
    _require_servers()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--mailboxes", "5", "--empty-only", "--rounds",
         "1", "--worker-cycles", "1", "--empty-concurrency", "1", "--rtt-ms", "50",
         "--peer", f"twin={sys.executable}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert "added RTT 50 ms" in done.stdout
    rows = [re.split(r" +\| +", line.strip("| ")) for line in done.stdout.splitlines()
            if "| no new mail" in line]
    assert [(r[0], r[1]) for r in rows] == [
        (who, f"no new mail, {kind}{first}")
        for first in (", first run", "", ", running worker's cycle 2")
        for kind in ("plain", "TLS")
        for who in ("this", "twin")
    ], done.stdout
    for r in rows:
        assert r[-1] == "ok 5/5", r
        assert float(r[6]) > 5 * 4 * 0.05, r  # ≥ 4 round trips a mailbox: the delay
