"""store.maildir on the real file system: delivery, idempotency, crash leftovers."""

from __future__ import annotations

import mailbox
import os
import time
from pathlib import Path

import mailpipe.plugins.store.maildir as maildir_module
import pytest
from mailpipe.plugins.store.maildir import (
    MaildirOptions,
    MaildirStore,
    file_name,
    key_of,
)
from pydantic import ValidationError

from mailpipe import Message, ProcessorContext, TemporaryFailure
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


@pytest.mark.parametrize("mechanism", ["staged", "threads"])
def test_a_failed_background_write_fails_flush_then_reaches_its_own_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mechanism: str
) -> None:
    """Both write-behind mechanisms: unnamed files staged until flush() (O_TMPFILE,
    the default) and writer threads (without O_TMPFILE, or spooled messages)."""
    import errno

    import mailpipe.plugins.store.maildir as maildir_module

    from mailpipe import PermanentFailure

    bad = Message.from_bytes(RAW + b"bad\r\n", uid="bad")
    good = Message.from_bytes(RAW, uid="good")
    real = maildir_module.MaildirStore._write
    broken = [True]

    def write(self: MaildirStore, name: str, chunks: object) -> int:
        if isinstance(chunks, maildir_module._Staged):  # an unnamed staged file
            data = os.pread(chunks.fd, chunks.size + 1, 0)
            if broken[0] and data == bad.raw:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(self, name, chunks)
        data = b"".join(chunks)  # type: ignore[call-overload]
        if broken[0] and data == bad.raw:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(self, name, [data])

    monkeypatch.setattr(maildir_module.MaildirStore, "_write", write)
    s = store(tmp_path)
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
    each); flush() names them all."""
    s = store(tmp_path)
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


def test_staged_file_is_fsynced_before_it_is_linked_into_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    s = store(tmp_path)
    for i in range(3):
        s.process(Message.from_bytes(RAW + b"%d\r\n" % i, uid=str(i)))
    s.flush()
    s.close()
    links = [ino for kind, ino in events if kind == "link"]
    if not links:
        skip_or_fail("no O_TMPFILE linking here")  # in CI: staging must be in use
    for ino in links:
        assert events.index(("fsync", ino)) < events.index(("link", ino))
