"""Issue 20.6: peak memory of a large spooled message through parse and the stores
does not grow with the message (a bound on memory, not on time).

A 40 MB base64 attachment is written to a spool file in pieces by the child itself;
the child then runs the processors under test on it and reports its peak RSS (VmHWM)
before and after. Before the fixes the growth was ~5x the message for parse,
store.attachments and store.jsonl, and ~2x for store.sqlite on a parsed message (its
raw column was not the last of the row, so SQLite materialised the zeroblob).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mailpipe.plugins.store.sqlite import connect, open_raw

SIZE = 40_000_000

# Writes work/spool/big.eml (argv[2] octets of base64, in pieces) and defines hwm(),
# work, size and message (a spooled Message) for the test-specific part that follows.
SPOOL = textwrap.dedent(
    """
    import base64, os, sys
    from pathlib import Path

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

    work = Path(sys.argv[1])
    from mailpipe.message import Message, MessageRef
    from mailpipe.processor import ProcessorContext

    spool = work / "spool" / "big.eml"
    spool.parent.mkdir()
    with spool.open("wb") as f:
        f.write(b"From: a@b.example\\r\\nSubject: big\\r\\nMIME-Version: 1.0\\r\\n"
                b"Content-Type: multipart/mixed; boundary=zz\\r\\n\\r\\n--zz\\r\\n"
                b"Content-Type: text/plain\\r\\n\\r\\nsee attached\\r\\n--zz\\r\\n"
                b"Content-Type: application/octet-stream; name=big.bin\\r\\n"
                b"Content-Transfer-Encoding: base64\\r\\n\\r\\n")
        for _ in range(int(sys.argv[2]) // 570_000):
            f.write(base64.encodebytes(os.urandom(570_000)).replace(b"\\n", b"\\r\\n"))
        f.write(b"--zz--\\r\\n")
    size = spool.stat().st_size
    ref = MessageRef(mailbox="box", number=1, uid="u1", size=size)
    message = Message(ref=ref, spool_path=spool)
    ctx = ProcessorContext(base_dir=work, pipeline="p")
    """
)


def run_child(script: str, work: Path) -> list[str]:
    """Run ``script`` (SPOOL + a test's part) on a SIZE-octet spool; its output words."""
    done = subprocess.run(
        [sys.executable, "-c", script, str(work), str(SIZE)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


CHILD = SPOOL + textwrap.dedent(
    """
    from mailpipe.plugins.parse.processor import ParseProcessor, ParseOptions
    from mailpipe.plugins.store.attachments import AttachmentsOptions, AttachmentsStore
    from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore

    steps = [
        ParseProcessor(ParseOptions(), ctx),
        AttachmentsStore(AttachmentsOptions(dir="att"), ctx),
        JsonlStore(JsonlOptions(path="out.jsonl"), ctx),
    ]
    before = hwm()
    for step in steps:
        step.process(message)
    blobs = [p for p in (work / "att").rglob("*") if p.is_file() and p.parent.name != "manifests"]
    print(size, before, hwm(), max(p.stat().st_size for p in blobs))
    """
)


@pytest.mark.timeout(300)
def test_peak_rss_of_a_40mb_message_through_parse_and_stores_is_bounded(
    tmp_path: Path,
) -> None:
    size, before, after, blob = (int(v) for v in run_child(CHILD, tmp_path)[-4:])
    assert size > SIZE  # ~1.37x once encoded
    assert blob >= SIZE - 570_000  # the attachment was stored whole
    assert after - before < 0.5 * size, (after - before) / size


SQLITE_CHILD = SPOOL + textwrap.dedent(
    """
    from mailpipe.plugins.parse.processor import ParseProcessor, ParseOptions
    from mailpipe.plugins.store.sqlite import SqliteOptions, SqliteStore

    ParseProcessor(ParseOptions(), ctx).process(message)  # as in the default chain
    store = SqliteStore(SqliteOptions(path="mail.sqlite3"), ctx)
    store.open()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: measure the store alone
    before = hwm()
    store.process(message)
    store.close()
    print(size, before, hwm(), message.key, message.sha256)
    """
)


@pytest.mark.timeout(300)
def test_peak_rss_of_a_40mb_message_through_store_sqlite_is_bounded(
    tmp_path: Path,
) -> None:
    *figures, key, sha256 = run_child(SQLITE_CHILD, tmp_path)[-5:]
    size, before, after = (int(v) for v in figures)
    assert size > SIZE
    assert after - before < 0.5 * size, (after - before) / size
    conn = connect(tmp_path / "mail.sqlite3")
    try:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
        blob = open_raw(conn, key)
        assert blob is not None
        with blob:
            digest = hashlib.sha256()
            for chunk in iter(lambda: blob.read(1 << 20), b""):
                digest.update(chunk)
        assert digest.hexdigest() == sha256  # stored whole
    finally:
        conn.close()


# The end of each child: run ``chain`` on the spool file ``spool`` under ``work``; print
# the message size, VmHWM before and after, and the largest attachment blob.
RUN_CHAIN = textwrap.dedent(
    """
    from mailpipe.message import Message, MessageRef
    from mailpipe.plugins.parse.processor import ParseProcessor, ParseOptions
    from mailpipe.plugins.store.attachments import AttachmentsOptions, AttachmentsStore
    from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore
    from mailpipe.processor import ProcessorContext

    size = spool.stat().st_size
    ctx = ProcessorContext(base_dir=work, pipeline="p")
    make = {
        "parse": lambda: ParseProcessor(ParseOptions(), ctx),
        "attachments": lambda: AttachmentsStore(AttachmentsOptions(dir="att"), ctx),
        "jsonl": lambda: JsonlStore(JsonlOptions(path="out.jsonl"), ctx),
    }
    steps = [make[name]() for name in chain]
    ref = MessageRef(mailbox="box", number=1, uid="u1", size=size)
    message = Message(ref=ref, spool_path=spool)
    before = hwm()
    for step in steps:
        step.process(message)
    blobs = [p for p in (work / "att").rglob("*") if p.is_file() and p.parent.name != "manifests"]
    print(size, before, hwm(), max((p.stat().st_size for p in blobs), default=0))
    """
)


# Issue 20.6, "any single message": every kind of large leaf body, not only base64
# attachments. The goal is peak RSS < 64 MiB + a small multiple of the spool threshold;
# the child's growth is held to 64 MiB + 4x the default threshold. Before the spool
# covered these kinds the growth was +318 MiB (quoted-printable, 36 MiB), +116 MiB
# (8bit, 39 MiB) and +179 MiB (base64 text/plain body, 52 MiB). store.attachments
# without a parse step parses the spool file too (store.jsonl without parse still
# loads the message: its minimal record uses the stdlib's whole-message parse).
KIND_CHILD = textwrap.dedent(
    """
    import base64, os, quopri, sys
    from pathlib import Path

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) * 1024

    work, kind, n, with_parse = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"

    spool = work / "spool" / "big.eml"
    spool.parent.mkdir()
    head = (b"From: a@b.example\\r\\nSubject: big\\r\\nMIME-Version: 1.0\\r\\n"
            b"Content-Type: multipart/mixed; boundary=zz\\r\\n\\r\\n--zz\\r\\n"
            b"Content-Type: text/plain\\r\\n\\r\\nsee attached\\r\\n--zz\\r\\n")
    with spool.open("wb") as f:
        if kind == "qp":
            f.write(head + b"Content-Type: application/octet-stream; name=big.bin\\r\\n"
                    b"Content-Transfer-Encoding: quoted-printable\\r\\n\\r\\n")
            for _ in range(n // 500_000):
                f.write(quopri.encodestring(os.urandom(200_000)).replace(b"\\n", b"\\r\\n"))
        elif kind == "8bit":
            f.write(head + b"Content-Type: application/pdf; name=big.pdf\\r\\n"
                    b"Content-Transfer-Encoding: 8bit\\r\\n\\r\\n")
            for _ in range(n // 570_000):
                f.write((b"\\xe9" * 75 + b"\\r\\n") * 7500)
        else:
            f.write(head + b"Content-Type: text/plain; charset=utf-8\\r\\n"
                    b"Content-Transfer-Encoding: base64\\r\\n\\r\\n")
            for _ in range(n // 570_000):
                f.write(base64.encodebytes(b"hello world " * 47500).replace(b"\\n", b"\\r\\n"))
        f.write(b"\\r\\n--zz--\\r\\n")
    chain = ["parse", "attachments", "jsonl"] if with_parse else ["attachments"]
    """
) + RUN_CHAIN


def _threshold() -> int:
    from mailpipe.config import SchedulerConfig

    return int(SchedulerConfig().spool_threshold)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("kind", "with_parse"),
    [("qp", True), ("8bit", True), ("b64text", True), ("qp", False)],
    ids=["quoted-printable", "8bit", "base64-text-body", "quoted-printable-no-parse"],
)
def test_peak_rss_by_body_kind_is_within_the_goal(
    tmp_path: Path, kind: str, with_parse: bool
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KIND_CHILD, str(tmp_path), kind, str(SIZE),
         "1" if with_parse else "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    size, before, after, blob = (int(v) for v in done.stdout.split()[-4:])
    assert size > 30 * 2**20
    if kind != "b64text":
        assert blob > 0.9 * SIZE * (0.4 if kind == "qp" else 1)  # stored whole
    bound = 64 * 2**20 + 4 * _threshold()
    assert after - before < bound, f"+{(after - before) / 2**20:.0f} MiB"
