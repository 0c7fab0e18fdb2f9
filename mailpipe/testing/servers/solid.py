"""solid-pop3d 0.15 (Debian ``solid-pop3d``): Maildir, PAM, USER/PASS and APOP.

Run inetd-style under socat with a private ``spop3d.conf`` (bulletins off, the
Maildir in the lab's home); the APOP secret is the user's ``~/.spop3d`` written by
the package's ``pop_auth``. No CAPA, no STLS; implicit TLS is a socat ``OPENSSL``
listener in front of it. While any message in the Maildir lacks a final line break
it refuses the login itself (``-ERR message is damaged`` to PASS), so the whole
mailbox is unreadable: 26 of the corpus, listed in :data:`REFUSED_CORPUS`.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from .base import MAIL_UID, LabServer
from .mailboxes import write_maildir
from .packages import staged
from .socat import socat_inetd, socat_tls_front

__all__ = ["REFUSED_CORPUS", "SolidPop3d"]

#: Corpus files that make solid-pop3d refuse the login ("message is damaged": no
#: final line break; measured, as the lab's solid-damaged.txt).
REFUSED_CORPUS: frozenset[str] = frozenset(
    {
        "8bit-headers__mikel__encoding_madness.eml",
        "8bit-headers__mikel__trademark_character_in_subject.eml",
        "8bit-headers__rspamd__newsletter.eml",
        "attachment__mikel__attachment_only_email.eml",
        "attachment__mikel__attachment_with_quoted_filename.eml",
        "attachment__rspamd__fname.eml",
        "bounce__mimekit__bounce.eml",
        "broken-headers__enmime__erroneous.eml",
        "broken-headers__mikel__new_line_in_to_header.eml",
        "broken-mime__cpython__msg_47.eml",
        "broken-mime__enmime__extra-base64-character.eml",
        "broken-mime__rspamd__badboundary.eml",
        "calendar__james__calendar.eml",
        "calendar__rspamd__ics.eml",
        "charset__mimekit__issue1130.eml",
        "charset__rspamd__arcallow.eml",
        "encoded-headers__mikel__raw_email_encoded_stack_level_too_deep.eml",
        "japanese__mikel__japanese.eml",
        "japanese__mikel__japanese_attachment.eml",
        "japanese__mikel__japanese_attachment_long_name.eml",
        "line-endings__sisimai__mac_lhost-postfix-01.eml",
        "long-lines__flanker__long-header.eml",
        "long-lines__mime4j__basic-plain-very-long-lines.eml",
        "long-lines__mime4j__very-long-boundary.eml",
        "long-lines__mime4j__very-very-long-boundary.eml",
        "not-rfc822__spamscope__mail_outlook_1.eml",
    }
)


class SolidPop3d(LabServer):
    """solid-pop3d on 127.0.0.1: ``pop3_port`` plaintext, ``pop3s_port`` TLS via socat."""

    name = "solid"
    title = "solid-pop3d 0.15"
    packages = ("solid-pop3d",)
    apt_packages = ("socat", "liblockfile1", "util-linux")
    session_process = "solid-pop3d"
    session_ends_with_connection = True
    auth_methods = ("user", "apop")
    implicit_tls = True
    capa = False

    @property
    def maildir(self) -> str:
        """The user's Maildir."""
        return str(self.home / "Maildir")

    def _configure(self) -> list[str]:
        self.sandbox.add_user("spop3d", MAIL_UID + 1)
        conf = self.base_dir / "spop3d.conf"
        conf.write_text(
            "<Global>\n"
            f'\tMailDropName\t"{self.maildir}"\n'
            "\tMailDropType\tmaildir\n"
            "\tLogStatistics\tno\n"
            "\tAddBulletins\tno\n"
            "\tAllowAPOP\tyes\n"
            "</Global>\n"
        )
        conf.chmod(0o644)
        write_maildir(self.home / "Maildir", [], uid=MAIL_UID, gid=MAIL_UID)
        binary = staged("solid-pop3d") / "usr/sbin/solid-pop3d"
        front = socat_tls_front(self, f"TCP:{self.host}:{self.pop3_port}")
        plain = shlex.join(socat_inetd(self, f"{binary} -f {conf}"))
        return ["sh", "-c", f"{front} & exec {plain}"]

    def _after_start(self) -> None:
        # pop_auth (run as the user, who exists only in the sandbox) writes ~/.spop3d.
        secret = self.user.apop_secret or ""
        pop_auth = staged("solid-pop3d") / "usr/bin/pop_auth"
        subprocess.run(
            self.sandbox.command(
                [
                    "setpriv",
                    f"--reuid={MAIL_UID}",
                    f"--regid={MAIL_UID}",
                    "--clear-groups",
                    "env",
                    f"HOME={self.home}",
                    str(pop_auth),
                ]
            ),
            input=f"{secret}\n{secret}\n",
            text=True,
            capture_output=True,
            check=True,
        )

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        write_maildir(self.home / "Maildir", messages, uid=MAIL_UID, gid=MAIL_UID)
        return []
