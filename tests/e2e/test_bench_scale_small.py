"""bench/scale.py --small runs end to end: its table is printed and every row verified."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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
    done = subprocess.run(
        [sys.executable, str(BENCH), "--small"],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        env={**os.environ, "MAILPIPE_TEST_POSTGRES": PG_DSN},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    out = done.stdout
    assert "mailpipe scale benchmark: 100 mailboxes x 2 messages" in out
    assert re.search(
        r"^\| scenario +\| mailboxes +\| messages .*\| verified", out, re.M
    )
    rows = [line for line in out.splitlines() if re.match(r"^\| (one|4) ", line)]
    scenarios = [re.split(r" +\| +", row.strip("| "))[:5] for row in rows]
    assert scenarios == [
        ["one worker, --once", "100", "200", "1", "50"],
        ["one worker, --once", "100", "200", "1", "200"],
        ["4 workers, PostgreSQL journal", "100", "200", "4", "50"],
    ], out
    for row in rows:
        assert row.rstrip(" |").endswith("ok 200/200"), row
        cells = re.split(r" +\| +", row.strip("| "))
        assert float(cells[5]) > 0 and float(cells[8]) > 0  # time and RSS measured
    # Issue 18: the no-new-mail cycles, plain and TLS, first run and steady state;
    # every mailbox has a successful poll record.
    empty = [line for line in out.splitlines() if line.startswith("| no new mail")]
    names = [re.split(r" +\| +", row.strip("| "))[0] for row in empty]
    assert names == [
        "no new mail, plain, first run",
        "no new mail, TLS, first run",
        "no new mail, plain",
        "no new mail, TLS",
    ], out
    for row in empty:
        cells = re.split(r" +\| +", row.strip("| "))
        assert cells[1:3] == ["100", "0"] and row.rstrip(" |").endswith("ok 100/100"), row
        assert float(cells[5]) > 0 and float(cells[9]) > 0  # time and CPU measured
    assert "Dovecot limit warnings: 0" in out
