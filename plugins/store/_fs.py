"""Durable file writes for the stores: fsync, atomic replace, error classification."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from mailpipe.errors import MailpipeError, PermanentFailure, TemporaryFailure

#: errno values that describe the environment, not the message: retrying later (after an
#: operator frees space, fixes permissions or remounts) can succeed, so the message must
#: stay on the server without counting an attempt.
TEMPORARY_ERRNOS = frozenset(
    {
        errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EBUSY,
        errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR,
        errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ESTALE, errno.ETIMEDOUT,
        errno.EINTR, errno.ENOLCK, errno.EDEADLK,
    }
)


def classify_os_error(exc: OSError, what: str) -> MailpipeError:
    """Return a TemporaryFailure for environment errors, else a PermanentFailure."""
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno in TEMPORARY_ERRNOS:
        return TemporaryFailure(detail)
    return PermanentFailure(detail)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created, renamed or removed are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents, fsyncing each parent that gained one."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # a concurrent writer created it
        fsync_dir(d.parent)


def tmp_name(stem: str) -> str:
    """Return a unique temporary file name ``.<stem>.<pid>.<random>.tmp``."""
    return f".{stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp"


def write_all(fd: int, chunks: Iterable[bytes]) -> int:
    """Write every chunk to ``fd`` (short writes resumed); return octets written."""
    written = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.write(fd, view)
            written += n
            view = view[n:]
    return written


def write_fsync(path: Path, chunks: Iterable[bytes], *, mode: int = 0o644) -> int:
    """Create ``path`` exclusively, write ``chunks``, fsync; return octets written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        written = write_all(fd, chunks)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    return written


def atomic_write(
    path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644
) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path``
    and fsyncs the directory: after a crash ``path`` holds the old or the new content.
    """
    tmp = path.with_name(tmp_name(path.name))
    write_fsync(tmp, [data] if isinstance(data, bytes) else data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def publish(tmp: Path, final: Path) -> bool:
    """Move the fsynced file ``tmp`` to ``final`` unless it exists; fsync the directory.

    Uses ``link`` (which never overwrites) and falls back to ``rename`` on file systems
    without hard links. Returns False, and removes ``tmp``, when ``final`` existed.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        os.unlink(tmp)
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK):
            raise
        if final.exists():
            os.unlink(tmp)
            return False
        os.rename(tmp, final)
    else:
        os.unlink(tmp)
    fsync_dir(final.parent)
    return True
