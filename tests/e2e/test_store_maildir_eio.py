"""store.maildir's syncfs group commit against a real write-back error.

A small ext4 on a loop device: the store stages messages (unnamed, not written back),
then the device shrinks under the file system so that every write-back fails with EIO.
The group's one syncfs must report it: flush() fails, nothing is named in new/ (so
the engine sends no DELE), the keys' markers are released. With a journal, ext4's own
commit fails too; without one only the data write-back fails, which syncfs reports
through the superblock's errseq alone. On an overlay whose upper layer is that ext4,
the overlay's syncfs does not see the upper's errseq: the store must not trust it
there (an fsync per file reports the EIO). Needs root (losetup, mount): skipped
otherwise, failing instead when env ``CI`` is set.
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
from mailpipe.testing.pytest_plugin import skip_or_fail


def _run(*argv: str) -> str:
    return subprocess.run(
        argv, check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], timeout=60, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], timeout=60, check=False)


@pytest.fixture(params=["journal", "no-journal"])
def loop_ext4(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Path, Path, str]]:
    """(mount point, backing image, loop device) of a fresh 64 MB ext4, with or
    without a journal."""
    if os.geteuid() != 0 or not all(
        shutil.which(t) for t in ("losetup", "mkfs.ext4", "mount", "umount")
    ):
        skip_or_fail("needs root with losetup, mkfs.ext4 and mount")
    if not syncfs_module.available():
        skip_or_fail("syncfs does not report write-back errors here")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    features = ["-O", "^has_journal"] if request.param == "no-journal" else []
    _run("mkfs.ext4", "-q", "-F", *features, str(image))
    try:
        loop = _run("losetup", "-f", "--show", str(image))
    except subprocess.CalledProcessError as exc:
        skip_or_fail(f"no loop device: {exc.stderr.strip()}")
    try:
        _run("mount", "-o", "errors=continue", loop, str(mnt))
        try:
            yield mnt, image, loop
        finally:
            _umount(mnt)  # (lazily if busy: never a mount left behind)
    finally:
        for _ in range(10):  # bounded: a device just unmounted may still be busy
            done = subprocess.run(["losetup", "-d", loop], timeout=60, check=False)
            if done.returncode == 0:
                break
            time.sleep(0.2)


@pytest.fixture
def overlay_on_ext4(
    loop_ext4: tuple[Path, Path, str], tmp_path: Path
) -> Iterator[tuple[Path, Path, str]]:
    """(overlay mount point, backing image, loop device): an overlayfs whose upper
    layer is on the loop ext4."""
    mnt, image, loop = loop_ext4
    for d in ("lower", "upper", "work"):
        (mnt / d).mkdir()
    ovl = tmp_path / "ovl"
    ovl.mkdir()
    try:
        _run(
            "mount", "-t", "overlay", "overlay", "-o",
            f"lowerdir={mnt}/lower,upperdir={mnt}/upper,workdir={mnt}/work", str(ovl),
        )
    except subprocess.CalledProcessError as exc:
        skip_or_fail(f"no overlayfs: {exc.stderr.strip()}")
    try:
        yield ovl, image, loop
    finally:
        _umount(ovl)


def _store(base: Path) -> MaildirStore:
    s = MaildirStore(
        MaildirOptions.model_validate({"path": "Maildir"}),
        ProcessorContext(base_dir=base),
    )
    s.open()
    return s


def _fail_the_device(image: Path, loop: str) -> None:
    """Every block past the first MB now fails: staged pages cannot be written."""
    with open(image, "r+b") as f:
        f.truncate(1 << 20)
    _run("losetup", "-c", loop)


def _messages() -> list[Message]:
    return [
        Message.from_bytes(b"Subject: %d\r\n\r\n" % i + b"y" * 100_000, uid=str(i))
        for i in range(3)
    ]


def _assert_released(md: Path, ms: list[Message]) -> None:
    for m in ms:  # released: the key can be delivered again (by a retry)
        fd = os.open(md / MARKERS / m.key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


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
    s = _store(mnt)
    try:
        assert s._by_syncfs
        os.sync()  # the folders and markers' directory are on the device
        ms = _messages()
        for m in ms:
            s.process(m)
        _fail_the_device(image, loop)
        # EIO from syncfs itself. With a journal, ext4 also turns read-only (the
        # links would fail with EROFS); without one, the links would succeed: only
        # syncfs's result (the superblock's errseq) stands between the lost pages
        # and their names in new/.
        with pytest.raises(TemporaryFailure, match=os.strerror(errno.EIO)):
            s.flush()
        assert len(synced) == 1
        md = mnt / "Maildir"
        assert os.listdir(md / "new") == []
        _assert_released(md, ms)
    finally:
        s.close()  # (an open descriptor would keep the mount busy)


@pytest.mark.parametrize("loop_ext4", ["no-journal"], indirect=True)
def test_on_an_overlay_a_write_back_eio_still_fails_the_group(
    overlay_on_ext4: tuple[Path, Path, str],
) -> None:
    """The overlay's syncfs returns 0 after its upper layer lost the pages (the
    upper's errseq records the EIO, not the overlay's): the store must make the
    files durable by an fsync each there, which reports it."""
    ovl, image, loop = overlay_on_ext4
    s = _store(ovl)
    try:
        os.sync()
        ms = _messages()
        for m in ms:
            s.process(m)
        _fail_the_device(image, loop)
        with pytest.raises(TemporaryFailure, match=os.strerror(errno.EIO)):
            s.flush()
        md = ovl / "Maildir"
        assert os.listdir(md / "new") == []  # no name for a lost page
        _assert_released(md, ms)
    finally:
        s.close()
