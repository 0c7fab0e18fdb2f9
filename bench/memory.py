"""Benchmark: peak RSS of one large base64 message through the default chain.

Issue 20, item 6. The parent starts the testing kit's POP3 server (implicit TLS, as in
``mailpipe demo``) on a Maildir holding one generated message: a short text part plus
a base64 attachment of ``--size`` MB (random octets). It writes the demo's config (the
chain of ``pipeline.example.toml``: parse, filter, store.sqlite, store.attachments,
store.jsonl) with ``max_message_size`` raised above the message, then runs
``mailpipe run CONFIG --once`` in a child process and reports the child's peak RSS
(``VmHWM`` of ``/proc/self/status``, read by the child at exit; ``ru_maxrss`` is
printed too, but on Linux it keeps the parent's resident size from the fork, which
holds the server's copy of the message). A first
child with a 2 KB message gives the baseline (interpreter, imports, TLS, SQLite).

It checks the outcome too: one row in the SQLite store whose raw bytes hash like the
message, one attachment blob of the right size, one JSONL line, the mailbox empty.

Usage: python bench/memory.py [--size MB] [--small] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path
from typing import Any

from mailpipe.demo import DEMO_PASSWORD, DEMO_USER, dump_toml, write_demo_config
from mailpipe.testing.server import Pop3Server

_CHILD = textwrap.dedent(
    """
    import atexit, resource, sys
    out = sys.argv.pop(1)
    def report():
        # VmHWM: the peak of this program's own memory. ru_maxrss also counts what
        # the parent had resident when it forked this child (Linux keeps the
        # high-water mark across exec), i.e. the server's copy of the message.
        with open("/proc/self/status") as status:
            hwm = next(l.split()[1] for l in status if l.startswith("VmHWM:"))
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(out, "w") as f:
            f.write(f"{hwm} {maxrss}")
    atexit.register(report)
    from mailpipe.cli import main
    main()
    """
)


def make_message(size: int) -> bytes:
    """A multipart/mixed message with a text part and a ``size``-octet base64 file."""
    body = base64.encodebytes(os.urandom(size)).replace(b"\n", b"\r\n")
    head = (
        b"From: Big Sender <big@customer.example>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: a large attachment\r\n"
        b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <big-1@customer.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"Please find the file attached.\r\n"
        b"--b1\r\n"
        b'Content-Type: application/octet-stream; name="big.bin"\r\n'
        b'Content-Disposition: attachment; filename="big.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
    )
    return head + body + b"--b1--\r\n"


def run_once(work: Path, message: bytes) -> dict[str, Any]:
    """Serve ``message`` and run the default chain on it in a child; return figures."""
    maildir = work / "server-mailbox"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "big-1").write_bytes(message)
    with Pop3Server(
        maildir=maildir, users={DEMO_USER: DEMO_PASSWORD}, tls="implicit"
    ) as server:
        config = write_demo_config(work, port=server.port, ca_file=server.ca_file)
        data = tomllib.loads(config.read_text())
        for mailbox in data["mailboxes"]:
            mailbox["max_message_size"] = 2 * len(message) + 2**20  # through the chain
        config.write_text(dump_toml(data))
        rss_file = work / "rss"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(rss_file),
             "--log-format", "json", "--log-level", "warning",
             "run", str(config), "--once"],
            capture_output=True, text=True, timeout=1800, cwd=work,
        )
        seconds = time.perf_counter() - started
        left = len(server.messages)
    if done.returncode != 0:
        raise SystemExit(f"mailpipe failed ({done.returncode}):\n{done.stderr[-3000:]}")
    hwm, maxrss = (int(v) for v in rss_file.read_text().split())
    return {
        "octets": len(message),
        "peak_rss_kib": hwm,
        "ru_maxrss_kib": maxrss,
        "seconds": round(seconds, 2),
        "verified": verify(work / "var", message) and left == 0,
    }


def verify(var: Path, message: bytes) -> bool:
    """One stored row with the exact raw bytes, its blob, one JSONL line."""
    db = sqlite3.connect(var / "tickets.sqlite3")
    try:
        rows = db.execute(
            "SELECT m.sha256, length(r.raw) FROM messages m JOIN message_raw r USING (key)"
        ).fetchall()
    finally:
        db.close()
    digest = hashlib.sha256(message).hexdigest()
    jsonl = var / "records.jsonl"  # absent when the message was refused or kept
    lines = jsonl.read_bytes().splitlines() if jsonl.exists() else []
    return rows == [(digest, len(message))] and len(lines) == 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=float, default=100.0,
                    help="attachment size in MB (decoded); the message is ~1.37x")
    ap.add_argument("--small", action="store_true", help="an 8 MB attachment (CI)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    size = int((8.0 if args.small else args.size) * 1_000_000)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mailpipe-memory-") as tmp:
        base = Path(tmp)
        (base / "baseline").mkdir()
        (base / "large").mkdir()
        results["baseline"] = run_once(base / "baseline", make_message(2000))
        results["large"] = run_once(base / "large", make_message(size))
    b, big = results["baseline"], results["large"]
    growth = (big["peak_rss_kib"] - b["peak_rss_kib"]) * 1024
    results["growth_over_message"] = round(growth / big["octets"], 3)
    print(f"{'run':<10} {'message MB':>10} {'peak RSS MiB':>13} {'ru_maxrss MiB':>14} "
          f"{'seconds':>8} verified")
    for name in ("baseline", "large"):
        r = results[name]
        print(f"{name:<10} {r['octets'] / 1e6:>10.1f} {r['peak_rss_kib'] / 1024:>13.1f} "
              f"{r['ru_maxrss_kib'] / 1024:>14.1f} {r['seconds']:>8.2f} {r['verified']}")
    print(f"peak RSS growth / message size: {results['growth_over_message']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if b["verified"] and big["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
