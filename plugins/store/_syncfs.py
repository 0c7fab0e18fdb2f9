"""syncfs(2), used only where it reports the write-back errors of what it syncs.

``syncfs(fd)`` writes back and waits for every dirty page and inode of the file system
holding ``fd``. Before Linux 5.8 it returned 0 whatever happened to the write-back (see
syncfs(2), BUGS), so an EIO on a file it synced went unseen; since 5.8 the file
system keeps an error sequence (errseq) per superblock, sampled when ``fd`` is opened,
and ``syncfs`` reports EIO (or ENOSPC, EDQUOT) when a write-back failed on that file
system after the sample. A caller therefore opens ``fd`` *before* the writes it wants
covered and syncs through it: a write-back error on any of them is reported.

An error already recorded but never reported when ``fd`` is opened is reported too
(errseq returns 0 for an unseen error), so a failure older than the writes can fail
them once: conservative, never the other way round.

The errseq checked is that of the superblock ``fd`` is on, and only file systems whose
write-back records a failure in their own superblock (``mapping_set_error``) are
covered: not overlayfs, whose files' pages belong to the upper file system (a
write-back EIO there leaves the overlay's errseq untouched: its syncfs returns 0 where
an fsync of the file reports EIO), nor FUSE, 9p or NFS, whose syncfs need not reach
the server that an fsync reaches. :func:`reports_errors_on` admits only the local file
systems known to record them (:data:`REPORTING_FILE_SYSTEMS`).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

#: The first Linux release whose syncfs reports write-back errors (errseq per
#: superblock: "vfs: track per-sb writeback errors and report them to syncfs").
REPORTS_ERRORS_SINCE = (5, 8)
_RELEASE = re.compile(r"^(\d+)\.(\d+)")


def release_reports_errors(release: str) -> bool:
    """Whether a Linux ``release`` string (``os.uname().release``) is one whose
    syncfs reports write-back errors; False for a release it cannot read."""
    m = _RELEASE.match(release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= REPORTS_ERRORS_SINCE


@cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """libc's syncfs, or None. ctypes is imported here, at the first store open,
    not at start-up; the process's own symbols (dlopen(NULL)) include libc's."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "syncfs", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


#: File system types (``/proc/self/mountinfo``) whose syncfs reports a failed
#: write-back of a file's data: block file systems that record it in their own
#: superblock's errseq; tmpfs has no write-back (neither syncfs nor fsync can fail).
REPORTING_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs"})


def file_system_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (``ext4``, ``overlay``...), from
    ``mountinfo`` (``/proc/self/mountinfo`` by default): the mount whose device is
    ``path``'s, else (Btrfs reports a subvolume's own device in ``st_dev``, not the
    mount's) the innermost mount whose mount point holds ``path``; None when
    mountinfo cannot be read or names neither."""
    dev = os.stat(path).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    real = os.path.realpath(path)
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        rest = fields[fields.index("-", 6) + 1:]
        if not rest:
            continue
        if fields[2] == wanted:
            return rest[0]
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # the later on top
            best = (len(point), rest[0])
    return best[1] if best is not None else None


_OCTAL = re.compile(r"\\([0-7]{3})")


def reports_errors_on(path: Path) -> bool:
    """Whether a syncfs through a descriptor on ``path``'s file system reports a
    failed write-back of a file there (see the module doc): the file system's type
    is one of :data:`REPORTING_FILE_SYSTEMS`."""
    return file_system_type(path) in REPORTING_FILE_SYSTEMS


def available() -> bool:
    """Whether :func:`syncfs` can be relied on here: Linux ≥ 5.8 and a libc that
    has the call (read on each call, so a test can change the release)."""
    return (
        sys.platform.startswith("linux")
        and release_reports_errors(os.uname().release)
        and _libc_syncfs() is not None
    )


def open_handle(path: Path) -> int:
    """A descriptor on the file system of ``path`` (a directory) to sync through;
    open it before the writes the sync must cover (the errseq sample)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def syncfs(fd: int) -> None:
    """syncfs(2) on ``fd``'s file system; OSError with the kernel's errno on failure
    (EIO: a write-back since ``fd`` was opened failed). The GIL is released."""
    fn = _libc_syncfs()
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")  # see available()
    if fn(fd) != 0:
        import ctypes  # (already loaded by _libc_syncfs)

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
