"""Courier 1.0.16 pop3d (Debian ``courier-pop``, unpacked): Maildir, authlib userdb.

``courierpop3login`` + ``courierpop3d`` under ``couriertcpd`` (plaintext + STLS on
``pop3_port``; implicit TLS through ``couriertls`` on ``pop3s_port``). Authentication
goes through ``authdaemond`` with the ``authuserdb`` module; the userdb entry holds
crypt and HMAC-MD5/SHA1/SHA256 passwords, so PLAIN, LOGIN and CRAM-MD5 work (mailpipe
has no CRAM-SHA*). Courier's compiled-in ``/etc/courier`` and ``/run/courier`` are
private copies bind-mounted in the sandbox, so the machine's are never touched.

Quirks recorded by the interop suite: it advertises ``UTF8 USER`` (RFC 6856) and,
until a client sends ``UTF8``, serves each message with 8-bit headers as a
``message/global`` notice ("Cannot display Unicode content"); it advertises
``LOGIN-DELAY 10`` (only advisory here).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from .base import MAIL_UID, LabServer
from .mailboxes import write_maildir
from .packages import staged

__all__ = ["NOTICE_SUBJECT", "Courier"]

#: The subject of the notice Courier serves instead of a message with 8-bit headers.
NOTICE_SUBJECT = b"Cannot display Unicode content"
AUTHLIB = "/usr/lib/courier/courier-authlib"
MECHANISMS = "PLAIN LOGIN CRAM-MD5 CRAM-SHA1 CRAM-SHA256"


class Courier(LabServer):
    """Courier pop3d on 127.0.0.1 (STLS on ``pop3_port``, TLS on ``pop3s_port``)."""

    name = "courier"
    title = "Courier 1.0.16 pop3d"
    packages = ("courier-pop",)
    apt_packages = (
        "courier-authlib",
        "courier-authlib-userdb",
        "courier-base",
        "libcourier-unicode4",
        "util-linux",
    )
    session_process = "courierpop3d"
    session_ends_with_connection = True
    auth_methods = ("user", "plain", "login", "cram-md5")
    starttls = True
    implicit_tls = True

    #: Courier's ``LOGIN-DELAY`` (seconds) advertised in CAPA.
    login_delay = 10

    @property
    def maildir(self) -> Path:
        """The user's Maildir."""
        return self.home / "Maildir"

    def _configure(self) -> list[str]:
        b = self.base_dir
        etc, run = b / "etc-courier", b / "run-courier"
        if not etc.exists():
            shutil.copytree("/etc/courier", etc, symlinks=True)
            rc = etc / "authdaemonrc"
            lines = [
                ln
                for ln in rc.read_text().splitlines()
                if not ln.startswith(("authmodulelist=", "daemons="))
            ]
            rc.write_text(
                "\n".join([*lines, 'authmodulelist="authuserdb"', "daemons=2", ""])
            )
            (run / "authdaemon").mkdir(parents=True)
            shutil.chown(run / "authdaemon", "courier", "courier")
            (run / "authdaemon").chmod(0o750)
            self.sandbox.bind(etc, Path("/etc/courier"))
            self.sandbox.bind(run, Path("/run/courier"))
        write_maildir(self.maildir, [], uid=MAIL_UID, gid=MAIL_UID)
        pop = staged("courier-pop") / "usr/lib/courier/courier"
        pw = shlex.quote(self.user.password)
        u = self.user.name
        env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "POP3AUTH": MECHANISMS,
            "POP3AUTH_TLS": MECHANISMS,
            "POP3_PROXY": "0",
            "POP3_STARTTLS": "YES",
            "POP3_TLS_REQUIRED": "0",
            "COURIERTLS": "/usr/bin/couriertls",
            "TLS_CERTFILE": str(self.tls_dir / "combined.pem"),
            "TLS_DHPARAMS": "/etc/courier/dhparams.pem",
            "TLS_TRUSTCERTS": str(self.ca_file),
            "TLS_VERIFYPEER": "NONE",
            "MAILDIRPATH": str(self.maildir),
        }
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())

        def tcpd(port: int, extra: str, wrap: str) -> str:
            return (
                f"env -i {envs} {extra} /usr/sbin/couriertcpd -address={self.host} "
                f"-maxprocs=40 -maxperip=40 -nodnslookup -noidentlookup "
                f"{port} {wrap} "
                f"{pop}/courierpop3login {pop}/courierpop3d {self.maildir}"
            )

        userdb = " && ".join(
            [
                "rm -f /etc/courier/userdb && touch /etc/courier/userdb",
                "chmod 600 /etc/courier/userdb",
                f"userdb {u} set uid={MAIL_UID} gid={MAIL_UID} home={self.home} "
                f"mail={self.maildir}",
                *(
                    f"printf '%s\\n%s\\n' {pw} {pw} | userdbpw {flag} | "
                    f"userdb {u} set {field}"
                    for flag, field in (
                        ("-md5", "systempw"),
                        ("-hmac-md5", "hmac-md5pw"),
                        ("-hmac-sha1", "hmac-sha1pw"),
                        ("-hmac-sha256", "hmac-sha256pw"),
                    )
                ),
                "makeuserdb",
            ]
        )
        script = "\n".join(
            [
                "set -e",
                userdb,
                f"env -i {AUTHLIB}/authdaemond &",
                "for i in $(seq 100); do "
                "[ -S /run/courier/authdaemon/socket ] && break; sleep 0.05; done",
                tcpd(
                    self.pop3s_port,
                    "POP3_TLS=1 POP3_STARTTLS=NO",
                    "/usr/bin/couriertls -server -tcpd -user=courier",
                )
                + " &",
                "exec " + tcpd(self.pop3_port, "", ""),
            ]
        )
        return ["sh", "-c", script]

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        write_maildir(self.maildir, messages, uid=MAIL_UID, gid=MAIL_UID)
        return []
