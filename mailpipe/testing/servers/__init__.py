"""The interop lab: Dovecot and five more real POP3 servers (Debian 12) for tests.

Each module starts one implementation on 127.0.0.1 on free ports, in a private
sandbox, with one user and TLS certificates made at start:

========== ============================ ==========================================
name       class                        mail store
========== ============================ ==========================================
dovecot    :class:`.dovecot.DovecotLab` Maildir (:class:`~mailpipe.testing.Dovecot`)
courier    :class:`.courier.Courier`    Maildir, authlib userdb (CRAM-*)
cyrus      :class:`.cyrus.Cyrus`        Cyrus spool via its LMTP, sasldb (SCRAM-*)
cyrus-imap :class:`.cyrus_imap.CyrusImap` the same Cyrus serving IMAP (imapd)
gnu        :class:`.gnu.GnuPop3d`       mbox, APOP database
solid      :class:`.solid.SolidPop3d`   Maildir, APOP via ~/.spop3d
popa3d     :class:`.popa3d.Popa3d`      mbox in a private /var/mail
========== ============================ ==========================================

The packages that Conflict with dovecot-pop3d are unpacked, never installed
(:mod:`.packages`; ``python -m mailpipe.testing.servers prepare``).
"""

from __future__ import annotations

from .base import LabServer, LabServerError, LabUser

__all__ = ["SERVERS", "LabServer", "LabServerError", "LabUser", "server_class"]

#: Lab server name -> "module:Class", imported on first use.
SERVERS: dict[str, str] = {
    "dovecot": "dovecot:DovecotLab",
    "courier": "courier:Courier",
    "cyrus": "cyrus:Cyrus",
    "cyrus-imap": "cyrus_imap:CyrusImap",
    "gnu": "gnu:GnuPop3d",
    "solid": "solid:SolidPop3d",
    "popa3d": "popa3d:Popa3d",
}


def server_class(name: str) -> type[LabServer]:
    """The :class:`LabServer` subclass called ``name`` (a key of :data:`SERVERS`)."""
    import importlib

    module, cls = SERVERS[name].split(":")
    found: type[LabServer] = getattr(
        importlib.import_module(f"{__name__}.{module}"), cls
    )
    return found
