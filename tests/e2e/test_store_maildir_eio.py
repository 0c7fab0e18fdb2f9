"""store.maildir's syncfs group commit against a real write-back error.

A small ext4 on a loop device: the store stages messages (unnamed, not written back),
then the device shrinks under the file system so that every write-back fails with EIO.
The group's one syncfs must report it: flush() fails, nothing is named in new/ (so
the engine sends no DELE), the keys' markers are released. Needs root (losetup,
mount); skipped otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import mailpipe.plugins.store._syncfs as syncfs_module
import pytest
from mailpipe.plugins.store.maildir import MARKERS, MaildirOptions, MaildirStore

from mailpipe import Message, ProcessorContext, TemporaryFailure


def _run(*argv: str) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """(mount point, backing image, loop device) of a fresh 64 MB ext4."""
    if os.geteuid() != 0 or not all(
        shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount", "umount")
    ):
        pytest.skip("needs root with losetup, mkfs.ext4 and mount")
    if not syncfs_module.available():
        pytest.skip("syncfs does not report write-back errors here")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    _run("mkfs.ext4", "-q", "-F", str(image))
    try:
        loop = _run("losetup", "-f", "--show", str(image))
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device: {exc.stderr.strip()}")
    try:
        _run("mount", "-o", "errors=continue", loop, str(mnt))
        try:
            yield mnt, image, loop
        finally:
            subprocess.run(["umount", str(mnt)], timeout=60, check=False)
    finally:
        for _ in range(10):  # bounded: a device just unmounted may still be busy
            done = subprocess.run(["losetup", "-d", loop], timeout=60, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.2)


def test_a_write_back_eio_fails_the_group_and_names_nothing(
    loop_ext4: tuple[Path, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    mnt, image, loop = loop_ext4
    synced: list[int] = []
    real_sync = syncfs_module.syncfs

    def syncfs(fd: int) -> None:
        synced.append(fd)
        real_sync(fd)

    monkeypatch.setattr(syncfs_module, "syncfs", syncfs)
    s = MaildirStore(
        MaildirOptions.model_validate({"path": "Maildir"}),
        ProcessorContext(base_dir=mnt),
    )
    s.open()
    try:
        assert s._by_syncfs
        os.sync()  # the folders and markers' directory are on the device
        ms = [
            Message.from_bytes(b"Subject: %d\r\n\r\n" % i + b"y" * 100_000, uid=str(i))
            for i in range(3)
        ]
        for m in ms:
            s.process(m)
        # Every block past the first MB now fails: the staged pages cannot be written.
        with open(image, "r+b") as f:
            f.truncate(1 << 20)
        _run("losetup", "-c", loop)
        # EIO from syncfs itself: had its result been ignored, the links would fail
        # with EROFS instead (ext4 turns read-only once its journal write fails).
        with pytest.raises(TemporaryFailure, match=os.strerror(errno.EIO)):
            s.flush()
        assert len(synced) == 1
        md = mnt / "Maildir"
        assert os.listdir(md / "new") == []
        for m in ms:  # released: the key can be delivered again (by a retry)
            fd = os.open(md / MARKERS / m.key, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
    finally:
        s.close()  # (an open descriptor would keep the mount busy)
