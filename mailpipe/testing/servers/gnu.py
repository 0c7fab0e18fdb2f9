"""GNU Mailutils 3.15 pop3d (Debian ``mailutils-pop3d``): mbox, USER/PASS and APOP.

Installed with apt (it does not Conflict with dovecot-pop3d) and started in the
foreground with a private configuration: plaintext + STLS on ``pop3_port``, implicit
TLS on ``pop3s_port``, the APOP secret in a ``popauth`` database, the mailbox an
mbox in the lab's home. It offers no SASL. It writes ``X-UIDL``, ``X-IMAPbase``,
``X-UID`` and ``Status`` headers into the mbox on the first session that opens it
(:data:`STAMPED_HEADERS`), so served messages carry them; ``IMPLEMENTATION`` shows
in CAPA only after login.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from .base import MAIL_UID, LabServer
from .mailboxes import write_mbox

__all__ = ["STAMPED_HEADERS", "GnuPop3d"]

#: Headers GNU pop3d adds to each message of the mbox it serves.
STAMPED_HEADERS: tuple[bytes, ...] = (b"X-UIDL", b"X-IMAPbase", b"X-UID", b"Status")
POP3D = "/usr/sbin/pop3d"


class GnuPop3d(LabServer):
    """GNU pop3d on 127.0.0.1 (STLS on ``pop3_port``, TLS on ``pop3s_port``)."""

    name = "gnu"
    title = "GNU Mailutils 3.15 pop3d"
    apt_packages = ("mailutils-pop3d", "util-linux")
    session_process = "pop3d"
    auth_methods = ("user", "apop")
    starttls = True
    implicit_tls = True

    @property
    def mbox(self) -> str:
        """The user's mbox."""
        return str(self.home / "mbox")

    def _configure(self) -> list[str]:
        b, t = self.base_dir, self.tls_dir
        plain = b / "apop.txt"
        plain.write_text(f"{self.user.name} {self.user.apop_secret}\n")
        subprocess.run(
            ["popauth", "-c", "-f", str(plain), "-o", str(b / "apop")],
            check=True,
            capture_output=True,
        )
        write_mbox(self.home / "mbox", [], uid=MAIL_UID, gid=MAIL_UID)
        conf = b / "pop3d.conf"
        conf.write_text(
            f"""# Written by mailpipe.testing.servers.gnu
mode daemon;
foreground true;
pidfile "{b}/pop3d.pid";
max-children 20;
logging {{ syslog false; print-severity true; }};
auth {{ authentication generic:system; authorization system; }};
mailbox {{ mailbox-pattern "mbox://{self.mbox}"; }};
tls-file-checks {{ key-file none; cert-file none; ca-file none; }};
tls {{
  ssl-certificate-file "{t}/cert.pem";
  ssl-key-file "{t}/key.pem";
  ssl-ca-file "{t}/ca.pem";
}};
apop-database-file "{b}/apop";
apop-database-safety none;
tcp-wrappers {{ enable false; }};
server {self.host}:{self.pop3_port} {{ tls-mode stls; }};
server {self.host}:{self.pop3s_port} {{ tls-mode connection; }};
mandatory-locking {{ enable false; }};
"""
        )
        return [POP3D, f"--config-file={conf}"]

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        write_mbox(self.home / "mbox", messages, uid=MAIL_UID, gid=MAIL_UID)
        return []
