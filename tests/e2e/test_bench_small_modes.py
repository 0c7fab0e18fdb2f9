"""Every benchmark runs in its small mode and prints its table (no timing assertions)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("MAILPIPE_CORPUS", ROOT.parent / "shared" / "corpus"))


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def need_imap_dovecot() -> None:
    """Skip without Dovecot's imapd (fail in CI)."""
    from mailpipe.testing.dovecot import dovecot_unavailable_reason
    from mailpipe.testing.pytest_plugin import skip_or_fail

    reason = dovecot_unavailable_reason(imap=True)
    if reason is not None:
        skip_or_fail(reason)


def test_store_throughput_small() -> None:
    out = run("bench/store_throughput.py", "--small")
    rows = [line.split() for line in out.splitlines() if line.startswith("store.")]
    assert {r[0] for r in rows} >= {"store.sqlite", "store.maildir", "store.jsonl"}
    assert all(r[-3] == "200" for r in rows), out  # every store wrote every message


def test_cross_process_stores_small() -> None:
    out = run("bench/cross_process_stores.py", "--small", "--before", "")
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if line.startswith("| store.")]
    assert len(rows) == 9, out  # 3 stores x (write, recheck, alternate)
    assert all(r[-1].strip() == "0" for r in rows), out  # no key stored twice


def test_parse_corpus_small() -> None:
    if not CORPUS.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"corpus missing in CI: {CORPUS}")
        pytest.skip(f"corpus not found at {CORPUS}")
    out = run("bench/parse_corpus.py", "--small", "--corpus", str(CORPUS))
    assert "stdlib baseline" in out and "mailpipe parse" in out


def test_parse_mixed_small() -> None:
    out = run("bench/parse_mixed.py", "--small")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"parse_file", "parse_message", "both"}, out
    assert int(rows["parse_file"][1]) + int(rows["parse_message"][1]) == 100, out


def test_pop3_retrieval_small() -> None:
    if shutil.which("dovecot") is None and not Path("/usr/sbin/dovecot").exists():
        if os.environ.get("CI"):
            pytest.fail("Dovecot is not installed (Debian dovecot-pop3d)")
        pytest.skip("Dovecot is not installed")
    out = run("bench/pop3_retrieval.py", "--small")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "mailpipe" in line]
    assert rows and all(line.rstrip().endswith("OK |") for line in rows), out


def test_imap_retrieval_small() -> None:
    need_imap_dovecot()
    out = run("bench/imap_retrieval.py", "--small")
    rows = [line for line in out.splitlines() if line.startswith("| ") and "mailpipe" in line]
    # mailpipe pipelined and lockstep in each of the four scenarios (0 and +20 ms,
    # small and mixed), every one verified byte-exact.
    assert len(rows) == 8 and all(line.rstrip().endswith("OK |") for line in rows), out
    if os.environ.get("CI"):
        assert any("| mbsync |" in line for line in out.splitlines()), out  # isync in CI


def test_imap_selection_small() -> None:
    need_imap_dovecot()
    out = run("bench/imap_selection.py", "--small")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in out.splitlines() if line.startswith("| mailpipe-")}
    assert set(rows) == {"mailpipe-watermark", "mailpipe-full"}, out
    assert rows["mailpipe-watermark"][0].strip() == "0", out  # nothing past the watermark
    assert rows["mailpipe-full"][0].strip() == "500", out  # the whole folder
    assert all(r[1].strip() == "0" for r in rows.values()), out  # nothing fetched again


def test_imap_push_small() -> None:
    need_imap_dovecot()
    out = run("bench/imap_push.py", "--small")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in out.splitlines() if line.startswith("| ") and "trials" not in line}
    # APPEND → chain start for both folders (push watches the second one too), and the
    # session-level IDLE span; three trials each.
    assert rows == {"chain INBOX": "3", "chain Support": "3", "wait_for_new INBOX": "3"}, out
