"""popa3d 1.0.3 (Debian ``popa3d``): mbox ``/var/mail/USER``, PAM, USER/PASS only.

Run inetd-style under socat; the compiled-in spool ``/var/mail`` is a private
directory bind-mounted in the sandbox, and its chroot ``/var/lib/popa3d`` must exist
(empty). It has no CAPA, no TLS and no SASL; implicit TLS is a socat ``OPENSSL``
listener in front of it, as an stunnel would be. Its UIDLs are a hash of a few
headers (RFC 1939 lets a server reuse one once the first message is gone).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from .base import MAIL_UID, LabServer
from .mailboxes import write_mbox
from .packages import staged
from .socat import socat_inetd, socat_tls_front

__all__ = ["Popa3d"]


class Popa3d(LabServer):
    """popa3d on 127.0.0.1: ``pop3_port`` plaintext, ``pop3s_port`` TLS via socat."""

    name = "popa3d"
    title = "popa3d 1.0.3"
    packages = ("popa3d",)
    apt_packages = ("socat", "util-linux")
    session_process = "usr/sbin/popa3d"
    session_ends_with_connection = True
    auth_methods = ("user",)
    implicit_tls = True
    capa = False

    @property
    def spool(self) -> Path:
        """The private ``/var/mail``."""
        return self.base_dir / "spool"

    def _configure(self) -> list[str]:
        self.spool.mkdir(exist_ok=True)
        self.spool.chmod(0o1777)
        Path("/var/lib/popa3d").mkdir(parents=True, exist_ok=True)  # chroot, empty
        self.sandbox.add_user("popa3d", MAIL_UID + 1, home=Path("/var/lib/popa3d"))
        if not self.sandbox.mounts:
            self.sandbox.bind(self.spool, Path("/var/mail"))
        write_mbox(self.spool / self.user.name, [], uid=MAIL_UID, gid=MAIL_UID)
        binary = staged("popa3d") / "usr/sbin/popa3d"
        front = socat_tls_front(self, f"TCP:{self.host}:{self.pop3_port}")
        plain = shlex.join(socat_inetd(self, str(binary)))
        return ["sh", "-c", f"{front} & exec {plain}"]

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        write_mbox(self.spool / self.user.name, messages, uid=MAIL_UID, gid=MAIL_UID)
        return []
