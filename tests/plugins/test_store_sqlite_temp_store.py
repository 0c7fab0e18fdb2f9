"""Review of issue 18's ``PRAGMA temp_store=MEMORY`` (h-hop): a statement journal in
memory is never spilled to a file, so one statement that rewrites many existing pages
holds them all in RAM. Migration 3 rewrites the whole ``messages`` table in one
statement (``ALTER TABLE messages DROP COLUMN raw``, or ``UPDATE ... SET raw = NULL``
on SQLite < 3.35): upgrading a store of version 2 must not take memory in proportion
to the database (issue 20.6: memory does not grow with the data)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

ROWS = 48
RAW = 1_000_000  # octets of raw bytes a row: ~48 MB in messages.raw before version 3

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mailpipe.plugins.store.sqlite import SCHEMA_VERSION, connect, migrate

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

    rows, size = int(sys.argv[2]), int(sys.argv[3])
    conn = connect(Path(sys.argv[1]) / "mail.sqlite3")
    migrate(conn, target=2)
    chunk = b"x" * size
    conn.execute("BEGIN IMMEDIATE")
    for i in range(rows):
        conn.execute(
            "INSERT INTO messages (key, mailbox, uid, sha256, size, parsed, record, "
            "raw, stored_at, updated_at) VALUES (?, 'box', ?, 's', ?, 1, '{}', ?, "
            "'t', 't')",
            (f"k{i}", str(i), size, chunk),
        )
    conn.execute("COMMIT")
    del chunk
    conn.close()
    conn = connect(Path(sys.argv[1]) / "mail.sqlite3")  # as the store opens it
    before = hwm()
    assert migrate(conn) == SCHEMA_VERSION
    after = hwm()
    temp_store = conn.execute("PRAGMA temp_store").fetchone()[0]
    moved = conn.execute("SELECT count(*), sum(length(raw)) FROM message_raw").fetchone()
    print(before, after, temp_store, *moved)
    """
)


def test_upgrading_a_large_version_2_store_keeps_memory_bounded(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(ROWS), str(RAW)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after, temp_store, count, total = map(
        int, done.stdout.splitlines()[-1].split()
    )
    assert (count, total) == (ROWS, ROWS * RAW)  # migration 3 moved every raw
    assert temp_store == 2  # MEMORY again for the store's own statements (issue 18)
    # With the statement journal in memory the peak grew by about the table (~50 MB).
    assert after - before < ROWS * RAW // 4, (after - before) / 1e6
