"""store.maildir on the real file system: delivery, idempotency, crash leftovers."""

from __future__ import annotations

import errno
import fcntl
import mailbox
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import mailpipe.plugins.store._maildir_group as group_module
import mailpipe.plugins.store._syncfs as syncfs_module
import mailpipe.plugins.store.maildir as maildir_module
import pytest
from mailpipe.plugins.store.maildir import (
    MARKERS,
    MaildirOptions,
    MaildirStore,
    file_name,
    key_of,
)
from pydantic import ValidationError

from mailpipe import LATER, Message, ProcessorContext, TemporaryFailure
from mailpipe.testing.pytest_plugin import skip_or_fail

RAW = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: Maildir\r\n"
    b"Message-ID: <m1@example.com>\r\n\r\nFirst line\r\n.dot line\r\nFrom me\r\n"
)


def store(tmp_path: Path, *, dry_run: bool = False, **options: object) -> MaildirStore:
    opts = MaildirOptions.model_validate({"path": "Maildir", **options})
    s = MaildirStore(opts, ProcessorContext(base_dir=tmp_path, dry_run=dry_run))
    s.open()
    return s


def deliver(s: MaildirStore, m: Message) -> None:
    """process() then flush(): with group_commit (the default) the file is written by
    a background thread and is only promised at flush()."""
    s.process(m)
    s.flush()


def listing(folder: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(folder / sub)) for sub in ("cur", "new", "tmp")}


def test_delivers_into_new_with_exact_bytes(tmp_path: Path) -> None:
    m = Message.from_bytes(RAW, mailbox="support", uid="1")
    deliver(store(tmp_path), m)
    md = tmp_path / "Maildir"
    (name,) = os.listdir(md / "new")
    assert key_of(name) == m.key and name.endswith(f".mailpipe,S={len(RAW)}")
    assert listing(md) == {"cur": [], "new": [name], "tmp": []}
    assert (md / "new" / name).read_bytes() == RAW
    box = mailbox.Maildir(md, create=False)
    assert [box.get_bytes(k) for k in box.iterkeys()] == [RAW]


def test_rerun_writes_nothing_twice(tmp_path: Path) -> None:
    m = Message.from_bytes(RAW, mailbox="support", uid="1")
    s = store(tmp_path)
    deliver(s, m)
    (path,) = (tmp_path / "Maildir" / "new").iterdir()
    before = path.stat()
    deliver(s, m)
    deliver(store(tmp_path), m)  # a new process after a crash
    after = path.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert listing(tmp_path / "Maildir")["new"] == [path.name]


def test_a_message_moved_to_cur_by_a_reader_is_not_delivered_again(
    tmp_path: Path,
) -> None:
    m = Message.from_bytes(RAW, mailbox="support", uid="1")
    deliver(store(tmp_path), m)
    md = tmp_path / "Maildir"
    (name,) = os.listdir(md / "new")
    os.rename(md / "new" / name, md / "cur" / f"{name}:2,S")
    deliver(store(tmp_path), m)
    assert listing(md) == {"cur": [f"{name}:2,S"], "new": [], "tmp": []}


def test_a_tmp_file_left_by_a_crash_is_ignored_then_cleaned(tmp_path: Path) -> None:
    m = Message.from_bytes(RAW, mailbox="support", uid="1")
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    torn = md / "tmp" / file_name(m.key, len(RAW))
    torn.write_bytes(RAW[:20])  # the crash hit before fsync and link
    foreign = md / "tmp" / "1700000000.M1P2.otherhost"
    foreign.write_bytes(b"another agent's delivery")

    deliver(store(tmp_path), m)  # fresh: the leftover is not taken for a delivery
    (delivered,) = (md / "new").iterdir()
    assert delivered.name != torn.name and delivered.read_bytes() == RAW
    assert sorted(os.listdir(md / "tmp")) == sorted([torn.name, foreign.name])

    old = time.time() - 37 * 3600
    for p in (torn, foreign):
        os.utime(p, (old, old))
    store(tmp_path)  # open cleans our own stale tmp files only
    assert os.listdir(md / "tmp") == [foreign.name]


def test_folder_is_a_maildir_plus_plus_subfolder(tmp_path: Path) -> None:
    m = Message.from_bytes(RAW, mailbox="support", uid="1")
    deliver(store(tmp_path, folder="Archive.2025"), m)
    sub = tmp_path / "Maildir" / ".Archive.2025"
    assert (sub / "maildirfolder").exists()
    assert [key_of(n) for n in listing(sub)["new"]] == [m.key]


@pytest.mark.parametrize("folder", ["../evil", ".hidden", "a/b", "a..b", ""])
def test_unsafe_folder_names_are_rejected(folder: str) -> None:
    with pytest.raises(ValidationError):
        MaildirOptions.model_validate({"path": "Maildir", "folder": folder})


def test_unwritable_maildir_is_a_temporary_failure(tmp_path: Path) -> None:
    (tmp_path / "Maildir").write_bytes(b"not a folder")
    opts = MaildirOptions(path=Path("Maildir"))
    s = MaildirStore(opts, ProcessorContext(base_dir=tmp_path))
    with pytest.raises(TemporaryFailure):
        s.process(Message.from_bytes(RAW, uid="1"))


def test_names_follow_arrival_order(tmp_path: Path) -> None:
    s = store(tmp_path)
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(20)]
    for m in ms:
        s.process(m)
    s.flush()
    box = mailbox.Maildir(tmp_path / "Maildir", create=False)
    # Maildir unique names start "<sec>.M<usec>": the order Dovecot numbers them in.
    names = sorted(
        os.listdir(tmp_path / "Maildir" / "new"),
        key=lambda n: (int(n.split(".")[0]), int(n.split(".")[1][1:7])),
    )
    assert [key_of(n) for n in names] == [m.key for m in ms]
    assert sorted(box.get_bytes(k) for k in box.iterkeys()) == sorted(m.raw for m in ms)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    s = store(tmp_path, dry_run=True)
    s.process(Message.from_bytes(RAW, uid="1"))
    assert not (tmp_path / "Maildir").exists()


@pytest.mark.parametrize("group_commit", [True, False])
def test_new_dir_is_fsynced_per_group_or_per_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_commit: bool
) -> None:
    import mailpipe.plugins.store.maildir as maildir_module

    synced: list[str] = []
    real = maildir_module.fsync_dir
    monkeypatch.setattr(
        maildir_module, "fsync_dir", lambda p: (synced.append(Path(p).name), real(p))
    )
    s = store(tmp_path, group_commit=group_commit)
    for i in range(3):
        s.process(Message.from_bytes(RAW + f"n{i}\r\n".encode()))
    assert synced.count("new") == (0 if group_commit else 3)
    s.flush()
    s.flush()  # nothing new: no second fsync
    assert synced.count("new") == (1 if group_commit else 3)
    assert len(listing(tmp_path / "Maildir")["new"]) == 3


@pytest.mark.parametrize("mechanism", ["staged", "syncfs", "threads"])
def test_a_failed_background_write_fails_flush_then_reaches_its_own_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    """Every write-behind mechanism: unnamed files staged until flush() (O_TMPFILE),
    made durable by an fsync each (sync = "file") or one syncfs (the default where it
    reports errors), and writer threads (without O_TMPFILE, or spooled messages)."""
    import errno

    import mailpipe.plugins.store.maildir as maildir_module

    from mailpipe import PermanentFailure

    bad = Message.from_bytes(RAW + b"bad\r\n", uid="bad")
    good = Message.from_bytes(RAW, uid="good")
    real = maildir_module.MaildirStore._write
    broken = [True]

    def write(self: MaildirStore, name: str, chunks: object) -> int:
        if isinstance(chunks, group_module._Staged):  # an unnamed staged file
            data = os.pread(chunks.fd, chunks.size + 1, 0)
            if broken[0] and data == bad.raw:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(self, name, chunks)
        data = b"".join(chunks)  # type: ignore[call-overload]
        if broken[0] and data == bad.raw:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(self, name, [data])

    real_link = maildir_module.MaildirStore._link_staged

    def link_staged(self: MaildirStore, item: group_module._Staged) -> None:
        if broken[0] and os.pread(item.fd, item.size + 1, 0) == bad.raw:
            raise OSError(errno.EINVAL, "Invalid argument")
        real_link(self, item)

    monkeypatch.setattr(maildir_module.MaildirStore, "_write", write)
    monkeypatch.setattr(maildir_module.MaildirStore, "_link_staged", link_staged)
    s = store(tmp_path, sync="auto" if mechanism == "syncfs" else "file")
    if mechanism == "syncfs" and not s._by_syncfs:
        skip_or_fail("syncfs does not report write-back errors here")
    if mechanism == "threads":
        s.TMPFILE = False
    s.process(good)
    s.process(bad)  # handed to the writer thread: no error yet
    with pytest.raises(PermanentFailure, match="Invalid argument"):
        s.flush()  # the group is not durable: the engine deletes none of it
    md = tmp_path / "Maildir"
    assert [key_of(n) for n in listing(md)["new"]] == [good.key]
    s.flush()  # reported once
    # Next poll: the key whose write failed is written inline, so the error is
    # attributed to that message (an attempt, then quarantine) and not to the group.
    with pytest.raises(PermanentFailure, match="Invalid argument"):
        s.process(bad)
    deliver(s, good)  # already stored: not written twice
    broken[0] = False
    deliver(s, bad)
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted([good.key, bad.key])
    assert listing(md)["tmp"] == []


def test_staged_writes_are_bounded_and_close_publishes_them(tmp_path: Path) -> None:
    """Unnamed files wait for flush() with their markers locked (two descriptors
    each): beyond MAX_HELD octets, process() publishes them (fsync, link into new/)."""
    s = store(tmp_path)
    s.MAX_HELD = 2 * (len(RAW) + 3)  # two of the messages below
    md = tmp_path / "Maildir"
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(3)]
    s.process(ms[0])
    assert listing(md)["new"] == [] and len(s._staged) == 1  # unnamed until flush
    s.process(ms[1])  # the bound: both published now
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms[:2])
    assert s._staged == []
    s.process(ms[2])
    assert len(s._staged) == 1
    s.close()  # publishes what is staged; nothing left behind in tmp/
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    assert listing(md)["tmp"] == []
    assert s._anonymous is True


def test_unnamed_files_are_bounded_by_batch_and_batches_in_flight(
    tmp_path: Path,
) -> None:
    """Fewer than BATCH files staged and at most MAX_BATCHES batches in flight after
    any process(): under BATCH * (MAX_BATCHES + 1) unnamed files (two descriptors
    each); flush() names them all (the per-file fsync path)."""
    s = store(tmp_path, sync="file")
    s.BATCH, s.MAX_BATCHES = 2, 1
    md = tmp_path / "Maildir"
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(7)]
    for m in ms:
        s.process(m)
        assert len(s._staged) < s.BATCH
        assert len(s._publishing) <= s.MAX_BATCHES
    assert s._anonymous is True
    s.flush()
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    s.close()


def test_background_writes_are_bounded_and_close_waits_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer threads (no O_TMPFILE; spooled messages) are bounded too."""
    import threading

    import mailpipe.plugins.store.maildir as maildir_module

    real = maildir_module.MaildirStore._write
    release = threading.Event()
    calls: list[int] = []

    def slow_write(self: MaildirStore, name: str, chunks: object) -> int:
        calls.append(1)
        assert release.wait(10)
        return real(self, name, chunks)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module.MaildirStore, "_write", slow_write)
    s = store(tmp_path)
    s.TMPFILE = False  # through the writer threads
    s.MAX_WRITES = 2
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(3)]
    s.process(ms[0])
    s.process(ms[1])
    third = threading.Thread(target=s.process, args=(ms[2],))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # two writes in flight: the third process() waits
    release.set()
    third.join(10)
    assert not third.is_alive()
    s.close()  # waits for the writer; nothing left behind in tmp/
    md = tmp_path / "Maildir"
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    assert listing(md)["tmp"] == []


def _spooled(tmp_path: Path, data: bytes, uid: str) -> Message:
    from mailpipe import MessageRef

    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    path = spool / f"pop3-{uid}.eml"
    path.write_bytes(data)
    path.chmod(0o600)
    ref = MessageRef(mailbox="support", number=1, uid=uid, size=len(data))
    return Message(ref=ref, spool_path=path)


@pytest.mark.parametrize("linkable", [True, False])
def test_a_spooled_message_is_delivered_without_a_copy_when_it_can_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linkable: bool
) -> None:
    import errno

    big = RAW + b"x" * 100_000 + b"\r\n"
    m = _spooled(tmp_path, big, "big")
    spool_inode = m.spool_path.stat().st_ino  # type: ignore[union-attr]
    if not linkable:  # e.g. the spool on another file system: copied instead

        def no_link(*a: object, **k: object) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    s = store(tmp_path)
    s.process(m)
    m.spool_path.unlink()  # type: ignore[union-attr]  # the engine's _unspool
    s.flush()
    md = tmp_path / "Maildir"
    (name,) = listing(md)["new"]
    stored = md / "new" / name
    assert stored.read_bytes() == big and key_of(name) == m.key
    assert (stored.stat().st_ino == spool_inode) is linkable
    umask = os.umask(0)
    os.umask(umask)
    assert stored.stat().st_mode & 0o777 == 0o644 & ~umask
    assert listing(md)["tmp"] == []


@pytest.mark.parametrize("how", ["tmpfile", "no-o-tmpfile", "no-proc-link"])
def test_in_memory_messages_are_written_unnamed_or_through_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """O_TMPFILE + linkat into new/ where the system allows it (nothing named in tmp/
    at any time, inode allocation outside tmp/'s lock); tmp/ + rename otherwise, with
    the same bytes (the fallback decides once per store)."""
    import errno

    real_link = os.link
    if how == "no-o-tmpfile":
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    elif how == "no-proc-link":

        def link(src: str, dst: object, **kw: object) -> None:
            if str(src).startswith("/proc/self/fd/"):
                raise OSError(errno.ENOENT, "No such file or directory")
            real_link(src, dst, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "link", link)
    s = store(tmp_path)
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(5)]
    for m in ms:
        s.process(m)
    s.flush()
    md = tmp_path / "Maildir"
    box = mailbox.Maildir(md, create=False)
    assert sorted(box.get_bytes(k) for k in box.iterkeys()) == sorted(m.raw for m in ms)
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    assert listing(md)["tmp"] == []
    assert s._anonymous is (how == "tmpfile")
    umask = os.umask(0)
    os.umask(umask)
    for name in listing(md)["new"]:
        assert (md / "new" / name).stat().st_mode & 0o777 == 0o644 & ~umask
    s.close()


def test_a_full_disk_while_staging_fails_the_group_not_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20 item 9 with staged writes: ENOSPC in process() is kept for flush()
    (a failed group commit), the key is not taken for stored, and the next attempt
    writes it inline so a lasting error reaches its own message."""
    import errno

    import mailpipe.plugins.store.maildir as maildir_module

    real = maildir_module.write_all
    full = [True]

    def write_all(fd: int, chunks: object) -> int:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, chunks)  # type: ignore[arg-type]

    import mailpipe.plugins.store._fs as fs_module

    monkeypatch.setattr(maildir_module, "write_all", write_all)
    monkeypatch.setattr(group_module, "write_all", write_all)  # (staged writes)
    monkeypatch.setattr(fs_module, "write_all", write_all)
    s = store(tmp_path)
    m = Message.from_bytes(RAW, uid="1")
    s.process(m)  # no error yet: the group fails at flush()
    with pytest.raises(TemporaryFailure, match="No space left"):
        s.flush()
    md = tmp_path / "Maildir"
    assert listing(md)["new"] == [] and listing(md)["tmp"] == []
    with pytest.raises(TemporaryFailure, match="No space left"):
        s.process(m)  # inline now: the message's own failure
    full[0] = False
    deliver(s, m)
    assert [key_of(n) for n in listing(md)["new"]] == [m.key]
    s.close()


@pytest.mark.parametrize("how", ["sync-file", "kernel-5.4"])
def test_staged_file_is_fsynced_before_it_is_linked_into_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The per-file path: chosen (sync = "file"), or where syncfs does not report
    write-back errors (auto on a kernel before 5.8)."""
    if how == "kernel-5.4":
        monkeypatch.setattr(os, "uname", _uname("5.4.0-150-generic"))
    events: list[tuple[str, object]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def link(src, dst, *a, **kw):  # type: ignore[no-untyped-def]
        if str(src).startswith("/proc/self/fd/"):
            events.append(("link", os.fstat(int(str(src).rsplit("/", 1)[1])).st_ino))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(maildir_module.os, "fsync", fsync)
    monkeypatch.setattr(maildir_module.os, "link", link)
    s = store(tmp_path, sync="file" if how == "sync-file" else "auto")
    assert not s._by_syncfs
    for i in range(3):
        s.process(Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)))
    s.flush()
    s.close()
    links = [ino for kind, ino in events if kind == "link"]
    if not links:
        skip_or_fail("no O_TMPFILE linking here")  # in CI: staging must be in use
    for ino in links:
        assert events.index(("fsync", ino)) < events.index(("link", ino))


# --- One syncfs per group (sync = "auto" where syncfs reports write-back errors) ---


def _uname(release: str) -> Callable[[], os.uname_result]:
    real = os.uname()
    fake = os.uname_result(
        (real.sysname, real.nodename, release, real.version, real.machine)
    )
    return lambda: fake


def syncfs_store(tmp_path: Path, **options: object) -> MaildirStore:
    s = store(tmp_path, **options)
    if not s._by_syncfs:
        skip_or_fail("syncfs does not report write-back errors here")  # in CI: it must
    return s


@pytest.mark.parametrize(
    ("release", "reports"),
    [
        ("5.8.0", True),
        ("5.7.19-generic", False),
        ("6.18.44-fc-v1272", True),
        ("4.19.0", False),
        ("10.0", True),
        ("unknown", False),
    ],
)
def test_syncfs_is_trusted_from_linux_5_8(release: str, reports: bool) -> None:
    assert syncfs_module.release_reports_errors(release) is reports


def test_syncfs_raises_the_kernel_errno(tmp_path: Path) -> None:
    if not syncfs_module.available():
        skip_or_fail("syncfs does not report write-back errors here")
    fd = syncfs_module.open_handle(tmp_path)
    try:
        syncfs_module.syncfs(fd)  # a real sync of tmp_path's file system
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        syncfs_module.syncfs(fd)  # closed
    assert info.value.errno == errno.EBADF


def test_before_linux_5_8_auto_falls_back_to_an_fsync_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "uname", _uname("5.4.0-150-generic"))
    synced: list[int] = []
    monkeypatch.setattr(syncfs_module, "syncfs", synced.append)
    s = store(tmp_path)
    assert s.options.sync == "auto" and not s._by_syncfs
    for i in range(3):
        s.process(Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)))
    s.flush()
    assert synced == [] and len(listing(tmp_path / "Maildir")["new"]) == 3
    assert s._writer is not None  # the fsyncs ran on the writer threads
    s.close()


def test_a_group_is_synced_once_before_any_of_its_files_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The descriptor syncfs reports through is opened before the group's first
    write (errseq samples at open); one syncfs, while new/ is still empty; then the
    links; then new/ fsynced once. No file is fsynced and no writer thread runs."""
    md = tmp_path / "Maildir"
    events: list[tuple[str, object]] = []
    real_open, real_sync = syncfs_module.open_handle, syncfs_module.syncfs
    real_write, real_fsync, real_link = maildir_module.write_all, os.fsync, os.link

    def open_handle(path: Path) -> int:
        events.append(("open", None))
        return real_open(path)

    def syncfs(fd: int) -> None:
        events.append(("syncfs", tuple(os.listdir(md / "new"))))
        real_sync(fd)

    def write_all(fd: int, chunks: object) -> int:
        events.append(("write", None))
        return real_write(fd, chunks)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def link(src, dst, *a, **kw):  # type: ignore[no-untyped-def]
        events.append(("link", None))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(syncfs_module, "open_handle", open_handle)
    monkeypatch.setattr(syncfs_module, "syncfs", syncfs)
    monkeypatch.setattr(maildir_module, "write_all", write_all)
    monkeypatch.setattr(group_module, "write_all", write_all)  # (staged writes)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    s = syncfs_store(tmp_path)
    events.clear()  # (open() created and fsynced the folders)
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(5)]
    for m in ms:
        s.process(m)
    assert listing(md)["new"] == []  # unnamed until the group is durable
    s.flush()
    assert events == (
        [("open", None)]
        + [("write", None)] * 5
        + [("syncfs", ())]
        + [("link", None)] * 5
        + [("fsync", "dir")]
    )
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    assert s._writer is None
    s.close()


def test_a_failed_syncfs_names_nothing_and_fails_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from syncfs (a write-back of the group failed): no file of the group is
    named in new/, the markers are released, flush() fails (so the engine sends no
    DELE) and each key is written inline (fsync per file) on its next attempt."""
    calls: list[int] = []

    def syncfs(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(syncfs_module, "syncfs", syncfs)
    s = syncfs_store(tmp_path)
    md = tmp_path / "Maildir"
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(3)]
    for m in ms:
        s.process(m)
    with pytest.raises(TemporaryFailure, match="Input/output error"):
        s.flush()
    assert len(calls) == 1
    assert listing(md) == {"cur": [], "new": [], "tmp": []}
    for m in ms:  # released: another process may deliver the key now
        fd = os.open(md / MARKERS / m.key, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    s.flush()  # reported once
    for m in ms:
        deliver(s, m)  # inline: fsynced on its own, no syncfs
    assert len(calls) == 1
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    s.close()


def test_a_group_holds_at_most_group_files_unnamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beyond GROUP_FILES staged files, process() syncs and names them: the
    descriptors a group holds (two a file, plus the group's and those of tmp/, new/
    and the markers' directory) stay bounded, and close() releases them all."""
    synced: list[int] = []
    real_sync = syncfs_module.syncfs
    monkeypatch.setattr(
        syncfs_module, "syncfs", lambda fd: (synced.append(fd), real_sync(fd))[1]
    )
    fds_before = len(os.listdir("/proc/self/fd"))
    s = syncfs_store(tmp_path)
    s.GROUP_FILES = 3
    md = tmp_path / "Maildir"
    ms = [Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in range(7)]
    for m in ms:
        s.process(m)
        assert len(s._staged) < s.GROUP_FILES
        held = len(os.listdir("/proc/self/fd")) - fds_before
        assert held <= 2 * (s.GROUP_FILES - 1) + 4
    assert len(synced) == 2 and len(listing(md)["new"]) == 6
    s.flush()
    assert len(synced) == 3
    assert sorted(key_of(n) for n in listing(md)["new"]) == sorted(m.key for m in ms)
    s.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_the_sync_option_names_what_it_accepts(tmp_path: Path) -> None:
    from mailpipe.app import load_config
    from mailpipe.errors import ConfigError

    assert MaildirOptions.model_validate({"path": "M", "sync": "file"}).sync == "file"
    text = '[pipelines.default]\nprocessors = [{ use = "store.maildir", path = "M", sync = "fs" }]\n'
    (tmp_path / "pipeline.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "pipeline.toml")
    assert "processors[0].sync: Input should be 'auto' or 'file' (got \"fs\")" in str(
        info.value
    )


async def test_a_failed_syncfs_means_no_dele(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P-09 through the engine: the group whose syncfs failed is not acknowledged;
    the next poll stores it (inline) and deletes it."""
    from mailpipe.testing.fakes import FakeSource, fake_runner

    if not syncfs_module.available():
        skip_or_fail("syncfs does not report write-back errors here")
    failing = [True]
    real_sync = syncfs_module.syncfs

    def syncfs(fd: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    monkeypatch.setattr(syncfs_module, "syncfs", syncfs)
    FakeSource.boxes.pop("sbox", None)
    runner = fake_runner(
        tmp_path, [{"use": "store.maildir", "path": "md"}], MaildirStore, mailbox="sbox"
    )
    box = runner.source.box
    try:
        for i in range(3):
            box.add(f"u{i}", RAW + b"%d\r\n" % i)
        await runner.poll()
        assert "dele" not in [c[0] for c in box.calls] and len(box.messages) == 3
        assert listing(tmp_path / "md")["new"] == []
        failing[0] = False
        await runner.poll()
        assert box.messages == {} and len(listing(tmp_path / "md")["new"]) == 3
    finally:
        FakeSource.boxes.pop("sbox", None)


def test_the_file_system_type_is_read_from_mountinfo(tmp_path: Path) -> None:
    dev = os.stat(tmp_path).st_dev
    me = f"{os.major(dev)}:{os.minor(dev)}"
    mountinfo = (
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"61 27 {me} / /var/lib/x rw,relatime shared:1 master:2 - overlay overlay "
        "rw,lowerdir=/l,upperdir=/u,workdir=/w\n"
    )
    assert syncfs_module.file_system_type(tmp_path, mountinfo) == "overlay"
    assert syncfs_module.file_system_type(
        tmp_path, f"27 1 {me} / / rw - ext4 /dev/vda rw\n"
    ) == "ext4"
    # Btrfs: st_dev is the subvolume's, not the mount's: the innermost mount point
    # holding the path decides (escaped as mountinfo escapes a space).
    real = os.path.realpath(tmp_path)
    inner = real.replace(" ", "\\040")
    assert syncfs_module.file_system_type(
        tmp_path,
        "27 1 9:9 / / rw - ext4 /dev/vda rw\n"
        f"28 27 0:99 / {inner} rw - btrfs /dev/vdb rw\n"
        "29 27 0:98 / /elsewhere rw - xfs /dev/vdc rw\n",
    ) == "btrfs"
    assert syncfs_module.file_system_type(
        tmp_path, "29 1 9:9 / /elsewhere rw - ext4 x rw\n"
    ) is None
    if syncfs_module.available():  # this machine's own: a real type
        assert syncfs_module.file_system_type(tmp_path) is not None


@pytest.mark.parametrize("fs_type", ["overlay", "fuse.sshfs", "virtiofs", "nfs4", None])
def test_auto_keeps_an_fsync_per_file_where_syncfs_misses_write_back_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs_type: str | None
) -> None:
    """An overlay's syncfs checks the overlay's errseq, not its upper layer's where
    the EIO is recorded; FUSE, 9p and NFS need not pass a syncfs to their server:
    there, as before 5.8, each file is fsynced (which reports its EIO)."""
    if not syncfs_module.available():
        skip_or_fail("syncfs does not report write-back errors here")
    monkeypatch.setattr(syncfs_module, "file_system_type", lambda path: fs_type)
    synced: list[int] = []
    monkeypatch.setattr(syncfs_module, "syncfs", synced.append)
    s = store(tmp_path)
    assert s.options.sync == "auto" and not s._by_syncfs
    for i in range(3):
        s.process(Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)))
    s.flush()
    assert synced == [] and len(listing(tmp_path / "Maildir")["new"]) == 3
    s.close()


def test_a_staged_key_stays_locked_against_other_processes_until_it_is_named(
    tmp_path: Path,
) -> None:
    """Issue 16: the marker of a key staged for the group's syncfs stays flock-ed
    until the file is named in new/, so another process (here, an instance with its
    own descriptors) delivering the same key waits, and after the flush finds it."""
    s = syncfs_store(tmp_path)
    other = store(tmp_path)
    other.CLAIM_TIMEOUT = 0.05
    md = tmp_path / "Maildir"
    m = Message.from_bytes(RAW + b"locked\r\n", uid="locked")
    s.process(m)
    assert listing(md)["new"] == []  # staged, unnamed
    with pytest.raises(TemporaryFailure, match="another process"):
        other.process(m)
    fd = os.open(md / MARKERS / m.key, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        s.flush()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # named: released
    finally:
        os.close(fd)
    deliver(other, m)  # finds it: not written twice
    assert [key_of(n) for n in listing(md)["new"]] == [m.key]
    s.close()
    other.close()


async def test_a_group_failing_inside_process_acknowledges_no_unnamed_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two mailboxes share the store; a group fills up inside process() and its
    syncfs fails there (not in flush()). Whatever mailbox's flush reports it, no
    message whose file is not named in new/ is deleted; the next polls store each
    message once and delete it."""
    import asyncio

    from mailpipe.chain import Chain
    from mailpipe.engine import MailboxRunner
    from mailpipe.journal.sqlite import SqliteJournal
    from mailpipe.message import MessageRef
    from mailpipe.plugin_manager import Hooks, get_plugin_manager
    from mailpipe.quarantine import Quarantine
    from mailpipe.registry import Registry
    from mailpipe.testing.fakes import FakeSource
    from mailpipe.validation import validate_config

    if not syncfs_module.available():
        skip_or_fail("syncfs does not report write-back errors here")
    monkeypatch.setattr(MaildirStore, "GROUP_FILES", 2)
    calls: list[bool] = []
    real_sync = syncfs_module.syncfs

    def syncfs(fd: int) -> None:
        import traceback

        calls.append(any(f.name == "_deliver" for f in traceback.extract_stack()))
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(fd)

    monkeypatch.setattr(syncfs_module, "syncfs", syncfs)
    names = ("sa", "sb")
    for n in names:
        FakeSource.boxes.pop(n, None)
    registry = Registry()
    registry.add("source", FakeSource, "test")
    registry.add("processor", MaildirStore, "test")
    data = {
        "mailboxes": [{"name": n, "source": "fake", "pipeline": "p"} for n in names],
        "pipelines": {"p": {"processors": [{"use": "store.maildir", "path": "md"}]}},
        "quarantine": {"dir": str(tmp_path / "q")},
    }
    config = validate_config(data, path=tmp_path / "pipeline.toml", registry=registry)
    chain = Chain(config.pipelines, base_dir=tmp_path)
    journal = SqliteJournal(tmp_path / "journal.sqlite3")
    runners = [
        MailboxRunner(
            spec, config=config, chain=chain, journal=journal,
            quarantine=Quarantine(tmp_path / "q"),
            hooks=Hooks(get_plugin_manager(entry_points=False)),
        )
        for spec in config.mailboxes
    ]
    try:
        for r in runners:
            for i in range(3):
                r.source.box.add(f"u{i}", RAW + b"%s %d\r\n" % (r.name.encode(), i))

        def named() -> set[str]:
            return {key_of(n) for n in listing(tmp_path / "md")["new"]} - {None}

        await asyncio.wait_for(asyncio.gather(*(r.poll() for r in runners)), 30)
        assert calls and calls[0], "the failing syncfs ran inside process()"
        for r in runners:
            for i in range(3):
                uid = f"u{i}"
                if uid not in r.source.box.messages:  # DELE'd: must be named
                    key = MessageRef(mailbox=r.name, number=0, uid=uid, size=0).key
                    assert key in named(), f"{r.name}/{uid} deleted, never named"
        for _ in range(2):
            await asyncio.wait_for(asyncio.gather(*(r.poll() for r in runners)), 30)
        assert all(r.source.box.messages == {} for r in runners)
        new = [key_of(n) for n in listing(tmp_path / "md")["new"]]
        assert len(new) == len(set(new)) == 6
    finally:
        await chain.close()
        for n in names:
            FakeSource.boxes.pop(n, None)


# -- process_nowait: the staged path on the event loop (issue 18, RESULTS §30) --------


def test_process_nowait_stages_like_process_and_flush_names_it(tmp_path: Path) -> None:
    s = syncfs_store(tmp_path)
    md = tmp_path / "Maildir"
    first, second = (Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)) for i in (1, 2))
    assert s.process_nowait(first) is None  # staged here, nothing named yet
    assert listing(md)["new"] == [] and len(s._staged) == 1
    assert s.process_nowait(first) is LATER  # a key met before: process() decides
    s.flush()
    assert s.process_nowait(second) is None
    assert [key_of(n) for n in listing(md)["new"]] == [first.key]
    assert len(s._staged) == 1
    s.flush()
    names = listing(md)["new"]
    assert sorted(key_of(n) for n in names) == sorted([first.key, second.key])
    (name,) = [n for n in names if key_of(n) == second.key]
    assert (md / "new" / name).read_bytes() == second.raw
    assert (md / MARKERS / second.key).read_text() == name
    assert s.process_nowait(second) is LATER  # stored: process() logs and syncs
    s.close()


def test_process_nowait_never_waits_for_a_marker_another_writer_holds(
    tmp_path: Path,
) -> None:
    s = syncfs_store(tmp_path)
    md = tmp_path / "Maildir"
    warm = Message.from_bytes(RAW + b"warm\r\n", uid="warm")
    deliver(s, warm)
    m = Message.from_bytes(RAW, uid="held")
    other = os.open(md / MARKERS / m.key, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert s.process_nowait(m) is LATER  # at once: _claim would wait 5 s
        assert s._staged == []
    finally:
        os.close(other)
    (md / MARKERS / m.key).write_bytes(b"1.M1P1.stale,S=1")
    assert s.process_nowait(m) is LATER  # names an earlier write: the thread decides
    assert s._staged == []
    s.close()


@pytest.mark.parametrize(
    "case",
    ["group_full", "octets", "file_sync", "dry_run", "spooled", "no_tmpfile", "large"],
)
def test_process_nowait_leaves_every_other_path_to_the_thread(
    tmp_path: Path, case: str
) -> None:
    options: dict[str, object] = {"sync": "file"} if case == "file_sync" else {}
    s = store(tmp_path, dry_run=case == "dry_run", **options)
    if case not in ("file_sync", "dry_run") and not s._by_syncfs:
        skip_or_fail("syncfs does not report write-back errors here")
    m = Message.from_bytes(RAW, uid="m")
    if case == "group_full":
        s.GROUP_FILES = 1  # this message would fill the group: its syncfs waits
    if case == "octets":
        s.MAX_HELD = len(RAW)
    if case == "no_tmpfile":
        s.TMPFILE = False
    if case == "large":  # a long write on the loop (write-back throttling): the thread
        m = Message.from_bytes(RAW + b"x" * (2 << 20), uid="m")  # 2 MiB
    if case == "spooled":
        spool = tmp_path / "spool.eml"
        spool.write_bytes(RAW)
        m = Message(ref=m.ref, spool_path=spool)
    assert s.process_nowait(m) is LATER
    assert s._staged == []
    if case != "dry_run":
        assert listing(tmp_path / "Maildir")["new"] == []
    s.close()


def test_a_maildir_replaced_while_open_fails_the_flush_then_is_used(tmp_path: Path) -> None:
    """Names are resolved from kept descriptors of tmp/, new/ and the markers'
    directory: a Maildir moved away and made again while the store is open must not
    get its group acknowledged (written into the moved one, whose new/ flush() does
    not sync); the flush fails, and the message is stored again in the new one."""
    s = store(tmp_path)
    md = tmp_path / "Maildir"
    m = Message.from_bytes(RAW, uid="moved")
    s.process(m)
    md.rename(tmp_path / "Maildir.old")
    for sub in ("cur", "new", "tmp", MARKERS):
        (md / sub).mkdir(parents=True)
    with pytest.raises(TemporaryFailure, match="replaced"):
        s.flush()
    deliver(s, m)  # the retry: listed again, stored in the Maildir at the path
    assert [key_of(n) for n in listing(md)["new"]] == [m.key]
    s.close()


def test_process_nowait_after_a_close_between_its_checks_and_its_lock(
    tmp_path: Path,
) -> None:
    """A close() on another thread between process_nowait's first checks and its
    taking of the store's lock leaves the message to process() (which opens the
    store again): nothing staged on a closed store, no marker left locked."""
    s = syncfs_store(tmp_path)
    m = Message.from_bytes(RAW, uid="closing")
    real = s._lock

    class ClosedMeanwhile:
        def acquire(self, blocking: bool = True) -> bool:
            s._lock = real
            s.close()  # completes just before the lock is taken
            return real.acquire(blocking)

    s._lock = ClosedMeanwhile()  # type: ignore[assignment]
    assert s.process_nowait(m) is LATER
    assert s._staged == [] and s._dir_fds == {}
    deliver(s, m)
    assert [key_of(n) for n in listing(tmp_path / "Maildir")["new"]] == [m.key]
    s.close()


def test_process_nowait_checks_the_group_bound_under_the_lock(tmp_path: Path) -> None:
    """A call abandoned on a thread (past the budget) may stage a file between
    process_nowait's first checks and its taking of the store's lock: the group
    bound is checked again, so a group never exceeds GROUP_FILES unpublished."""
    s = syncfs_store(tmp_path)
    s.GROUP_FILES = 3
    s.process(Message.from_bytes(RAW + b"0\r\n", uid="0"))  # one staged: room for one
    real = s._lock

    class StagedMeanwhile:
        def acquire(self, blocking: bool = True) -> bool:
            s._lock = real
            s.process(Message.from_bytes(RAW + b"1\r\n", uid="1"))  # the group: 2 of 3
            return real.acquire(blocking)

    s._lock = StagedMeanwhile()  # type: ignore[assignment]
    assert s.process_nowait(Message.from_bytes(RAW + b"2\r\n", uid="2")) is LATER
    assert len(s._staged) == 2
    s.flush()
    s.close()
