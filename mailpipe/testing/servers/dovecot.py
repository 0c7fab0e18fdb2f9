"""Dovecot 2.3 as the sixth interop server: :class:`~mailpipe.testing.Dovecot` seen
through the :class:`~.base.LabServer` interface, with every mechanism and APOP on."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from mailpipe.testing.dovecot import (
    DEFAULT_MECHANISMS,
    Dovecot,
    DovecotUser,
    dovecot_unavailable_reason,
)

from .base import EVERY_PASSWORD_AUTH, LabServer, LabServerError, LabUser

__all__ = ["DovecotLab"]


class DovecotLab(LabServer):
    """A private Dovecot with user ``mptest``; APOP secret = password."""

    name = "dovecot"
    title = "Dovecot 2.3.19 pop3"
    auth_methods = EVERY_PASSWORD_AUTH
    starttls = True
    implicit_tls = True
    session_process = "/pop3 "  # the title is dovecot-<instance>/pop3

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(base_dir)
        self.user = LabUser("mptest", "Secr3t-pw", apop_secret="Secr3t-pw")
        self.dovecot = Dovecot(
            self.base_dir, auth_mechanisms=(*DEFAULT_MECHANISMS, "apop")
        )
        self._user: DovecotUser | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why Dovecot cannot run here, or None."""
        return dovecot_unavailable_reason()

    @property
    def ca_file(self) -> Path:
        """The Dovecot test CA."""
        return self.dovecot.ca_file

    @property
    def running(self) -> bool:
        """True while Dovecot's master runs."""
        return self.dovecot.running

    def start(self) -> None:
        """Start Dovecot and create the user."""
        reason = self.unavailable_reason()
        if reason:
            raise LabServerError(reason)
        self.base_dir.chmod(0o755)
        self.dovecot.start()
        self.pop3_port, self.pop3s_port = (
            self.dovecot.pop3_port,
            self.dovecot.pop3s_port,
        )
        if self._user is None:
            self._user = self.dovecot.add_user(self.user.name, self.user.password)

    def stop(self) -> None:
        """Stop Dovecot."""
        self.dovecot.stop()

    def log_text(self) -> str:
        """Dovecot's logs."""
        return self.dovecot.log_text()

    @property
    def pid(self) -> int | None:
        """PID of Dovecot's master."""
        return self.dovecot.pid

    def _write_messages(self, messages: Sequence[bytes]) -> list[int]:
        assert self._user is not None
        for raw in messages:
            self.dovecot.deliver(self._user, raw)
        return []

    def remove(self) -> None:
        """Delete the base directory (after :meth:`stop`)."""
        shutil.rmtree(self.base_dir, ignore_errors=True)
