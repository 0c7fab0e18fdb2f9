"""A private view of the system for one test server: its own users, mail spool, /etc.

The Debian servers of the interop lab read compiled-in paths (``/etc/courier``,
``/run/courier``, ``/var/mail``) and look users up through NSS and PAM. Rather than
adding users to the machine or editing its ``/etc``, each server runs inside a new
mount and PID namespace (``unshare``) in which copies of ``/etc/passwd``,
``/etc/shadow`` and ``/etc/group`` with the test users, and any private directory,
are bind-mounted over the real ones. Nothing else outside the namespace changes
(except an empty chroot directory a server insists on, e.g. popa3d's
``/var/lib/popa3d``), and killing the namespace's first process ends every process
in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Sandbox", "SystemUser", "sandbox_unavailable_reason"]

UNSHARE = "/usr/bin/unshare"


def sandbox_unavailable_reason() -> str | None:
    """Why servers cannot be sandboxed here (not root, no unshare), or None."""
    if os.geteuid() != 0:
        return "the interop servers need root (they switch to their mail users)"
    if not os.access(UNSHARE, os.X_OK):
        return f"{UNSHARE} is missing (apt-get install util-linux)"
    return None


@dataclass(frozen=True, slots=True)
class SystemUser:
    """A user that exists only inside a :class:`Sandbox` (passwd + shadow + group)."""

    name: str
    uid: int
    gid: int
    home: Path
    password: str | None = None


def _hash_password(password: str) -> str:
    # SHA-512 crypt, as Debian's passwd writes it (the crypt module is deprecated).
    out = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@dataclass
class Sandbox:
    """Copies of the user databases under ``directory`` plus extra bind mounts.

    Add users with :meth:`add_user` and mounts with :meth:`bind`, then wrap a
    command with :meth:`command`: it runs as PID 1 of a fresh PID namespace (so it
    and all its children die when it dies) with the private files mounted.
    """

    directory: Path
    users: dict[str, SystemUser] = field(default_factory=dict)
    mounts: list[tuple[Path, Path]] = field(default_factory=list)
    groups: dict[str, int] = field(default_factory=dict)

    def add_user(
        self,
        name: str,
        uid: int,
        *,
        home: Path | None = None,
        password: str | None = None,
        gid: int | None = None,
        group: str | None = None,
    ) -> SystemUser:
        """Add ``name`` (and its group, by default of the same name and id)."""
        user = SystemUser(
            name=name,
            uid=uid,
            gid=uid if gid is None else gid,
            home=home or Path("/nonexistent"),
            password=password,
        )
        self.users[name] = user
        self.groups.setdefault(group or name, user.gid)
        return user

    def bind(self, source: Path, target: Path) -> None:
        """Mount ``source`` over ``target`` (which must exist) inside the namespace."""
        self.mounts.append((source, target))

    def write(self) -> None:
        """Write the passwd, shadow and group copies (call after the last add)."""
        etc = self.directory / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        passwd = Path("/etc/passwd").read_text()
        shadow = Path("/etc/shadow").read_text()
        group = Path("/etc/group").read_text()
        taken = {line.split(":", 1)[0] for line in passwd.splitlines()}
        taken_groups = {line.split(":", 1)[0] for line in group.splitlines()}
        for u in self.users.values():
            if u.name in taken:
                continue
            pw = _hash_password(u.password) if u.password is not None else "!"
            passwd += f"{u.name}:x:{u.uid}:{u.gid}::{u.home}:/usr/sbin/nologin\n"
            shadow += f"{u.name}:{pw}:19000:0:99999:7:::\n"
        for name, gid in self.groups.items():
            if name not in taken_groups:
                group += f"{name}:x:{gid}:\n"
        for fname, text, mode in (
            ("passwd", passwd, 0o644),
            ("shadow", shadow, 0o640),
            ("group", group, 0o644),
        ):
            (etc / fname).write_text(text)
            (etc / fname).chmod(mode)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace with every mount in place."""
        etc = self.directory / "etc"
        mounts = [(etc / f, Path("/etc") / f) for f in ("passwd", "shadow", "group")]
        mounts += self.mounts
        script = " && ".join(
            f"mount --bind {_q(str(src))} {_q(str(dst))}" for src, dst in mounts
        )
        return [
            UNSHARE,
            "--mount",
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--mount-proc",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'{script} && exec "$@"',
            "sandbox",
            *argv,
        ]


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """``chown -R uid:gid path`` (numeric ids: the names exist only in the sandbox)."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` (a fresh directory), keeping modes."""
    shutil.copytree(src, dst, symlinks=True)
