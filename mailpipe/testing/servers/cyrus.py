"""Cyrus IMAP 3.6.1 pop3d (Debian ``cyrus-common`` + ``cyrus-pop3d``, unpacked).

Cyrus ``master`` runs pop3d (plaintext + STLS on ``pop3_port``, implicit TLS on
``pop3s_port``) and lmtpd (a unix socket) from a private configuration directory.
Users live in a private sasldb (PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256;
APOP allowed); mail is delivered through LMTP, as an MTA would. The ``cyrus`` user
Cyrus switches to exists only in the sandbox. Set ``popminpoll`` (minutes) to make
Cyrus enforce a minimum time between logins (``LOGIN-DELAY``, RFC 2449).
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .base import EVERY_PASSWORD_AUTH, MAIL_UID, LabServer, LabUser
from .packages import CYRUS_LIBRARIES, staged
from .sandbox import chown_tree

__all__ = ["Cyrus"]

CYRUS_UID = MAIL_UID + 2
MAIL_GID = 8  # Debian's "mail" group
MECHANISMS = "PLAIN LOGIN CRAM-MD5 SCRAM-SHA-1 SCRAM-SHA-256"


class Cyrus(LabServer):
    """Cyrus pop3d on 127.0.0.1 (STLS on ``pop3_port``, TLS on ``pop3s_port``)."""

    name = "cyrus"
    title = "Cyrus IMAP 3.6.1 pop3d"
    packages = ("cyrus-common", "cyrus-pop3d")
    apt_packages = (*CYRUS_LIBRARIES, "util-linux")
    session_process = "pop3d -"
    auth_methods = EVERY_PASSWORD_AUTH
    starttls = True
    implicit_tls = True

    def __init__(
        self, base_dir: str | os.PathLike[str] | None = None, *, popminpoll: int = 0
    ) -> None:
        super().__init__(base_dir)
        self.popminpoll = popminpoll
        # APOP checks the sasldb password.
        self.user = LabUser(self.user.name, self.user.password, self.user.password)

    @property
    def config(self) -> Path:
        """The generated ``imapd.conf``."""
        return self.base_dir / "cyrus" / "imapd.conf"

    @property
    def lmtp_socket(self) -> Path:
        """lmtpd's unix socket."""
        return self.base_dir / "cyrus" / "socket" / "lmtp"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LD_LIBRARY_PATH": str(staged("cyrus-common") / "usr/lib/x86_64-linux-gnu"),
        }

    def _configure(self) -> list[str]:
        y = self.base_dir / "cyrus"
        self.sandbox.add_user("cyrus", CYRUS_UID, gid=MAIL_GID, group="mail")
        bindir = y / "bin"
        for sub in ("bin", "spool", "socket", "run", "lib", "tls"):
            (y / sub).mkdir(parents=True, exist_ok=True)
        for sub in (
            "db",
            "socket",
            "proc",
            "log",
            "msg",
            "user",
            "quota",
            "sieve",
            "lock",
            "ptclient",
            "sync",
        ):
            (y / "lib" / sub).mkdir(parents=True, exist_ok=True)
        for pkg in self.packages:
            for exe in (staged(pkg) / "usr/lib/cyrus/bin").iterdir():
                link = bindir / exe.name
                if not link.exists():
                    link.symlink_to(exe)
        for f in ("cert.pem", "key.pem", "ca.pem"):
            (y / "tls" / f).write_bytes((self.tls_dir / f).read_bytes())
        self.config.write_text(
            f"""configdirectory: {y}/lib
partition-default: {y}/spool
service_path: {bindir}
admins: cyrus
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {y}/sasldb2
sasl_mech_list: {MECHANISMS}
allowplaintext: yes
allowapop: yes
popminpoll: {self.popminpoll}
unixhierarchysep: yes
autocreate_post: 1
autocreate_quota: 0
lmtpsocket: {self.lmtp_socket}
idlesocket: {y}/socket/idle
notifysocket: {y}/socket/notify
mboxname_lockpath: {y}/lib/lock
proc_path: {y}/run/proc
tls_server_cert: {y}/tls/cert.pem
tls_server_key: {y}/tls/key.pem
tls_client_ca_file: {y}/tls/ca.pem
munge8bit: no
reject8bit: no
duplicatesuppression: no
"""
        )
        (y / "cyrus.conf").write_text(
            f"""START {{
  recover cmd="{bindir}/ctl_cyrusdb -r -C {self.config}"
}}
SERVICES {{
{self._services(bindir)}
  lmtpunix cmd="{bindir}/lmtpd -C {self.config}" listen="{self.lmtp_socket}" prefork=0 maxchild=4
}}
EVENTS {{
  checkpoint cmd="{bindir}/ctl_cyrusdb -c -C {self.config}" period=30
}}
"""
        )
        sasldb = y / "sasldb2"
        for user in (self.user.name, "cyrus"):
            subprocess.run(
                [
                    "saslpasswd2",
                    "-p",
                    "-c",
                    "-f",
                    str(sasldb),
                    "-u",
                    socket.gethostname(),
                    user,
                ],
                input=self.user.password.encode(),
                check=True,
                capture_output=True,
            )
        chown_tree(y, CYRUS_UID, MAIL_GID)
        sasldb.chmod(0o640)
        y.chmod(0o750)
        master = bindir / "master"
        return [
            "env",
            f"LD_LIBRARY_PATH={self._env()['LD_LIBRARY_PATH']}",
            str(master),
            "-C",
            str(self.config),
            "-M",
            str(y / "cyrus.conf"),
            "-p",
            str(y / "master.pid"),
        ]

    def _services(self, bindir: Path) -> str:
        """The ``cyrus.conf`` lines of the mail services (lmtpd is always there)."""
        return (
            f'  pop3 cmd="{bindir}/pop3d -C {self.config}" '
            f'listen="{self.host}:{self.pop3_port}" prefork=0 maxchild=20\n'
            f'  pop3s cmd="{bindir}/pop3d -s -C {self.config}" '
            f'listen="{self.host}:{self.pop3s_port}" prefork=0 maxchild=20'
        )

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        refused = []
        lmtp: smtplib.LMTP | None = None
        try:
            for i, raw in enumerate(messages):
                # An MTA speaks CRLF; smtplib would add a line to an LF ending.
                data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                data = data if data.endswith(b"\r\n") else data + b"\r\n"
                if lmtp is None:
                    lmtp = smtplib.LMTP(str(self.lmtp_socket), timeout=60)
                try:
                    lmtp.sendmail("sender@example.org", [self.user.name], data)
                except smtplib.SMTPDataError:  # e.g. 554 5.6.0 invalid header
                    refused.append(i)
                    lmtp.close()  # lmtpd may hang up after refusing
                    lmtp = None
        finally:
            if lmtp is not None:
                lmtp.quit()
        return refused
