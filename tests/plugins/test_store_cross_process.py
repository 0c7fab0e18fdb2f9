"""The file stores are idempotent across processes, not only within one.

Issue 16, point 1: a worker that takes over a dead worker's mailbox must see the keys the
dead one stored after its own store opened. Each store is proven twice: with a second
instance that opened before the first one wrote (what a takeover looks like), and with
two real processes delivering the same keys at the same time.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mailpipe.plugins.store.attachments import AttachmentsOptions, AttachmentsStore
from mailpipe.plugins.store.jsonl import JsonlOptions, JsonlStore
from mailpipe.plugins.store.maildir import (
    MARKERS,
    MaildirOptions,
    MaildirStore,
    key_of,
)
from mailpipe.plugins.store.mbox import MboxOptions, MboxStore, scan

from mailpipe import Message, ProcessorContext, TemporaryFailure

RAW = (
    "From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: n{n}\r\n"
    "Message-ID: <m{n}@example.com>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    "--b\r\nContent-Type: text/plain\r\n\r\nbody {n}\r\n"
    '--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: '
    'attachment; filename="a{n}.bin"\r\n\r\npayload {n}\r\n--b--\r\n'
)


def message(n: int) -> Message:
    return Message.from_bytes(RAW.format(n=n).encode(), mailbox="box", uid=str(n))


def stores(base: Path) -> dict[str, Any]:
    """One instance of each file store on the shared paths under ``base``."""
    ctx = ProcessorContext(base_dir=base)
    return {
        "maildir": MaildirStore(MaildirOptions(path=Path("Maildir")), ctx),
        "mbox": MboxStore(MboxOptions(path=Path("box.mbox")), ctx),
        "jsonl": JsonlStore(JsonlOptions(path=Path("box.jsonl")), ctx),
        "attachments": AttachmentsStore(AttachmentsOptions(dir=Path("att")), ctx),
    }


def deliver(store: Any, m: Message) -> None:
    if hasattr(store, "open"):
        store.open()
    store.process(m)
    if hasattr(store, "flush"):
        store.flush()


def copies(base: Path, kind: str) -> collections.Counter[str]:
    """How many times each key is stored in the store ``kind``."""
    if kind == "maildir":
        return collections.Counter(
            key_of(name)
            for sub in ("new", "cur")
            for name in os.listdir(base / "Maildir" / sub)
        )
    if kind == "mbox":
        return collections.Counter(e.key for e in scan(base / "box.mbox")[0])
    if kind == "jsonl":
        lines = (base / "box.jsonl").read_text().splitlines()
        return collections.Counter(json.loads(line)["key"] for line in lines)
    manifests = (base / "att" / "manifests").iterdir()
    return collections.Counter(p.stem for p in manifests)


@pytest.mark.parametrize("kind", ["maildir", "mbox", "jsonl", "attachments"])
def test_a_key_stored_by_an_instance_that_opened_later_is_not_stored_again(
    tmp_path: Path, kind: str
) -> None:
    first, second = stores(tmp_path)[kind], stores(tmp_path)[kind]
    deliver(first, message(0))
    deliver(second, message(1))  # both open now, each has seen the other's state
    deliver(first, message(2))  # written after `second` listed/scanned the store
    deliver(second, message(2))  # the takeover: must find it
    deliver(second, message(0))
    assert copies(tmp_path, kind) == {message(n).key: 1 for n in range(3)}


def test_maildir_waits_for_a_key_being_written_then_fails_temporarily(
    tmp_path: Path,
) -> None:
    s = stores(tmp_path)["maildir"]
    s.open()
    m = message(7)
    fd = os.open(tmp_path / "Maildir" / MARKERS / m.key, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is delivering this key
        s.CLAIM_TIMEOUT = 0.05
        with pytest.raises(TemporaryFailure, match="another process"):
            s.process(m)
    finally:
        os.close(fd)
    deliver(s, m)  # the lock released: delivered now, once
    assert copies(tmp_path, "maildir") == {m.key: 1}


@pytest.mark.parametrize("stale_size", ["1", "9" * 40])
def test_maildir_redoes_a_write_whose_marker_names_a_missing_file(
    tmp_path: Path, stale_size: str
) -> None:
    """The marker then names the new file alone, also when the stale name was longer
    (the marker is emptied when it is claimed, before the new name is written)."""
    s = stores(tmp_path)["maildir"]
    s.open()
    m = message(3)
    # A writer killed after naming the file in the marker, before linking it into new/.
    (tmp_path / "Maildir" / MARKERS / m.key).write_text(
        f"1.M1P1.{m.key}.mailpipe,S={stale_size}"
    )
    deliver(s, m)
    assert copies(tmp_path, "maildir") == {m.key: 1}
    name = (tmp_path / "Maildir" / MARKERS / m.key).read_text()
    assert (tmp_path / "Maildir" / "new" / name).exists()


def test_maildir_finds_a_key_a_reader_moved_to_cur_after_the_store_opened(
    tmp_path: Path,
) -> None:
    first, second = stores(tmp_path)["maildir"], stores(tmp_path)["maildir"]
    second.open()
    m = message(4)
    deliver(first, m)
    md = tmp_path / "Maildir"
    (name,) = os.listdir(md / "new")
    os.rename(md / "new" / name, md / "cur" / f"{name}:2,S")
    deliver(second, m)
    assert copies(tmp_path, "maildir") == {m.key: 1}


_CHILD = textwrap.dedent(
    """
    import random, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_store_cross_process import deliver, message, stores

    base, seed, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    go = base / "go"
    for _ in range(2000):  # both processes start delivering together
        if go.exists():
            break
        time.sleep(0.005)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    instances = stores(base)
    for n in order:
        for store in instances.values():
            deliver(store, message(n))
    """
)


def test_two_processes_delivering_the_same_keys_store_each_once(
    tmp_path: Path,
) -> None:
    count = 60
    script = _CHILD.format(tests=str(Path(__file__).parent))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(seed), str(count)],
            stderr=subprocess.PIPE,
        )
        for seed in (1, 2)
    ]
    (tmp_path / "go").touch()
    for child in children:
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()
    expected = {message(n).key: 1 for n in range(count)}
    for kind in ("maildir", "mbox", "jsonl", "attachments"):
        assert copies(tmp_path, kind) == expected, kind


def test_maildir_syncs_the_folders_when_it_finds_a_key_another_process_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dead (or frozen) writer's rename into new/ may not be durable yet: the store
    # that finds the key and skips it must still sync the folders at its flush(),
    # before the engine acknowledges the message (review of issue 16, M1).
    import mailpipe.plugins.store.maildir as maildir_module

    first, second = stores(tmp_path)["maildir"], stores(tmp_path)["maildir"]
    first.open()
    first.process(message(7))  # written, never flushed: the process "dies" here
    first._settle(0, 0)
    synced: list[str] = []
    monkeypatch.setattr(maildir_module, "fsync_dir",
                        lambda path: synced.append(Path(path).name))
    second.open()
    second.process(message(7))
    assert copies(tmp_path, "maildir") == {message(7).key: 1}
    second.flush()
    assert synced == ["new", "cur"]
